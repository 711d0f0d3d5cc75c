"""Screenshots of the MLflow UI for docs/analysts.md (not part of `make test`).

Starts `mlflow server` on loopback over a tabrec store (the demo store of `make run` by default,
trained into a temporary directory when no --store is given), opens the pages an analyst reads
in headless Chromium (Debian's package: `apt-get install -y chromium`), and saves small PNGs:

    experiments.png        the experiment list
    experiment_runs.png    the rossmann experiment in the model-training view (runs table)
    run_overview.png       a training run: description, datasets, metrics, params
    run_dataset.png        the run's training dataset opened (source, digest, profile, schema)
    run_metrics.png        the run's model metrics charts (epoch/ history, final figures)
    run_artifacts.png      the run's artifacts with the partial-dependence plot open
    run_error_breakdown.png  the same with the error breakdown open
    model_version.png      the champion's model version page with its description
    model_version_refused.png  a ratings version that was not promoted (when the store has one:
                           e.g. a second `tabrec train ratings ... --register ratings` that is worse)

Chromium is driven over the DevTools protocol on a pipe, to set the UI's preferences first
(model-training view, no assistant panel) and click "Show more" on the run description.

    .venv/bin/python benchmarks/ui_screenshots.py [--store DIR] [--out docs/img]

Prints one JSON line: the files, their sizes, and the seconds it took.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-pipe"]
MAX_BYTES = 300_000
# The UI's own preferences (localStorage, `<key>_v<version>` = JSON): open in the model-training
# view, and keep the assistant panel from opening itself over a third of the page.
UI_PREFERENCES = {"mlflow.workflowType_v1": "machine_learning", "mlflow.assistant.panelOpen_v1": False,
                  "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True}
# Plotly's mode bar (zoom, pan, ...) shows over the top of every metric chart in a still picture.
HIDE_HOVER_TOOLS = ("(() => { const s = document.createElement('style'); "
                    "s.textContent = '.modebar-container, .modebar { display: none !important; }'; "
                    "document.head.appendChild(s); return true; })()")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_store(root: Path) -> Path:
    """`make run`'s demo (both models trained and registered) into `root`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "pipelines.demo", "--out", str(root / "demo")], cwd=root, env=env,
                   check=True, stdout=sys.stderr)
    return root


