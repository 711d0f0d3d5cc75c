"""HTTP serving load: `tabrec serve` against `mlflow models serve` on the same registered models.

Usage: python benchmarks/serve_load.py [--duration 10] [--warmup 2] [--concurrency 1,4]
                                      [--batch 1,10,100] [--inprocess-repeat 300]
                                      [--tracking-uri URI --rossmann NAME --ratings NAME]
                                      [--layers 500,250] [--keep DIR]

Without --tracking-uri, small synthetic Rossmann and ratings models are trained first (the
pipelines' own `pipelines.synth` + `pipelines.jobs` (`train_rossmann` / `train_ratings`), the sizes the
test suite's session fixture uses; under a minute on a quiet machine) into a temporary MLflow sqlite store
and registered with alias `champion`. The Rossmann model is the default recipe (its ensemble,
hidden layers and snapshot schedule) on small data; `--layers 1000,500` trains the wider network
that every serve_load figure before the fifth session of 2026-12-02 was measured with (a pin kept
from before the default layers became 500,250; it made each request's second-layer products four
times the default model's). Then three servers start on free loopback ports, each
in its own process group:

- `tabrec serve` (one uvicorn worker) with both models: `POST /v1/models/<name>/predict`
  with `{"records": [...]}`;
- `mlflow models serve -m models:/<name>@champion --env-manager local` (one uvicorn worker),
  once per model: `POST /invocations` with `{"dataframe_split": ...}`. MLflow loads the same
  pyfunc (models-from-code wrapper around the same bundle), using the modeling code logged
  with the model.

Every server gets one torch thread (`OMP_NUM_THREADS=1`, `TABREC_TORCH_THREADS=1`). For each
case (model x records per request x concurrency) both servers are driven back to back by a
closed-loop client: `concurrency` keep-alive connections, each sending the next request as
soon as the previous answer arrives, for `warmup` + `duration` seconds (only the last
`duration` seconds count). The client is raw asyncio HTTP/1.1 in this process, so it shares
the machine's cores with the server under test. Before the load, one request of each case is
sent to both servers and their predictions compared.

Figures per case and server: requests/s, records/s, p50/p99 latency (ms), errors (non-200
answers or broken connections); `ratio` = tabrec requests/s / MLflow requests/s. The
1-minute load average is sampled at the start of every case: other jobs on the machine
disturb these figures. Prints one JSON line on stdout; progress goes to stderr. All server
processes are killed on exit (normal, error, Ctrl-C or SIGTERM).

`in_process` (before the servers start, one torch thread): the cost of predicting one raw
record in this process, frame path (`predict(records_frame([record]))`, what a request took
before the small-request path) against the small-request path (`predict_records([record])`),
median of 5 rounds of `--inprocess-repeat` calls each, for both models.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine_info import machine  # noqa: E402

ROSSMANN_COLUMNS = ["Store", "DayOfWeek", "Date", "Open", "Promo", "StateHoliday", "SchoolHoliday"]
STARTED: list[Server] = []


def log(msg: str) -> None:
    print(f"[serve_load] {msg}", file=sys.stderr, flush=True)



def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------- models and payloads
def train_models(root: Path, layers: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Small synthetic models, registered as `rossmann` and `ratings` (alias champion); the Rossmann
    network has the job's default hidden layers unless `layers` says otherwise."""
    from pipelines.jobs.ratings import RatingsConfig, train_ratings
    from pipelines.jobs.rossmann import RossmannConfig, train_rossmann
    from pipelines.synth import write_ratings, write_rossmann

    ross = write_rossmann(root / "rossmann", stores=12, days=300, seed=0)
    rat = write_ratings(root / "ratings", users=200, items=300, ratings=10_000, seed=0)
    log("training rossmann (2 epochs) ...")
    shape = {} if layers is None else {"layers": layers}
    train_rossmann(RossmannConfig(train=str(ross["train.csv"]), store=str(ross["store.csv"]), epochs=2, **shape,
                                  lr="3e-3", register="rossmann", force=True, quiet=True,
                                  forest_rows=5_000, forest_trees=10))
    log("training ratings (3 epochs) ...")
    train_ratings(RatingsConfig(ratings=str(rat["u.data"]), items=str(rat["movies.csv"]), epochs=3,
                                lr="1e-2", batch_size=256, register="ratings", force=True, quiet=True))
    return {"rossmann_test": ross["test.csv"], "ratings_data": rat["u.data"]}


