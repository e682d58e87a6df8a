"""Control over the S3 server a gateway test talks to: outages, inspection, the daemon's config.

``S3Outage`` is a TCP proxy on loopback in front of the real moto server. A gateway configured
with its endpoint reaches S3 only through it, so a test can take S3 down (every live connection
is cut and new ones are closed at once, before any request reaches the server) and bring it
back on the same endpoint, without touching the shared moto server; or hold every request in
the proxy (a slow store) until the test releases it.

``StrippingStore`` is an HTTP proxy in front of it that drops ``If-Match``/``If-None-Match``:
an S3-compatible store that silently ignores conditional writes.

``BucketView`` reads what is really stored (ETag, bytes, archive members, every version of a
versioned bucket) with a synchronous boto3 client, for assertions and ``eventually`` polls.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
import botocore.exceptions
import httpx2
import trio

from gateway.config import S3Settings
from gateway.store.base import archive_key
from gateway_tests.s3_server import MotoServer

COPY_CHUNK = 65536
CONDITIONAL_HEADERS = frozenset({b"if-match", b"if-none-match"})


def s3_env(settings: S3Settings) -> dict[str, str]:
    """The ``CXG_S3_*`` variables that point a daemon at ``settings`` (moto's test keys)."""
    assert settings.endpoint is not None
    return {
        "CXG_S3_BUCKET": settings.bucket,
        "CXG_S3_ENDPOINT": settings.endpoint,
        "CXG_S3_REGION": settings.region,
        "CXG_S3_PATH_STYLE": "true",
        "CXG_S3_ACCESS_KEY_ID": "test",
        "CXG_S3_SECRET_ACCESS_KEY": "test",
    }


@attrs.frozen
class StoredState:
    """One observation of a stored object: its ETag and its bytes."""

    etag: str
    body: bytes


class BucketView:
    """What the bucket really holds, read with boto3 behind the gateway's back."""

    def __init__(self, moto: MotoServer, bucket: str) -> None:
        self.client: Any = moto.boto_client()
        self.bucket = bucket

    def enable_versioning(self) -> None:
        """Keep every uploaded version, so uploads can be counted exactly."""
        self.client.put_bucket_versioning(
            Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"}
        )

    def state(self, workspace_id: str) -> StoredState | None:
        """The workspace's archive as stored now, or ``None`` when there is none."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=archive_key(workspace_id))
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return StoredState(etag=response["ETag"], body=response["Body"].read())

    def exists(self, workspace_id: str) -> bool:
        """Whether the workspace has an archive."""
        return self.state(workspace_id) is not None

    def versions(self, workspace_id: str) -> int:
        """How many versions of the archive were ever uploaded (versioned bucket)."""
        key = archive_key(workspace_id)
        listed = self.client.list_object_versions(Bucket=self.bucket, Prefix=key)
        return sum(1 for version in listed.get("Versions", []) if version["Key"] == key)

    def put(self, workspace_id: str, body: bytes) -> StoredState:
        """Store ``body`` as the workspace's archive, as another writer would."""
        self.client.put_object(Bucket=self.bucket, Key=archive_key(workspace_id), Body=body)
        state = self.state(workspace_id)
        assert state is not None
        return state

    def members(self, workspace_id: str) -> dict[str, bytes] | None:
        """The archive's regular files by name, or ``None`` when there is no archive."""
        state = self.state(workspace_id)
        if state is None:
            return None
        return archive_files(state.body)


def archive_files(body: bytes) -> dict[str, bytes]:
    """The regular files of a tar.gz archive, by name."""
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        for member in archive:
            if member.isfile():
                extracted = archive.extractfile(member)
                assert extracted is not None
                files[member.name] = extracted.read()
    return files


class S3Outage:
    """A loopback TCP proxy in front of an S3 server that a test can take down and bring back.

    Start it with ``nursery.start(outage.serve)``; point the gateway at ``endpoint``. While
    down, live connections are cut and new ones are closed unanswered, so nothing reaches the
    server: a write attempted during the outage certainly did not happen.
    """

    def __init__(self, target_endpoint: str) -> None:
        target = urlsplit(target_endpoint)
        assert target.hostname is not None and target.port is not None
        self._target = (target.hostname, target.port)
        self._port: int | None = None
        self._live: set[trio.CancelScope] = set()
        self.up = True
        self.connections = 0
        # While held, bytes from the gateway wait here before reaching S3 (a slow upload).
        self._flowing = trio.Event()
        self._flowing.set()
        self.held_chunks = 0

    @property
    def endpoint(self) -> str:
        """The URL a gateway uses to reach S3 through this proxy."""
        assert self._port is not None, "start serve() first"
        return f"http://127.0.0.1:{self._port}"

    async def serve(self, *, task_status: trio.TaskStatus[S3Outage]) -> None:
        """Listen on a loopback port until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self._port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            await trio.serve_listeners(self._relay, listeners, handler_nursery=nursery)

    def take_down(self) -> None:
        """S3 becomes unreachable: cut every live connection, refuse every new one."""
        self.up = False
        for scope in self._live:
            scope.cancel()

    def bring_back(self) -> None:
        """S3 is reachable again on the same endpoint."""
        self.up = True

    def hold(self) -> None:
        """Requests stall: what the gateway sends waits in the proxy until ``release``."""
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def release(self) -> None:
        """Held requests go on to S3."""
        self._flowing.set()

    async def _gate(self) -> None:
        if not self._flowing.is_set():
            self.held_chunks += 1
            await self._flowing.wait()

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.up:
                return
            self.connections += 1
            with trio.CancelScope() as scope:
                self._live.add(scope)
                try:
                    upstream = await trio.open_tcp_stream(*self._target)
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(
                            _copy, client, upstream, nursery.cancel_scope, self._gate
                        )
                        nursery.start_soon(_copy, upstream, client, nursery.cancel_scope, None)
                finally:
                    self._live.discard(scope)


async def _copy(
    source: trio.SocketStream,
    sink: trio.SocketStream,
    done: trio.CancelScope,
    gate: Callable[[], Awaitable[None]] | None,
) -> None:
    """Copy one direction; when either side ends, the whole connection ends."""
    try:
        while data := await source.receive_some(COPY_CHUNK):
            if gate is not None:
                await gate()
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        done.cancel()


@attrs.define
class StrippingStore:
    """An HTTP proxy on loopback in front of moto that drops If-Match / If-None-Match.

    It behaves like an S3-compatible server that ignores conditional writes: every request
    reaches moto, just without its conditions. ``stripped`` counts the headers removed.
    """

    upstream: str
    stripped: int = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = []
        for name, value in scope["headers"]:
            if name.lower() in CONDITIONAL_HEADERS:
                self.stripped += 1
            elif name.lower() != b"host":
                headers.append((name.decode(), value.decode()))
        # The S3 client sends absolute-form targets (http://host/path); keep the path only.
        target = urlsplit(scope["raw_path"].decode())
        url = self.upstream + target.path
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode()
        async with httpx2.AsyncClient(timeout=30) as http:
            answer = await http.request(scope["method"], url, headers=headers, content=body)
        await send(
            {
                "type": "http.response.start",
                "status": answer.status_code,
                "headers": [
                    (k.encode(), v.encode())
                    for k, v in answer.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer.content})