def start_server(store: Path, port: int) -> subprocess.Popen:
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # importing the server takes a minute on a busy 2-core machine
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("mlflow server did not answer /health within 300 s")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
    JSON messages ending in NUL on fds 3 and 4), so no websocket library is needed."""

    def __init__(self, chromium: str, profile: str) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        cmd = ["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', chromium, *CHROMIUM_FLAGS,
               f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(cmd, pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.call(f"{domain}.enable", session=True)

    def call(self, method: str, session: bool = False, timeout: float = 60, **params: Any) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            ready, _, _ = select.select([self._from_chrome], [], [], 1.0)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
        raise TimeoutError(f"{method}: no answer in {timeout} s")

    def js(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                        awaitPromise=True)
        return res.get("result", {}).get("value")

    def goto(self, url: str, size: tuple[int, int]) -> None:
        """A fresh document for every page: the UI reads its preferences and the route only when
        it loads (a hash change alone would keep the previous page's state)."""
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=size[0], height=size[1],
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", session=True, url="about:blank")
        self.call("Page.navigate", session=True, url=url)

    def wait_for_text(self, text: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.js(f"document.body && document.body.innerText.includes({json.dumps(text)})"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"page never showed {text!r}")

    def wait_for_js(self, condition: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.js(condition):
                return
            time.sleep(0.5)
        raise TimeoutError(f"page never met {condition!r}")

    def click_text(self, text: str) -> bool:
        """Click the innermost visible element whose own text is `text` (a button, a tree node)."""
        return bool(self.js(f"""(() => {{
            const all = [...document.querySelectorAll('button, a, span, div')]
              .filter(e => e.offsetParent !== null && e.innerText && e.innerText.trim() === {json.dumps(text)});
            if (!all.length) return false;
            all[all.length - 1].click();
            return true;
        }})()"""))

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        shrink(path)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def shrink(path: Path) -> None:
    """A UI screenshot has few colours: a 256-colour palette keeps it sharp and small."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


@dataclass
class Shot:
    route: str  # the UI route after the origin, e.g. "#/experiments"
    size: tuple[int, int]  # window width, height
    wait_for: str  # text the page shows once it has loaded
    clicks: tuple[str, ...] = ()  # texts to click before the picture (e.g. "Show more")
    charts: int = 0  # Plotly charts that must have drawn (the metric charts load one by one)


def pages(store: Path) -> dict[str, Shot]:
    """File name -> what to open, for the demo's Rossmann champion run and its model version."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rossmann")
    if exp is None:
        raise SystemExit(f"{store}: no 'rossmann' experiment (run `make run` or omit --store)")
    champion = client.get_model_version_by_alias("rossmann", "champion")
    run_id, e = champion.run_id, exp.experiment_id
    info = client.get_run(run_id)
    run_name = info.info.run_name
    train = next(d.dataset for d in info.inputs.dataset_inputs
                 if any(t.key == "mlflow.data.context" and t.value == "training" for t in d.tags))
    run = f"#/experiments/{e}/runs/{run_id}"
    return {
        "experiments.png": Shot("#/experiments", (1400, 560), "rossmann"),
        "experiment_runs.png": Shot(f"#/experiments/{e}/runs", (1600, 420), run_name),
        "run_overview.png": Shot(run, (1400, 1500), "Description", ("Show more",)),
        "run_dataset.png": Shot(run, (1400, 1000), "Description", (f"{train.name} ({train.digest})",)),
        "run_metrics.png": Shot(f"{run}/model-metrics", (1400, 1200), "epoch", charts=5),
        "run_artifacts.png": Shot(f"{run}/artifacts/plots/partial_dependence.png", (1600, 1420),
                                  "partial_dependence.png"),
        "run_error_breakdown.png": Shot(f"{run}/artifacts/plots/error_breakdown.png", (1600, 860),
                                        "error_breakdown.png"),
        "model_version.png": Shot(f"#/models/rossmann/versions/{champion.version}", (1400, 900), "Promoted"),
        **refused_version(client),
    }


def refused_version(client: Any) -> dict[str, Shot]:
    """The newest ratings version that did not take the alias, if the store has one."""
    try:
        versions = client.search_model_versions("name = 'ratings'")
    except Exception:  # noqa: BLE001 - no ratings model: nothing to show
        return {}
    refused = [v for v in versions if (v.tags or {}).get("tabrec.promoted") == "false"]
    if not refused:
        return {}
    v = max(refused, key=lambda v: int(v.version))
    return {"model_version_refused.png": Shot(f"#/models/ratings/versions/{v.version}", (1400, 800),
                                              "Not promoted")}


def take(browser: Browser, origin: str, shots: dict[str, Shot], out: Path, settle_s: float) -> None:
    browser.goto(f"{origin}/#/experiments", (1200, 800))  # set the UI's preferences on its origin
    browser.wait_for_text("Experiments")
    for key, value in UI_PREFERENCES.items():
        browser.js(f"localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(value))})")
    for name, shot in shots.items():
        browser.goto(f"{origin}/{shot.route}", shot.size)
        browser.wait_for_text(shot.wait_for)
        if shot.charts:
            browser.wait_for_js(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {shot.charts}")
        time.sleep(settle_s)  # charts and images finish drawing
        browser.js(HIDE_HOVER_TOOLS)
        for text in shot.clicks:
            browser.click_text(text)
            time.sleep(1.0)
        browser.screenshot(out / name)
        print(f"{name}: {(out / name).stat().st_size / 1e3:.0f} kB", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="directory holding mlflow.db and mlartifacts (default: a fresh "
                                                    "demo store in a temporary directory)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--settle", type=float, default=4.0, help="seconds a page draws after it has loaded")
    parser.add_argument("--only", nargs="*", help="file names to (re)take")
    args = parser.parse_args(argv)
    if not args.chromium:
        raise SystemExit("chromium not found: apt-get install -y chromium (or pass --chromium PATH)")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tabrec-ui-") as tmp:
        store = args.store.resolve() if args.store else demo_store(Path(tmp))
        shots = pages(store)
        if args.only:
            shots = {k: v for k, v in shots.items() if k in args.only}
        args.out.mkdir(parents=True, exist_ok=True)
        port = free_port()
        server = start_server(store, port)
        browser = None
        try:
            browser = Browser(args.chromium, str(Path(tmp) / "chromium-profile"))
            take(browser, f"http://127.0.0.1:{port}", shots, args.out, args.settle)
        finally:
            if browser is not None:
                browser.close()
            server.terminate()
            server.wait(timeout=30)
    sizes = {name: (args.out / name).stat().st_size for name in shots}
    print(json.dumps({"out": str(args.out), "files": sizes, "all_under_limit": all(b < MAX_BYTES for b in
                                                                                    sizes.values()),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
