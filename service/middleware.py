"""Request-body limit as pure ASGI middleware: a body over TABREC_MAX_BODY_BYTES is refused
before any of it is parsed, whether its Content-Length says so or the bytes run over.

(The per-request observability middleware lives with the metrics and logs it records, in
service/metrics.py.)
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body


class BodyLimitMiddleware:
    """413 when Content-Length or the bytes actually received exceed the limit; 400 on a bad length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            if not declared.strip().isdigit():
                await self._reject(scope, send, 400, "invalid Content-Length header")
                return
            if int(declared) > self.max_bytes:
                await self._reject(scope, send, 413, self._too_large())
                return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._reject(scope, send, 413, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"request body larger than {self.max_bytes} bytes (TABREC_MAX_BODY_BYTES)"

    async def _reject(self, scope: Scope, send: Send, status: int, detail: str) -> None:
        response = JSONResponse(error_body(scope.get("path", ""), detail), status_code=status,
                                headers={"Connection": "close"})
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
