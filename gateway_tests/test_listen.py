"""Listen addresses as the Go service read them: ``:PORT`` is every interface, both families."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import trio
from structlog.testing import capture_logs

from gateway.web.server import bind_addresses
from gateway_tests.conftest import REPO
from gateway_tests.harness import LaunchGateway


def _private_network_namespace_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, check=False
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not _private_network_namespace_works(),
    reason="needs unprivileged network namespaces (unshare -rn) to listen on every interface "
    "without exposing the machine",
)
async def test_ipv6_and_ipv4_clients_reach_a_port_only_listener(tmp_path: Path) -> None:
    # In a namespace of its own the daemon may listen on every interface: only its own
    # loopback exists there. The probe starts the real daemon with ":8086" and ":9090".
    command = [
        "unshare",
        "-rn",
        "sh",
        "-c",
        f'ip link set lo up && exec "{sys.executable}" -m gateway_tests.dualstack_probe "$0"',
        str(tmp_path),
    ]
    with trio.fail_after(90):
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, cwd=REPO, check=False
        )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    seen = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert seen == {
        "urls": ["http://[::]:8086"],
        "main_v6": 200,
        "main_v4": 200,
        "metrics_v6": 200,
        "metrics_v4": 200,
    }


@pytest.mark.parametrize("listen_addr", [":0", "0.0.0.0:0", "[::]:0"])
def test_wildcard_addresses_become_one_dual_stack_socket(listen_addr: str) -> None:
    [bind] = bind_addresses(listen_addr)
    assert bind.startswith("fd://")
    sock = socket.socket(fileno=int(bind.removeprefix("fd://")))
    try:  # bound, never listening: nothing can connect to it
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert sock.getsockname()[0] == "::"
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("listen_addr", "bind"),
    [("127.0.0.1:8086", "127.0.0.1:8086"), ("[::1]:8086", "[::1]:8086"), ("h:1", "h:1")],
)
def test_explicit_hosts_are_bound_as_given(listen_addr: str, bind: str) -> None:
    assert bind_addresses(listen_addr) == [bind]


@pytest.mark.parametrize("failure", [errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL])
@pytest.mark.parametrize("where", ["socket", "bind"])
def test_a_host_without_ipv6_degrades_to_ipv4_with_one_log_line(failure: int, where: str) -> None:
    # The kernel's answers on a host booted without IPv6, at socket() or at bind().
    class NoIpv6Socket(socket.socket):
        def bind(self, address: object) -> None:
            raise OSError(failure, os.strerror(failure))

    def create(family: int, kind: int) -> socket.socket:
        if where == "socket":
            raise OSError(failure, os.strerror(failure))
        return NoIpv6Socket(family, kind)

    with capture_logs() as logs:
        assert bind_addresses(":8086", create) == ["0.0.0.0:8086"]
    assert [entry["event"] for entry in logs] == ["listen.ipv4_only"]
    assert logs[0]["listen_addr"] == ":8086"


def test_a_port_in_use_is_an_error_not_a_silent_ipv4_fallback() -> None:
    def create(family: int, kind: int) -> socket.socket:
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))

    with pytest.raises(OSError, match="in use"):
        bind_addresses(":8086", create)


@pytest.mark.parametrize(
    ("listen_addr", "reachable", "unreachable"),
    [("[::1]:0", "[::1]", "127.0.0.1"), ("127.0.0.1:0", "127.0.0.1", "[::1]")],
)
async def test_explicit_loopback_forms_listen_on_their_family_only(
    launch_gateway: LaunchGateway, listen_addr: str, reachable: str, unreachable: str
) -> None:
    running = await launch_gateway(CXG_LISTEN_ADDR=listen_addr)
    port = running.http_url.rsplit(":", 1)[1]
    assert running.http_url == f"http://{reachable}:{port}"
    async with httpx2.AsyncClient(timeout=10) as http:
        assert (await http.get(f"http://{reachable}:{port}/healthz")).status_code == 200
        with pytest.raises(httpx2.ConnectError):
            await http.get(f"http://{unreachable}:{port}/healthz")
    await running.shutdown()
