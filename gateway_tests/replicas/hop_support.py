"""Two in-process gateways in replica mode and what the hop tests need around them.

Until the ownership records decide placement, a test decides it: ``TablePlacement`` is a
small fixed table of our own ``Placement`` seam (``SessionServices.placement``) — gateway B's
``claim`` raises ``OwnedElsewhere(owner=A)`` for a workspace, A's ``holds`` answers for that
epoch. Everything else is the real daemon: real sockets, the fake codex as the child, moto S3
as the store (replica mode requires S3).

``HopTap`` is a loopback TCP relay put between B and A's internal listener: it records what A
receives and can cut every hop at once (both sides get a reset), as a lost pod would.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from gateway.codex_home.persistence import Persistence
from gateway.replicas.placement import OwnedElsewhere, PeerOwner
from gateway_tests.harness import RunningGateway, gateway_env, start_gateway
from gateway_tests.s3_control import s3_env

PEER_SECRET = "test-peer-secret-shared-by-both-pods"
# What A's tap keeps of each hop connection (upstream direction): the head and some frames.
TAP_RECORD_BYTES = 1 << 20


@attrs.define
class TablePlacement:
    """A fixed ownership table as one pod sees it (``owners``: workspace → owner)."""

    pod: str
    owners: dict[str, PeerOwner] = attrs.field(factory=dict)
    # Every claim, in order (a forwarded connect's retry re-reads through claim).
    claims: list[str] = attrs.field(factory=list)
    # Called before each claim answers (count of claims so far): lets a test move the owner
    # between two tries.
    before_claim: Callable[[str, int], None] | None = None

    async def claim(self, workspace_id: str) -> int:
        """This pod's epoch when the table names it (or nobody), else ``OwnedElsewhere``."""
        self.claims.append(workspace_id)
        if self.before_claim is not None:
            self.before_claim(workspace_id, len(self.claims))
        await trio.lowlevel.checkpoint()
        owner = self.owners.get(workspace_id)
        if owner is None:
            return 1
        if owner.pod != self.pod:
            raise OwnedElsewhere(owner)
        return owner.epoch

    def holds(self, workspace_id: str, epoch: int) -> bool:
        """Whether the table names this pod at exactly ``epoch``."""
        owner = self.owners.get(workspace_id)
        return owner is not None and owner.pod == self.pod and owner.epoch == epoch

    async def release(self, workspace_id: str, epoch: int) -> None:
        """The table is the test's to change."""

    def set_draining(self) -> None:
        """The table has no heartbeat to mark; the manager refuses new sessions itself."""

    def owner_gone(self, owner: PeerOwner) -> bool:
        """The table's owners live as long as the test says."""
        return False

    async def peer_owner(self, workspace_id: str) -> PeerOwner | None:
        """The table's owner when it is another pod."""
        owner = self.owners.get(workspace_id)
        return owner if owner is not None and owner.pod != self.pod else None

    def snapshots(self, workspace_id: str, epoch: int, persistence: Persistence) -> None:
        """Saves go to the archive key itself, as on a single pod."""
        return None

    async def describe_owners(self) -> dict[str, Any]:
        """Nothing beyond the sessions themselves."""
        return {}


def free_port() -> int:
    """A loopback port free right now (for an internal listener whose address peers must
    know before it starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@attrs.define
class Pod:
    """One gateway of the pair."""

    name: str
    gateway: RunningGateway
    placement: TablePlacement
    peer_addr: str
    tmp: Path

    def codex_homes(self) -> list[Path]:
        """The CODEX_HOME directories of this pod's sessions."""
        return [p.parent for p in self.tmp.glob("sessions/**/fake-codex-start.json")]


async def start_pod(
    nursery: trio.Nursery,
    tmp_path: Path,
    name: str,
    codex_bin: Path | str,
    s3: dict[str, str],
    placement: TablePlacement,
    **env: str,
) -> Pod:
    """A gateway in replica mode named ``name`` with ``placement``."""
    tmp = tmp_path / name
    tmp.mkdir()
    peer_addr = f"127.0.0.1:{free_port()}"
    overrides = {
        **s3,
        "CXG_POD_NAME": name,
        "CXG_PEER_ADDR": peer_addr,
        "CXG_PEER_LISTEN_ADDR": peer_addr,
        "CXG_PEER_SECRET": PEER_SECRET,
        **env,
    }
    running = await start_gateway(
        nursery, gateway_env(tmp, codex_bin, **overrides), placement=placement
    )
    return Pod(name, running, placement, peer_addr, tmp)


class HopTap:
    """A TCP relay in front of an internal listener: records, and can cut, every hop."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self.address = ""
        self.received: list[bytearray] = []  # what went upstream, per connection
        self._pairs: list[tuple[trio.SocketStream, trio.SocketStream]] = []
        self.connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[HopTap]) -> None:
        """Relay until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        self.address = f"{host}:{port}"
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        self.connections += 1
        record = bytearray()
        self.received.append(record)
        try:
            upstream = await trio.open_tcp_stream(*self._upstream)
        except OSError:
            await downstream.aclose()
            return
        self._pairs.append((downstream, upstream))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, downstream, upstream, record, nursery)
            nursery.start_soon(self._pump, upstream, downstream, None, nursery)

    @staticmethod
    async def _pump(
        source: trio.SocketStream,
        sink: trio.SocketStream,
        record: bytearray | None,
        nursery: trio.Nursery,
    ) -> None:
        try:
            while chunk := await source.receive_some(65536):
                if record is not None and len(record) < TAP_RECORD_BYTES:
                    record += chunk[: TAP_RECORD_BYTES - len(record)]
                await sink.send_all(chunk)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            nursery.cancel_scope.cancel()

    def cut(self) -> None:
        """Reset every hop now (both ends get an RST), as a pod lost mid-stream."""
        for pair in self._pairs:
            for stream in pair:
                sock = stream.socket
                if sock.fileno() >= 0:
                    # Linger on, zero seconds: close sends a reset, not a FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
        self._pairs.clear()


__all__ = [
    "PEER_SECRET",
    "HopTap",
    "Pod",
    "TablePlacement",
    "free_port",
    "s3_env",
    "start_pod",
]
