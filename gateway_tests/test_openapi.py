"""The OpenAPI document in docs/api matches the routes the app serves and what they answer."""

from __future__ import annotations

import httpx2
import jsonschema
import yaml

from gateway.version import package_version
from gateway.web.admin import AdminRoutes
from gateway.web.app import Readiness, build_app
from gateway_tests.conftest import REPO
from gateway_tests.harness import ADMIN_SECRET, LaunchGateway, connect

SPEC = yaml.safe_load((REPO / "docs" / "api" / "openapi.yaml").read_text())


def _documented() -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in SPEC["paths"].items() for method in item}


def test_every_served_route_is_documented_and_every_documented_route_is_served() -> None:
    app = build_app(
        AdminRoutes(None, None, None),  # type: ignore[arg-type]
        Readiness(),
        metrics=True,
    )
    assert set(app.served_routes) == _documented()


async def test_admin_listing_matches_the_documented_schema(launch_gateway: LaunchGateway) -> None:
    gateway = await launch_gateway()
    async with connect(gateway, "ws_doc"):
        async with httpx2.AsyncClient() as http:
            response = await http.get(
                f"{gateway.http_url}/admin/sessions",
                headers={"Authorization": f"Bearer {ADMIN_SECRET}"},
            )
        body = response.json()
    listing = SPEC["paths"]["/admin/sessions"]["get"]["responses"]["200"]
    jsonschema.validate({**body, "sessions": []}, listing["content"]["application/json"]["schema"])
    assert set(body) == {"sessions", "version"}
    assert body["version"] == {"gateway": package_version(), "codex": "codex-cli 0.0.0-fake"}
    for session in body["sessions"]:
        jsonschema.validate(session, SPEC["components"]["schemas"]["Session"])
    assert body["sessions"][0]["workspaceId"] == "ws_doc"
    assert body["sessions"][0]["state"] == "running"


async def test_documented_statuses_are_what_the_routes_answer(
    launch_gateway: LaunchGateway,
) -> None:
    gateway = await launch_gateway()
    async with httpx2.AsyncClient() as http:
        checks = {
            ("/healthz", "get"): (await http.get(f"{gateway.http_url}/healthz")).status_code,
            ("/readyz", "get"): (await http.get(f"{gateway.http_url}/readyz")).status_code,
            ("/metrics", "get"): (await http.get(f"{gateway.http_url}/metrics")).status_code,
            ("/", "get"): (await http.get(f"{gateway.http_url}/")).status_code,
            ("/codex-app/ws", "get"): (
                await http.get(f"{gateway.http_url}/codex-app/ws")
            ).status_code,
            ("/admin/sessions", "get"): (
                await http.get(f"{gateway.http_url}/admin/sessions")
            ).status_code,
            ("/admin/sessions/restart", "post"): (
                await http.post(f"{gateway.http_url}/admin/sessions/restart", content=b"{")
            ).status_code,
        }
    for (path, method), status in checks.items():
        assert str(status) in SPEC["paths"][path][method]["responses"], (path, status)
