"""HEADs, small PUTs and ranged GETs without botocore's per-call machinery: the requests made by the thousand.

A request through a boto3 client costs 1.3-1.8 ms of CPU (parameter validation,
endpoint rules, a dozen event hooks, the response model), more than twice what
the request itself needs. ``ls -l`` of objects written by other tools needs a
keyed HEAD per object, ``tar -x`` or ``cp -r`` of small files a PUT per file
and a GET per file read back, and a sequential read a GET per 8 MiB (where
boto3's per-call work was a tenth of the daemon's CPU). This module owns a
lean path for those requests: botocore's own SigV4 signer and the client's
credentials, an urllib3 pool of its own with the same TLS verification and
timeouts, and the object URL prefix that botocore itself resolved for the
bucket. It answers only the plain outcomes: a HEAD's or GET's 200/206 (shaped
as boto3 returns them) and 404, a GET's 416 (a range past the end), a PUT's
200. PUT bodies stay within 1 MiB; a GET's body is read in the caller's
pieces as it arrives. Anything else (403, 400, 5xx, a connection or TLS
failure, a body cut short, a key urllib3 would rewrite, metadata that is not
plain ASCII) returns ``None``, and ``store.py`` asks boto3, which retries and
turns the failure into a clear error; a PUT sent twice stores the same bytes.
It stays off when a proxy is configured for the endpoint: only boto3 knows
that route.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
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


class QuickPath:
    """HEAD, PUT and ranged GET of one object under an SSE-C key, signed by botocore and sent straight
    through urllib3."""

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
        if url.scheme == "https":
            # botocore's default bundle when none is configured, so both paths trust the same CAs.
            trusted = ca_bundle or botocore.httpsession.get_cert_path(True)
            pool_settings.update(cert_reqs="CERT_REQUIRED", ca_certs=trusted)
        self._pool = urllib3.PoolManager(**pool_settings).connection_from_url(self._base)

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
        request = botocore.awsrequest.AWSRequest(method=method, url=self._base + target, headers=headers, data=body)
        # Over TLS the body is not hashed for the signature (as in store.py's client); over HTTP it is.
        request.context["payload_signing_enabled"] = not self._base.startswith("https://")
        try:
            botocore.auth.S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self._region).add_auth(request)
            # decode_content off: the bytes as stored, whatever Content-Encoding says (as botocore does).
            return self._pool.urlopen(method, target, body=body, headers=dict(request.headers.items()),
                                      redirect=False, decode_content=False, preload_content=preload)
        except (urllib3.exceptions.HTTPError, OSError, botocore.exceptions.BotoCoreError) as error:
            log.debug("quick %s of %r failed (%s); asking boto3", method, object_key, type(error).__name__)
            return None

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
        headers = response.headers
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