def network_shape(tracking_uri: str, name: str) -> dict[str, Any]:
    """The served Rossmann bundle's hidden layers and ensemble size (what a request runs)."""
    import mlflow

    from modeling.predictors import load_predictor

    mlflow.set_tracking_uri(tracking_uri)
    nets = load_predictor(f"models:/{name}@champion").networks
    return {"layers": list(nets[0].layer_sizes), "members": len(nets)}


def rossmann_rows(test_csv: Path | None, n: int) -> list[dict[str, Any]]:
    if test_csv is None:
        from pipelines.synth import synth_rossmann

        test = synth_rossmann(stores=12, days=300, seed=0)[2]
    else:
        test = pd.read_csv(test_csv, dtype={"StateHoliday": str})
    test = test[ROSSMANN_COLUMNS].head(n)
    rows = json.loads(test.to_json(orient="records"))
    while len(rows) < n:
        rows += rows[: n - len(rows)]
    return rows


def ratings_rows(data: Path | None, n: int) -> list[dict[str, Any]]:
    if data is None:
        rng = np.random.default_rng(0)
        pairs = rng.integers(1, 200, size=(n, 2))
    else:
        pairs = pd.read_csv(data, sep="\t", header=None, usecols=[0, 1]).head(n).to_numpy()
    return [{"user": str(u), "item": str(i)} for u, i in pairs]


def split_body(rows: list[dict[str, Any]]) -> dict[str, Any]:
    columns = list(rows[0])
    return {"dataframe_split": {"columns": columns, "data": [[r[c] for c in columns] for r in rows]}}


# ---------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own process group (so uvicorn's children die with it)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], ready_path: str, log_dir: Path) -> None:
        self.name, self.cmd, self.env, self.ready_path = name, cmd, env, ready_path
        self.port = free_port()
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        log(f"starting {self.name} on port {self.port}: {' '.join(self.cmd)}")
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        STARTED.append(self)
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}{self.ready_path}"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        log(f"{self.name} ready")
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None and not _group_alive(proc.pid):
            return
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(proc.pid):
                break
        log(f"stopped {self.name}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_all() -> None:
    while STARTED:
        STARTED.pop().stop()


def server_env(tracking_uri: str) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)  # `mlflow models serve` execs `uvicorn` from PATH
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TABREC_TORCH_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "TQDM_DISABLE": "1"}


