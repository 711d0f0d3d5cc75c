"""API-key and admin-token checks as FastAPI dependencies (constant-time, keys never logged).

The dependencies are `async def`: they never block, and FastAPI would otherwise run each
sync dependency in its threadpool (a thread hop per dependency per request)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.deps import SettingsDep

bearer_scheme = HTTPBearer(auto_error=False, description="API key as `Authorization: Bearer <key>`.")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key header.")
admin_scheme = APIKeyHeader(name="X-Admin-Token", auto_error=False,
                            description="Admin token (or `Authorization: Bearer <token>`).")


def matches(presented: str, secrets: Sequence[SecretStr]) -> bool:
    """Compare against every secret in constant time per secret, with no early exit."""
    candidate = presented.encode("utf-8", "surrogateescape")
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(candidate, secret.get_secret_value().encode("utf-8"))
    return found


def presented(request: Request, header: str) -> list[str | None]:
    """Every credential the request carries: the named header and `Authorization`, each when
    present at all. One that is empty, or an Authorization that is not `Bearer <token>`, is a
    credential that cannot match (None): it fails instead of being skipped."""
    sent: list[str | None] = []
    if header in request.headers:
        sent.append(request.headers[header].strip() or None)
    if "authorization" in request.headers:
        scheme, _, token = request.headers["authorization"].strip().partition(" ")
        sent.append(token.strip() or None if scheme.lower() == "bearer" else None)
    return sent


def all_match(sent: list[str | None], secrets: Sequence[SecretStr]) -> bool:
    """Every credential sent is one of the secrets (each compared; no early exit)."""
    results = [s is not None and matches(s, secrets) for s in sent]
    return all(results)


async def require_api_key(
    request: Request,
    settings: SettingsDep,
    bearer: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
    api_key: str | None = Security(api_key_scheme),
) -> None:
    """401 when keys are configured and none was sent; 403 when any credential sent is wrong
    (a valid X-API-Key does not excuse a wrong Authorization, nor the reverse). The declared
    schemes document the headers (OpenAPI security); `presented` reads them as sent."""
    if not settings.api_keys:
        return
    sent = presented(request, "x-api-key")
    if not sent:
        raise HTTPException(401, "missing API key (Authorization: Bearer <key> or X-API-Key)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not all_match(sent, settings.api_keys):
        raise HTTPException(403, "invalid API key")


async def require_admin(
    request: Request,
    settings: SettingsDep,
    bearer: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
    token: str | None = Security(admin_scheme),
) -> None:
    """Admin token for reload; with no token and no API keys (local open mode) reload is open.
    As for API keys, every credential sent must be the admin token."""
    if settings.admin_token is None:
        if settings.api_keys:
            raise HTTPException(403, "admin endpoints are disabled: set TABREC_ADMIN_TOKEN")
        return
    sent = presented(request, "x-admin-token")
    if not sent:
        raise HTTPException(401, "missing admin token (X-Admin-Token or Authorization: Bearer)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not all_match(sent, [settings.admin_token]):
        raise HTTPException(403, "invalid admin token")
