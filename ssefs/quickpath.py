"""HEADs, small PUTs, ranged GETs and listings without botocore's per-call machinery.

A request through a boto3 client costs 1.3-1.8 ms of CPU (parameter validation,
endpoint rules, a dozen event hooks, the response model), more than twice what
the request itself needs. ``ls -l`` of objects written by other tools needs a
keyed HEAD per object, ``tar -x`` or ``cp -r`` of small files a PUT per file
and a GET per file read back, and a sequential read a GET per 8 MiB (where
boto3's per-call work was a tenth of the daemon's CPU). This module owns a
lean path for those requests: botocore's own SigV4 signer and the client's
credentials, an urllib3 pool of its own with the same TLS verification and
timeouts, and the object URL prefix that botocore itself resolved for the
bucket. Batches of HEADs go through libcurl (``pycurl``) when it is installed,
many in flight from one thread with the same verification. It answers only
the plain outcomes: a HEAD's or GET's 200/206 (shaped as boto3 returns them)
and 404, a GET's 416 (a range past the end), a PUT's 200, a listing page.
PUT bodies stay within 1 MiB; a GET's body is read in the caller's pieces as
it arrives. Anything else (403, 400, 5xx, a connection or TLS failure, a body
cut short, a key urllib3 would rewrite, metadata that is not plain ASCII)
returns ``None``, and ``store.py`` asks boto3, which retries and turns the
failure into a clear error; a PUT sent twice stores the same bytes. It stays
off when a proxy is configured for the endpoint: only boto3 knows that route.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import queue
import urllib.request
import xml.etree.ElementTree as ElementTree
from typing import Any
from urllib.parse import quote, unquote_plus, urlencode, urlsplit

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import botocore.exceptions
import botocore.httpsession
import urllib3

try:
    import pycurl
except ImportError:  # the HEAD batches then go through urllib3, one at a time per worker thread
    pycurl = None  # type: ignore[assignment]

from .keys import SseKey

log = logging.getLogger(__name__)

METADATA_PREFIX = "x-amz-meta-"
ECHO_HEADER = "x-amz-server-side-encryption-customer-key-md5"
# The key stands in for any object key while botocore resolves the bucket's URL.
PROBE_KEY = "ssefs-url-probe"
NOT_FOUND = "not found"
PAST_THE_END = "range past the end"
# Larger bodies go through boto3, whose retries and 100-continue suit long uploads.
PUT_LIMIT = 1024 * 1024
S3_NAMESPACE = "{http://s3.amazonaws.com/doc/2006-03-01/}"
# head_many: through urllib3, keys per worker-thread hop (one hop per HEAD cost a quarter of the CPU)
# and hops at once; through libcurl, keys per hop and one hop at a time, with all max_connections in
# flight from its thread (two threads of half as many: 3,745-4,222 against 4,510 entries/s of ls -l).
URLLIB3_HEAD_BATCH = 16
CURL_HEAD_BATCH = 256
EMPTY_PAYLOAD_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class QuickPath:
    """HEAD, PUT and ranged GET of one object under an SSE-C key and listing pages, signed by botocore
    and sent straight through urllib3; batches of HEADs through libcurl, which signs them itself."""

    def __init__(self, client: Any, credentials: botocore.credentials.Credentials, bucket: str, *,
                 ca_bundle: str | None, max_connections: int, connect_timeout: float, read_timeout: float) -> None:
        self._credentials = credentials
        self._region = client.meta.region_name
        # The URL botocore would use (addressing style, endpoint rules, region), less the probe key.
        presigned = client.generate_presigned_url("head_object", Params={"Bucket": bucket, "Key": PROBE_KEY})
        url = urlsplit(presigned)
        self._base = f"{url.scheme}://{url.netloc}"
        self._path_prefix = url.path[: -len(PROBE_KEY)]
        pool_settings: dict[str, Any] = {
            "maxsize": max_connections,
            "timeout": urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            "retries": False,
        }
        # botocore's default bundle when none is configured, so every path trusts the same CAs.
        self._trusted = ca_bundle or botocore.httpsession.get_cert_path(True)
        if url.scheme == "https":
            pool_settings.update(cert_reqs="CERT_REQUIRED", ca_certs=self._trusted)
        self._pool = urllib3.PoolManager(**pool_settings).connection_from_url(self._base)
        self._max_connections = max_connections
        self._timeouts_ms = (int(connect_timeout * 1000), int((connect_timeout + read_timeout) * 1000))
        # Idle libcurl sessions (a multi handle and its easy handles, with their open connections).
        self._curl_sessions: queue.SimpleQueue[_CurlSession] = queue.SimpleQueue()

    @classmethod
    def usable_for(cls, endpoint: str) -> bool:
        """False when a proxy is configured for ``endpoint``: then only boto3 knows the route."""
        url = urlsplit(endpoint)
        return not (urllib.request.getproxies().get(url.scheme) and not urllib.request.proxy_bypass(url.netloc))

    def _send(self, method: str, object_key: str, headers: dict[str, str], body: bytes | None = None,
              *, preload: bool = True, query: str = "") -> Any:
        """Sign and send one request; None if it could not be sent or answered. Without ``preload``
        the body is left for the caller to read (and the connection to release). An empty
        ``object_key`` with a ``query`` addresses the bucket."""
        if any(part in (".", "..") for part in object_key.split("/")):
            return None  # urllib3 would resolve the dot segment, asking for another object
        target = self._path_prefix + quote(object_key, safe="/~")
        if query:
            target = (target.rstrip("/") or "/") + "?" + query
        try:
            signed = self._signed_headers(method, target, headers, body)
            # decode_content off: the bytes as stored, whatever Content-Encoding says (as botocore does).
            return self._pool.urlopen(method, target, body=body, headers=signed,
                                      redirect=False, decode_content=False, preload_content=preload)
        except (urllib3.exceptions.HTTPError, OSError, botocore.exceptions.BotoCoreError) as error:
            log.debug("quick %s of %r failed (%s); asking boto3", method, object_key, type(error).__name__)
            return None

    def _signed_headers(self, method: str, target: str, headers: dict[str, str],
                        body: bytes | None = None) -> dict[str, str]:
        """``headers`` plus botocore's SigV4 signature for ``method`` on ``target`` (path and query)."""
        request = botocore.awsrequest.AWSRequest(method=method, url=self._base + target, headers=headers, data=body)
        # Over TLS the body is not hashed for the signature (as in store.py's client); over HTTP it is.
        request.context["payload_signing_enabled"] = not self._base.startswith("https://")
        botocore.auth.S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self._region).add_auth(request)
        return dict(request.headers.items())

    def put(self, object_key: str, key: SseKey, body: bytes, metadata: dict[str, str],
            content_md5: str) -> dict[str, Any] | None:
        """Store ``body`` with ``metadata``; the answer's ETag and key echo as boto3 returns them, or None."""
        if len(body) > PUT_LIMIT or not all(
            (name + value).isascii() and (name + value).isprintable() for name, value in metadata.items()
        ):
            return None
        headers = key.sse_headers()
        headers["Content-MD5"] = content_md5  # the server refuses a body cut short (see store.put)
        headers.update({METADATA_PREFIX + name: value for name, value in metadata.items()})
        response = self._send("PUT", object_key, headers, body)
        if response is None or response.status != 200:
            return None
        return {"ETag": response.headers.get("ETag", ""), "SSECustomerKeyMD5": response.headers.get(ECHO_HEADER)}

    def get(self, object_key: str, key: SseKey, offset: int, length: int,
            piece_size: int) -> dict[str, Any] | str | None:
        """``length`` bytes at ``offset`` (fewer at the end) as ``Pieces`` of ``piece_size`` bytes (the
        last may be shorter), with the key echo; or ``NOT_FOUND``, ``PAST_THE_END``, or None: ask boto3."""
        if length <= 0 or piece_size <= 0:
            return None
        headers = key.sse_headers()
        headers["Range"] = f"bytes={offset}-{offset + length - 1}"
        response = self._send("GET", object_key, headers, preload=False)
        if response is None:
            return None
        read_to_the_end = False
        try:
            if response.status in (404, 416):
                response.drain_conn()  # a short error document
                read_to_the_end = True
                return NOT_FOUND if response.status == 404 else PAST_THE_END
            # A 200 is the whole object: right only if the range started at 0 and the object fits in it.
            declared = response.length_remaining
            if not (response.status == 206 or (response.status == 200 and offset == 0 and declared is not None
                                               and declared <= length)):
                return None
            # Each piece read from the socket into its own buffer; urllib3 raises if the body ends
            # short of its Content-Length (None here: boto3 then reads it again).
            pieces = list(iter(lambda: response.read(piece_size), b""))
            read_to_the_end = True
            if any(len(piece) != piece_size for piece in pieces[:-1]):
                return None
            return {"Pieces": pieces, "SSECustomerKeyMD5": response.headers.get(ECHO_HEADER)}
        except (urllib3.exceptions.HTTPError, OSError) as error:
            log.debug("quick GET of %r failed (%s); asking boto3", object_key, type(error).__name__)
            return None
        finally:
            # A connection with body left unread cannot serve another request.
            if read_to_the_end:
                response.release_conn()
            else:
                response.close()

    def head(self, object_key: str, key: SseKey) -> dict[str, Any] | str | None:
        """The object's headers as boto3 would return them, ``NOT_FOUND``, or None: ask boto3."""
        response = self._send("HEAD", object_key, key.sse_headers())
        if response is None:
            return None
        if response.status == 404:
            return NOT_FOUND
        if response.status != 200:
            return None
        return _head_answer(response.headers)

    @property
    def head_batching(self) -> tuple[int, int]:
        """For ``head_many``: how many keys to hand over per call, and how many calls to run at once."""
        return (CURL_HEAD_BATCH, 1) if pycurl is not None else (URLLIB3_HEAD_BATCH, self._max_connections)

    def head_many(self, batch: list[tuple[str, SseKey]]) -> list[dict[str, Any] | str | None]:
        """``head`` of each (object key, SSE key), in order. With libcurl, ``max_connections`` HEADs
        are in flight at once from this one thread, signed by libcurl's own
        SigV4 (``CURLOPT_AWS_SIGV4``): against SeaweedFS 70-90 µs of CPU per HEAD, where urllib3
        and botocore's signer take 570, and three to four times the HEADs per second. Without
        libcurl, one after another."""
        if pycurl is None or not self._region:
            return [self.head(object_key, key) for object_key, key in batch]
        try:
            credentials = self._credentials.get_frozen_credentials()
        except botocore.exceptions.BotoCoreError:
            credentials = None
        if credentials is None or not credentials.access_key or not credentials.secret_key:
            return [None] * len(batch)  # boto3 reports what is wrong with the credentials
        try:
            session = self._curl_sessions.get_nowait()
        except queue.Empty:
            session = _CurlSession(self._max_connections, self._trusted, self._timeouts_ms)
        session.sign_as(credentials.access_key, credentials.secret_key, self._region)
        try:
            answers = session.heads([self._curl_head_request(object_key, key, credentials.token)
                                     for object_key, key in batch])
        except pycurl.error as error:
            # A session that failed midway may hold requests in flight: it is dropped, not reused.
            log.debug("quick HEAD batch failed in libcurl (%s); asking again", type(error).__name__)
            session.close()
            return [None] * len(batch)
        session.forget_credentials()
        self._curl_sessions.put(session)
        return answers

    def _curl_head_request(self, object_key: str, key: SseKey, token: str | None) -> tuple[str, list[str]] | None:
        if any(part in (".", "..") for part in object_key.split("/")):
            return None  # libcurl would resolve the dot segment, asking for another object
        headers = key.sse_headers()
        headers["x-amz-content-sha256"] = EMPTY_PAYLOAD_SHA256  # a HEAD has no body
        if token:
            headers["x-amz-security-token"] = token  # signed with the other headers
        url = self._base + self._path_prefix + quote(object_key, safe="/~")
        return url, [f"{name}: {value}" for name, value in headers.items()]

    def list_page(self, prefix: str, *, delimiter: str | None, max_keys: int,
                  continuation: str | None) -> dict[str, Any] | None:
        """One ListObjectsV2 page, shaped as boto3 returns it (``Contents`` with Key, Size, ETag and
        LastModified; ``CommonPrefixes``; ``IsTruncated``; ``NextContinuationToken``), or None: ask boto3.

        Keys come URL-encoded (``encoding-type=url``, as boto3 asks) so that any key survives XML.
        """
        parameters = {"list-type": "2", "prefix": prefix, "max-keys": str(max_keys), "encoding-type": "url"}
        if delimiter is not None:
            parameters["delimiter"] = delimiter
        if continuation is not None:
            parameters["continuation-token"] = continuation
        response = self._send("GET", "", {}, query=urlencode(sorted(parameters.items()), quote_via=quote, safe="~"))
        if response is None or response.status != 200:
            return None
        try:
            return _parse_list_page(response.data)
        except (ElementTree.ParseError, ValueError, TypeError, AttributeError) as error:
            log.debug("quick LIST of %r: unreadable answer (%s); asking boto3", prefix, type(error).__name__)
            return None


