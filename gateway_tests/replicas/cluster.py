"""A replica-mode cluster of real gateway processes on loopback, sharing one moto bucket.

Each pod is ``python -m gateway serve`` with its own pod name (``CXG_POD_NAME``), its own
``CXG_PEER_ADDR`` / ``CXG_PEER_LISTEN_ADDR`` ports, its own ``CXG_TMP_ROOT`` (its own "node
disk") and a short takeover time. Its stderr (JSON log lines) is read continuously; every line
is stamped with the *test's* clock on arrival, so what happened on different pods can be
ordered (which pod started a child for a workspace, and when; when it stopped).

The scenarios assert on ownership facts — which pod ran a child, child pids and their start and
stop, what the bucket holds — never on the status a non-owner answers (until the forwarder
exists it is a 503; afterwards the connect is relayed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import attrs
import httpx2
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionRejected, open_websocket_url

from gateway.config import S3Settings
from gateway_tests.harness import ADMIN_SECRET, MAX_MESSAGE, Rpc, gateway_env, token_for
from gateway_tests.s3_control import s3_env

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
PEER_SECRET = "cluster-peer-secret-for-tests-only"
# The shortest takeover time the configuration allows.
TAKEOVER_SECONDS = 5.0


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _base_env() -> dict[str, str]:
    env = {name: os.environ[name] for name in ("PATH", "LANG", "TZ") if name in os.environ}
    env["HOME"] = os.environ.get("HOME", "/")
    return env


@attrs.define(eq=False)
class Pod:
    """One gateway process of the cluster."""

    name: str
    env: dict[str, str]
    process: trio.Process | None = None
    url: str = ""
    # (arrival time on the test's clock, record)
    records: list[tuple[float, dict[str, Any]]] = attrs.field(factory=list)
    lines: list[str] = attrs.field(factory=list)
    exited: trio.Event = attrs.field(factory=trio.Event)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        assert self.process is not None
        return self.process.pid

    @property
    def output(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        return "\n".join(self.lines)

    @property
    def ws_url(self) -> str:
        """Where clients connect."""
        return "ws://" + self.url.removeprefix("http://") + "/"

    async def pump(self) -> None:
        """Read stderr to EOF, then reap the process."""
        assert self.process is not None and self.process.stderr is not None
        buffer = b""
        while chunk := await self.process.stderr.receive_some(65536):
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                self._add(raw)
        if buffer:
            self._add(buffer)
        await self.process.wait()
        self.exited.set()
        self._wake()

    def _add(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace")
        self.lines.append(line)
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            self.records.append((trio.current_time(), record))
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def find(self, event: str, **fields: Any) -> list[tuple[float, dict[str, Any]]]:
        """Every record named ``event`` whose fields include ``fields``, with its arrival time."""
        return [
            (at, record)
            for at, record in self.records
            if record.get("event") == event
            and all(record.get(key) == value for key, value in fields.items())
        ]

    async def wait_for_log(self, event: str, **fields: Any) -> tuple[float, dict[str, Any]]:
        """The first record named ``event`` with ``fields`` (raises if the process exits first)."""
        while True:
            found = self.find(event, **fields)
            if found:
                return found[0]
            if self.exited.is_set():
                raise AssertionError(f"{self.name} exited before logging {event}:\n{self.output}")
            await self._changed.wait()

    def children_started(self, workspace_id: str) -> list[tuple[float, int]]:
        """(time, pid) of every codex child this pod started for ``workspace_id``."""
        return [
            (at, int(record["pid"]))
            for at, record in self.find("session.started", workspace_id=workspace_id)
        ]

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the daemon itself."""
        assert self.process is not None
        os.kill(self.process.pid, signum)

    async def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of this pod's ``/metrics`` (0 when it is not exported)."""
        async with httpx2.AsyncClient(timeout=10) as http:
            response = await http.get(f"{self.url}/metrics")
        response.raise_for_status()
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    async def admin_sessions(self) -> dict[str, Any]:
        """``GET /admin/sessions`` of this pod."""
        async with httpx2.AsyncClient(timeout=10) as http:
            response = await http.get(
                f"{self.url}/admin/sessions", headers={"Authorization": f"Bearer {ADMIN_SECRET}"}
            )
        response.raise_for_status()
        listing: dict[str, Any] = response.json()
        return listing


