"""A real S3-compatible server on loopback for persistence tests: moto's ThreadedMotoServer.

``gateway_tests/conftest.py`` registers the fixtures for every test module.

``moto_server`` starts one server per test session (a thread, so a plain sync fixture);
``atomic_moto`` / ``atomic_s3_settings`` the same with conditional writes atomic as on S3;
``s3_settings`` wipes its state, creates a fresh bucket and returns the ``S3Settings`` a store
needs. ``closed_port_settings`` points at a port nobody listens on (an unreachable store).
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import boto3
import pytest
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

from gateway.config import S3Settings, Secret

BUCKET = "codex-homes"
REGION = "us-east-1"


@attrs.frozen
class MotoServer:
    """A running server: its endpoint URL and a way to stop it early."""

    endpoint: str
    server: ThreadedMotoServer | AtomicMotoServer

    def reset(self) -> None:
        """Wipe every bucket and object (moto's reset API)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def boto_client(self):  # type: ignore[no-untyped-def]
        """A synchronous boto3 client, for tests to inspect or tamper with the bucket."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )


@contextmanager
def running_moto() -> Iterator[MotoServer]:
    """A moto server on 127.0.0.1 with an OS-chosen port, stopped when the block ends."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoServer(endpoint=f"http://{host}:{port}", server=server)
    finally:
        server.stop()


class _OneRequestAtATime:
    """A WSGI wrapper that runs moto's requests one at a time.

    moto checks ``If-None-Match`` / ``If-Match`` and then writes, without a lock: two
    conditional writes racing on one key can both succeed, which S3 never allows. Serialised,
    every conditional write is atomic as on S3 (each body is read and each answer built whole
    inside the lock; moto holds objects in memory anyway).
    """

    def __init__(self, app: Any) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with self._lock:
            return list(self._app(environ, start_response))


class AtomicMotoServer:
    """moto's server with atomic conditional writes (``_OneRequestAtATime``), in a thread."""

    def __init__(self) -> None:
        app = _OneRequestAtATime(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            "127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def get_host_and_port(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


@contextmanager
def running_atomic_moto() -> Iterator[MotoServer]:
    """Like ``running_moto``, with conditional writes atomic as on S3 (replica mode's tests)."""
    server = AtomicMotoServer()
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoServer(endpoint=f"http://{host}:{port}", server=server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def atomic_moto() -> Iterator[MotoServer]:
    """One atomic moto server for the whole test session (replica mode's races)."""
    with running_atomic_moto() as server:
        yield server


@pytest.fixture
def atomic_s3_settings(atomic_moto: MotoServer) -> S3Settings:
    """A clean atomic server with an empty bucket; the settings to reach it."""
    atomic_moto.reset()
    atomic_moto.boto_client().create_bucket(Bucket=BUCKET)
    return settings_for(atomic_moto.endpoint)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto server for the whole test session."""
    with running_moto() as server:
        yield server


def settings_for(endpoint: str, bucket: str = BUCKET) -> S3Settings:
    """``S3Settings`` for ``endpoint`` with moto's accept-anything credentials."""
    return S3Settings(
        bucket=bucket,
        endpoint=endpoint,
        region=REGION,
        access_key_id="test",
        secret_access_key=Secret("test"),
        path_style=True,
    )


@pytest.fixture
def s3_settings(moto_server: MotoServer) -> S3Settings:
    """A clean server with an empty bucket; the settings to reach it."""
    moto_server.reset()
    moto_server.boto_client().create_bucket(Bucket=BUCKET)
    return settings_for(moto_server.endpoint)


@pytest.fixture
def closed_port_settings() -> S3Settings:
    """Settings for an endpoint where nothing listens (connection refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return settings_for(f"http://127.0.0.1:{port}")
