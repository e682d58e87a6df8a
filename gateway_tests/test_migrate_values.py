"""tools/migrate_values.py: a Go chart values file becomes this chart's, rendered by real Helm."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway.config import load_config, require_authenticator
from gateway_tests.conftest import REPO
from gateway_tests.helm_render import env_of, fake_environ, manifests, render

GO_VALUES = Path(__file__).resolve().parent / "data" / "helm" / "go-values.yaml"
SCRIPT = REPO / "tools" / "migrate_values.py"


def migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def migrated_values() -> dict[str, Any]:
    result = migrate("--release", "agentserver", "--namespace", "agents", str(GO_VALUES))
    assert result.returncode == 0, result.stderr
    values: dict[str, Any] = yaml.safe_load(result.stdout)
    return values


def test_the_go_values_render_to_the_urls_and_secrets_the_go_chart_derived() -> None:
    objects = manifests(render(migrated_values()))
    env = env_of(objects)
    value = {name: entry.get("value") for name, entry in env.items()}
    assert value["CXG_LISTEN_ADDR"] == ":8086"
    assert value["CXG_AGENTSERVER_INTERNAL_URL"] == "http://agentserver.agents.svc:8080"
    assert value["CXG_EXEC_GATEWAY_URL"] == "ws://agentserver-codex-exec-gateway.agents.svc:6060"
    assert (
        value["CXG_EXEC_GATEWAY_INTERNAL_URL"]
        == "http://agentserver-codex-exec-gateway.agents.svc:6060"
    )
    assert value["CXG_MODEL_PROVIDER_BASE_URL"] == "http://agentserver-llmproxy.agents.svc:8085/v1"
    assert value["CXG_IDLE_SHUTDOWN"] == "45m"
    assert value["CXG_CAPTOKEN_TTL"] == "1h"
    # The Go service's meaning: "warning" was info, "TRUE" was true.
    assert value["CXG_LOG_LEVEL"] == "info"
    assert value["CXG_S3_PATH_STYLE"] == "true"
    assert value["CXG_ALLOW_HMAC_TOKENS"] == "false"
    refs = {
        name: (
            entry["valueFrom"]["secretKeyRef"]["name"],
            entry["valueFrom"]["secretKeyRef"]["key"],
        )
        for name, entry in env.items()
        if "valueFrom" in entry
    }
    # Secrets the chart gives as 0400 files: the projected volume says which Secret and key.
    refs.update(secret_files(objects))
    assert refs == {
        "CXG_AGENTSERVER_INTERNAL_SECRET": (
            "agentserver-codex-app-gateway-internal",
            "agentserver-internal-secret",
        ),
        "CXG_EXEC_GATEWAY_INTERNAL_SECRET": ("agentserver-codex-gateway", "internal-shared-secret"),
        "CXG_CAPTOKEN_HMAC_SECRET": ("agentserver-codex-gateway", "cap-token-hmac-secret"),
        "CXG_CODEX_API_KEY": ("agentserver-codex-app-gateway-secret", "codex-api-key"),
        "CXG_S3_ACCESS_KEY_ID": ("codex-app-gateway-s3", "access_key_id"),
        "CXG_S3_SECRET_ACCESS_KEY": ("codex-app-gateway-s3", "secret_access_key"),
    }
    config = load_config(fake_environ(env))
    require_authenticator(config)
    assert config.project_trusted_paths == ("/workspace", "/data")
    assert config.exec_gateway is not None and config.agentserver is not None


def test_no_secret_of_the_go_values_reaches_the_output() -> None:
    result = migrate("--release", "agentserver", "--namespace", "agents", str(GO_VALUES))
    assert "literal-internal-api-secret-from-values" not in result.stdout + result.stderr
    assert "sk-literal-static-key" not in result.stdout + result.stderr
    assert "kubectl -n agents create secret generic" in result.stderr


def test_untranslatable_go_values_exit_2_naming_the_key(tmp_path: Path) -> None:
    go_values = yaml.safe_load(GO_VALUES.read_text())
    go_values["codexAppGateway"]["modelProviderWireApi"] = "chat"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(go_values))
    result = migrate("--release", "r", "--namespace", "n", str(bad))
    assert result.returncode == 2
    assert "modelProviderWireApi" in result.stderr.strip()


def secret_files(objects: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Each secret file of the Deployment's secrets volume: variable -> (Secret, key)."""
    files: dict[str, tuple[str, str]] = {}
    for obj in objects:
        if obj.get("kind") != "Deployment":
            continue
        for volume in obj["spec"]["template"]["spec"].get("volumes", []):
            for source in volume.get("projected", {}).get("sources", []):
                secret = source.get("secret")
                for item in (secret or {}).get("items", []):
                    files[item["path"]] = (secret["name"], item["key"])
    return files
