"""The Helm chart and the container image, checked offline.

The chart is rendered and linted by the real Helm engine (helm-python-sdk bundles Helm's Go SDK),
every rendered manifest is validated against the Kubernetes API schemas (kubernetes-validate),
and the properties that matter in production are asserted: secrets only by reference, a grace
period that covers the drain, a hardened pod, the probes, and env that the daemon understands.
The Dockerfile cannot be built here, so its key properties are checked statically.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from gateway.config import VARIABLES, load_config, require_authenticator
from gateway.durations import parse_go_duration
from gateway.sessions.manager import DRAIN_FINAL_SAVE_SECONDS
from gateway_tests.helm_render import (
    CHART,
    NAMESPACE,
    POD_FIELDS,
    SECRET_DIR,
    by_kind,
    container,
    env_of,
    fake_environ,
    manifests,
    render,
)

REPO = Path(__file__).resolve().parent.parent
PRODUCTION_VALUES = Path(__file__).resolve().parent / "data" / "helm" / "production-values.yaml"
DOCKERFILE = REPO / "Dockerfile"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a recent one.
KUBE_VERSIONS = ("1.27.0", "1.35.0")
# Kinds from CRDs, for which kubernetes-validate ships no schema; checked structurally below.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}
KNOWN_VARIABLES = {var.name: var for var in VARIABLES}
SECRET_VARIABLES = {var.name for var in VARIABLES if var.secret} | {"CXG_S3_ACCESS_KEY_ID"}
# Variables whose chart default deliberately differs from the daemon's: the daemon keeps the Go
# service's /tmp paths for local runs; in the pod they must be on the session emptyDir. The
# session cap is sized to the chart's memory limit (the daemon cannot know it).
# CXG_CHILD_ISOLATION: the pod is built for the isolated mode, so it refuses to run without it.
CHART_OWN_DEFAULTS = {
    "CXG_TMP_ROOT",
    "CXG_LOCAL_STORE_DIR",
    "CXG_MAX_SESSIONS",
    "CXG_CHILD_ISOLATION",
}
# What one real codex 0.169.0 app-server child takes at rest, and the daemon itself.
CHILD_MEMORY_BYTES = 140 * 1024 * 1024
DAEMON_MEMORY_BYTES = 512 * 1024 * 1024


# --- helpers -------------------------------------------------------------------------------


def production_values() -> dict[str, Any]:
    return helm.values_from_yaml(PRODUCTION_VALUES.read_text())


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return manifests(render())


@pytest.fixture(scope="module")
def production_objects() -> list[dict[str, Any]]:
    return manifests(render(production_values()))


@pytest.fixture(params=["default", "production"])
def objects(
    request: pytest.FixtureRequest,
    default_objects: list[dict[str, Any]],
    production_objects: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    return default_objects if request.param == "default" else production_objects


# --- rendering, lint and Kubernetes schemas ------------------------------------------------


@pytest.mark.parametrize("values_file", [None, PRODUCTION_VALUES], ids=["default", "production"])
def test_chart_lints_without_warnings(values_file: Path | None) -> None:
    values = helm.values_from_yaml(values_file.read_text()) if values_file else None
    for kube_version in KUBE_VERSIONS:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{kube_version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], report


def test_default_render_has_the_expected_objects(default_objects: list[dict[str, Any]]) -> None:
    kinds = sorted(obj["kind"] for obj in default_objects)
    assert kinds == [
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    assert all(obj["metadata"]["name"] == "cxg-codex-app-gateway" for obj in default_objects)
    # Secrets are created outside the chart: it never renders one.
    assert by_kind(default_objects, "Deployment")["spec"]["replicas"] == 1


def test_production_render_has_the_expected_objects(
    production_objects: list[dict[str, Any]],
) -> None:
    kinds = sorted(obj["kind"] for obj in production_objects)
    assert kinds == [
        "Deployment",
        "HTTPRoute",
        "Ingress",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(
    objects: list[dict[str, Any]], kube_version: str
) -> None:
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        # strict: unknown fields (a typo, a misplaced key) fail too.
        kubernetes_validate.validate(obj, kube_version, strict=True)
    selector = by_kind(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert selector.items() <= labels.items(), obj["kind"]


def test_crd_objects_point_at_the_service(production_objects: list[dict[str, Any]]) -> None:
    service = by_kind(production_objects, "Service")
    ports = {port["name"]: port["port"] for port in service["spec"]["ports"]}
    assert ports == {"http": 8086, "metrics": 9090}

    monitor = by_kind(production_objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s" and endpoint["scrapeTimeout"] == "5s"

    route = by_kind(production_objects, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["hostnames"] == ["codex-app.example.com"]
    assert route["spec"]["parentRefs"] == [
        {"name": "public", "namespace": "gateway-system", "sectionName": "https"}
    ]
    [rule] = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["backendRefs"] == [{"name": service["metadata"]["name"], "port": 8086}]
    assert rule["timeouts"] == {"request": "0s"}

    ingress = by_kind(production_objects, "Ingress")
    assert ingress["spec"]["tls"] == [
        {"hosts": ["codex-app.example.com"], "secretName": "codex-app-example-com-tls"}
    ]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"


# --- secrets -------------------------------------------------------------------------------


def secret_sources(objects: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Each secret variable and the (Secret, key) it comes from, as a file or a secretKeyRef."""
    refs = {
        name: (
            entry["valueFrom"]["secretKeyRef"]["name"],
            entry["valueFrom"]["secretKeyRef"]["key"],
        )
        for name, entry in env_of(objects).items()
        if "secretKeyRef" in entry.get("valueFrom", {})
    }
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    for volume in pod["volumes"]:
        for source in volume.get("projected", {}).get("sources", []):
            for item in source["secret"]["items"]:
                refs[item["path"]] = (source["secret"]["name"], item["key"])
    return refs


