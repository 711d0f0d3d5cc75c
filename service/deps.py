"""FastAPI dependencies: the app's state (settings, model registry) and the served model.

Routes declare what they need as typed parameters (`registry: RegistryDep`, `model: ServedModel`)
instead of reaching into `request.app.state` or resolving a model name by hand. The registry on
`app.state` stays the only mutable state; these functions only read it. All are `async def`:
they never block, and FastAPI runs a sync dependency in its threadpool (a thread hop each).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request

from service.registry import LoadedModel, ModelNotReady, ModelRegistry, UnknownModel
from service.settings import Settings

ModelName = Annotated[str, Path(description="A served model name (see GET /v1/models).", examples=["rossmann"])]


async def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


async def get_registry(request: Request) -> ModelRegistry:
    """The app's model registry (the one piece of mutable state)."""
    return request.app.state.registry


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]


def resolve_model(request: Request, name: str, kind: str | None = None) -> LoadedModel:
    """The loaded model for `name` (404 unknown, 503 not loaded, 404 wrong kind), labelled on
    the request state for logs and metrics. Used by the dependencies below and by /invocations,
    whose model comes from a query parameter or header chosen after the body is read."""
    registry: ModelRegistry = request.app.state.registry
    try:
        model = registry.get(name)
    except UnknownModel:
        raise HTTPException(404, f"unknown model {name!r}; served: {sorted(registry.specs)}") from None
    except ModelNotReady:
        request.state.model = name
        raise HTTPException(503, f"model {name!r} is not loaded", headers={"Retry-After": "5"}) from None
    request.state.model = name
    if kind is not None and model.kind != kind:
        raise HTTPException(404, f"model {name!r} is a {model.kind} model; this endpoint needs a {kind} model")
    return model


def _served(kind: str | None) -> Callable[[Request, str], Awaitable[LoadedModel]]:
    async def served_model(request: Request, name: ModelName) -> LoadedModel:
        return resolve_model(request, name, kind)

    return served_model


async def served_version(request: Request, name: ModelName, version: str) -> LoadedModel:
    """The model serving `name`, which must be `version` (404 otherwise): Open Inference
    Protocol's /versions/{version} routes answer only for the version being served."""
    model = resolve_model(request, name)
    if version != str(model.version):
        raise HTTPException(404, f"model {name!r} serves version {model.version}, not {version}")
    return model


ServedModel = Annotated[LoadedModel, Depends(_served(None))]
"""The model named by the `{name}` path parameter."""
RatingsModel = Annotated[LoadedModel, Depends(_served("ratings"))]
"""Like ServedModel, and 404 unless it is a ratings model (recommendations, similar items)."""
ServedVersion = Annotated[LoadedModel, Depends(served_version)]
"""The model named by `{name}`, checked against the `{version}` path parameter."""
