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

Time bounds (``CXG_S3_TIMEOUT``, ``T``, 5 s by default). A client gives up on a connect after
about 10 s, so a store that does not answer must fail the restore well before that — and a
save, or the daemon's drain, must not wait minutes on it either. Every request therefore has
an overall deadline, all retries included: ``T`` for requests without archive data (HEAD, GET
until its headers, create / abort multipart), ``T`` plus one second per MiB sent for
``PutObject`` and ``UploadPart`` (a floor of 1 MiB/s), ``T`` plus 0.1 s per part for
``CompleteMultipartUpload``, and ``T`` for each read of a GET body (no data for that long is
a stall). The HTTP client's own connect, read, write and pool timeouts are ``T`` as well, so a
request cannot hang below the deadline either. A missed deadline is ``StoreUnavailable``; for
a write it leaves the outcome in doubt, as any lost answer does.
"""

from __future__ import annotations

import hashlib
import io
import uuid
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
from gateway.store.base import (
    KEY_PREFIX,
    ObjectNotFound,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from types_aiobotocore_s3 import S3Client

MIB = 1024 * 1024
# S3 refuses parts under 5 MiB (except the last); 8 MiB keeps part counts low for big homes
# while one buffered part stays small.
DEFAULT_PART_SIZE = 8 * MIB
MIN_PART_SIZE = 5 * MIB
READ_CHUNK_SIZE = 256 * 1024
# Slowest transfer rate a data-carrying request may run at before its deadline passes.
_MIN_BYTES_PER_SECOND = MIB
_SECONDS_PER_COMPLETED_PART = 0.1

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


def _transfer_seconds(size: int) -> float:
    """Time allowed for sending ``size`` bytes of archive data, beyond the base deadline."""
    return size / _MIN_BYTES_PER_SECOND


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
    _read_deadline: float

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield the body in chunks of at most ``READ_CHUNK_SIZE`` bytes.

        Each read is bounded by ``read_deadline``. A body that ends before its announced
        length is a failed transfer (``StoreUnavailable``), never a shorter object: a restore
        must not take a dropped connection for a truncated archive and refuse it.
        """
        received = 0
        while True:
            try:
                with trio.fail_after(self._read_deadline):
                    chunk = await self._body.read(READ_CHUNK_SIZE)
            except trio.TooSlowError:
                raise StoreUnavailable(
                    f"reading {self._where} stalled: no data for {self._read_deadline:g} s"
                ) from None
            except (botocore.exceptions.BotoCoreError, OSError) as exc:
                raise StoreUnavailable(
                    f"reading {self._where} failed midway: {_describe_error(exc)}"
                ) from exc
            if not chunk:
                if self.size is not None and received != self.size:
                    raise StoreUnavailable(
                        f"reading {self._where} ended after {received} of {self.size} bytes"
                    )
                return
            received += len(chunk)
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
        max_attempts: int = 3,
        timeout: float | None = None,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        self.settings = settings
        self.part_size = part_size
        # The deadline of a request without archive data (see the module docstring).
        self.timeout = settings.timeout if timeout is None else timeout
        self._config = AioConfig(
            http_session_cls=aiobotocore.httpxsession.HttpxSession,
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            connector_args={"write_timeout": self.timeout, "pool_timeout": self.timeout},
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
    def _mapped(self, operation: str, key: str, *, extra_seconds: float = 0.0) -> Iterator[None]:
        """Bound ``operation`` on ``key`` in time and translate its failures into store errors.

        The deadline is ``timeout`` plus ``extra_seconds`` (time for the data it carries).
        """
        deadline = self.timeout + extra_seconds
        try:
            with trio.fail_after(deadline):
                yield
        except StoreError:
            raise
        except trio.TooSlowError:
            raise StoreUnavailable(
                f"{operation} {self._where(key)}: store unreachable: no answer within "
                f"{deadline:g} s (CXG_S3_TIMEOUT)"
            ) from None
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
                read_deadline=self.timeout,
            )
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.timeout):
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

    async def check(self) -> None:
        """``HeadBucket``: the bucket exists and these credentials may use it."""
        client = await self._get_client()
        bucket = self.settings.bucket
        try:
            await client.head_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError as exc:
            code, status = _client_error_code(exc)
            if code in ("NoSuchBucket", "404") or status == 404:
                raise StoreUnavailable(f"bucket {bucket!r} does not exist (CXG_S3_BUCKET)") from exc
            raise StoreUnavailable(
                f"bucket {bucket!r} refused HeadBucket: {_describe_error(exc)}"
            ) from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise StoreUnavailable(
                f"S3 unreachable for bucket {bucket!r}: {_describe_error(exc)}"
            ) from exc

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
                self._mapped("PutObject", key, extra_seconds=_transfer_seconds(len(body))),
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
        # Shielded (and bounded by its deadline): an upload the store created but whose id was
        # lost to a cancellation could never be aborted. A cancellation meanwhile is delivered
        # at the first checkpoint inside the ``try``, which aborts the upload.
        with trio.CancelScope(shield=True), self._mapped("CreateMultipartUpload", key):
            created = await client.create_multipart_upload(
                Bucket=bucket, Key=key, ContentType="application/gzip"
            )
        upload_id = created["UploadId"]
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            parts: list[dict[str, Any]] = []
            digests: list[bytes] = []

            async def upload_part(data: bytes) -> None:
                number = len(parts) + 1
                digests.append(hashlib.md5(data, usedforsecurity=False).digest())
                with self._mapped(
                    f"UploadPart {number}", key, extra_seconds=_transfer_seconds(len(data))
                ):
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
                    self._mapped(
                        "CompleteMultipartUpload",
                        key,
                        extra_seconds=_SECONDS_PER_COMPLETED_PART * len(parts),
                    ),
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
        """Best-effort cleanup of an unfinished upload (a lifecycle rule catches leftovers).

        The shield comes first: this runs while the writer is being cancelled, and even taking
        the client lock is a checkpoint that would raise ``Cancelled`` before the abort was
        sent. The request's own deadline (``timeout``) keeps the shield from hanging.
        """
        with trio.CancelScope(shield=True), suppress(StoreError):
            client = await self._get_client()
            with self._mapped("AbortMultipartUpload", key):
                await client.abort_multipart_upload(
                    Bucket=self.settings.bucket, Key=key, UploadId=upload_id
                )

    # --- small objects (replica mode's records and heartbeats) -----------------------------

    async def read_small(self, key: str, *, max_bytes: int) -> tuple[bytes, str] | None:
        """``GetObject`` of a small object: its body and ETag, or ``None`` when missing."""
        client = await self._get_client()
        try:
            with self._mapped("GetObject", key):
                response = await client.get_object(Bucket=self.settings.bucket, Key=key)
                body = response["Body"]
                try:
                    length = response.get("ContentLength")
                    if length is not None and length > max_bytes:
                        raise StoreUnavailable(
                            f"{self._where(key)} is {length} bytes, more than the {max_bytes} "
                            "a record may have"
                        )
                    data = await body.read(max_bytes + 1)
                finally:
                    await body.close()
        except ObjectNotFound:
            return None
        if len(data) > max_bytes:
            raise StoreUnavailable(f"{self._where(key)} is larger than {max_bytes} bytes")
        return data, response["ETag"]

    async def write_small(self, key: str, body: bytes, *, expected_generation: str | None) -> str:
        """One conditional ``PutObject``; see ``SmallObjects.write_small``."""
        client = await self._get_client()
        with self._conditional(key), self._mapped("PutObject", key):
            response = await client.put_object(
                Bucket=self.settings.bucket,
                Key=key,
                Body=body,
                ContentType="application/json",
                **self._conditions(expected_generation),  # type: ignore[arg-type]
            )
        return response["ETag"]

    async def list_generations(self, prefix: str, *, limit: int) -> dict[str, str]:
        """``ListObjectsV2`` under ``prefix``, following pages up to ``limit`` keys."""
        client = await self._get_client()
        found: dict[str, str] = {}
        token: str | None = None
        while len(found) < limit:
            extra = {"ContinuationToken": token} if token else {}
            with self._mapped("ListObjectsV2", prefix):
                page = await client.list_objects_v2(
                    Bucket=self.settings.bucket,
                    Prefix=prefix,
                    MaxKeys=min(1000, limit - len(found)),
                    **extra,  # type: ignore[arg-type]
                )
            for item in page.get("Contents", []):
                found[item["Key"]] = item["ETag"]
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
        return found

    async def copy(self, source: str, target: str, *, metadata: dict[str, str]) -> str:
        """``CopyObject`` inside the bucket (no data passes through this pod)."""
        client = await self._get_client()
        bucket = self.settings.bucket
        with self._mapped("CopyObject", target):
            response = await client.copy_object(
                Bucket=bucket,
                Key=target,
                CopySource={"Bucket": bucket, "Key": source},
                MetadataDirective="REPLACE",
                Metadata=metadata,
                ContentType="application/gzip",
            )
        return response["CopyObjectResult"]["ETag"]

    async def read_metadata(self, key: str) -> tuple[str, dict[str, str]] | None:
        """``HeadObject``: the ETag and user metadata, or ``None`` when missing."""
        client = await self._get_client()
        try:
            with self._mapped("HeadObject", key):
                response = await client.head_object(Bucket=self.settings.bucket, Key=key)
        except ObjectNotFound:
            return None
        return response["ETag"], dict(response.get("Metadata", {}))

    async def delete(self, key: str) -> None:
        """``DeleteObject`` (S3 answers success for a missing key too)."""
        client = await self._get_client()
        with self._mapped("DeleteObject", key):
            await client.delete_object(Bucket=self.settings.bucket, Key=key)

    async def probe_conditional_writes(self) -> list[str]:
        """Check that the bucket honours conditional writes; return what it ignored.

        Writes a small object under ``codex-app-gateway/.probe/`` (a key no workspace can
        have: ids never contain ``/``) with ``If-None-Match: *`` twice and then with
        ``If-Match`` on a wrong ETag, expecting the second and third to be refused with 412;
        the object is deleted afterwards. An empty list means fencing works. Raises
        ``StoreUnavailable`` when the store cannot be asked.
        """
        client = await self._get_client()
        key = f"{KEY_PREFIX}.probe/{uuid.uuid4().hex}"
        ignored: list[str] = []

        async def put(conditions: dict[str, str]) -> bool:
            """Whether the store accepted the write (False: it answered 412)."""
            try:
                with self._mapped("PutObject", key):
                    await client.put_object(
                        Bucket=self.settings.bucket,
                        Key=key,
                        Body=b"conditional write probe",
                        **conditions,  # type: ignore[arg-type]
                    )
            except PreconditionFailed:
                return False
            return True

        try:
            if not await put({"IfNoneMatch": "*"}):
                raise StoreUnavailable(
                    f"probing {self._where(key)}: a fresh key refused If-None-Match: *"
                )
            if await put({"IfNoneMatch": "*"}):
                ignored.append("If-None-Match: * on an existing object")
            if await put({"IfMatch": '"00000000000000000000000000000000"'}):
                ignored.append("If-Match with a wrong ETag")
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self.timeout),
                suppress(
                    botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError
                ),
            ):
                await client.delete_object(Bucket=self.settings.bucket, Key=key)
        return ignored

    async def aclose(self) -> None:
        """Close the HTTP client, if one was opened."""
        async with self._client_lock:
            self._client = None
            await self._stack.aclose()
