"""Prometheus metrics: one place that names every signal the daemon exports."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SESSIONS_ACTIVE = Gauge("cxg_sessions_active", "Sessions whose codex child is running.")
CLIENTS_ATTACHED = Gauge("cxg_clients_attached", "Client WebSockets currently relayed.")
SESSION_STARTS = Counter("cxg_session_starts_total", "Session starts by result.", ["result"])
SESSION_STOPS = Counter("cxg_session_stops_total", "Session stops by reason.", ["reason"])
SESSION_START_SECONDS = Histogram(
    "cxg_session_start_seconds",
    "Time from first connect to a ready child (restore, render, spawn, readiness).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SESSION_STOP_SECONDS = Histogram(
    "cxg_session_stop_seconds",
    "Time from stop request to the final save finishing.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SAVES = Counter("cxg_saves_total", "CODEX_HOME saves by kind and result.", ["kind", "result"])
SAVE_SECONDS = Histogram(
    "cxg_save_seconds",
    "Duration of CODEX_HOME saves.",
    ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
UNSAVED_HOMES = Gauge(
    "cxg_unsaved_homes", "Stopped sessions whose CODEX_HOME is not yet saved (kept on disk)."
)
FRAMES = Counter("cxg_frames_relayed_total", "WebSocket frames relayed.", ["direction"])
FRAME_BYTES = Counter(
    "cxg_frame_bytes_relayed_total",
    "Bytes relayed as on the wire (frame headers and payloads).",
    ["direction"],
)
INFLIGHT_BYTES = Gauge(
    "cxg_ws_inflight_bytes",
    "Client bytes held for checking and forwarding (bounded by CXG_WS_INFLIGHT_BUDGET).",
)
SAVE_BYTES = Counter("cxg_save_bytes_total", "Compressed archive bytes uploaded.", ["kind"])
MODEL_TOKEN_REFRESHES = Counter(
    "cxg_model_token_refreshes_total", "Model token refreshes by result.", ["result"]
)
WS_CLOSES = Counter(
    "cxg_ws_closes_total", "WebSocket closes by side that closed and code.", ["side", "code"]
)
AUTH_RESULTS = Counter("cxg_auth_results_total", "Authentication outcomes.", ["result"])
STORE_UNFENCED = Gauge(
    "cxg_store_unfenced",
    "1 when the object store ignores conditional writes and the gateway runs unfenced "
    "(CXG_S3_ALLOW_UNFENCED=true).",
)
BUILD_INFO = Gauge(
    "cxg_build_info",
    "Always 1: this gateway's version and the codex version its start-up check found.",
    ["version", "codex_version"],
)
POLICY_REFUSALS = Counter(
    "cxg_policy_refusals_total",
    "Client messages refused by the protocol policy, by rule.",
    ["rule"],
)
FORWARDS = Counter(
    "cxg_forwarded_connections_total",
    "Connects forwarded to the pod that owns their workspace, by result (relayed, owner_moved: "
    "a 409 that was retried, gave_up: 409 on every try, unreachable, refused: the owner's "
    "refusal passed on).",
    ["result"],
)
FORWARDED_ACTIVE = Gauge(
    "cxg_forwarded_clients", "Clients relayed to another pod through this one right now."
)
FORWARDED_BYTES = Counter(
    "cxg_forwarded_bytes_total",
    "Bytes relayed between forwarded clients and their workspace's pod, as on the wire.",
    ["direction"],
)
HOP_FAILURES = Counter(
    "cxg_hop_failures_total",
    "Pod-to-pod hops that failed, by stage (connect, upgrade, mid_stream).",
    ["stage"],
)
PEER_CONNECTS = Counter(
    "cxg_peer_connects_total",
    "Forwarded connects received on the internal listener, by result.",
    ["result"],
)
OWNER_ACQUISITIONS = Counter(
    "cxg_owner_acquisitions_total",
    "Workspaces this pod became the owner of (replica mode), by how: new (no record), "
    "released (let go by its owner), takeover (its owner's heartbeat went silent).",
    ["kind"],
)
OWNER_COMMITS = Counter(
    "cxg_owner_commits_total",
    "Snapshot commits on ownership records (replica mode), by result: ok, superseded (another "
    "pod owns the workspace: refused), failed (store unreachable; retried).",
    ["result"],
)
OWNER_RELEASES = Counter(
    "cxg_owner_releases_total", "Workspaces released after a final save, by result.", ["result"]
)
REPLICA_EVENTS = Counter(
    "cxg_replica_events_total",
    "Replica-mode events: heartbeat_failed, fenced (self-fencing), duplicate_pod_name.",
    ["event"],
)
