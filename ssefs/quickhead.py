"""Keyed HEAD requests without botocore's per-call machinery, for the many HEADs a listing needs.

A HEAD through a boto3 client costs about 1.3 ms of CPU (parameter validation,
endpoint rules, a dozen event hooks, the response model), more than twice what
the request itself needs, and ``ls -l`` of a directory of objects written by
others needs one keyed HEAD per object. This module owns a lean path for that
one request: botocore's own SigV4 signer and the client's credentials, an
urllib3 pool of its own with the same TLS verification and timeouts, and the
object URL prefix that botocore itself resolved for the bucket. It answers only
the plain outcomes, 200 (the headers shaped as boto3 returns them) and 404.
Anything else (403, 400, 5xx, a connection or TLS failure, a key urllib3 would
rewrite) returns ``None``, and ``store.py`` asks boto3, which retries and turns
the failure into a clear error. It stays off when a proxy is configured for the
endpoint: only boto3 knows that route.
"""

from __future__ import annotations

import email.utils
import logging
import urllib.request
from typing import Any
from urllib.parse import quote, urlsplit

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


class QuickHead:
    """HEAD of one object under an SSE-C key, signed by botocore and sent straight through urllib3."""

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

    def head(self, object_key: str, key: SseKey) -> dict[str, Any] | str | None:
        """The object's headers as boto3 would return them, ``NOT_FOUND``, or None: ask boto3."""
        if any(part in (".", "..") for part in object_key.split("/")):
            return None  # urllib3 would resolve the dot segment, asking for another object
        target = self._path_prefix + quote(object_key, safe="/~")
        request = botocore.awsrequest.AWSRequest(method="HEAD", url=self._base + target, headers=key.sse_headers())
        try:
            botocore.auth.S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self._region).add_auth(request)
            response = self._pool.urlopen("HEAD", target, headers=dict(request.headers.items()), redirect=False)
        except (urllib3.exceptions.HTTPError, OSError, botocore.exceptions.BotoCoreError) as error:
            log.debug("quick HEAD of %r failed (%s); asking boto3", object_key, type(error).__name__)
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
