"""Processes the benchmarks run: the gateway daemon, codex children, nginx, the S3 server."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from gateway.sessions.child import app_server_argv, build_child_env
from gateway_tests.bench.common import children_of, free_port, wait_until
from gateway_tests.fakes.launchers import make_fake_codex_launcher
from gateway_tests.harness import ADMIN_SECRET, HMAC_SECRET, token_for

PYTHON = sys.executable
_LISTENING = re.compile(r"listening on: (ws://\S+)")
DAEMON_START_TIMEOUT = 60.0
CHILD_START_TIMEOUT = 60.0


def real_codex_bin() -> Path:
    """The pinned real codex (installed by the Makefile's codex step)."""
    from gateway_tests.conftest import find_real_codex

    return find_real_codex()


def fake_codex_bin(directory: Path, **knobs: str) -> Path:
    """A launcher for the fake codex with ``knobs`` (e.g. ``ECHO_BINARY="1"``)."""
    return make_fake_codex_launcher(directory, **knobs)


# --- the gateway --------------------------------------------------------------------------


def gateway_env(run_dir: Path, codex_bin: Path, **overrides: str) -> dict[str, str]:
    """Environment for a benchmark daemon: dev auth, local store, loopback, production logging."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CXG_", "FAKE_CODEX_", "AWS_"))
    }
    env.update(
        {
            "CXG_INBOUND_HMAC_SECRET": HMAC_SECRET,
            "CXG_ADMIN_SECRET": ADMIN_SECRET,
            "CXG_TMP_ROOT": str(run_dir / "sessions"),
            "CXG_LOCAL_STORE_DIR": str(run_dir / "store"),
            "CXG_LISTEN_ADDR": "127.0.0.1:0",
            "CXG_CODEX_BIN": str(codex_bin),
            "CXG_LOG_FORMAT": "json",
            "CXG_LOG_LEVEL": "info",
            "CXG_CHILD_STOP_GRACE": "5s",
            "CXG_CHECKPOINT_INTERVAL": "0",
            "CXG_DRAIN_BUDGET": "120s",
            "CXG_CHILD_READY_TIMEOUT": "120s",
            # A model provider nobody listens on: the benchmarks never run a turn.
            "CXG_MODEL_PROVIDER_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
            "CXG_BENCH_CHILDREN_FILE": str(run_dir / "children.json"),
        }
    )
    env.update(overrides)
    return env


@attrs.define
class Gateway:
    """A running benchmark daemon."""

    process: trio.Process
    http_url: str
    run_dir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ws_url(self) -> str:
        return "ws://" + self.http_url.removeprefix("http://") + "/"

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.http_url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def child(self, workspace: str) -> dict[str, Any]:
        """The recorded child of ``workspace``: url, token, pid."""
        children = json.loads((self.run_dir / "children.json").read_text())
        entry: dict[str, Any] = children[workspace]
        return entry

    def children(self) -> dict[str, dict[str, Any]]:
        """Every child recorded so far, by workspace."""
        path = self.run_dir / "children.json"
        children: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}
        return children

    @staticmethod
    def headers(workspace: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {token_for(workspace)}")]


@contextlib.asynccontextmanager
async def running_gateway(
    run_dir: Path, codex_bin: Path, **overrides: str
) -> AsyncIterator[Gateway]:
    """Run ``python -m gateway_tests.bench.gatewayd`` until the block ends, then drain it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = gateway_env(run_dir, codex_bin, **overrides)
    log_file = (run_dir / "gateway.log").open("ab")
    process = await trio.lowlevel.open_process(
        [PYTHON, "-m", "gateway_tests.bench.gatewayd"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log_file,
        env=env,
        cwd=str(run_dir),
    )
    try:
        assert process.stdout is not None
        buffer = b""
        with trio.fail_after(DAEMON_START_TIMEOUT):
            while b"\n" not in buffer:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"gateway exited at start; see {run_dir / 'gateway.log'}")
                buffer += chunk
        started = json.loads(buffer.split(b"\n", 1)[0])
        yield Gateway(process=process, http_url=started["urls"][0], run_dir=run_dir)
    finally:
        with trio.CancelScope(shield=True):
            await stop_process_tree(process, grace=150.0)
            log_file.close()


async def stop_process_tree(process: trio.Process, grace: float) -> None:
    """SIGTERM ``process`` and wait; after ``grace``, SIGKILL it and whatever it left behind."""
    if process.returncode is None:
        descendants = children_of(process.pid)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await process.wait()
        if process.returncode is None:
            descendants = sorted(set(descendants) | set(children_of(process.pid)))
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            for pid in descendants:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


# --- a codex child started directly ---------------------------------------------------------


@attrs.define
class DirectChild:
    """A ``codex app-server`` started by the benchmark itself (the baseline)."""

    process: trio.Process
    url: str
    token: str

    @property
    def port(self) -> int:
        return int(self.url.removeprefix("ws://").split("/", 1)[0].rsplit(":", 1)[1])

    def headers(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]


def prepare_home(root: Path, config_toml: str | None) -> tuple[Path, Path, dict[str, str]]:
    """A CODEX_HOME and HOME under ``root`` and the allow-listed environment the gateway uses."""
    codex_home, home = root / "codex-home", root / "home"
    for path in (codex_home, home):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if config_toml is not None:
        (codex_home / "config.toml").write_text(config_toml)
    env = build_child_env(os.environ, codex_home=codex_home, home=home, extra={})
    return codex_home, home, env


@contextlib.asynccontextmanager
async def direct_child(
    codex_bin: Path, env: Mapping[str, str], cwd: Path
) -> AsyncIterator[DirectChild]:
    """Spawn ``codex app-server`` on an ephemeral loopback port with a capability token.

    Yields as soon as the ``listening on`` banner names the port (connecting is the caller's
    part of the measurement); stops the child (SIGTERM, then SIGKILL) when the block ends.
    """
    token = secrets.token_urlsafe(32)
    # The very command line a session uses, so the baseline starts the same child.
    argv = app_server_argv(str(codex_bin), hashlib.sha256(token.encode()).hexdigest())
    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(env),
        cwd=str(cwd),
        start_new_session=True,
    )
    try:
        async with trio.open_nursery() as nursery:
            assert process.stderr is not None
            stderr = process.stderr
            buffer = b""
            url = None
            with trio.fail_after(CHILD_START_TIMEOUT):
                while url is None:
                    chunk = await stderr.receive_some(65536)
                    if not chunk:
                        raise RuntimeError(f"{codex_bin} exited before its banner")
                    buffer += chunk
                    match = _LISTENING.search(buffer.decode("utf-8", "replace"))
                    if match:
                        url = match.group(1)

            async def drain() -> None:
                while await stderr.receive_some(65536):
                    pass

            nursery.start_soon(drain)
            yield DirectChild(process=process, url=url, token=token)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                with trio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


