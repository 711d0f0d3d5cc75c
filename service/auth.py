"""API-key and admin-token checks as FastAPI dependencies (constant-time, keys never logged).

The dependencies are `async def`: they never block, and FastAPI would otherwise run each
sync dependency in its threadpool (a thread hop per dependency per request)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi import HTTPException, Security
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


def _presented(*values: str | None) -> list[str]:
    return [v for v in values if v]


async def require_api_key(
    settings: SettingsDep,
    bearer: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
    api_key: str | None = Security(api_key_scheme),
) -> None:
    """401 when keys are configured and none was sent; 403 when any credential sent is wrong
    (a valid X-API-Key does not excuse a wrong Authorization: Bearer, nor the reverse)."""
    if not settings.api_keys:
        return
    sent = _presented(api_key, bearer.credentials if bearer else None)
    if not sent:
        raise HTTPException(401, "missing API key (Authorization: Bearer <key> or X-API-Key)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not all([matches(s, settings.api_keys) for s in sent]):  # a list: every one is compared
        raise HTTPException(403, "invalid API key")


async def require_admin(
    settings: SettingsDep,
    bearer: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
    token: str | None = Security(admin_scheme),
) -> None:
    """Admin token for reload; with no token and no API keys (local open mode) reload is open."""
    if settings.admin_token is None:
        if settings.api_keys:
            raise HTTPException(403, "admin endpoints are disabled: set TABREC_ADMIN_TOKEN")
        return
    sent = _presented(token, bearer.credentials if bearer else None)
    if not sent:
        raise HTTPException(401, "missing admin token (X-Admin-Token or Authorization: Bearer)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not all([matches(s, [settings.admin_token]) for s in sent]):  # every credential sent must be right
        raise HTTPException(403, "invalid admin token")