def _parse_list_page(document: bytes) -> dict[str, Any] | None:
    root = ElementTree.fromstring(document)
    if root.tag != S3_NAMESPACE + "ListBucketResult":
        return None
    url_encoded = root.findtext(S3_NAMESPACE + "EncodingType") == "url"

    def key_text(element: ElementTree.Element, name: str) -> str:
        text = element.findtext(S3_NAMESPACE + name)
        if text is None:
            raise ValueError(f"no {name}")
        return unquote_plus(text) if url_encoded else text

    contents = []
    for item in root.iterfind(S3_NAMESPACE + "Contents"):
        modified = item.findtext(S3_NAMESPACE + "LastModified")
        contents.append({
            "Key": key_text(item, "Key"),
            "Size": int(item.findtext(S3_NAMESPACE + "Size") or 0),
            "ETag": item.findtext(S3_NAMESPACE + "ETag") or "",
            "LastModified": datetime.datetime.fromisoformat(modified) if modified else None,
        })
    return {
        "Contents": contents,
        "CommonPrefixes": [{"Prefix": key_text(common, "Prefix")}
                           for common in root.iterfind(S3_NAMESPACE + "CommonPrefixes")],
        "IsTruncated": root.findtext(S3_NAMESPACE + "IsTruncated") == "true",
        "NextContinuationToken": root.findtext(S3_NAMESPACE + "NextContinuationToken"),
    }


