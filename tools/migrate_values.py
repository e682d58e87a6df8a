#!/usr/bin/env python3
"""Turn the Go chart's values (agentserver chart 0.50.x, ``codexAppGateway`` and the shared
keys it reads) into values for this repository's ``codex-app-gateway`` chart.

Usage::

    python tools/migrate_values.py --release agentserver --namespace agentserver \\
        go-values.yaml > codex-app-gateway-values.yaml

The Go chart computed several URLs from the release name and namespace; they are written out
here explicitly (``docs/migration.md`` lists each one). Secrets are never copied: the output
refers to the Secrets the Go chart created (``<release>-codex-gateway``,
``<release>-codex-app-gateway-secret``, the S3 ``existingSecret``), except agentserver's
internal secret, which the Go chart passed as a literal value; the output names a Secret for
it and the notes on stderr say how to create it. Values are translated with the Go service's
meaning (``logLevel: warning`` was info there, so it is info here). Exit status 2 with one line
on stderr when the input cannot be translated.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

GO_DEFAULTS = {
    "port": 8086,
    "tmpRoot": "/tmp/codex-app-gateway",
    "idleShutdown": "30m",
    "capTokenTtl": "1h",
    "model": "gpt-5.5",
    "modelProvider": "modelserver",
    "modelProviderEnvKey": "CODEX_API_KEY",
    "modelProviderWireApi": "responses",
}
GO_SERVICE_PORT = 8080
GO_EXEC_GATEWAY_PORT = 6060
GO_LLMPROXY_PORT = 8085


class MigrationError(ValueError):
    """The Go values cannot be translated; the message names the key."""


def _get(values: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return default if node is None or node == "" else node


def _go_log_level(value: Any) -> str:
    """CXG_LOG_LEVEL as the Go service read it: debug, warn, error; anything else info."""
    level = str(value).lower()
    return level if level in ("debug", "warn", "error") else "info"


def _go_path_style(value: Any) -> bool:
    """CXG_S3_PATH_STYLE as the Go service read it: true only for "true" in any case."""
    return str(value).lower() == "true"


def migrate(go_values: Mapping[str, Any], release: str, namespace: str) -> tuple[dict, list[str]]:
    """Return this chart's values for ``go_values`` and notes for the operator."""
    app = _get(go_values, "codexAppGateway", {})
    if not isinstance(app, Mapping):
        raise MigrationError("codexAppGateway must be a mapping")
    notes: list[str] = []
    svc = f"{namespace}.svc"

    def app_value(key: str) -> Any:
        return _get(app, key, GO_DEFAULTS.get(key))

    replicas = int(app_value("replicaCount") or 1)
    if replicas != 1:
        notes.append(
            f"codexAppGateway.replicaCount was {replicas}; a pod owns its sessions, so "
            "this chart is set to 1 (more replicas need workspace-sticky routing)"
        )
    go_level = app_value("logLevel") or "info"
    level = _go_log_level(go_level)
    if str(go_level).lower() != level:
        notes.append(
            f"codexAppGateway.logLevel {go_level!r} meant {level!r} in the Go service; "
            f"written as {level!r}"
        )
    wire_api = str(app_value("modelProviderWireApi"))
    if wire_api != "responses":
        raise MigrationError(
            f"codexAppGateway.modelProviderWireApi is {wire_api!r}; codex supports only 'responses'"
        )
    s3 = _get(app, "s3", {})
    for key in ("bucket", "endpoint", "existingSecret"):
        if not _get(s3, key):
            raise MigrationError(f"codexAppGateway.s3.{key} is required (the Go chart required it)")
    if not _get(go_values, "internal.apiSecret"):
        raise MigrationError("internal.apiSecret is required (the Go chart required it)")

    exec_port = _get(go_values, "codexExecGateway.port", GO_EXEC_GATEWAY_PORT)
    exec_host = f"{release}-codex-exec-gateway.{svc}:{exec_port}"
    llmproxy_port = _get(go_values, "llmproxy.port", GO_LLMPROXY_PORT)
    base_url = app_value("modelProviderBaseUrl") or (
        f"http://{release}-llmproxy.{svc}:{llmproxy_port}/v1"
    )
    service_port = _get(go_values, "service.port", GO_SERVICE_PORT)
    gateway_host = _get(go_values, "gateway.host")
    external_host = app_value("externalHost") or (
        f"codex-app.{gateway_host}" if gateway_host else ""
    )
    trusted = app_value("projectTrustedPaths") or []
    if isinstance(trusted, str):
        trusted = [part.strip() for part in trusted.split(",") if part.strip()]
    shared_secret = f"{release}-codex-gateway"
    internal_secret = f"{release}-codex-app-gateway-internal"
    notes.append(
        f"create Secret {internal_secret} with key agentserver-internal-secret holding the Go "
        "chart's internal.apiSecret (it was a literal env value there), e.g. "
        f"kubectl -n {namespace} create secret generic {internal_secret} "
        '--from-literal=agentserver-internal-secret="$INTERNAL_API_SECRET"'
    )
    tmp_root = str(app_value("tmpRoot"))
    notes.append(
        f"rollback: the Go chart's codexAppGateway.tmpRoot ({tmp_root}) must be set to "
        "/var/lib/codex-app-gateway/sessions before a Go pod restores homes saved here"
    )

    values: dict[str, Any] = {
        "replicaCount": 1,
        "port": int(app_value("port")),
        "externalHost": external_host,
        "logging": {"level": level, "format": "json"},
        "sessions": {
            "idleShutdown": str(app_value("idleShutdown")),
            "projectTrustedPaths": list(trusted),
        },
        "auth": {
            "agentserver": {"internalUrl": f"http://{release}.{svc}:{service_port}"},
            # The Go service loaded CXG_INBOUND_HMAC_SECRET and never accepted HMAC tokens.
            "inboundHmac": {"enabled": False, "allowWithVerifier": False},
        },
        "s3": {
            "bucket": str(_get(s3, "bucket")),
            "endpoint": str(_get(s3, "endpoint")),
            "region": str(_get(s3, "region", "us-east-1")),
            "pathStyle": _go_path_style(_get(s3, "pathStyle", False)),
            "existingSecret": str(_get(s3, "existingSecret")),
            "accessKeyIdKey": "access_key_id",
            "secretAccessKeyKey": "secret_access_key",
        },
        "execGateway": {
            "url": f"ws://{exec_host}",
            "internalUrl": f"http://{exec_host}",
            "capTokenTtl": str(app_value("capTokenTtl")),
        },
        "model": {
            "provider": str(app_value("modelProvider")),
            "name": str(app_value("model")),
            "baseUrl": base_url,
            "envKey": str(app_value("modelProviderEnvKey")),
            "wireApi": wire_api,
            "staticApiKey": True,
        },
        "secrets": {
            "agentserverInternal": {"name": internal_secret, "key": "agentserver-internal-secret"},
            "execGatewayInternal": {"name": shared_secret, "key": "internal-shared-secret"},
            "capTokenHmac": {"name": shared_secret, "key": "cap-token-hmac-secret"},
            "inboundHmac": {"name": shared_secret, "key": "inbound-hmac-secret"},
            "codexApiKey": {"name": f"{release}-codex-app-gateway-secret", "key": "codex-api-key"},
        },
    }
    resources = _get(app, "resources")
    if resources:
        values["resources"] = resources
    if external_host:
        notes.append(
            "expose the chart with ingress.enabled or httpRoute.enabled "
            f"for {external_host} (the Go chart's HTTPRoute is not migrated)"
        )
    return values, notes


def main(argv: list[str] | None = None) -> int:
    """Command line: Go values file in, this chart's values on stdout, notes on stderr."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("go_values", type=Path, help="the Go chart's values file")
    parser.add_argument("--release", required=True, help="the Go chart's release name")
    parser.add_argument("--namespace", required=True, help="the Go chart's namespace")
    args = parser.parse_args(argv)
    try:
        go_values = yaml.safe_load(args.go_values.read_text()) or {}
        values, notes = migrate(go_values, args.release, args.namespace)
    except (OSError, yaml.YAMLError, MigrationError, ValueError) as exc:
        print(f"migrate_values: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump(values, sort_keys=False))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