def test_every_secret_is_a_file_or_a_secret_key_ref(objects: list[dict[str, Any]]) -> None:
    assert not [obj for obj in objects if obj["kind"] == "Secret"]
    assert not [obj for obj in objects if "data" in obj or "stringData" in obj]
    env = env_of(objects)
    for name, entry in env.items():
        if name in SECRET_VARIABLES:
            assert "value" not in entry, name
            ref = entry["valueFrom"]["secretKeyRef"]
            assert set(ref) == {"name", "key"} and ref["name"] and ref["key"], name
    # By default every secret but the S3 key id (an identifier) is a file, not a variable.
    assert not {name for name in env if name in SECRET_VARIABLES} - {"CXG_S3_ACCESS_KEY_ID"}
    for name, entry in env.items():
        if name.endswith("_FILE"):
            assert entry["value"] == f"{SECRET_DIR}/{name.removesuffix('_FILE')}", name


def test_secret_files_are_0400_and_mounted_read_only(
    production_objects: list[dict[str, Any]],
) -> None:
    pod = by_kind(production_objects, "Deployment")["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "secrets"]
    assert volume["projected"]["defaultMode"] == 0o400
    [mount] = [m for m in container(production_objects)["volumeMounts"] if m["name"] == "secrets"]
    assert mount == {"name": "secrets", "mountPath": SECRET_DIR, "readOnly": True}
    assert "fsGroup" not in pod["securityContext"]


def test_secrets_as_variables_when_files_are_switched_off() -> None:
    values = production_values()
    values["secrets"]["asFiles"] = False
    rendered = manifests(render(values))
    env = env_of(rendered)
    assert not [name for name in env if name.endswith("_FILE")]
    assert set(env) >= SECRET_VARIABLES
    pod = by_kind(rendered, "Deployment")["spec"]["template"]["spec"]
    assert "secrets" not in {v["name"] for v in pod["volumes"]}


def test_production_secrets_come_from_the_configured_keys(
    production_objects: list[dict[str, Any]],
) -> None:
    refs = secret_sources(production_objects)
    assert refs == {
        "CXG_AGENTSERVER_INTERNAL_SECRET": ("agentserver-internal", "internal-api-secret"),
        "CXG_INBOUND_HMAC_SECRET": ("agentserver-codex-gateway", "inbound-hmac-secret"),
        "CXG_ADMIN_SECRET": ("codex-app-gateway-admin", "admin-secret"),
        "CXG_S3_ACCESS_KEY_ID": ("codex-app-gateway-s3", "access_key_id"),
        "CXG_S3_SECRET_ACCESS_KEY": ("codex-app-gateway-s3", "secret_access_key"),
        "CXG_EXEC_GATEWAY_INTERNAL_SECRET": ("agentserver-codex-gateway", "internal-shared-secret"),
        "CXG_CAPTOKEN_HMAC_SECRET": ("agentserver-codex-gateway", "cap-token-hmac-secret"),
        "CXG_CODEX_API_KEY": ("agentserver-codex-app-gateway-secret", "codex-api-key"),
        "CXG_PEER_SECRET": ("codex-app-gateway-peer", "peer-secret"),
    }


# --- env and the daemon's configuration ----------------------------------------------------


def test_env_names_are_all_known_to_the_daemon(objects: list[dict[str, Any]]) -> None:
    for name in env_of(objects):
        if name.startswith("CXG_"):
            assert name in KNOWN_VARIABLES, f"{name} is not in gateway.config.VARIABLES"


def test_production_values_set_every_variable(production_objects: list[dict[str, Any]]) -> None:
    # Every CXG_* variable has a values entry; a new variable needs one (and a line here).
    # A secret counts as set whether it comes as CXG_<NAME> or as CXG_<NAME>_FILE.
    cxg = {name for name in env_of(production_objects) if name.startswith("CXG_")}
    secrets = {var.name for var in VARIABLES if var.secret}
    assert all(name.removesuffix("_FILE") in secrets for name in cxg if name.endswith("_FILE"))
    normalized = {name.removesuffix("_FILE") if name.endswith("_FILE") else name for name in cxg}
    files = {f"{name}_FILE" for name in secrets}
    assert normalized == set(KNOWN_VARIABLES) - files


def test_default_env_equals_the_daemon_defaults(default_objects: list[dict[str, Any]]) -> None:
    env = env_of(default_objects)
    for name, entry in env.items():
        var = KNOWN_VARIABLES[name]
        if name in CHART_OWN_DEFAULTS:
            continue
        assert entry["value"] == (var.default or ""), name
    # Unset optional variables stay unset (no authenticator, store, exec gateway or secrets).
    assert not {name for name in KNOWN_VARIABLES if KNOWN_VARIABLES[name].default is None} & (
        env.keys()
    )


def test_session_directories_are_on_the_emptydir_and_not_under_tmp(
    objects: list[dict[str, Any]],
) -> None:
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container(objects)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == set(volumes)
    assert set(mounts) - {"secrets"} == {"sessions", "tmp"}
    assert mounts["tmp"] == "/tmp"
    assert volumes["sessions"]["emptyDir"]["sizeLimit"]
    assert volumes["tmp"]["emptyDir"]["sizeLimit"]
    env = env_of(objects)
    for name in ("CXG_TMP_ROOT", "CXG_LOCAL_STORE_DIR"):
        path = env[name]["value"]
        assert path.startswith(mounts["sessions"].rstrip("/") + "/"), name
        assert not path.startswith("/tmp"), name


def test_production_env_is_a_valid_daemon_configuration(
    production_objects: list[dict[str, Any]],
) -> None:
    environ = fake_environ(env_of(production_objects))
    config = load_config(environ)
    require_authenticator(config)
    assert config.listen_addr == ":8086"
    assert config.metrics_listen_addr == ":9090"
    assert config.tmp_root == "/var/lib/codex-app-gateway/sessions"
    assert config.agentserver is not None
    assert config.agentserver.internal_url == "http://agentserver.agentserver.svc:8080"
    assert config.s3 is not None and config.s3.bucket == "codex-app-gateway-prod"
    assert config.s3.path_style is True and config.s3.region == "eu-west-1"
    assert config.exec_gateway is not None and config.exec_gateway.captoken_ttl == 3600
    assert config.exec_gateway.startup_timeout == 15
    assert config.admin_secret and config.inbound_hmac_secret and config.model.static_api_key
    assert config.project_trusted_paths == ("/workspace", "/data")
    assert config.allowed_origins == ("https://agentserver.example.com",)
    assert config.drain_budget == 60 and config.child_stop_grace == 15
    assert config.max_sessions == 40
    assert config.ws_max_message_size == 64 * 1024 * 1024
    assert config.restore_limits.max_total_bytes == 16 * 1024**3
    assert config.restore_limits.max_entries == 400000
    assert config.model.token_refresh_interval == 240
    assert config.replicas is not None
    assert config.replicas.pod_name == POD_FIELDS["metadata.name"]
    assert config.replicas.peer_addr == "10.1.2.3:8087"
    assert config.replicas.peer_listen_addr == ":8087"
    assert config.replicas.takeover_after == 30


def test_default_env_is_a_valid_daemon_configuration(
    default_objects: list[dict[str, Any]],
) -> None:
    config = load_config(fake_environ(env_of(default_objects)))
    assert config.s3 is None and config.exec_gateway is None and config.agentserver is None
    assert config.drain_budget == 30
    assert config.replicas is None


# --- shutdown and probes -------------------------------------------------------------------


def shutdown_budget(objects: list[dict[str, Any]]) -> tuple[int, float, int]:
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    command = container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = parse_go_duration(env_of(objects)["CXG_DRAIN_BUDGET"]["value"])
    return int(command[1]), drain, pod["terminationGracePeriodSeconds"]


def test_grace_period_covers_the_prestop_sleep_and_the_drain(
    objects: list[dict[str, Any]],
) -> None:
    pre_stop, drain, grace = shutdown_budget(objects)
    env = env_of(objects)
    child_stop = parse_go_duration(env["CXG_CHILD_STOP_GRACE"]["value"])
    assert child_stop <= drain
    if "CXG_PEER_ADDR" in env:
        # Replica mode: a turn running at the budget is stopped then, and saved after.
        assert grace >= pre_stop + drain + child_stop + DRAIN_FINAL_SAVE_SECONDS + 5
    else:
        assert grace >= pre_stop + drain + 5


def test_grace_period_defaults_and_production_numbers(
    default_objects: list[dict[str, Any]], production_objects: list[dict[str, Any]]
) -> None:
    assert shutdown_budget(default_objects) == (5, 30.0, 45)
    # Replica mode: 10 preStop + 60 drain + 15 child stop grace + 10 final save + 15 margin.
    assert shutdown_budget(production_objects) == (10, 60.0, 110)


def test_an_explicit_grace_period_too_short_for_the_drain_fails_rendering() -> None:
    # The Go chart's defect: 30 s grace with a 10 s preStop for a 30 s drain budget.
    values = {
        "shutdown": {
            "drainBudgetSeconds": 30,
            "preStopSleepSeconds": 10,
            "terminationGracePeriodSeconds": 30,
        }
    }
    with pytest.raises(helm.HelmRenderError, match="need 50 s"):
        render(values)
    values["shutdown"]["terminationGracePeriodSeconds"] = 120
    pod = by_kind(manifests(render(values)), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120


def test_prestop_zero_disables_the_hook() -> None:
    objects = manifests(render({"shutdown": {"preStopSleepSeconds": 0}}))
    assert "lifecycle" not in container(objects)
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 40


def test_probes_hit_healthz_and_readyz_on_the_listen_port(objects: list[dict[str, Any]]) -> None:
    gateway = container(objects)
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    assert env_of(objects)["CXG_LISTEN_ADDR"]["value"] == f":{ports['http']}"
    assert gateway["args"] == ["serve"]


# --- pod hardening and policy --------------------------------------------------------------


def test_pod_runs_hardened(objects: list[dict[str, Any]]) -> None:
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    security = container(objects)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    # Root with exactly the capabilities the isolated mode needs (proven sufficient and
    # DAC_OVERRIDE necessary by gateway_tests/security/test_os_isolation.py).
    assert security["capabilities"] == {
        "drop": ["ALL"],
        "add": ["CHOWN", "DAC_OVERRIDE", "KILL", "SETGID", "SETUID"],
    }
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] == 0
    assert env_of(objects)["CXG_CHILD_ISOLATION"]["value"] == "required"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["serviceAccountName"] == by_kind(objects, "ServiceAccount")["metadata"]["name"]
    assert container(objects)["resources"]["limits"]["memory"]


def test_network_policy_closes_the_instance_metadata_port(objects: list[dict[str, Any]]) -> None:
    # Children share the pod's network identity (docs/security.md): the metadata endpoint
    # (169.254.169.254, port 80) stays closed because no rule allows port 80 or everything.
    policy = by_kind(objects, "NetworkPolicy")["spec"]
    assert all(rule.get("ports") for rule in policy["egress"]), "an egress rule allows every port"
    egress_ports = {port["port"] for rule in policy["egress"] for port in rule["ports"]}
    assert 80 not in egress_ports and "http" not in egress_ports


def test_disruption_budget_and_network_policy(objects: list[dict[str, Any]]) -> None:
    pdb = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": by_kind(objects, "Deployment")["spec"]["selector"],
    }
    policy = by_kind(objects, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    ingress = policy["ingress"][0]
    assert {"port": "http", "protocol": "TCP"} in ingress["ports"]
    egress_ports = {port["port"] for rule in policy["egress"] for port in rule["ports"]}
    assert 53 in egress_ports


def _egress_ports(values: dict[str, Any]) -> list[set[int]]:
    policy = by_kind(manifests(render(values)), "NetworkPolicy")["spec"]
    return [{port["port"] for port in rule["ports"]} for rule in policy["egress"]]


def test_egress_ports_follow_the_configured_urls() -> None:
    configured = {
        "auth": {"agentserver": {"internalUrl": "http://agentserver.svc:9191"}},
        "secrets": {"existingSecret": "cxg"},
        "execGateway": {"url": "wss://exec.svc:7443", "internalUrl": "http://exec.svc"},
        "model": {"baseUrl": "https://llm.example.com/v1"},
        "s3": {"bucket": "homes", "endpoint": "http://minio.svc:9000", "existingSecret": "s3"},
    }
    # DNS, then agentserver, exec gateway (both URLs), model proxy, S3: each from its URL.
    assert _egress_ports(configured) == [{53}, {9191}, {7443, 80}, {443}, {9000}]
    # AWS S3 itself (no endpoint) is https.
    aws = {**configured, "s3": {"bucket": "homes", "existingSecret": "s3"}}
    assert _egress_ports(aws)[-1] == {443}
    # Nothing configured: no rule for what the daemon will never call.
    assert _egress_ports({"model": {"baseUrl": "http://llmproxy:8085/v1"}}) == [{53}, {8085}]
    # A rule's own ports still win.
    explicit = {"networkPolicy": {"egress": {"modelProxy": {"ports": [{"port": 1234}]}}}}
    assert _egress_ports(explicit) == [{53}, {1234}]


def test_default_session_cap_fits_the_memory_limit(default_objects: list[dict[str, Any]]) -> None:
    limit = parse_quantity(container(default_objects)["resources"]["limits"]["memory"])
    sessions = int(env_of(default_objects)["CXG_MAX_SESSIONS"]["value"])
    assert sessions * CHILD_MEMORY_BYTES + DAEMON_MEMORY_BYTES <= limit
    # ... with room for the children's own tools, not just barely.
    assert sessions * CHILD_MEMORY_BYTES <= 0.8 * limit


def parse_quantity(text: str) -> int:
    """A Kubernetes memory quantity (``8Gi``, ``512Mi``, ``1G``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text.removesuffix(suffix)) * factor)
    return int(text)


def test_s3_from_the_default_chain_needs_no_keys_and_takes_an_irsa_annotation() -> None:
    role = "arn:aws:iam::123456789012:role/codex-app-gateway"
    objects = manifests(
        render(
            {
                "s3": {"bucket": "homes", "credentials": "defaultChain"},
                "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": role}},
            }
        )
    )
    env = env_of(objects)
    assert env["CXG_S3_BUCKET"]["value"] == "homes"
    assert not {name for name in env if "ACCESS_KEY" in name or name.startswith("AWS_")}
    account = by_kind(objects, "ServiceAccount")
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": role}
    assert (
        by_kind(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        == (account["metadata"]["name"])
    )
    # The default stays keys from a Secret, and asks for one.
    with pytest.raises(helm.HelmRenderError, match="defaultChain"):
        render({"s3": {"bucket": "homes"}})


def test_production_network_policy_is_narrowed(production_objects: list[dict[str, Any]]) -> None:
    policy = by_kind(production_objects, "NetworkPolicy")["spec"]
    # The public ports, and (replica mode) the internal port for the other gateway pods.
    ingress, _peers = policy["ingress"]
    assert {"port": "metrics", "protocol": "TCP"} in ingress["ports"]
    assert len(ingress["from"]) == 2
    assert all(rule.get("to") for rule in policy["egress"])
    # Peers, DNS, agentserver, exec gateway, model proxy, S3 and the extra rule.
    assert len(policy["egress"]) == 7


def test_allow_all_egress() -> None:
    objects = manifests(render({"networkPolicy": {"egress": {"allowAll": True}}}))
    assert by_kind(objects, "NetworkPolicy")["spec"]["egress"] == [{}]


# --- replica mode ----------------------------------------------------------------------------

REPLICA_ENV = {
    "POD_IP",
    "CXG_POD_NAME",
    "CXG_PEER_ADDR",
    "CXG_PEER_LISTEN_ADDR",
    "CXG_OWNER_TAKEOVER_AFTER",
    "CXG_PEER_SECRET_FILE",
}
# The smallest values replica mode renders with: it needs the bucket (and a Secret for it).
S3_VALUES = {
    "s3": {"bucket": "homes", "existingSecret": "s3"},
    "secrets": {"existingSecret": "cxg"},
}


def replica_objects(**values: Any) -> list[dict[str, Any]]:
    return manifests(render({**S3_VALUES, **values}))


def is_replica_mode(objects: list[dict[str, Any]]) -> bool:
    return "CXG_PEER_ADDR" in env_of(objects)


def test_one_replica_renders_as_before(default_objects: list[dict[str, Any]]) -> None:
    for objects in (default_objects, replica_objects(replicaCount=1)):
        env = env_of(objects)
        assert not REPLICA_ENV & env.keys()
        assert not {name for name in env if "PEER" in name}
        assert [port["name"] for port in container(objects)["ports"]] == ["http"]
        deployment = by_kind(objects, "Deployment")["spec"]
        assert deployment["strategy"] == {"type": "Recreate"}
        assert deployment["template"]["spec"]["terminationGracePeriodSeconds"] == 45
        policy = by_kind(objects, "NetworkPolicy")["spec"]
        assert len(policy["ingress"]) == 1
        assert not [rule for rule in policy["egress"] if "podSelector" in str(rule.get("to"))]
    assert manifests(render({"replicaCount": 1})) == default_objects


@pytest.mark.parametrize(
    ("values", "on"),
    [
        ({"replicaCount": 2}, True),
        ({"replicaCount": 1, "replicas": {"enabled": True}}, True),
        ({"replicaCount": 3, "replicas": {"enabled": False}}, False),
        ({"replicaCount": 1, "replicas": {"enabled": False}}, False),
    ],
)
def test_replica_mode_is_on_with_more_than_one_replica_or_when_asked(
    values: dict[str, Any], on: bool
) -> None:
    assert is_replica_mode(replica_objects(**values)) is on


def test_replica_mode_rolls_with_a_surge_and_no_pod_unavailable() -> None:
    deployment = by_kind(replica_objects(replicaCount=3), "Deployment")["spec"]
    assert deployment["replicas"] == 3
    assert deployment["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    surge = replica_objects(replicaCount=3, replicas={"maxSurge": "50%"})
    assert by_kind(surge, "Deployment")["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": "50%",
        "maxUnavailable": 0,
    }


def test_replica_mode_keeps_a_disruption_budget() -> None:
    objects = replica_objects(replicaCount=3)
    pdb = by_kind(objects, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"] == by_kind(objects, "Deployment")["spec"]["selector"]


def test_replica_grace_period_covers_the_drain_the_child_stop_grace_and_the_save() -> None:
    objects = replica_objects(
        replicaCount=2,
        sessions={"childStopGraceSeconds": 20},
        shutdown={"drainBudgetSeconds": 40, "preStopSleepSeconds": 5, "marginSeconds": 10},
    )
    pre_stop, drain, grace = shutdown_budget(objects)
    assert (pre_stop, drain) == (5, 40)
    assert grace == 5 + 40 + 20 + DRAIN_FINAL_SAVE_SECONDS + 10
    assert parse_go_duration(env_of(objects)["CXG_CHILD_STOP_GRACE"]["value"]) == 20
    # An explicit grace period that would cut the last saves short fails rendering.
    with pytest.raises(helm.HelmRenderError, match="the child stop grace \\(20 s\\)"):
        render(
            {
                **S3_VALUES,
                "replicaCount": 2,
                "sessions": {"childStopGraceSeconds": 20},
                "shutdown": {"drainBudgetSeconds": 40, "terminationGracePeriodSeconds": 60},
            }
        )


def test_replica_mode_takes_the_pod_name_and_address_from_the_downward_api() -> None:
    objects = replica_objects(replicaCount=2)
    entries = container(objects)["env"]
    env = env_of(objects)
    assert env["CXG_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["CXG_PEER_ADDR"]["value"] == "$(POD_IP):8087"
    # The kubelet expands $(POD_IP) only when POD_IP is defined earlier in the list.
    names = [entry["name"] for entry in entries]
    assert names.index("POD_IP") < names.index("CXG_PEER_ADDR")
    assert env["CXG_PEER_LISTEN_ADDR"]["value"] == ":8087"
    assert env["CXG_OWNER_TAKEOVER_AFTER"]["value"] == "25s"
    ports = {port["name"]: port for port in container(objects)["ports"]}
    assert ports["peer"] == {"name": "peer", "containerPort": 8087, "protocol": "TCP"}
    # Never exposed through the Service: peers reach each other by pod address.
    service_ports = {port["name"] for port in by_kind(objects, "Service")["spec"]["ports"]}
    assert "peer" not in service_ports
    config = load_config(fake_environ(env))
    assert config.replicas is not None
    assert config.replicas.peer_addr == f"{POD_FIELDS['status.podIP']}:8087"
    assert config.replicas.pod_name == POD_FIELDS["metadata.name"]
    moved = env_of(replica_objects(replicaCount=2, replicas={"peerPort": 9443}))
    assert moved["CXG_PEER_ADDR"]["value"] == "$(POD_IP):9443"
    assert moved["CXG_PEER_LISTEN_ADDR"]["value"] == ":9443"


def test_replica_mode_reads_the_peer_secret_from_a_file() -> None:
    objects = replica_objects(replicaCount=2, secrets={"peer": {"name": "peers", "key": "k"}})
    env = env_of(objects)
    assert env["CXG_PEER_SECRET_FILE"]["value"] == f"{SECRET_DIR}/CXG_PEER_SECRET"
    assert "CXG_PEER_SECRET" not in env
    assert secret_sources(objects)["CXG_PEER_SECRET"] == ("peers", "k")
    as_variable = env_of(
        replica_objects(
            replicaCount=2, secrets={"asFiles": False, "peer": {"name": "peers", "key": "k"}}
        )
    )
    assert as_variable["CXG_PEER_SECRET"]["valueFrom"] == {
        "secretKeyRef": {"name": "peers", "key": "k"}
    }


def test_only_gateway_pods_may_reach_the_internal_port() -> None:
    objects = replica_objects(
        replicaCount=2, networkPolicy={"ingressFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}
    )
    selector = by_kind(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    policy = by_kind(objects, "NetworkPolicy")["spec"]
    public, peers = policy["ingress"]
    assert {"port": "peer", "protocol": "TCP"} not in public["ports"]
    assert peers == {
        "ports": [{"port": "peer", "protocol": "TCP"}],
        "from": [{"podSelector": {"matchLabels": selector}}],
    }
    # And the pods may reach each other's internal port (egress is closed by default).
    assert {
        "ports": [{"port": 8087, "protocol": "TCP"}],
        "to": [{"podSelector": {"matchLabels": selector}}],
    } in policy["egress"]
    for kube_version in KUBE_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, kube_version, strict=True)


def test_replica_mode_needs_a_bucket() -> None:
    with pytest.raises(helm.HelmRenderError, match=r"replica mode .* needs s3\.bucket"):
        render({"replicaCount": 2})


# --- schema and cross-value checks ---------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"logging": {"level": "verbose"}}, "/logging/level"),
        ({"sessions": {"idleShutdown": "30 minutes"}}, "/sessions/idleShutdown"),
        ({"websocket": {"maxMessageSize": "lots"}}, "/websocket/maxMessageSize"),
        ({"shutdown": {"drainBudgetSeconds": "30s"}}, "/shutdown/drainBudgetSeconds"),
        ({"model": {"wireApi": "chat"}}, "/model/wireApi"),
        ({"s3": {"endpoint": "minio:9000"}}, "/s3/endpoint"),
        ({"execGateway": {"url": "http://exec:6060"}}, "/execGateway/url"),
        ({"secrets": {"admin": {"name": "x", "key": ""}}}, "/secrets/admin/key"),
        ({"extraEnv": [{"name": "CXG_MODEL", "value": "other"}]}, "/extraEnv/0/name"),
        ({"replicaCount": -1}, "/replicaCount"),
        ({"replicas": {"enabled": "yes"}}, "/replicas/enabled"),
        ({"replicas": {"peerPort": 70000}}, "/replicas/peerPort"),
        ({"replicas": {"ownerTakeoverAfter": "25 seconds"}}, "/replicas/ownerTakeoverAfter"),
        ({"replicas": {"maxSurge": 0}}, "/replicas/maxSurge"),
        ({"replicas": {"peers": 2}}, "additional properties 'peers'"),
        ({"idleShutdown": "30m"}, "additional properties 'idleShutdown'"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render(values)
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values(values))
    assert helm.lint(CHART, values)["errors"]


def test_schema_accepts_both_values_files() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(None))
        chart.validate_schema(chart.merge_values(production_values()))
        assert chart.schema is not None
        assert chart.schema["additionalProperties"] is False


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tmpRoot": "/tmp/codex-app-gateway"}, "tmpRoot (/tmp/codex-app-gateway) must lie under"),
        ({"sessionVolume": {"mountPath": "/tmp/sessions"}}, "must not be under /tmp"),
        (
            {"sessions": {"childStopGraceSeconds": 40}},
            "childStopGraceSeconds (40) exceeds shutdown.drainBudgetSeconds (30)",
        ),
        ({"s3": {"bucket": "codex"}}, "s3.existingSecret must name"),
        ({"s3": {"endpoint": "https://s3.example.com"}}, "set the bucket too"),
        ({"execGateway": {"url": "ws://exec:6060"}}, "needs both execGateway.url"),
        (
            {"execGateway": {"url": "ws://exec:6060", "internalUrl": "http://exec:6060"}},
            "CXG_EXEC_GATEWAY_INTERNAL_SECRET needs a Secret",
        ),
        ({"auth": {"agentserver": {"internalUrl": "http://as:8080"}}}, "secrets.existingSecret"),
        ({"admin": {"enabled": True}}, "CXG_ADMIN_SECRET needs a Secret"),
        ({"ingress": {"enabled": True}}, "ingress.enabled needs externalHost"),
        (
            {"httpRoute": {"enabled": True}, "externalHost": "codex.example.com"},
            "httpRoute.parentRefs",
        ),
        ({"metrics": {"port": 8086}}, "metrics.port must differ from port"),
    ],
)
def test_inconsistent_values_fail_rendering(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


def test_values_yaml_documents_every_variable() -> None:
    values_yaml = (CHART / "values.yaml").read_text()
    for name in KNOWN_VARIABLES:
        if name in ("CXG_LISTEN_ADDR",):
            continue
        assert name in values_yaml, f"values.yaml does not say which key sets {name}"


def test_notes_warn_about_missing_auth_and_store() -> None:
    notes = render()[f"{CHART.name}/templates/NOTES.txt"]
    assert "no authenticator is configured" in notes
    assert "no S3 bucket is set" in notes
    notes = render(production_values())[f"{CHART.name}/templates/NOTES.txt"]
    assert "WARNING" not in notes
    # codex needs the port written out, even 443 for wss.
    assert "codex --remote wss://codex-app.example.com:443 " in notes


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


# --- Dockerfile ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_pins_base_images_and_stages() -> None:
    froms = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    images = [args.split()[0] for args in froms]
    assert images == [
        image for image in images if re.fullmatch(r"[a-z0-9./-]+:\d+\.\d+\.\d+-[a-z0-9-]+", image)
    ], images
    assert images[0].startswith("node:")
    assert images[-1].startswith("python:3.11.") and "-slim" in images[-1]
    assert [args.split()[-1] for args in froms] == ["codex", "build", "runtime"]


def test_dockerfile_codex_version_matches_tools_codex() -> None:
    pinned = json.loads((REPO / "tools" / "codex" / "package.json").read_text())
    version = pinned["dependencies"]["@openai/codex"]
    args = [args for keyword, args in dockerfile_instructions() if keyword == "ARG"]
    assert f"CODEX_VERSION={version}" in args
    text = DOCKERFILE.read_text()
    assert "COPY tools/codex/package.json tools/codex/package-lock.json" in text
    assert "npm ci" in text
    assert "vendor/${triple}" in text and "TARGETARCH" in text
    assert "x86_64-unknown-linux-musl" in text and "aarch64-unknown-linux-musl" in text
    assert "ln -s /opt/codex/bin/codex /usr/local/bin/codex" in text


def test_dockerfile_runtime_is_non_root_and_runs_the_gateway() -> None:
    instructions = dockerfile_instructions()
    runtime_start = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    runtime = instructions[runtime_start:]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert len(users) == 1 and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[0]), users
    # Under tini, which reaps orphans and ends with the daemon (docs/architecture.md).
    assert ("ENTRYPOINT", '["/usr/bin/tini", "-s", "--", "codex-app-gateway"]') in runtime
    assert ("CMD", '["serve"]') in runtime
    assert ("EXPOSE", "8086") in runtime
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "CXG_TMP_ROOT=/var/lib/codex-app-gateway/sessions" in env
    runs = " ".join(args for keyword, args in runtime if keyword == "RUN")
    assert "bubblewrap" in runs and " tini" in runs
    build = " ".join(args for keyword, args in instructions[:runtime_start] if keyword == "RUN")
    assert "pip install -c constraints.txt ." in build
    # A plain `docker run` is non-root (children then share its uid, with one warning); the
    # chart runs the image as uid 0 with five capabilities, so children get their own uids.
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart_values["podSecurityContext"]["runAsUser"] == 0
    assert users[0] != "0:0"


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "tools/codex/node_modules", ".run"} <= ignored
    for needed in ("gateway", "pyproject.toml", "constraints.txt", "tools/codex"):
        assert needed not in ignored