def _head_answer(headers: Any) -> dict[str, Any] | None:
    """A HEAD's 200 headers (any mapping with ``get`` and ``items``) shaped as boto3 returns them."""
    try:
        modified = email.utils.parsedate_to_datetime(headers.get("Last-Modified", ""))
    except (TypeError, ValueError):
        return None
    metadata = {
        name[len(METADATA_PREFIX):]: value
        for name, value in headers.items()
        if name.lower().startswith(METADATA_PREFIX)
    }
    return {
        "ContentLength": int(headers.get("Content-Length", 0)),
        "ETag": headers.get("ETag", ""),
        "LastModified": modified,
        "Metadata": metadata,
        "SSECustomerKeyMD5": headers.get(ECHO_HEADER),
    }


class _CurlSession:
    """A libcurl multi handle with ``width`` easy handles that keep their connections open between
    batches. Used by one thread at a time. TLS verification as in the urllib3 pool: peer and host
    name checked against the same CA bundle; no proxy, no redirects, HTTP(S) only."""

    def __init__(self, width: int, trusted: str | None, timeouts_ms: tuple[int, int]) -> None:
        assert pycurl is not None
        self._multi = pycurl.CurlMulti()
        self._idle: list[pycurl.Curl] = []
        # Handles with a request in flight: (its number in the batch, the header lines it received).
        self._busy: dict[pycurl.Curl, tuple[int, list[bytes]]] = {}
        for _ in range(max(1, width)):
            handle = pycurl.Curl()
            handle.setopt(pycurl.NOBODY, 1)
            handle.setopt(pycurl.NOSIGNAL, 1)
            if trusted:
                handle.setopt(pycurl.CAINFO, trusted)
            handle.setopt(pycurl.SSL_VERIFYPEER, 1)
            handle.setopt(pycurl.SSL_VERIFYHOST, 2)
            handle.setopt(pycurl.PROXY, "")  # not the environment's: a proxy turns the quick path off
            handle.setopt(pycurl.FOLLOWLOCATION, 0)
            handle.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
            handle.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
            handle.setopt(pycurl.CONNECTTIMEOUT_MS, timeouts_ms[0])
            handle.setopt(pycurl.TIMEOUT_MS, timeouts_ms[1])
            self._idle.append(handle)

    def heads(self, requests: list[tuple[str, list[str]] | None]) -> list[dict[str, Any] | str | None]:
        """Send every (URL, header lines) HEAD, as many at once as there are easy handles; each answer
        is a 200's headers as boto3 shapes them, ``NOT_FOUND``, or None (anything else, or no request)."""
        answers: list[dict[str, Any] | str | None] = [None] * len(requests)
        waiting = [number for number, request in enumerate(requests) if request is not None]
        waiting.reverse()
        busy = self._busy
        busy.clear()
        while waiting or busy:
            while waiting and self._idle:
                number = waiting.pop()
                request = requests[number]
                assert request is not None  # only numbers of requests are waiting
                url, header_lines = request
                handle = self._idle.pop()
                lines: list[bytes] = []
                handle.setopt(pycurl.URL, url)
                handle.setopt(pycurl.HTTPHEADER, header_lines)
                handle.setopt(pycurl.HEADERFUNCTION, lines.append)
                busy[handle] = (number, lines)
                self._multi.add_handle(handle)
            while self._multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
            while True:
                queued, succeeded, failed = self._multi.info_read()
                for handle in succeeded:
                    number, lines = busy.pop(handle)
                    answers[number] = _curl_answer(handle.getinfo(pycurl.RESPONSE_CODE), lines)
                    self._release(handle)
                for handle, _code, message in failed:
                    number, _lines = busy.pop(handle)
                    log.debug("quick HEAD failed in libcurl (%s); asking again", message.split(":")[0])
                    self._release(handle)
                if not queued:
                    break
            if busy:
                self._multi.select(1.0)
        return answers

    def sign_as(self, access_key: str, secret_key: str, region: str) -> None:
        """Have libcurl sign the next requests with SigV4 for S3 in ``region`` (every header sent
        is signed, as S3 requires of the x-amz-* ones)."""
        for handle in self._idle:
            handle.setopt(pycurl.AWS_SIGV4, f"aws:amz:{region}:s3")
            handle.setopt(pycurl.USERNAME, access_key)
            handle.setopt(pycurl.PASSWORD, secret_key)

    def forget_credentials(self) -> None:
        for handle in self._idle:
            handle.setopt(pycurl.PASSWORD, "")

    def close(self) -> None:
        """Free the handles and their connections (and with them the credentials set on them)."""
        for handle in [*self._idle, *self._busy]:
            handle.close()
        self._multi.close()

    def _release(self, handle: pycurl.Curl) -> None:
        self._multi.remove_handle(handle)
        handle.setopt(pycurl.HTTPHEADER, [])  # the signed headers (the SSE-C key) do not outlive the request
        self._idle.append(handle)


def _curl_answer(status: int, lines: list[bytes]) -> dict[str, Any] | str | None:
    if status == 404:
        return NOT_FOUND
    if status != 200:
        return None
    headers = _Headers()
    for raw in lines:
        try:
            line = raw.decode("ascii")  # anything else (metadata in another charset): the other paths decide
        except UnicodeDecodeError:
            return None
        name, colon, value = line.partition(":")
        if colon and not name.startswith((" ", "\t")):
            headers.add(name.strip(), value.strip())
    return _head_answer(headers)


class _Headers:
    """Response headers as urllib3 gives them: looked up in any case, a header sent twice (in any
    case; SeaweedFS sends the key's MD5 twice) read as both values joined by ", "."""

    def __init__(self) -> None:
        self._by_lower: dict[str, tuple[str, str]] = {}

    def add(self, name: str, value: str) -> None:
        known = self._by_lower.get(name.lower())
        self._by_lower[name.lower()] = (known[0], f"{known[1]}, {value}") if known else (name, value)

    def get(self, name: str, default: Any = None) -> Any:
        known = self._by_lower.get(name.lower())
        return known[1] if known else default

    def items(self) -> list[tuple[str, str]]:
        return list(self._by_lower.values())