# --- nginx ----------------------------------------------------------------------------------

NGINX_CONFIG = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{nginx_port};
        location / {{
            proxy_pass http://127.0.0.1:{child_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    """The nginx binary; installs the Debian package first when there is none."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise RuntimeError("nginx is not installed and there is no apt-get to install it")
    print("  installing nginx (Debian package nginx-light) …", flush=True)
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=apt_env, timeout=600)
    for package in ("nginx-light", "nginx"):
        installed = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
            env=apt_env,
            timeout=600,
            check=False,
        )
        if installed.returncode == 0:
            break
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        raise RuntimeError("installing nginx failed")
    return found


def nginx_version() -> str:
    try:
        out = subprocess.run(
            [nginx_binary(), "-v"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, RuntimeError):
        return "unavailable"
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


@attrs.define
class Nginx:
    port: int
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def running_nginx(prefix: Path, child_port: int) -> Iterator[Nginx]:
    """A private nginx (own prefix and config, one worker) proxying WebSockets to the child."""
    binary = nginx_binary()
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONFIG.format(prefix=prefix, nginx_port=port, child_port=child_port))
    with (prefix / "stderr.log").open("ab") as stderr:
        process = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
        )
    try:
        if not wait_until(lambda: _port_open(port) or process.poll() is not None, 20):
            raise RuntimeError(f"nginx did not listen; see {prefix}")
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited ({process.returncode}); see {prefix}/error.log")
        yield Nginx(port=port, process=process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# --- the S3 server --------------------------------------------------------------------------


@contextlib.contextmanager
def running_moto(log_path: Path) -> Iterator[str]:
    """moto's S3 server in its own process (its CPU and memory are not the measured ones)."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [PYTHON, "-m", "gateway_tests.bench.motod"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
        if not line.startswith("http://"):
            raise RuntimeError(f"moto server did not start; see {log_path}")
        yield line
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
