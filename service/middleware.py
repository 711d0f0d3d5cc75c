"""The request body as pure ASGI middleware, read once before routing:

- a body over TABREC_MAX_BODY_BYTES is refused (413) before any of it is parsed, whether its
  Content-Length says so or the bytes run over; a malformed Content-Length is a 400;
- a body that does not arrive within TABREC_BODY_TIMEOUT seconds is a 408 (a slow or stalled
  client cannot hold a worker); a client that goes away mid-body gets no answer and is counted
  as 499 (client closed request), not as a server error;
- the body's media type is settled here, so routes only ever see JSON: a body without a
  Content-Type is read as JSON (stock clients such as tritonclient send none), a JSON type passes,
  Open Inference Protocol binary tensor data (Triton's binary extension, announced by the
  `Inference-Header-Content-Length` header on /v2) is split into its JSON header, which the route
  parses, and the raw tensor bytes, left on the request state (`tensor_bytes`); any other
  Content-Type is a 415 that names the accepted ones.

(The per-request observability middleware lives with the metrics and logs it records, in
service/metrics.py.)
"""

from __future__ import annotations

import email.message

import anyio
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body

JSON_TYPES = ("application/json", "application/*+json")
BINARY_HEADER = b"inference-header-content-length"
BINARY_TYPES = ("application/octet-stream", *JSON_TYPES)
DISCONNECTED = 499  # nginx's "client closed request": the status recorded for a client that left


class BodyMiddleware:
    """Reads POST/PUT/PATCH bodies within a size and time limit and normalises their media type."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await reject(scope, send, 400, "invalid Content-Length header")
                return
            if int(declared) > self.max_bytes:
                await reject(scope, send, 413, self._too_large())
                return
        body = await self._read(scope, receive, send)
        if body is None:
            return
        outcome = settle_media_type(scope, headers, body)
        if isinstance(outcome, tuple):
            await reject(scope, send, *outcome)
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": outcome, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering (413, 408) or when the client went away."""
        chunks: list[bytes] = []
        total = 0
        with anyio.move_on_after(self.timeout) as deadline:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    scope.setdefault("state", {})["disconnected"] = True
                    return None
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > self.max_bytes:
                    await reject(scope, send, 413, self._too_large())
                    return None
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        if deadline.cancelled_caught:
            await reject(scope, send, 408, f"request body not received within {self.timeout:g} s "
                                            "(TABREC_BODY_TIMEOUT)")
        return None

    def _too_large(self) -> str:
        return f"request body larger than {self.max_bytes} bytes (TABREC_MAX_BODY_BYTES)"


def settle_media_type(scope: Scope, headers: dict[bytes, bytes], body: bytes) -> bytes | tuple[int, str]:
    """The body the app should parse as JSON (headers fixed up in `scope`), or (status, detail)."""
    if not body:
        return body
    encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
    if encoding not in ("", "identity"):
        return 415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed"
    raw_type = headers.get(b"content-type", b"").decode("latin-1").strip()
    media = media_type(raw_type)
    split = headers.get(BINARY_HEADER)
    if split is not None and scope.get("path", "").startswith("/v2/"):
        if media and media not in ("application/octet-stream", "application/json") and not media.endswith("+json"):
            return 415, (f"Content-Type {raw_type!r} is not accepted with binary tensor data; send "
                         f"{' or '.join(BINARY_TYPES[:2])} (or none)")
        text = split.decode("latin-1").strip()
        if not text.isdigit() or int(text) > len(body):
            return 400, (f"Inference-Header-Content-Length {text!r} must be the length of the JSON "
                         f"header, at most the body's {len(body)} bytes")
        size = int(text)
        scope.setdefault("state", {})["tensor_bytes"] = memoryview(body)[size:]
        body = body[:size]
        _set_headers(scope, body)
        return body
    if not media:
        _set_headers(scope, body)
        return body
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return body
    accepted = " or ".join(JSON_TYPES)
    extra = "; /v2 inference also takes binary tensor data (application/octet-stream)" if scope.get(
        "path", "").startswith("/v2/") else ""
    return 415, f"Content-Type {raw_type!r} is not accepted; send {accepted}{extra}"


def media_type(value: str) -> str:
    """'application/json; charset=utf-8' -> 'application/json' ('' when absent)."""
    if not value:
        return ""
    message = email.message.Message()
    message["content-type"] = value
    return message.get_content_type().lower()


def _set_headers(scope: Scope, body: bytes) -> None:
    """Declare the (possibly shortened) body as JSON for the routes' parser."""
    kept = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
    scope["headers"] = [*kept, (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]


async def reject(scope: Scope, send: Send, status: int, detail: str) -> None:
    """Answer before the app runs; the connection closes (the rest of the body is never read)."""
    response = JSONResponse(error_body(scope.get("path", ""), detail), status_code=status,
                            headers={"Connection": "close"})
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
