"""Client errors in one shape: `{"detail": ...}` (plus a plain "error" string on /v2).

Pydantic validation errors become an itemised 422 (`[{"record", "field", "msg"}]`, the record
index taken from the location inside a records container); malformed JSON is a 400; input
errors raised while scoring (RecordsError, InputError, DataError) are 422s in the same shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from modeling.errors import DataError
from modeling.schema import RecordsError
from service.schemas import ErrorItem, ErrorResponse, InputError

ERROR_TEXTS = {
    400: "malformed JSON body, Content-Length or binary tensor header",
    401: "API key missing", 403: "API key wrong", 404: "unknown model or item",
    408: "request body not received in time (TABREC_BODY_TIMEOUT)",
    413: "too many records or body too large",
    415: "unsupported Content-Type or Content-Encoding (send application/json)",
    422: "invalid input", 503: "model not loaded yet",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, all in the ErrorResponse shape."""
    return {code: {"model": ErrorResponse, "description": ERROR_TEXTS[code]} for code in codes}


ERRORS = error_responses(400, 401, 403, 404, 408, 413, 415, 422, 503)
"""The documented error responses of the model routes (OpenAPI `responses`)."""
ADMIN_ERRORS = error_responses(401, 403) | {
    401: {"model": ErrorResponse, "description": "admin token missing"},
    403: {"model": ErrorResponse, "description": "admin token wrong, or reload disabled (API keys set, no admin token)"},
}
RECORD_CONTAINERS = {"records", "dataframe_records", "instances", "inputs", "data"}
BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 detail


def error_body(path: str, detail: Any) -> dict[str, Any]:
    """{"detail": ...}; Open Inference Protocol clients also expect a plain "error" string."""
    body: dict[str, Any] = {"detail": detail}
    if path.startswith("/v2"):
        body["error"] = detail if isinstance(detail, str) else "; ".join(
            f"{d.get('field') or ''}: {d['msg']}".lstrip(": ") for d in detail)
    return body


def items_json(items: list[ErrorItem]) -> list[dict[str, Any]]:
    return [i.model_dump() for i in items]


def validation_items(errors: list[Mapping[str, Any]], path: str) -> tuple[int, list[dict[str, Any]]]:
    """Pydantic errors -> (status, [{record, field, msg}]); malformed JSON is a 400."""
    status, items = 422, []
    for e in errors:
        if e.get("type") == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", "")
            status = 400
            items.append({"record": None, "field": "body", "msg": f"malformed JSON: {reason}".rstrip(": ")})
            continue
        loc = list(e.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        record = None
        if not path.startswith("/v2") and len(loc) >= 2 and loc[0] in RECORD_CONTAINERS:
            idx = next((j for j, p in enumerate(loc) if isinstance(p, int)), None)
            if idx is not None:
                record, loc = int(loc[idx]), loc[idx + 1:]
        field = ".".join(str(p) for p in loc) or None
        items.append({"record": record, "field": field, "msg": str(e.get("msg", "invalid"))})
    return status, items


def install_error_handlers(app: FastAPI) -> None:
    """Every client error has the {"detail": ...} shape; 422 details are itemised per record."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, items = validation_items(exc.errors(), request.url.path)
        return JSONResponse(error_body(request.url.path, items), status_code=status)

    @app.exception_handler(RecordsError)
    async def on_records(request: Request, exc: RecordsError) -> JSONResponse:
        items = [ErrorItem(record=e.record if e.record >= 0 else None, field=e.field, msg=e.msg)
                 for e in exc.errors]
        return JSONResponse(error_body(request.url.path, items_json(items)), status_code=422)

    @app.exception_handler(InputError)
    async def on_input(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, items_json(exc.items)), status_code=422)

    @app.exception_handler(DataError)
    async def on_data(request: Request, exc: DataError) -> JSONResponse:
        items = [{"record": None, "field": None, "msg": str(exc)}]
        return JSONResponse(error_body(request.url.path, items), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 400 and detail == BODY_PARSE_ERROR:  # FastAPI's own: e.g. not UTF-8
            detail = [{"record": None, "field": "body", "msg": "malformed JSON: the body could not be decoded"}]
        return JSONResponse(error_body(request.url.path, detail), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))
