"""An S3 object store on Trio: aiobotocore with its httpx2 backend.

Writes stream: a body that fits in one part goes up as a single conditional ``PutObject``;
anything larger becomes a multipart upload of ``part_size`` parts, so memory holds at most one
part whatever the archive size.

Fencing (see ``docs`` in ``gateway.codex_home.persistence`` for the whole story):

* single ``PutObject``: ``If-Match: <etag>`` / ``If-None-Match: *`` — the store decides
  atomically; honoured by AWS S3, MinIO, moto and most S3-compatible servers;
* multipart: the same condition on ``CompleteMultipartUpload`` (AWS S3 honours it), plus a
  ``HeadObject`` check before the upload starts and again right before completing, aborting the
  upload on a mismatch. On a store that ignores conditions on completion (moto 5.2.5, some
  older S3-compatible servers) the checks still reject every writer that is already stale and
  every write that races with a long upload; only a competing write landing in the one round
  trip between the last check and the completion can be overwritten.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from typing import TYPE_CHECKING, Any, NoReturn

import aiobotocore.httpxsession
import aiobotocore.session
import attrs
import botocore.exceptions
import trio
from aiobotocore.config import AioConfig

from gateway.config import S3Settings
from gateway.store.base import ObjectNotFound, PreconditionFailed, StoreError, StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Iterator

    from types_aiobotocore_s3 import S3Client

MIB = 1024 * 1024
# S3 refuses parts under 5 MiB (except the last); 8 MiB keeps part counts low for big homes
# while one buffered part stays small.
DEFAULT_PART_SIZE = 8 * MIB
MIN_PART_SIZE = 5 * MIB
READ_CHUNK_SIZE = 256 * 1024
# Aborting a multipart upload is cleanup that must happen even when the caller was cancelled,
# but must never hold a shutdown hostage.
_ABORT_BUDGET_SECONDS = 10.0

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.get("Code", "?")
        message = error.get("Message") or ""
        return f"{code} (HTTP {status}){': ' + message if message else ''}"
    return f"{type(exc).__name__}: {exc}"


def _client_error_code(exc: botocore.exceptions.ClientError) -> tuple[str, int | None]:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


# aiobotocore's httpx2 session streams a file-like body by iterating it, and a BytesIO iterates
# by *lines*: for compressed data that is hundreds of thousands of ~260-byte sends per part,
# which made saves run at a few MiB/s. Iterating in large chunks sends the same bytes.
_BODY_CHUNK = 256 * 1024


class _ChunkedBody(io.BytesIO):
    """A request body that botocore can seek and hash, and that iterates in large chunks."""

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(_BODY_CHUNK):
            yield chunk


@attrs.define
class _S3Object:
    """One ``GetObject`` response being streamed."""

    generation: str
    size: int | None
    _body: Any
    _where: str

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield the body in chunks of at most ``READ_CHUNK_SIZE`` bytes."""
        while True:
            try:
                chunk = await self._body.read(READ_CHUNK_SIZE)
            except (botocore.exceptions.BotoCoreError, OSError) as exc:
                raise StoreUnavailable(
                    f"reading {self._where} failed midway: {_describe_error(exc)}"
                ) from exc
            if not chunk:
                return
            yield chunk


