"""Admin: reload every model (needs the admin token when one is configured)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from service.auth import require_admin
from service.deps import RegistryDep
from service.errors import ADMIN_ERRORS
from service.schemas import ReloadResponse

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses=ADMIN_ERRORS)


@router.post("/reload", response_model=ReloadResponse,
             summary="Re-resolve every model URI/alias; load changes off to the side; swap atomically")
def reload(registry: RegistryDep,
           force: Annotated[bool, Query(description="reload even unchanged versions")] = False) -> ReloadResponse:
    report = registry.refresh(force=force)
    return ReloadResponse(ok=report.ok, ready=registry.ready, models=[vars(e) for e in report.entries])
