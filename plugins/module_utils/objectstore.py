# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A snapshot store in an S3-compatible bucket (no Ansible imports). PRIVATE to the collection.

S3Storage offers the narrow interface of store.FileStorage (put_atomic, get, exists, list,
delete, mtime, size, touch, sync, clean_temporary) over "/"-separated paths below a bucket and
prefix, so JobStore keeps one object layout and one format on both backends:
- an S3 PUT is atomic and durable once acknowledged: put_atomic is one PUT (multipart above
  MULTIPART_BYTES, assembled by the server only when complete), sync has nothing to do;
- put_new is a conditional PUT (If-None-Match: *), so of two writers of one name only one wins, and
  put_if_unchanged one with If-Match (the catalog head: of two writers committing on one head, one wins);
- list pages through ListObjectsV2 with a delimiter (objects and "folders" under a prefix);
- mtime is LastModified; touch copies an object onto itself (a new LastModified), which is what
  the store's garbage collection grace period needs;
- throttling and 5xx answers are retried with backoff by botocore (standard retry mode), every
  call has connect and read timeouts, and the client's connection pool is bounded;
- get, the restore's hot path, first tries one GET of a URL botocore presigns, sent through urllib3 (the HTTP
  library under botocore) without botocore's per-request machinery, which costs twice the CPU of the whole
  request; any answer but 200 with the whole body, or any failure, goes through botocore's own get_object
  (retries, backoff, the errors below). Not used when a proxy is configured for the endpoint.
