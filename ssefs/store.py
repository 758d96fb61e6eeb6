"""The S3 object store: the one owner of the boto3 client.

Every request that touches object data (PUT, GET and ranged GET, HEAD,
CreateMultipartUpload, UploadPart, CopyObject source and target) carries the
mount's SSE-C parameters, and every data response is checked to echo our key's
MD5 (a server that answers without it did not encrypt, or stored the object in
clear). Listing and deletes need no key. Blocking boto3 calls run in worker
threads through one ``trio.CapacityLimiter`` sized like the connection pool, so
the trio loop never blocks. botocore's standard retry mode bounds retries of
throttling, 5xx and connection failures; what still fails is translated into the
typed errors of ``errors.py``, naming the object key and never the SSE-C key.
Writes always use the current key; reads use the key an object is known to be
stored under (``KeyIndex``, by fingerprint; the current key when unknown), and
only when the server refuses that key (403) try the mount's previous keys,
remembering the one that worked. Keys whose delete is queued
(``deletes.DeleteQueue``) read as absent, and a write to one first cancels its
delete or waits for it. This module knows object keys, not paths, inodes or
FUSE. HEADs, PUTs of up to 1 MiB, ranged GETs and listing pages first try
``quickpath`` (the same requests without botocore's per-call CPU); whatever it
cannot answer goes through boto3 as above.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import boto3
import botocore.credentials
import botocore.exceptions
import botocore.session
import botocore.utils
import trio
from botocore.config import Config as BotoConfig

from .config import S3Settings
from .deletes import DeleteQueue
from .errors import (
    ConfigError,
    NoSuchObject,
    NotEncrypted,
    ServerUnavailable,
    SseBlocked,
    SsefsError,
    StartupCheckError,
    WrongKey,
    unwrap_group,
)
from .keys import KeyRing, SseKey
from .metadata import ATTRIBUTES_TAG, names_attributes_tag, with_tagged_attributes
from .quickpath import NOT_FOUND, PAST_THE_END, QuickPath

log = logging.getLogger(__name__)

T = TypeVar("T")

# S3 returns at most 1000 keys per ListObjectsV2 page.
LIST_PAGE = 1000
# A bound on the memory spent remembering which directories have a marker (``keep_directory``).
MAX_MARKERS_REMEMBERED = 100_000

# A CreateMultipartUpload whose answer was lost may have created an upload anyway (botocore then
# sends it again). Until the request has an answer, the journal holds a row with this prefix instead
# of an upload id; uploads of the same key initiated within this many seconds of the request (clock
# skew, retries) are taken for its strays and aborted.
PENDING_CREATE_PREFIX = "pending-create:"
STRAY_UPLOAD_WINDOW_SECONDS = 300.0


@dataclass(frozen=True)
class ObjectInfo:
    """What S3 says about one object."""

    key: str
    size: int
    etag: str
    mtime: float
    metadata: dict[str, str] = field(default_factory=dict)
    # False while the attributes are not final: an object uploaded as it was written, its tag not set yet.
    settled: bool = True


@dataclass(frozen=True)
class Listing:
    """The direct children of a prefix: objects, and sub-prefixes (without the trailing ``/``)."""

    objects: list[ObjectInfo]
    prefixes: list[str]
    # Whether the prefix's own directory marker (``dir/``) was among the objects (it is not in ``objects``).
    has_marker: bool = False


def _status(error: botocore.exceptions.ClientError) -> tuple[int, str, str]:
    response: Any = error.response
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    details = response.get("Error", {})
    return status, str(details.get("Code", "")), str(details.get("Message", ""))


def _echoed_md5_matches(echoed: str | None, expected: str) -> bool:
    """True when the echoed key MD5 is ours; SeaweedFS sends the header twice ("X, X")."""
    if not echoed:
        return False
    return all(part.strip() == expected for part in echoed.split(","))


WRITE_OPERATIONS = frozenset({"PutObject", "CreateMultipartUpload", "UploadPart", "CopyObject"})
SSE_BLOCKED_HINT = (
    "AWS blocks SSE-C on new buckets since April 2026 (writes with a correct key get 403); "
    "allow it with PutBucketEncryption, BlockedEncryptionTypes = NONE"
)


class KeyIndex(Protocol):
    """Which key (by fingerprint) objects not under the current key are stored with."""

    def get(self, object_key: str) -> str | None: ...

    def remember(self, object_key: str, fingerprint: str) -> None: ...

    def forget(self, object_key: str) -> None: ...


class UploadJournal(Protocol):
    """Where started multipart uploads are recorded until completed or aborted.

    An upload the daemon could not finish (killed mid-upload) leaves parts on
    the server that are billed and invisible; the next start aborts what the
    journal still lists (``uploader.abort_unfinished_uploads``).
    """

    def multipart_started(self, object_key: str, upload_id: str, key_fingerprint: str | None = None) -> None: ...

    def multipart_finished(self, upload_id: str, etag: str | None = None) -> None:
        """Aborted (``etag`` None) or completed as the object with ``etag``."""


class MemoryKeyIndex:
    """A ``KeyIndex`` that lasts as long as the process."""

    def __init__(self) -> None:
        self._fingerprints: dict[str, str] = {}

    def get(self, object_key: str) -> str | None:
        return self._fingerprints.get(object_key)

    def remember(self, object_key: str, fingerprint: str) -> None:
        self._fingerprints[object_key] = fingerprint

    def forget(self, object_key: str) -> None:
        self._fingerprints.pop(object_key, None)


class ObjectStore:
    """Async access to one bucket: writes under the current SSE-C key, reads under whichever fits."""

    def __init__(self, settings: S3Settings, keys: KeyRing | SseKey, key_index: KeyIndex | None = None) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.keys = keys if isinstance(keys, KeyRing) else KeyRing(keys)
        self.key_index: KeyIndex = key_index or MemoryKeyIndex()
        self.upload_journal: UploadJournal | None = None
        # Deletes not yet confirmed by S3: their keys read as absent, and writes to them wait.
        self.deletes = DeleteQueue(self.delete_many)
        # Objects seen to be under the current key, while previous keys are configured.
        self._under_current_key: set[str] = set()
        # Directory markers this mount saw or made: their directories outlive their last object.
        self._markers: set[str] = set()
        # Directories about to be removed (rmdir, rename): the deletes under them need not keep them.
        self._leaving: set[str] = set()
        # Whether reading an attributes tag was refused once (warned about once per mount).
        self._tag_read_failed = False
        self._key = self.keys.current
        self._sse = self._key.sse_params()
        self.limiter = trio.CapacityLimiter(settings.max_connections)
        self._sse_c_blocked: bool | None = None
        # None until the first UploadPartCopy tells us whether the server supports it.
        self.part_copy_supported: bool | None = None
        core_session = botocore.session.get_session()
        core_session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_s3_time)
        try:
            session = boto3.session.Session(profile_name=settings.profile, botocore_session=core_session)
        except botocore.exceptions.ProfileNotFound:
            raise ConfigError(f"[s3] profile {settings.profile!r} is not defined in the AWS config files") from None
        credentials: dict[str, str] = {}
        if settings.access_key_id and settings.secret_access_key:
            credentials = {
                "aws_access_key_id": settings.access_key_id,
                "aws_secret_access_key": settings.secret_access_key,
            }
        # Typed as Any: the SSE-C keyword arguments are spread from dicts, which the stubs cannot follow.
        self._client: Any = session.client(
            "s3",
            endpoint_url=settings.endpoint,
            region_name=settings.region,
            verify=str(settings.ca_bundle) if settings.ca_bundle else True,
            use_ssl=settings.endpoint.startswith("https://"),
            config=BotoConfig(
                max_pool_connections=settings.max_connections,
                retries={"mode": "standard", "max_attempts": settings.max_attempts},
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                s3={  # type: ignore[arg-type]
                    "addressing_style": settings.addressing_style,
                    # Over TLS, signing each body with SHA-256 (botocore's default when no
                    # checksum header is sent) only burns CPU: TLS already protects it.
                    "payload_signing_enabled": not settings.endpoint.startswith("https://"),
                },
                # Integrity in transit comes from TLS; extra checksums cost CPU on every PUT.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
            **credentials,
        )
        self._quick = self._make_quick(session, credentials)

    def _make_quick(self, session: boto3.session.Session, explicit: dict[str, str]) -> QuickPath | None:
        """The lean path for HEAD and small PUT/GET, or None where it cannot follow the client
        (a proxy, no credentials yet)."""
        if not QuickPath.usable_for(self.settings.endpoint):
            log.info("a proxy is set for %s: every request goes through boto3", self.settings.endpoint)
            return None
        credentials = (
            botocore.credentials.Credentials(explicit["aws_access_key_id"], explicit["aws_secret_access_key"])
            if explicit else session.get_credentials()
        )
        if credentials is None:
            return None  # boto3 reports the missing credentials on the first request
        return QuickPath(
            self._client, credentials, self.bucket,
            ca_bundle=str(self.settings.ca_bundle) if self.settings.ca_bundle else None,
            max_connections=self.settings.max_connections,
            connect_timeout=self.settings.connect_timeout, read_timeout=self.settings.read_timeout,
        )

    @property
    def key_fingerprint(self) -> str:
        return self._key.fingerprint

    # ----------------------------------------------------------------- keys

    def key_for(self, object_key: str) -> SseKey:
        """The key ``object_key`` is believed to be stored under."""
        fingerprint = self.key_index.get(object_key)
        return (self.keys.by_fingerprint(fingerprint) if fingerprint else None) or self._key

    def _stored_under(self, object_key: str, key: SseKey) -> None:
        if key is self._key:
            if self.key_index.get(object_key) is not None:
                self.key_index.forget(object_key)
        elif self.key_index.get(object_key) != key.fingerprint:
            self.key_index.remember(object_key, key.fingerprint)

    async def _copy_source_key(self, object_key: str) -> SseKey:
        """The key to name for ``object_key`` as a copy source.

        A copy source under the wrong key gets a 500 from SeaweedFS rather than a
        403, so while previous keys are configured an object whose key is not yet
        known is HEADed (which finds and remembers its key) before it is copied.
        """
        if not self.keys.previous or self.key_index.get(object_key) is not None:
            return self.key_for(object_key)
        if object_key not in self._under_current_key:
            await self.head(object_key)
            if self.key_index.get(object_key) is None:
                self._under_current_key.add(object_key)
        return self.key_for(object_key)

    async def _with_fitting_key(self, object_key: str, attempt: Callable[[SseKey], Awaitable[T]]) -> T:
        """Run ``attempt`` with the object's key; on a 403, with each other key of the ring."""
        first = self.key_for(object_key)
        try:
            return await attempt(first)
        except WrongKey as refused:
            for other in self.keys.all:
                if other is first:
                    continue
                try:
                    result = await attempt(other)
                except WrongKey:
                    continue
                log.info("%r is stored under key %s", object_key, other.fingerprint)
                self._stored_under(object_key, other)
                return result
            raise refused from None

    # ----------------------------------------------------------------- plumbing

    async def _call(self, operation: str, object_key: str, function: Callable[[], T]) -> T:
        """Run one blocking boto3 call in a worker thread and translate its errors."""
        try:
            return await trio.to_thread.run_sync(function, limiter=self.limiter)
        except SsefsError:
            raise
        except botocore.exceptions.ClientError as error:
            translated = self._translate_client_error(operation, object_key, error)
            if _status(error)[0] == 403 and operation in WRITE_OPERATIONS and await self.sse_c_blocked():
                translated = SseBlocked(
                    f"{operation} {object_key!r}: bucket {self.bucket!r} refuses SSE-C writes. {SSE_BLOCKED_HINT}"
                )
            raise translated from None
        except botocore.exceptions.NoCredentialsError:
            raise StartupCheckError(
                "no S3 credentials found: set access_key_id/secret_access_key in [s3], a profile, "
                "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            ) from None
        except botocore.exceptions.SSLError as error:
            raise ServerUnavailable(
                f"TLS failure talking to {self.settings.endpoint} ({operation} {object_key!r}): "
                f"{_first_line(error)}; if the server uses a private CA, set [s3] ca_bundle"
            ) from None
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionError) as error:
            raise ServerUnavailable(
                f"cannot reach S3 endpoint {self.settings.endpoint} ({operation} {object_key!r}): "
                f"{_first_line(error)}"
            ) from None
        except botocore.exceptions.BotoCoreError as error:
            raise ServerUnavailable(f"{operation} {object_key!r} failed: {_first_line(error)}") from None

    async def _quick_or_boto3(
        self, operation: str, object_key: str, quick: Callable[[], dict[str, Any] | str | None] | None,
        boto3_call: Callable[[], Any],
    ) -> Any:
        """The quick path's answer (in a worker thread) when it has one, else boto3's, which retries
        and explains what the quick path could not answer."""
        if quick is not None:
            answer = await trio.to_thread.run_sync(quick, limiter=self.limiter)
            if answer == NOT_FOUND:
                raise self._not_found(operation, object_key)
            if isinstance(answer, dict):
                return answer
        return await self._call(operation, object_key, boto3_call)

    def _not_found(self, operation: str, object_key: str) -> NoSuchObject:
        return NoSuchObject(f"{operation} {object_key!r} in bucket {self.bucket}: no such object")

    def _translate_client_error(
        self, operation: str, object_key: str, error: botocore.exceptions.ClientError
    ) -> SsefsError:
        status, code, message = _status(error)
        where = f"{operation} {object_key!r} in bucket {self.bucket}"
        if code == "NoSuchBucket":
            return NoSuchObject(f"bucket {self.bucket!r} does not exist")
        if status == 404 or code in ("NoSuchKey", "NotFound", "404"):
            return NoSuchObject(f"{where}: no such object")
        if status == 403:
            if operation in WRITE_OPERATIONS:
                return WrongKey(
                    f"{where}: access denied: the credentials may not write here, or the bucket blocks "
                    f"SSE-C writes. {SSE_BLOCKED_HINT}"
                )
            if operation in ("GetObject", "HeadObject"):
                return WrongKey(
                    f"{where}: access denied: the object is encrypted under another SSE-C key, "
                    "or the credentials may not read it"
                )
            return WrongKey(f"{where}: access denied ({code or status})")
        if status == 400 and operation in ("GetObject", "HeadObject", "CopyObject"):
            return NotEncrypted(
                f"{where}: the server refused the SSE-C key ({code or status}: {message or 'bad request'}); "
                "the object is probably not stored with SSE-C"
            )
        if status == 416:
            return SsefsError(f"{where}: range not satisfiable", errno_value=22)
        if status >= 500 or status == 0:
            return ServerUnavailable(f"{where}: server error {status} {code} after retries")
        return SsefsError(f"{where}: {status} {code} {message}".rstrip())

    def _check_echo(
        self, operation: str, object_key: str, response: Any, *, required: bool = True, key: SseKey | None = None
    ) -> None:
        """Insist that the server confirmed SSE-C with our key.

        SeaweedFS sends no echo on CreateMultipartUpload and CopyObject, so there
        the check is ``required=False``: an echo, when present, must still match.
        """
        echoed = response.get("SSECustomerKeyMD5")
        if not required and not echoed:
            return
        if not _echoed_md5_matches(echoed, (key or self._key).md5_b64):
            raise NotEncrypted(
                f"{operation} {object_key!r} in bucket {self.bucket}: the server did not confirm SSE-C "
                "with our key; the object is stored without SSE-C (or the server ignores SSE-C)"
            )

    # ----------------------------------------------------------------- bucket

    async def check_bucket(self) -> None:
        """Verify the bucket exists and the credentials may use it."""

        try:
            await self._call("HeadBucket", "", functools.partial(self._client.head_bucket, Bucket=self.bucket))
        except NoSuchObject:
            raise StartupCheckError(f"bucket {self.bucket!r} does not exist at {self.settings.endpoint}") from None
        except WrongKey:
            raise StartupCheckError(
                f"the S3 credentials are not allowed to use bucket {self.bucket!r} (403)"
            ) from None

    async def sse_c_blocked(self) -> bool:
        """Whether the bucket's encryption configuration blocks SSE-C writes (asked once).

        Servers that do not implement the setting, or credentials that may not read
        it, count as "not blocked": a real refusal then still surfaces as a 403.
        """
        if self._sse_c_blocked is None:

            def fetch() -> bool:
                try:
                    response = self._client.get_bucket_encryption(Bucket=self.bucket)
                except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
                    return False
                rules = response.get("ServerSideEncryptionConfiguration", {}).get("Rules", [])
                return any(
                    "SSE-C" in rule.get("BlockedEncryptionTypes", {}).get("EncryptionType", []) for rule in rules
                )

            self._sse_c_blocked = await trio.to_thread.run_sync(fetch, limiter=self.limiter)
        return self._sse_c_blocked

    # ----------------------------------------------------------------- reads

    async def head(self, object_key: str, *, key: SseKey | None = None) -> ObjectInfo:
        """The object's size, ETag, time and user metadata; with ``key``, under that key only."""
        self._refuse_pending("HeadObject", object_key)

        async def attempt(sse_key: SseKey) -> ObjectInfo:
            response = await self._quick_or_boto3(
                "HeadObject",
                object_key,
                functools.partial(self._quick.head, object_key, sse_key) if self._quick else None,
                functools.partial(
                    self._client.head_object, Bucket=self.bucket, Key=object_key, **sse_key.sse_params()
                ),
            )
            self._check_echo("HeadObject", object_key, response, key=sse_key)
            return await self._with_attributes_tag(_info_from_head(object_key, response))

        if key is not None:
            return await attempt(key)
        return await self._with_fitting_key(object_key, attempt)

    async def head_many(self, object_keys: list[str]) -> dict[str, ObjectInfo | SsefsError]:
        """Each object's ``head``, or the error it raised; many in flight.

        The quick path takes a batch of keys per worker-thread hop (``QuickPath.head_many``:
        through libcurl, many in flight from one thread): at thousands of HEADs (``ls -l`` of
        a directory written by others) one hop per key cost about a quarter of the CPU. What
        it cannot answer goes through ``head``.
        """
        results: dict[str, ObjectInfo | SsefsError] = {}
        slow: list[str] = []
        quick_path = self._quick
        if quick_path is None:
            slow = list(object_keys)
        else:
            # Keys are chosen here, on the trio thread that owns the key index; pending deletes read as absent.
            wanted: list[tuple[str, SseKey]] = []
            for object_key in object_keys:
                if self.deletes.is_pending(object_key):
                    slow.append(object_key)
                else:
                    wanted.append((object_key, self.key_for(object_key)))

            batch_size, at_once = quick_path.head_batching
            hops = trio.CapacityLimiter(at_once)

            async def ask_batch(batch: list[tuple[str, SseKey]]) -> None:
                async with hops:
                    answers = await trio.to_thread.run_sync(quick_path.head_many, batch, limiter=self.limiter)
                tagged: list[ObjectInfo] = []
                for (object_key, sse_key), answer in zip(batch, answers, strict=True):
                    if answer == NOT_FOUND:
                        results[object_key] = self._not_found("HeadObject", object_key)
                    elif not isinstance(answer, dict):
                        slow.append(object_key)
                    else:
                        try:
                            self._check_echo("HeadObject", object_key, answer, key=sse_key)
                        except NotEncrypted as error:
                            results[object_key] = error
                        else:
                            info = _info_from_head(object_key, answer)
                            results[object_key] = info
                            if names_attributes_tag(info.metadata):
                                tagged.append(info)
                # A directory of large files uploaded while written: their tags are read side by side.
                async with trio.open_nursery() as tag_readers:
                    for info in tagged:
                        tag_readers.start_soon(read_tag, info)

            async def read_tag(info: ObjectInfo) -> None:
                try:
                    results[info.key] = await self._with_attributes_tag(info)
                except SsefsError as error:
                    results[info.key] = error

            async with trio.open_nursery() as nursery:
                for start in range(0, len(wanted), batch_size):
                    nursery.start_soon(ask_batch, wanted[start:start + batch_size])

        async def head_one(object_key: str) -> None:
            try:
                results[object_key] = await self.head(object_key)
            except SsefsError as error:
                results[object_key] = error

        async with trio.open_nursery() as nursery:
            for object_key in slow:
                nursery.start_soon(head_one, object_key)
        return results

    async def _with_attributes_tag(self, info: ObjectInfo) -> ObjectInfo:
        """An object uploaded while it was written keeps its final attributes in a tag: read it.

        Where the tag cannot be read (no ``s3:GetObjectTagging`` permission, or a
        server without tagging), the attributes the upload was created with stand,
        marked not settled so that no index keeps them; the object itself stays
        readable. Only an object that vanished meanwhile is an error.
        """
        if not names_attributes_tag(info.metadata):
            return info

        def fetch() -> str | None:
            tags = self._client.get_object_tagging(Bucket=self.bucket, Key=info.key).get("TagSet", [])
            return next((str(tag["Value"]) for tag in tags if tag.get("Key") == ATTRIBUTES_TAG), None)

        try:
            tag = await self._call("GetObjectTagging", info.key, fetch)
        except NoSuchObject:
            raise
        except SsefsError as error:
            if not self._tag_read_failed:
                log.warning("cannot read the attributes tag of %r (%s): files uploaded while they were written "
                            "show the mode and time they were created with", info.key, error)
            self._tag_read_failed = True
            tag = None
        metadata, settled = with_tagged_attributes(info.metadata, tag)
        return ObjectInfo(info.key, info.size, info.etag, info.mtime, metadata, settled)

    async def tag_attributes(self, object_key: str, tag: str) -> None:
        """Set the attributes tag of an object uploaded while it was written (no data is copied)."""
        await self._call(
            "PutObjectTagging",
            object_key,
            functools.partial(
                self._client.put_object_tagging, Bucket=self.bucket, Key=object_key,
                Tagging={"TagSet": [{"Key": ATTRIBUTES_TAG, "Value": tag}]},
            ),
        )

    async def get_range(self, object_key: str, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (fewer at the end of the object)."""
        return b"".join(await self.get_pieces(object_key, offset, length, max(length, 1)))

    async def get_pieces(self, object_key: str, offset: int, length: int, piece_size: int) -> list[bytes]:
        """Read ``length`` bytes at ``offset`` (fewer at the end of the object) as pieces of ``piece_size``
        bytes (the last may be shorter).

        Each piece is read from the socket into its own buffer: no copy of the
        whole range is made and then cut up, which for a read-ahead GET of
        8 MiB cut into 1 MiB blocks saved about a fifth of its CPU.
        """
        if length <= 0:
            return []
        self._refuse_pending("GetObject", object_key)

        def fetch(sse_key: SseKey) -> list[bytes]:
            quick = (self._quick.get(object_key, sse_key, offset, length, piece_size)
                     if self._quick is not None else None)
            if quick == NOT_FOUND:
                raise self._not_found("GetObject", object_key)
            if quick == PAST_THE_END:
                return []
            if isinstance(quick, dict):
                self._check_echo("GetObject", object_key, quick, key=sse_key)
                return quick["Pieces"]
            response = self._client.get_object(
                Bucket=self.bucket, Key=object_key, Range=f"bytes={offset}-{offset + length - 1}",
                **sse_key.sse_params(),
            )
            self._check_echo("GetObject", object_key, response, key=sse_key)
            body = response["Body"]
            try:
                # Read until an empty read: that is where botocore checks the length against Content-Length.
                pieces = list(iter(functools.partial(body.read, piece_size), b""))
            finally:
                body.close()
            if any(len(piece) != piece_size for piece in pieces[:-1]):  # a short read mid-way: cut again
                data = b"".join(pieces)
                pieces = [data[start:start + piece_size] for start in range(0, len(data), piece_size)]
            return pieces

        async def attempt(sse_key: SseKey) -> list[bytes]:
            return await self._call("GetObject", object_key, functools.partial(fetch, sse_key))

        try:
            return await self._with_fitting_key(object_key, attempt)
        except SsefsError as error:
            if error.errno == 22:  # 416: offset at or past the end
                return []
            raise

    # ----------------------------------------------------------------- listing

    def _list_pages(self, prefix: str, *, delimiter: str | None = None,
                    max_keys: int = LIST_PAGE) -> Iterator[dict[str, Any]]:
        """ListObjectsV2 pages under ``prefix`` (blocking: call from a worker thread), each as boto3
        shapes it. Each page first tries the quick path (a third of botocore's CPU per listed
        entry); a page it cannot read comes from boto3, which retries and explains."""
        continuation: str | None = None
        while True:
            page = (self._quick.list_page(prefix, delimiter=delimiter, max_keys=max_keys, continuation=continuation)
                    if self._quick is not None else None)
            if page is None:
                arguments: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": max_keys}
                if delimiter is not None:
                    arguments["Delimiter"] = delimiter
                if continuation is not None:
                    arguments["ContinuationToken"] = continuation
                page = self._client.list_objects_v2(**arguments)
            yield page
            continuation = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not continuation:
                return

    async def list_children(self, prefix: str) -> Listing:
        """All objects and sub-prefixes directly under ``prefix`` (which is "" or ends in ``/``)."""

        def fetch() -> Listing:
            objects: list[ObjectInfo] = []
            prefixes: list[str] = []
            has_marker = False
            for page in self._list_pages(prefix, delimiter="/"):
                for common in page.get("CommonPrefixes", ()):
                    prefixes.append(common["Prefix"][len(prefix):].rstrip("/"))
                for item in page.get("Contents", ()):
                    # A directory marker lists itself as a child of its own prefix.
                    if item["Key"] == prefix:
                        has_marker = True
                        continue
                    objects.append(_info_from_listing(item))
            return Listing(objects, prefixes, has_marker)

        deleted = _DeletedKeys(self.deletes, prefix)
        listing = await self._call("ListObjectsV2", prefix, fetch)
        if listing.has_marker:
            self._saw_marker(prefix)
        return Listing([info for info in listing.objects if info.key not in deleted], listing.prefixes,
                       listing.has_marker)

    async def list_tree(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, at any depth, markers included."""

        def fetch() -> list[ObjectInfo]:
            return [_info_from_listing(item) for page in self._list_pages(prefix) for item in page.get("Contents", ())]

        deleted = _DeletedKeys(self.deletes, prefix)
        tree = [info for info in await self._call("ListObjectsV2", prefix, fetch) if info.key not in deleted]
        for info in tree:
            if info.key.endswith("/"):
                self._saw_marker(info.key)
        return tree

    async def first_object_with_prefix(self, prefix: str) -> ObjectInfo | None:
        """The lexicographically first object whose key starts with ``prefix``, if any."""
        # Keys being deleted are skipped: ask for enough to get past them.
        deleted = _DeletedKeys(self.deletes, prefix)
        wanted = 1 + len(deleted)

        def fetch() -> list[ObjectInfo]:
            page = next(self._list_pages(prefix, max_keys=min(wanted, LIST_PAGE)))
            return [_info_from_listing(item) for item in page.get("Contents", ())]

        found = await self._call("ListObjectsV2", prefix, fetch)
        return next((info for info in found if info.key not in deleted), None)

    async def keys_with_prefix(self, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` keys starting with ``prefix`` (no delimiter)."""
        # Keys being deleted are skipped: ask for enough to get past them.
        deleted = _DeletedKeys(self.deletes, prefix)
        wanted = limit + len(deleted)

        def fetch() -> list[str]:
            page = next(self._list_pages(prefix, max_keys=min(wanted, LIST_PAGE)))
            return [item["Key"] for item in page.get("Contents", ())]

        keys = await self._call("ListObjectsV2", prefix, fetch)
        return [key for key in keys if key not in deleted][:limit]

    async def probe(self, object_key: str) -> tuple[ObjectInfo | None, bool]:
        """Whether ``object_key`` exists as an object, and whether ``object_key/`` holds anything.

        An exact key is the smallest key with itself as prefix, so a one-key
        listing answers the first question without a keyed HEAD.
        """
        found: ObjectInfo | None = None
        is_directory = False

        async def probe_object() -> None:
            nonlocal found
            first = await self.first_object_with_prefix(object_key)
            if first is not None and first.key == object_key:
                found = first

        async def probe_directory() -> None:
            nonlocal is_directory
            first = await self.keys_with_prefix(object_key + "/", 1)
            is_directory = bool(first)
            if first == [object_key + "/"]:
                self._saw_marker(first[0])

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe_object)
                nursery.start_soon(probe_directory)
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        return found, is_directory

    # ----------------------------------------------------------------- writes

    async def put(self, object_key: str, data: bytes, metadata: dict[str, str] | None = None) -> str:
        """Upload a whole object in one request; returns its ETag.

        The body's MD5 goes along (Content-MD5) so that the server refuses a
        body cut short: SeaweedFS stores an empty object when a PUT's
        connection closes after the headers (botocore waits for
        ``100-continue`` there), which would replace a file by 0 bytes.
        """
        await self.deletes.settle(object_key)
        content_md5 = base64.b64encode(hashlib.md5(data).digest()).decode("ascii")
        response = await self._quick_or_boto3(
            "PutObject",
            object_key,
            functools.partial(self._quick.put, object_key, self._key, data, metadata or {}, content_md5)
            if self._quick else None,
            functools.partial(
                self._client.put_object, Bucket=self.bucket, Key=object_key, Body=data,
                Metadata=metadata or {}, ContentMD5=content_md5, **self._sse,
            ),
        )
        self._check_echo("PutObject", object_key, response)
        self._stored_under(object_key, self._key)
        return str(response.get("ETag", "")).strip('"')

    async def put_directory_marker(self, prefix: str) -> None:
        """Create the empty ``dir/`` object that marks a directory."""
        await self.deletes.settle(prefix)
        await self._put_marker(prefix)

    async def keep_directory(self, prefix: str) -> None:
        """Before something leaves the directory ``prefix``: give it a marker unless it is known to have one.

        S3 has no directories: one without a marker exists only while an
        object is under it, and goes with its last one (AWS at once,
        SeaweedFS's empty-folder cleaner minutes later), where POSIX keeps an
        emptied directory until ``rmdir``. Deletes of files see to it here
        (``delete_many``); ``rmdir`` and ``rename`` of a directory call it.
        """
        if prefix not in self._markers:
            # Not settled first like a new directory: this one exists (something is still in it), and from
            # inside ``delete_many`` that would wait for the very batch being sent.
            await self._put_marker(prefix)

    async def _put_marker(self, prefix: str) -> None:
        await self._call(
            "PutObject",
            prefix,
            functools.partial(self._client.put_object, Bucket=self.bucket, Key=prefix, Body=b"", **self._sse),
        )
        self._saw_marker(prefix)

    async def flush_deletes_before_removing(self, prefix: str) -> None:
        """Send the deletes pending under the directory ``prefix``, which is itself about to be removed
        (rmdir, the rename of a directory): no marker is written to keep it or anything below it."""
        self._leaving.add(prefix)
        try:
            await self.deletes.flush(prefix)
        finally:
            self._leaving.discard(prefix)

    def _saw_marker(self, prefix: str) -> None:
        if len(self._markers) >= MAX_MARKERS_REMEMBERED:
            self._markers.clear()  # forgotten ones cost one PUT of their marker again, when next needed
        self._markers.add(prefix)

    async def create_multipart(self, object_key: str, metadata: dict[str, str] | None = None) -> str:
        """Start a multipart upload, journaled from before the request so a lost answer orphans nothing."""
        await self.deletes.settle(object_key)
        journal = self.upload_journal
        started = time.time()
        pending = PENDING_CREATE_PREFIX + secrets.token_hex(8)
        if journal is not None:
            journal.multipart_started(object_key, pending, self._key.fingerprint)
        try:
            response = await self._call(
                "CreateMultipartUpload",
                object_key,
                functools.partial(
                    self._client.create_multipart_upload, Bucket=self.bucket, Key=object_key,
                    Metadata=metadata or {}, **self._sse,
                ),
            )
        except SsefsError:
            # Attempts that reached the server may each have created an upload.
            swept = False
            with trio.move_on_after(30):
                swept = await self.abort_stray_uploads(object_key, started, time.time(), keep=None)
            if swept and journal is not None:
                journal.multipart_finished(pending)
            raise
        self._check_echo("CreateMultipartUpload", object_key, response, required=False)
        upload_id = str(response["UploadId"])
        if journal is not None:
            journal.multipart_started(object_key, upload_id, self._key.fingerprint)
        # Sent more than once: an earlier attempt may have created an upload whose answer was lost.
        retried = response.get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0
        swept = not retried or await self.abort_stray_uploads(object_key, started, time.time(), keep=upload_id)
        if swept and journal is not None:
            journal.multipart_finished(pending)
        return upload_id

    async def abort_stray_uploads(self, object_key: str, sent: float, answered: float, *, keep: str | None) -> bool:
        """Abort the multipart uploads of exactly ``object_key`` initiated between ``sent`` and
        ``answered`` (give or take ``STRAY_UPLOAD_WINDOW_SECONDS``), except ``keep``: the strays of
        a CreateMultipartUpload sent more than once. False if that could not be done (logged; the
        journal keeps the request, so the next start tries again)."""

        def fetch() -> list[tuple[str, str, float]]:
            paginator = self._client.get_paginator("list_multipart_uploads")
            return [
                (str(upload["Key"]), str(upload["UploadId"]), upload["Initiated"].timestamp())
                for page in paginator.paginate(Bucket=self.bucket, Prefix=object_key)
                for upload in page.get("Uploads", ())
            ]

        aborted = 0
        try:
            uploads = await self._call("ListMultipartUploads", object_key, fetch)
            for key, upload_id, initiated in uploads:
                window = (sent - STRAY_UPLOAD_WINDOW_SECONDS, answered + STRAY_UPLOAD_WINDOW_SECONDS)
                if key != object_key or upload_id == keep or not window[0] <= initiated <= window[1]:
                    continue
                try:
                    await self.abort_multipart(key, upload_id)
                except NoSuchObject:
                    pass
                aborted += 1
        except SsefsError as error:
            log.warning("could not look for stray multipart uploads of %r (tried again at the next start): %s",
                        object_key, error)
            return False
        if aborted:
            log.info("aborted %d stray multipart upload(s) of %r left by a retried request", aborted, object_key)
        return True

    async def upload_part(self, object_key: str, upload_id: str, part_number: int, data: bytes, *,
                          key: SseKey | None = None) -> str:
        """Send one part under ``key``, the key the upload was created under (default: the current key):
        S3 wants the same key on every part, and SeaweedFS takes another one silently, leaving an object
        whose parts under the other key read back as garbage."""
        response = await self._call(
            "UploadPart",
            object_key,
            functools.partial(
                self._client.upload_part, Bucket=self.bucket, Key=object_key, UploadId=upload_id,
                PartNumber=part_number, Body=data, **(self._sse if key is None else key.sse_params()),
            ),
        )
        self._check_echo("UploadPart", object_key, response, key=key)
        return str(response["ETag"])

    async def upload_part_copy(
        self, object_key: str, upload_id: str, part_number: int, source_key: str, start: int, end: int
    ) -> str | None:
        """Copy bytes ``start..end-1`` of ``source_key`` into a part, server-side.

        Returns None when the server does not implement UploadPartCopy for SSE-C
        sources (SeaweedFS answers 501); that answer is remembered, so the caller
        falls back to uploading the bytes and later uploads do not ask again.
        """
        if self.part_copy_supported is False:
            return None

        source_sse = (await self._copy_source_key(source_key)).copy_source_params()

        def copy() -> Any:
            return self._client.upload_part_copy(
                Bucket=self.bucket, Key=object_key, UploadId=upload_id, PartNumber=part_number,
                CopySource={"Bucket": self.bucket, "Key": source_key}, CopySourceRange=f"bytes={start}-{end - 1}",
                **self._sse, **source_sse,
            )

        try:
            response = await self._call("UploadPartCopy", object_key, copy)
        except SsefsError as error:
            if "NotImplemented" in str(error) or " 501 " in f" {error} ":
                log.info("the server does not support UploadPartCopy with SSE-C; unchanged ranges are re-uploaded")
                self.part_copy_supported = False
                return None
            raise
        self.part_copy_supported = True
        return str(response["CopyPartResult"]["ETag"])

    async def complete_multipart(self, object_key: str, upload_id: str, part_etags: list[str], *,
                                 key: SseKey | None = None) -> str:
        """Complete an upload created under ``key`` (default: the current key), which the object is then under."""
        parts = [{"PartNumber": number, "ETag": etag} for number, etag in enumerate(part_etags, start=1)]
        response = await self._call(
            "CompleteMultipartUpload",
            object_key,
            functools.partial(
                self._client.complete_multipart_upload, Bucket=self.bucket, Key=object_key,
                UploadId=upload_id, MultipartUpload={"Parts": parts},
            ),
        )
        self._stored_under(object_key, key or self._key)
        etag = str(response.get("ETag", "")).strip('"')
        if self.upload_journal is not None:
            self.upload_journal.multipart_finished(upload_id, etag)
        return etag

    async def abort_multipart(self, object_key: str, upload_id: str) -> None:
        await self._call(
            "AbortMultipartUpload",
            object_key,
            functools.partial(
                self._client.abort_multipart_upload, Bucket=self.bucket, Key=object_key, UploadId=upload_id
            ),
        )
        if self.upload_journal is not None:
            self.upload_journal.multipart_finished(upload_id)

    async def copy(self, source_key: str, target_key: str, metadata: dict[str, str] | None = None) -> str:
        """Server-side copy from the source's key to the current key; returns the new object's ETag.

        Metadata is always given explicitly (``MetadataDirective=REPLACE``): the
        source's own, or ``metadata``. That works on AWS and on SeaweedFS alike
        (SeaweedFS refuses COPY when source and target coincide), and with
        ``source_key == target_key`` it rewrites an object's metadata in place
        (and re-encrypts it under the current key if it was under an older one).
        """
        if metadata is None:
            metadata = (await self.head(source_key)).metadata
        await self.deletes.settle(target_key)
        source_sse = (await self._copy_source_key(source_key)).copy_source_params()
        response = await self._call(
            "CopyObject",
            source_key,
            functools.partial(
                self._client.copy_object, Bucket=self.bucket, Key=target_key,
                CopySource={"Bucket": self.bucket, "Key": source_key},
                MetadataDirective="REPLACE", Metadata=metadata, **self._sse, **source_sse,
            ),
        )
        self._check_echo("CopyObject", target_key, response, required=False)
        self._stored_under(target_key, self._key)
        self._under_current_key.discard(source_key)
        return str(response.get("CopyObjectResult", {}).get("ETag", "")).strip('"')

    async def delete(self, object_key: str) -> None:
        """Delete one object now (a queued delete of the same key is then moot)."""
        await self.deletes.settle(object_key)
        await self._call(
            "DeleteObject",
            object_key,
            functools.partial(self._client.delete_object, Bucket=self.bucket, Key=object_key),
        )
        self._deleted(object_key)

    def delete_later(self, object_key: str) -> None:
        """Queue the object's delete (journaled): from now on it reads as absent; ``deletes.run`` sends it."""
        self.deletes.add(object_key)

    async def delete_many(self, object_keys: list[str]) -> dict[str, str]:
        """Delete up to 1,000 objects in one request; returns the reason for each that was not deleted.
        The directories they leave get their markers first (``keep_directory``); if that fails, so does this."""
        leaving = tuple(self._leaving)
        unmarked = {prefix for prefix in {key[:key.rstrip("/").rfind("/") + 1] for key in object_keys}
                    if prefix and prefix not in self._markers and not prefix.startswith(leaving)}
        if unmarked:
            try:
                async with trio.open_nursery() as nursery:
                    for prefix in unmarked:
                        nursery.start_soon(self.keep_directory, prefix)
            except BaseExceptionGroup as group:
                raise unwrap_group(group) from None

        def send() -> Any:
            return self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in object_keys], "Quiet": True},
            )

        response = await self._call("DeleteObjects", object_keys[0] if object_keys else "", send)
        errors = {
            str(error.get("Key")): f"{error.get('Code', '')} {error.get('Message', '')}".strip()
            for error in response.get("Errors", ())
            # Absent already: what a delete wants.
            if error.get("Code") != "NoSuchKey"
        }
        for object_key in object_keys:
            if object_key not in errors:
                self._deleted(object_key)
        return errors

    def _deleted(self, object_key: str) -> None:
        if self.key_index.get(object_key) is not None:
            self.key_index.forget(object_key)
        self._under_current_key.discard(object_key)
        self._markers.discard(object_key)

    def _refuse_pending(self, operation: str, object_key: str) -> None:
        if self.deletes.is_pending(object_key):
            raise NoSuchObject(f"{operation} {object_key!r} in bucket {self.bucket}: no such object (deleted)")


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def parse_s3_time(text: str) -> datetime.datetime:
    """The times S3 sends, parsed in a microsecond or two.

    botocore's default parser (dateutil) costs about 50 µs a call: a LIST page
    of 1,000 objects spent 50 ms on its dates, a HEAD a tenth of its CPU. S3
    sends ISO 8601 in XML bodies and RFC 1123 in headers; anything else, or a
    time without a zone, goes to botocore's own parser.
    """
    try:
        parsed = (
            # RFC 1123 starts with the day's name ("Tue, 24 Nov ..."; note the T of GMT), ISO 8601 with the year.
            email.utils.parsedate_to_datetime(text) if text[:1].isalpha() else datetime.datetime.fromisoformat(text)
        )
    except (ValueError, TypeError, IndexError):
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        return botocore.utils.parse_timestamp(text)
    return parsed


class _DeletedKeys:
    """The keys one LIST must not show under ``prefix``: those pending delete now, and those pending
    when it went out (a delete confirmed while the LIST is answered still shows in its answer)."""

    def __init__(self, deletes: DeleteQueue, prefix: str) -> None:
        self._deletes = deletes
        self._when_sent = set(deletes.pending_under(prefix))

    def __len__(self) -> int:
        return len(self._when_sent)

    def __contains__(self, key: object) -> bool:
        return key in self._when_sent or (isinstance(key, str) and self._deletes.is_pending(key))


def _info_from_listing(item: dict[str, Any]) -> ObjectInfo:
    return ObjectInfo(
        key=item["Key"],
        size=int(item.get("Size", 0)),
        etag=str(item.get("ETag", "")).strip('"'),
        mtime=item["LastModified"].timestamp() if item.get("LastModified") else 0.0,
    )

def _info_from_head(object_key: str, response: dict[str, Any]) -> ObjectInfo:
    return ObjectInfo(
        key=object_key,
        size=int(response.get("ContentLength", 0)),
        etag=str(response.get("ETag", "")).strip('"'),
        mtime=response["LastModified"].timestamp() if response.get("LastModified") else 0.0,
        metadata=dict(response.get("Metadata", {})),
    )
