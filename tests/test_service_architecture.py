"""Architecture rules of the service package: what it imports, how big its modules are, and
that `create_app` wires exactly the routes (and auth guards) the HTTP contract documents."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import Settings, create_app
from service.auth import require_admin, require_api_key

SERVICE = Path(__file__).resolve().parents[1] / "service"
MODULES = sorted(SERVICE.rglob("*.py"))
MAX_LINES = 500

# (method, path, endpoint name) in matching order, captured from the app before the split of
# service/app.py into routers (plus the routes added since: per-model MLflow paths, the v2
# versioned readiness); the endpoint names are also the OpenAPI operation ids' stems.
ROUTES = [
    ("GET", "/openapi.json", "openapi"),
    ("HEAD", "/openapi.json", "openapi"),
    ("GET", "/docs", "swagger_ui_html"),
    ("HEAD", "/docs", "swagger_ui_html"),
    ("GET", "/docs/oauth2-redirect", "swagger_ui_redirect"),
    ("HEAD", "/docs/oauth2-redirect", "swagger_ui_redirect"),
    ("GET", "/redoc", "redoc_html"),
    ("HEAD", "/redoc", "redoc_html"),
    ("GET", "/healthz", "healthz"),
    ("GET", "/readyz", "readyz"),
    ("GET", "/ping", "ping"),
    ("GET", "/metrics", "metrics"),
    ("GET", "/v1/models", "list_models"),
    ("GET", "/v1/models/{name}", "get_model"),
    ("POST", "/v1/models/{name}/predict", "predict"),
    ("GET", "/v1/models/{name}/users/{user}/recommendations", "recommendations"),
    ("GET", "/v1/models/{name}/items/{item}/similar", "similar"),
    ("POST", "/v1/admin/reload", "reload"),
    ("POST", "/invocations", "invocations"),
    ("POST", "/models/{name}/invocations", "model_invocations"),
    ("GET", "/models/{name}/ping", "model_ping"),
    ("GET", "/v2", "v2_server"),
    ("GET", "/v2/health/live", "v2_live"),
    ("GET", "/v2/health/ready", "v2_ready"),
    ("GET", "/v2/models/{name}/ready", "v2_model_ready"),
    ("GET", "/v2/models/{name}/versions/{version}/ready", "v2_version_ready"),
    ("GET", "/v2/models/{name}", "v2_metadata"),
    ("GET", "/v2/models/{name}/versions/{version}", "v2_version_metadata"),
    ("POST", "/v2/models/{name}/infer", "v2_infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer", "v2_version_infer"),
]
API_KEY_ROUTES = {p for _, p, _ in ROUTES if p.startswith("/v1/models")} | {
    "/invocations", "/models/{name}/invocations", "/v2/models/{name}/infer",
    "/v2/models/{name}/versions/{version}/infer"}
ADMIN_ROUTES = {"/v1/admin/reload"}


def imported_modules(path: Path) -> Iterator[str]:
    """Every module a file imports: import statements (relative ones resolved) and
    import_module/__import__ calls with a literal name."""
    package = ".".join(path.relative_to(SERVICE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module or ""
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            yield str(node.args[0].value)


def test_service_modules_do_not_import_pipelines():
    assert len(MODULES) >= 10 and SERVICE / "routers" / "v2.py" in MODULES
    offenders = {str(p.relative_to(SERVICE.parent)): m for p in MODULES for m in imported_modules(p)
                 if m == "pipelines" or m.startswith("pipelines.")}
    assert offenders == {}


def test_importing_the_service_loads_no_pipelines_module():
    """The transitive check: service imports modeling, and modeling must not pull pipelines in."""
    code = ("import sys, service.app, service.server, service.routers.v1, service.routers.v2; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pipelines'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_import_scanner_sees_imports():
    """The scanner itself: it must find the imports it is meant to forbid."""
    found = set(imported_modules(SERVICE / "app.py"))
    assert {"service.routers", "service.settings", "fastapi"} <= found


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(SERVICE)) for p in MODULES])
def test_service_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def route_contexts(app) -> list:
    try:  # FastAPI >= 0.16x keeps included routers as nodes; flatten them to effective routes
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - older FastAPI lists the routes flat
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def guards(route) -> set:
    """Every dependency callable under a route (router-level ones included)."""
    found, stack = set(), [getattr(route, "dependant", None)]
    while stack:
        dependant = stack.pop()
        for sub in getattr(dependant, "dependencies", []):
            found.add(sub.call)
            stack.append(sub)
    return found


@pytest.mark.parametrize("models", [{}, {"a": "/nonexistent/a", "b": "models:/b@champion"}])
def test_create_app_wires_the_same_routes_as_before_the_split(models):
    app = create_app(Settings(models=models))
    contexts = route_contexts(app)
    wired = [(m, r.path, r.name) for r in contexts for m in sorted(r.methods or ())]
    assert wired == ROUTES
    by_path = {r.path: guards(r) for r in contexts}
    assert {p for p, g in by_path.items() if require_api_key in g} == API_KEY_ROUTES
    assert {p for p, g in by_path.items() if require_admin in g} == ADMIN_ROUTES
    documented = {(m.upper(), p) for p, item in app.openapi()["paths"].items() for m in item}
    assert documented == {(m, p) for m, p, _ in ROUTES if not p.startswith(("/docs", "/redoc", "/openapi"))
                          and m != "HEAD"}