Errors name the endpoint and bucket and say what to do; credentials never appear in them.
"""
from __future__ import annotations

import io
import threading
import urllib.parse
import urllib.request

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import StoreError

try:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore import exceptions as botocore_errors
    from botocore.config import Config
    from botocore.httpsession import get_cert_path
    import urllib3
    BOTO3_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    boto3 = TransferConfig = botocore_errors = Config = get_cert_path = urllib3 = None
    BOTO3_IMPORT_ERROR = e

MULTIPART_BYTES = 64 << 20  # objects larger than this go up in parts, in parallel
PART_BYTES = 16 << 20
MAX_CONNECTIONS = 16        # a bounded pool: the store's writers and readers use a few threads each
PARALLELISM = 8             # chunk uploads (snapshot) and downloads (restore) at once: requests wait on the network
LIST_PAGE = 1000            # keys per ListObjectsV2 page (S3's maximum)

_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId")
_CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict")  # a conditional PUT lost to another writer
_REGION = ("AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException", "301")


class S3Storage:
    """Storage in bucket under prefix at an S3-compatible endpoint.

    Credentials: access_key and secret_key when given, else the standard AWS chain (environment, shared
    credentials file, instance role). addressing_style: "path" (most self-hosted servers) or "virtual"."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 addressing_style: str = "path", ca_bundle: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, session_token: str | None = None, connect_timeout: float = 10,
                 read_timeout: float = 60, max_attempts: int = 5, max_connections: int = MAX_CONNECTIONS) -> None:
        if boto3 is None:
            raise StoreError("The Python package boto3 is missing (%s): install the collection's requirements to use "
                             "an object store." % BOTO3_IMPORT_ERROR)
        if not bucket:
            raise StoreError("The object store has no bucket: set object_store.bucket.")
        if addressing_style not in ("path", "virtual", "auto"):
            raise StoreError("object_store.addressing_style is %r: use path, virtual or auto." % (addressing_style,))
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.list_page = LIST_PAGE
        self.parallelism = PARALLELISM
        config = Config(s3={"addressing_style": addressing_style}, signature_version="s3v4",
                        retries={"max_attempts": int(max_attempts), "mode": "standard"},
                        connect_timeout=connect_timeout, read_timeout=read_timeout,
                        max_pool_connections=int(max_connections))
        session = boto3.session.Session(aws_access_key_id=access_key or None, aws_secret_access_key=secret_key or None,
                                        aws_session_token=session_token or None, region_name=region or "us-east-1")
        try:
            self.client = session.client("s3", endpoint_url=endpoint_url or None, verify=ca_bundle or True, config=config)
        except ValueError as e:  # an endpoint URL botocore cannot use
            raise StoreError("The object store endpoint %r is not a valid URL (%s): give it as https://host[:port]."
                             % (endpoint_url, e)) from None
        self._transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=PART_BYTES,
                                        max_concurrency=4, use_threads=True)
        self._direct = self._direct_pool(ca_bundle, connect_timeout, read_timeout, int(max_connections))
        self.direct_gets = 0  # GETs answered on the direct path (botocore's events do not see them)
        self._count_lock = threading.Lock()

    def _direct_pool(self, ca_bundle, connect_timeout, read_timeout, max_connections):
        """The urllib3 pool of the direct GET path, or None where it must not be used (a proxy for the endpoint)."""
        url = self.client.meta.endpoint_url
        host = urllib.parse.urlsplit(url).hostname or ""
        if urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
            return None
        tls = {"cert_reqs": "CERT_REQUIRED", "ca_certs": get_cert_path(ca_bundle or True)} if url.startswith("https:") else {}
        return urllib3.PoolManager(num_pools=4, maxsize=max_connections, block=False, retries=False,
                                   timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout), **tls)

    @property
    def root(self) -> str:
        """Where the store is, for messages (no credentials)."""
        return "s3://%s/%s" % (self.bucket, self.prefix) if self.prefix else "s3://%s" % self.bucket

    def _where(self):
        return "bucket %s at %s" % (self.bucket, self.endpoint_url or "AWS S3")

    def _key(self, path):
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise StoreError("Invalid store path %r." % path)
        return "%s/%s" % (self.prefix, path) if self.prefix else path

    def _error(self, e, what):
        """A StoreError for a failed call: what went wrong at which endpoint and bucket, and what to do."""
        if isinstance(e, botocore_errors.ClientError):
            code = str(e.response.get("Error", {}).get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
            if code == "NoSuchBucket":
                return StoreError("The %s does not exist (%s): create the bucket, or fix object_store.bucket and object_store.endpoint_url."
                                  % (self._where(), what))
            if code in _CREDENTIALS:
                return StoreError("The %s refused the credentials (%s, %s): check the access key and secret (or the "
                                  "AWS credential chain: environment, shared file, instance role)." % (self._where(), code, what))
            if code == "403" and what != "opening the bucket":
                # an answer to HEAD has no body: a listing tells a refused secret from a missing permission
                try:
                    self.check_bucket()
                except StoreError as precise:
                    return precise
            if code in ("AccessDenied", "403"):
                return StoreError("The %s denied access (%s): grant the credentials read, write, list and delete on "
                                  "the bucket and prefix %r." % (self._where(), what, self.prefix))
            if code in _REGION:
                return StoreError("The %s is in another region than object_store.region (%s, %s): set object_store.region to the "
                                  "bucket's region." % (self._where(), code, what))
            return StoreError("The %s failed %s (%s): check the object store's health and try again." % (self._where(), what, code))
        if isinstance(e, (botocore_errors.EndpointConnectionError, botocore_errors.ConnectTimeoutError,
                          botocore_errors.ReadTimeoutError, botocore_errors.ConnectionClosedError)):
            return StoreError("The object store endpoint %s cannot be reached for the bucket %s (%s, %s): check that it "
                              "runs, the URL and port, the firewall, and object_store.ca_bundle for TLS."
                              % (self.endpoint_url or "AWS S3", self.bucket, type(e).__name__, what))
        if isinstance(e, botocore_errors.NoCredentialsError):
            return StoreError("No credentials for the %s: set object_store.access_key and object_store.secret_key, or provide them "
                              "through the AWS credential chain (environment, shared file, instance role)." % self._where())
        if isinstance(e, botocore_errors.SSLError):
            return StoreError("TLS to the object store endpoint %s failed (%s): set object_store.ca_bundle to the CA that "
                              "signed its certificate." % (self.endpoint_url, what))
        return StoreError("The %s failed %s (%s)." % (self._where(), what, type(e).__name__))

    def _call(self, what, fn, **kw):
        try:
            return fn(Bucket=self.bucket, **kw)
        except botocore_errors.BotoCoreError as e:
            raise self._error(e, what) from None
        except botocore_errors.ClientError as e:
            raise self._error(e, what) from None

    @staticmethod
    def _missing(e):
        return isinstance(e, botocore_errors.ClientError) and str(
            e.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404", "NotFound")

    # the FileStorage interface -------------------------------------------------------------------------
    def put_atomic(self, path: str, data: bytes, sync: bool = True) -> None:
        """One PUT (multipart above MULTIPART_BYTES): visible only once whole. sync is accepted for FileStorage's
        interface; an acknowledged PUT is durable."""
        key = self._key(path)
        if len(data) <= MULTIPART_BYTES:
            self._call("writing %s" % path, self.client.put_object, Key=key, Body=bytes(data))
            return
        try:
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, key, Config=self._transfer)
        except (botocore_errors.BotoCoreError, botocore_errors.ClientError, boto3.exceptions.S3UploadFailedError) as e:
            raise self._error(getattr(e, "__cause__", None) or e, "writing %s" % path) from None

    def put_new(self, path: str, data: bytes) -> bool:
        """Create path with data only if nothing has that name (a conditional PUT); False when it existed."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=bytes(data), IfNoneMatch="*")
            return True
        except botocore_errors.ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in _CONFLICT:
                return False
            raise self._error(e, "creating %s" % path) from None
        except botocore_errors.BotoCoreError as e:
            raise self._error(e, "creating %s" % path) from None

    def put_if_unchanged(self, path: str, data: bytes, expected: bytes | None) -> bool:
        """Replace path with data only if it still holds expected (None: only if nothing has that name): a
        conditional PUT (If-Match on the ETag read with expected, or If-None-Match: *). False when another writer
        changed it first."""
        if expected is None:
            return self.put_new(path, data)
        key = self._key(path)
        try:
            cur = self.client.get_object(Bucket=self.bucket, Key=key)
            if cur["Body"].read() != expected:
                return False
            self.client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data), IfMatch=cur["ETag"])
            return True
        except botocore_errors.ClientError as e:
            if self._missing(e) or str(e.response.get("Error", {}).get("Code")) in _CONFLICT:
                return False
            raise self._error(e, "replacing %s" % path) from None
        except botocore_errors.BotoCoreError as e:
            raise self._error(e, "replacing %s" % path) from None

    def sync(self, paths: list) -> None:
        """Nothing to do: every acknowledged PUT is durable."""

    def get(self, path: str) -> bytes | None:
        key = self._key(path)
        if self._direct is not None:
            data = self._get_direct(key)
            if data is not None:
                return data
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except botocore_errors.ClientError as e:
            if self._missing(e):
                raise StoreError("The store object %s is missing under %s: the store is incomplete; restore another "
                                 "snapshot or a copy of the store." % (path, self.root)) from None
            raise self._error(e, "reading %s" % path) from None
        except botocore_errors.BotoCoreError as e:
            raise self._error(e, "reading %s" % path) from None

    def _get_direct(self, key):
        """The object's bytes from one presigned GET, or None (no retry here: the caller asks botocore then)."""
        try:
            url = self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=900)
            reply = self._direct.request("GET", url, preload_content=True, decode_content=False, redirect=False)
        except (botocore_errors.BotoCoreError, urllib3.exceptions.HTTPError, OSError):
            return None
        if reply.status != 200:
            return None
        with self._count_lock:
            self.direct_gets += 1
        return reply.data

    def _head(self, path):
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(path))
        except botocore_errors.ClientError as e:
            if self._missing(e):
                return None
            raise self._error(e, "checking %s" % path) from None
        except botocore_errors.BotoCoreError as e:
            raise self._error(e, "checking %s" % path) from None

    def exists(self, path: str) -> bool:
        return self._head(path) is not None

    def _stat(self, path):
        head = self._head(path)
        if head is None:
            raise FileNotFoundError(path)  # as os.stat: the store's GC skips objects deleted meanwhile
        return head

    def mtime(self, path: str) -> float:
        return self._stat(path)["LastModified"].timestamp()

    def size(self, path: str) -> int:
        return int(self._stat(path)["ContentLength"])

    def touch(self, path: str) -> None:
        """A new LastModified: the object copied onto itself."""
        key = self._key(path)
        self._call("touching %s" % path, self.client.copy_object, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                   MetadataDirective="REPLACE")

    def list(self, prefix: str) -> list:
        """Names (not paths) directly under the folder prefix: objects and sub-folders, sorted."""
        base = (self._key(prefix) + "/") if prefix else (self.prefix + "/" if self.prefix else "")
        names, token = set(), None
        while True:
            kw = {"Prefix": base, "Delimiter": "/", "MaxKeys": self.list_page}
            if token:
                kw["ContinuationToken"] = token
            page = self._call("listing %s" % prefix, self.client.list_objects_v2, **kw)
            names.update(o["Key"][len(base):] for o in page.get("Contents", []))
            names.update(p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", []))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return sorted(n for n in names if n)

    def list_tree(self, prefix: str) -> list:
        """Paths (relative to the folder prefix) of every object below it, at any depth: one request per page of
        keys, however many sub-folders there are."""
        base = self._key(prefix) + "/"
        paths, token = [], None
        while True:
            kw = {"Prefix": base, "MaxKeys": self.list_page}
            if token:
                kw["ContinuationToken"] = token
            page = self._call("listing %s" % prefix, self.client.list_objects_v2, **kw)
            paths.extend(o["Key"][len(base):] for o in page.get("Contents", []))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return sorted(p for p in paths if p)

    def delete(self, path: str) -> None:
        self._call("deleting %s" % path, self.client.delete_object, Key=self._key(path))

    def clean_temporary(self, prefix: str, older_than: float) -> None:
        """Nothing to clean: an object store has no temporary names (an unfinished multipart upload is not an object)."""

    def check_bucket(self) -> None:
        """The bucket answers to these credentials: StoreError naming what is wrong otherwise. (A listing, not a
        HEAD: an answer to HEAD has no body, so a bad secret and a missing permission would look alike.)"""
        self._call("opening the bucket", self.client.list_objects_v2, Prefix=self.prefix, MaxKeys=1)