class S3ObjectStore:
    """Objects in one S3 bucket; generations are ETags.

    The client is created on first use (construction does no I/O) and closed by ``aclose``.
    Timeouts and retries are bounded so that a session stop, and the daemon's drain, end in a
    bounded time even when the store is unreachable.
    """

    def __init__(
        self,
        settings: S3Settings,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        self.settings = settings
        self.part_size = part_size
        self._config = AioConfig(
            http_session_cls=aiobotocore.httpxsession.HttpxSession,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path" if settings.path_style else "auto"},
            # Checksums only where S3 requires them: parts are already in memory and signed;
            # trailing checksums would need a streaming body encoding for no extra safety here.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client: S3Client | None = None
        self._stack = AsyncExitStack()
        self._client_lock = trio.Lock()
        # Writes whose outcome is unknown (the connection failed after the request was sent):
        # key -> (the generation that write expected, the ETag the object has if it landed).
        self._in_doubt: dict[str, tuple[str | None, str]] = {}

    def describe(self) -> str:
        """``s3://bucket`` plus the endpoint when one is configured."""
        endpoint = f" at {self.settings.endpoint}" if self.settings.endpoint else ""
        return f"s3://{self.settings.bucket}{endpoint}"

    def _where(self, key: str) -> str:
        return f"s3://{self.settings.bucket}/{key}"

    async def _get_client(self) -> S3Client:
        async with self._client_lock:
            if self._client is None:
                settings = self.settings
                session = aiobotocore.session.get_session()
                # An empty key id means "use the default credential chain" (IRSA, instance
                # profile, environment), so it is passed as None rather than as "".
                key_id = settings.access_key_id or None
                secret = settings.secret_access_key.reveal() if key_id else None
                client: S3Client = await self._stack.enter_async_context(
                    session.create_client(
                        "s3",
                        region_name=settings.region,
                        endpoint_url=settings.endpoint or None,
                        aws_access_key_id=key_id,
                        aws_secret_access_key=secret,
                        config=self._config,
                    )
                )
                self._client = client
                return client
            return self._client

    @contextmanager
    def _mapped(self, operation: str, key: str) -> Iterator[None]:
        """Translate botocore/httpx failures of ``operation`` on ``key`` into store errors."""
        try:
            yield
        except StoreError:
            raise
        except botocore.exceptions.ClientError as exc:
            self._raise_client_error(operation, key, exc)
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise StoreUnavailable(
                f"{operation} {self._where(key)}: store unreachable: {_describe_error(exc)}"
            ) from exc

    def _raise_client_error(
        self, operation: str, key: str, exc: botocore.exceptions.ClientError
    ) -> NoReturn:
        code, status = _client_error_code(exc)
        where = self._where(key)
        if code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
            raise ObjectNotFound(where) from exc
        if code in _PRECONDITION_CODES or status == 412:
            raise PreconditionFailed(
                f"{operation} {where}: the object changed since this writer last saw it"
            ) from exc
        # Everything else (AccessDenied, NoSuchBucket, 5xx, throttling, and AWS's 409
        # ConditionalRequestConflict, which asks for a retry) is "not now": the caller keeps
        # its local copy and retries or answers 503.
        raise StoreUnavailable(f"{operation} {where} refused: {_describe_error(exc)}") from exc

    @asynccontextmanager
    async def open_read(self, key: str) -> AsyncIterator[_S3Object]:
        """Open ``key`` with ``GetObject``; the generation is the ETag of the bytes read."""
        client = await self._get_client()
        with self._mapped("GetObject", key):
            response = await client.get_object(Bucket=self.settings.bucket, Key=key)
        body = response["Body"]
        try:
            yield _S3Object(
                generation=response["ETag"],
                size=response.get("ContentLength"),
                body=body,
                where=self._where(key),
            )
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_ABORT_BUDGET_SECONDS):
                await body.close()

    async def head_generation(self, key: str) -> str | None:
        """The ETag currently stored under ``key``, or ``None`` when there is no object."""
        client = await self._get_client()
        try:
            with self._mapped("HeadObject", key):
                response = await client.head_object(Bucket=self.settings.bucket, Key=key)
        except ObjectNotFound:
            return None
        return response["ETag"]

    def _conditions(self, expected_generation: str | None) -> dict[str, str]:
        if expected_generation is None:
            return {"IfNoneMatch": "*"}
        return {"IfMatch": expected_generation}

    async def _check_generation(self, key: str, expected_generation: str | None) -> None:
        current = await self.head_generation(key)
        if current != expected_generation:
            raise PreconditionFailed(
                f"{self._where(key)}: stored generation {current or '(none)'} is not the "
                f"expected {expected_generation or '(none)'}"
            )

    async def write(
        self, key: str, chunks: AsyncIterable[bytes], *, expected_generation: str | None
    ) -> str:
        """Write ``key`` conditionally; see the module docstring for the fencing rules."""
        expected_generation = await self._settle_in_doubt(key, expected_generation)
        buffer = bytearray()
        iterator = aiter(chunks)
        async for chunk in iterator:
            buffer += chunk
            if len(buffer) >= self.part_size:
                return await self._write_multipart(key, buffer, iterator, expected_generation)
        return await self._put(key, bytes(buffer), expected_generation)

    @contextmanager
    def _conditional(self, key: str) -> Iterator[None]:
        """A conditional write on a vanished object is a lost race, not a missing object."""
        try:
            yield
        except ObjectNotFound as exc:
            raise PreconditionFailed(
                f"{self._where(key)}: the object this writer expected no longer exists"
            ) from exc

    async def _settle_in_doubt(self, key: str, expected_generation: str | None) -> str | None:
        """The generation to expect, given a previous write of ``key`` of unknown outcome.

        When that write did land, the stored object is this writer's own and carries the ETag
        it would have had: expecting it lets this writer go on instead of taking its own
        snapshot for a newer one from elsewhere.
        """
        in_doubt = self._in_doubt.get(key)
        if in_doubt is None or in_doubt[0] != expected_generation:
            self._in_doubt.pop(key, None)
            return expected_generation
        # Kept until the store has answered: a failed look leaves the question open.
        current = await self.head_generation(key)
        del self._in_doubt[key]
        return current if current == in_doubt[1] else expected_generation

    @contextmanager
    def _outcome_unknown_on_failure(
        self, key: str, expected_generation: str | None, etag: str
    ) -> Iterator[None]:
        """Remember a write that failed in transit: it may have reached the store all the same."""
        try:
            yield
        except StoreUnavailable:
            self._in_doubt[key] = (expected_generation, etag)
            raise

    async def _put(self, key: str, body: bytes, expected_generation: str | None) -> str:
        client = await self._get_client()
        etag = f'"{hashlib.md5(body, usedforsecurity=False).hexdigest()}"'
        try:
            with (
                self._outcome_unknown_on_failure(key, expected_generation, etag),
                self._conditional(key),
                self._mapped("PutObject", key),
            ):
                response = await client.put_object(
                    Bucket=self.settings.bucket,
                    Key=key,
                    Body=_ChunkedBody(body),
                    ContentType="application/gzip",
                    **self._conditions(expected_generation),  # type: ignore[arg-type]
                )
        except PreconditionFailed:
            # A retried request whose first attempt landed finds its own object.
            if await self.head_generation(key) == etag:
                return etag
            raise
        return response["ETag"]

    async def _write_multipart(
        self,
        key: str,
        first: bytearray,
        rest: AsyncIterator[bytes],
        expected_generation: str | None,
    ) -> str:
        client = await self._get_client()
        bucket = self.settings.bucket
        # A writer that is already stale must not even start: the upload could take minutes.
        await self._check_generation(key, expected_generation)
        with self._mapped("CreateMultipartUpload", key):
            created = await client.create_multipart_upload(
                Bucket=bucket, Key=key, ContentType="application/gzip"
            )
        upload_id = created["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            digests: list[bytes] = []

            async def upload_part(data: bytes) -> None:
                number = len(parts) + 1
                digests.append(hashlib.md5(data, usedforsecurity=False).digest())
                with self._mapped(f"UploadPart {number}", key):
                    response = await client.upload_part(
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=_ChunkedBody(data),
                    )
                parts.append({"PartNumber": number, "ETag": response["ETag"]})

            buffer = first
            async for chunk in rest:
                buffer += chunk
                if len(buffer) >= self.part_size:
                    await upload_part(bytes(buffer))
                    buffer = bytearray()
            if buffer or not parts:
                await upload_part(bytes(buffer))
            # Second fence: a newer snapshot written while this upload ran wins.
            await self._check_generation(key, expected_generation)
            combined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
            etag = f'"{combined}-{len(parts)}"'
            try:
                with (
                    self._outcome_unknown_on_failure(key, expected_generation, etag),
                    self._conditional(key),
                    self._mapped("CompleteMultipartUpload", key),
                ):
                    completed = await client.complete_multipart_upload(
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                        **self._conditions(expected_generation),  # type: ignore[arg-type]
                    )
            except PreconditionFailed:
                if await self.head_generation(key) == etag:
                    return etag
                raise
            return completed["ETag"]
        except BaseException:
            await self._abort(key, upload_id)
            raise

    async def _abort(self, key: str, upload_id: str) -> None:
        """Best-effort cleanup of an unfinished upload (a lifecycle rule catches leftovers)."""
        client = await self._get_client()
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(_ABORT_BUDGET_SECONDS),
            suppress(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError),
        ):
            await client.abort_multipart_upload(
                Bucket=self.settings.bucket, Key=key, UploadId=upload_id
            )

    async def aclose(self) -> None:
        """Close the HTTP client, if one was opened."""
        async with self._client_lock:
            self._client = None
            await self._stack.aclose()