@attrs.define(eq=False)
class Cluster:
    """Gateway processes in one nursery; every one still running is killed at the end."""

    nursery: trio.Nursery
    root: Path
    codex_bin: Path
    s3: S3Settings
    extra_env: dict[str, str]
    pods: list[Pod] = attrs.field(factory=list)

    def pod_env(self, name: str, **overrides: str) -> dict[str, str]:
        """The environment of pod ``name``: replica mode on the shared bucket."""
        env = _base_env()
        # Where this pod's internal listener binds is where the others reach it.
        peer = f"127.0.0.1:{free_port()}"
        env.update(
            gateway_env(
                self.root / name,
                self.codex_bin,
                CXG_LOG_FORMAT="json",
                CXG_POD_NAME=name,
                CXG_PEER_ADDR=peer,
                CXG_PEER_LISTEN_ADDR=peer,
                CXG_PEER_SECRET=PEER_SECRET,
                CXG_OWNER_TAKEOVER_AFTER=f"{TAKEOVER_SECONDS:g}s",
                **s3_env(self.s3),
                **self.extra_env,
            )
        )
        env.update(overrides)
        return env

    async def start(self, name: str, *, wait: bool = True, **overrides: str) -> Pod:
        """Start pod ``name``; with ``wait``, return once it serves (else once it runs)."""
        pod = Pod(name, self.pod_env(name, **overrides))
        pod.process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "gateway", "serve"],
            env=pod.env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.pods.append(pod)
        self.nursery.start_soon(pod.pump)
        if wait:
            with trio.fail_after(START_TIMEOUT):
                _, serving = await pod.wait_for_log("daemon.serving")
                # The stop signals are handled from just after the start-up checks.
                await pod.wait_for_log("startup.checks_passed")
            pod.url = serving["urls"][0]
        return pod

    def kill(self, pod: Pod) -> None:
        """SIGKILL the pod's daemon and everything it started (a lost node)."""
        for pid in [pod.pid, *descendants(pod.pid)]:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def children_started(self, workspace_id: str) -> list[tuple[float, str, int]]:
        """(time, pod, pid) of every child any pod started for ``workspace_id``, in order."""
        found = [
            (at, pod.name, pid)
            for pod in self.pods
            for at, pid in pod.children_started(workspace_id)
        ]
        return sorted(found)

    async def aclose(self) -> None:
        """Kill whatever still runs (a failing test must not leave a daemon behind)."""
        for pod in self.pods:
            if pod.process is not None and pod.process.returncode is None:
                self.kill(pod)
        with trio.CancelScope(shield=True), trio.move_on_after(15):
            for pod in self.pods:
                await pod.exited.wait()
        # Each pod's log beside its session root, for a failing scenario's reader.
        for number, pod in enumerate(self.pods):
            (self.root / f"{pod.name}.{number}.log").write_text(pod.output)


@asynccontextmanager
async def running_cluster(
    tmp_path: Path, codex_bin: Path, s3: S3Settings, **extra_env: str
) -> AsyncIterator[Cluster]:
    """A cluster whose pods are started with ``cluster.start(name)``."""
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path, codex_bin, s3, dict(extra_env))
        try:
            yield cluster
        finally:
            await cluster.aclose()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), from /proc; only this test's tree."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.append(child)
                    pending.append(child)
    return found


@asynccontextmanager
async def client(
    pod: Pod, workspace_id: str, *, initialize: bool = True, token: str | None = None
) -> AsyncIterator[Rpc]:
    """A JSON-RPC client of ``workspace_id`` connected to ``pod`` (``token``: one of its own)."""
    token = token_for(workspace_id) if token is None else token
    async with open_websocket_url(
        pod.ws_url,
        extra_headers=[(b"authorization", f"Bearer {token}".encode())],
        max_message_size=MAX_MESSAGE,
        connect_timeout=30,
    ) as ws:
        rpc = Rpc(ws)
        if initialize:
            await rpc.initialize()
        yield rpc


async def try_connect(pod: Pod, workspace_id: str) -> int:
    """Open and close one connect of ``workspace_id`` at ``pod``: 101, or the refusal's status."""
    try:
        async with client(pod, workspace_id, initialize=False):
            return 101
    except ConnectionRejected as refused:
        return int(refused.status_code)


async def until_true(predicate: Callable[[], Any], *, within: float, every: float = 0.2) -> None:
    """Poll an (async or plain) predicate about the store or a pod until it holds."""
    with trio.fail_after(within):
        while True:
            result = predicate()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await trio.sleep(every)


def store_view(records: Mapping[str, Any]) -> dict[str, Any]:
    """A readable summary of an ownership record for assertion messages."""
    return {key: records.get(key) for key in ("pod", "epoch", "state", "committed")}