# ---------------------------------------------------------------- closed-loop client
def http_request(port: int, path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode() + payload


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(chunks)
            chunks.append(chunk[:-2])
    raise RuntimeError("response without Content-Length or chunked body")


async def one_request(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await read_response(reader)
    finally:
        writer.close()


async def drive(port: int, request: bytes, concurrency: int, warmup: float, duration: float) -> dict[str, Any]:
    """`concurrency` keep-alive connections in a closed loop; latencies after `warmup` count."""
    start = time.perf_counter()
    warm_until, deadline = start + warmup, start + warmup + duration
    latencies: list[float] = []
    errors = 0

    async def loop() -> None:
        nonlocal errors
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while time.perf_counter() < deadline:
            try:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", port)
                reader, writer = conn
                t0 = time.perf_counter()
                writer.write(request)
                status, _ = await read_response(reader)
                t1 = time.perf_counter()
                ok = status == 200
            except (OSError, asyncio.IncompleteReadError, ValueError, RuntimeError):
                t0 = t1 = time.perf_counter()
                ok = False
                if conn is not None:
                    conn[1].close()
                conn = None
                await asyncio.sleep(0.01)
            if t0 >= warm_until and t1 <= deadline:
                if ok:
                    latencies.append(t1 - t0)
                else:
                    errors += 1
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    lat = np.array(latencies) * 1000.0
    return {"requests": len(latencies), "rps": round(len(latencies) / duration, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "errors": errors}


# ---------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per case and server")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each measurement")
    p.add_argument("--concurrency", default="1,4", help="comma-separated closed-loop connection counts")
    p.add_argument("--batch", default="1,10,100", help="comma-separated records per request")
    p.add_argument("--inprocess-repeat", type=int, default=300,
                   help="calls per round of the in-process one-record timing (0: skip it)")
    p.add_argument("--tracking-uri", help="use models already registered in this MLflow store")
    p.add_argument("--rossmann", default="rossmann", help="registered Rossmann model name (alias champion)")
    p.add_argument("--ratings", default="ratings", help="registered ratings model name (alias champion)")
    p.add_argument("--layers", help="Rossmann hidden layers, e.g. 1000,500 (default: the training job's default)")
    p.add_argument("--keep", type=Path, help="work in this directory and keep it (store, data, server logs)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    atexit.register(stop_all)
    load_start = load_1m()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="tabrec-serve-load-")
    root = args.keep or Path(tmp.name)  # type: ignore[union-attr]
    root.mkdir(parents=True, exist_ok=True)
    try:
        if args.tracking_uri:
            tracking_uri, data = args.tracking_uri, {"rossmann_test": None, "ratings_data": None}
        else:
            tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
            os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
            os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            cwd = Path.cwd()
            os.chdir(root)  # artifacts under root/mlartifacts
            try:
                t0 = time.perf_counter()
                data = train_models(root, tuple(int(v) for v in args.layers.split(",")) if args.layers else None)
                log(f"trained both models in {time.perf_counter() - t0:.0f} s")
            finally:
                os.chdir(cwd)
        inproc = in_process(tracking_uri, args, data) if args.inprocess_repeat > 0 else None
        result = run(args, tracking_uri, data, root, concurrencies, batches)
        result["in_process_one_record_ms"] = inproc
        result["rossmann_network"] = network_shape(tracking_uri, args.rossmann)
    finally:
        stop_all()
        if tmp is not None:
            tmp.cleanup()
    result["load_avg_1m"] = {"start": load_start, "end": load_1m()}
    print(json.dumps(result))


def run(args: argparse.Namespace, tracking_uri: str, data: dict[str, Any], root: Path,
        concurrencies: list[int], batches: list[int]) -> dict[str, Any]:
    env = server_env(tracking_uri)
    names = {"rossmann": args.rossmann, "ratings": args.ratings}
    ours = Server("tabrec", [sys.executable, "-m", "pipelines.cli", "serve", "--host", "127.0.0.1",
                             "--port", "{port}", "--workers", "1",
                             *[a for kind, n in names.items() for a in ("--model", f"{kind}=models:/{n}@champion")]],
                  env, "/readyz", root)
    mlflow_servers = {kind: Server(f"mlflow-{kind}", [sys.executable, "-m", "mlflow", "models", "serve", "-m",
                                                      f"models:/{n}@champion", "--env-manager", "local",
                                                      "-h", "127.0.0.1", "-p", "{port}", "-w", "1"],
                                   env, "/ping", root)
                      for kind, n in names.items()}
    servers = [ours, *mlflow_servers.values()]
    for s in servers:
        s.start()
    for s in servers:
        s.wait_ready()

    rows = {"rossmann": rossmann_rows(data["rossmann_test"], max(batches)),
            "ratings": ratings_rows(data["ratings_data"], max(batches))}
    cases, ratios, agree = [], {}, {}
    for kind in ("rossmann", "ratings"):
        for n in batches:
            ours_req = http_request(ours.port, f"/v1/models/{kind}/predict", {"records": rows[kind][:n]})
            mlf = mlflow_servers[kind]
            mlf_req = http_request(mlf.port, "/invocations", split_body(rows[kind][:n]))
            agree[f"{kind}/{n}"] = check_agreement(ours.port, ours_req, mlf.port, mlf_req, n)
            for c in concurrencies:
                key = f"{kind}/records={n}/concurrency={c}"
                figures = {}
                for server, port, req in (("tabrec", ours.port, ours_req), ("mlflow", mlf.port, mlf_req)):
                    load = load_1m()
                    log(f"{key} {server} ...")
                    res = asyncio.run(drive(port, req, c, args.warmup, args.duration))
                    res.update(model=kind, records=n, concurrency=c, server=server, load_1m=load,
                               records_per_s=round(res["rps"] * n, 1))
                    log(f"  {res['rps']} req/s  p50 {res['p50_ms']} ms  p99 {res['p99_ms']} ms  "
                        f"errors {res['errors']}  (load {load})")
                    cases.append(res)
                    figures[server] = res["rps"]
                ratios[key] = round(figures["tabrec"] / figures["mlflow"], 2) if figures["mlflow"] else None
    return {"benchmark": "serve_load", "date": dt.date.today().isoformat(), "machine": machine(),
            "duration_s": args.duration, "warmup_s": args.warmup, "torch_threads_per_server": 1,
            "workers_per_server": 1, "predictions_agree": agree, "cases": cases,
            "ratio_tabrec_over_mlflow_rps": ratios}


def in_process(tracking_uri: str, args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """One-record predict in this process: frame path vs small-request path (ms per call)."""
    import torch

    from modeling.predictors import load_predictor
    from service.schemas import records_frame

    torch.set_num_threads(1)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    out: dict[str, Any] = {}
    rows = {"rossmann": rossmann_rows(data["rossmann_test"], 1)[0], "ratings": ratings_rows(data["ratings_data"], 1)[0]}
    for kind, name in (("rossmann", args.rossmann), ("ratings", args.ratings)):
        predictor = load_predictor(f"models:/{name}@champion")
        record = rows[kind]
        paths = {"frame": lambda p=predictor, r=record: p.predict(records_frame([r], keep=p.schema.names)),
                 "fast": lambda p=predictor, r=record: p.predict_records([r])}
        figures: dict[str, Any] = {}
        for path, call in paths.items():
            value = call()
            assert value is not None, f"{kind}: the small-request path did not take {record}"
            figures[f"{path}_value"] = float(value[0])
            for _ in range(50):
                call()
            rounds = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(args.inprocess_repeat):
                    call()
                rounds.append((time.perf_counter() - t0) / args.inprocess_repeat * 1000.0)
            figures[path] = round(float(np.median(rounds)), 4)
        figures["speedup"] = round(figures["frame"] / figures["fast"], 2)
        log(f"in-process one-record predict, {kind}: frame {figures['frame']} ms, fast {figures['fast']} ms")
        out[kind] = figures
    return out


def check_agreement(port_a: int, req_a: bytes, port_b: int, req_b: bytes, n: int) -> float | str:
    """Max abs difference between the two servers' predictions for one request (or the error)."""
    (sa, ba), (sb, bb) = asyncio.run(one_request(port_a, req_a)), asyncio.run(one_request(port_b, req_b))
    if sa != 200 or sb != 200:
        return f"status tabrec={sa} mlflow={sb}: {ba[:200]!r} {bb[:200]!r}"
    pa = np.array(json.loads(ba)["predictions"], dtype=float)
    pb = np.array(json.loads(bb)["predictions"], dtype=float).reshape(-1)
    if len(pa) != n or len(pb) != n:
        return f"lengths tabrec={len(pa)} mlflow={len(pb)} for {n} records"
    return float(np.max(np.abs(pa - pb))) if n else 0.0


if __name__ == "__main__":
    main()
