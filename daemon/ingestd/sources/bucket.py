"""The ObjectStore of `sources/objects.py` for S3, Google Cloud Storage and Azure Blob,
on obstore (Python bindings of the Rust `object_store` crate).

One library for the three clouds: async, a listing that streams page by page, range
reads, conditional GETs (If-Match), and each cloud's own credential chain. What it does
not do is worked around here:

- `object_store` strips the trailing '/' of keys, so a folder placeholder `photos/`
  lists as a zero-byte `photos`. A zero-byte entry is therefore checked with a HEAD of
  the listed name: a placeholder has no object of that exact name (404). Verdicts are
  cached per key and ETag, so each placeholder costs one HEAD per change, not per poll.
- Keys with an empty, '.' or '..' segment (`a//b`, `./x`) cannot be represented and
  abort the listing; that is reported as a named error naming the key.
- A Rust worker thread may still be inside the event loop's wake-up call when the
  interpreter shuts down, which aborts the process (exit 134). An atexit hook gives
  those threads a moment to leave Python before finalization starts.

Credentials never come from the config: each cloud's standard environment, profile or
workload identity is used (see `docs/buckets.md`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import InvalidPathError, PreconditionError, UnauthenticatedError
from obstore.store import AzureStore, GCSStore, S3Store

from ingestd.config import BucketUrl, SourceOptions
from ingestd.core.source import ErrorKind
from ingestd.sources.objects import BucketError, ObjectChanged, ObjectInfo

__all__ = ["Timeouts", "open_store"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Client limits. With the defaults an unreachable endpoint fails within ~30 s:
    connection refused or an unknown host at once (after `retries` quick retries), a
    black-holed address after `connect` s per attempt, bounded by `retry_window`."""

    connect: float = 5.0
    request: float = 10.0  # a whole listing page, HEAD or ranged read
    read: float = 60.0  # a stall while streaming an object's body
    transfer: float = 24 * 3600.0  # a whole object body (huge objects are legitimate)
    retries: int = 3
    retry_window: float = 20.0  # no new retry is started after this
    guard: float = 90.0  # asyncio-side cap on one call, in case the client misbehaves


def open_store(
    url: BucketUrl,
    options: SourceOptions,
    *,
    page_size: int = 1000,
    timeouts: Timeouts | None = None,
) -> ObstoreBucket:
    """An ObjectStore over `url`. Never raises: the client is built on first use, and a
    failure to build it (no Azure account, say) is a BucketError from that call, so a
    misconfigured watch is retried like any outage instead of stopping the daemon."""
    return ObstoreBucket(url, options, page_size=page_size, timeouts=timeouts or Timeouts())


# --- process exit ----------------------------------------------------------------------

_exit_hook_installed = False


def _install_exit_hook() -> None:
    global _exit_hook_installed
    if not _exit_hook_installed:
        _exit_hook_installed = True
        # Sleeping releases the GIL so a tokio thread finishing `call_soon_threadsafe`
        # leaves Python before Py_Finalize; measured: 5 of 8 short runs aborted without.
        atexit.register(time.sleep, 0.05)


# --- the store -------------------------------------------------------------------------


class ObstoreBucket:
    def __init__(
        self, url: BucketUrl, options: SourceOptions, *, page_size: int, timeouts: Timeouts
    ) -> None:
        self.url = url
        self.options = options
        self.page_size = max(1, page_size)
        self.timeouts = timeouts
        self._meta: Any = None  # short requests: list, head, range
        self._data: Any = None  # object bodies: no overall deadline, a stall deadline
        # key -> (etag, is_placeholder) for zero-byte listed entries
        self._zero: dict[str, tuple[str, bool]] = {}

    # -- building the clients ------------------------------------------------------------

    def _stores(self) -> tuple[Any, Any]:
        if self._meta is None:
            self._meta, self._data = _build(self.url, self.options, self.timeouts)
            _install_exit_hook()
        return self._meta, self._data

    # -- the interface -------------------------------------------------------------------

    async def list_pages(self, subprefix: str = "") -> AsyncIterator[list[ObjectInfo]]:
        """Pages of at most `page_size` objects, in key order. `subprefix` is a plain
        string prefix of the key (like MemoryObjectStore); one ending in '/' (or empty)
        is listed directly, another lists its folder and filters."""
        meta, _ = self._call_stores("list")
        folder, _, _ = subprefix.rpartition("/")
        exact = subprefix.endswith("/") or not subprefix
        prefix = subprefix.rstrip("/") if exact else folder
        last: str | None = None
        try:
            stream = obstore.list(meta, prefix or None, chunk_size=self.page_size)
            while True:
                try:
                    async with asyncio.timeout(self.timeouts.guard):
                        batch = await stream.__anext__()
                except StopAsyncIteration:
                    break
                page: list[ObjectInfo] = []
                for m in batch:
                    info = _info(m)
                    if not exact and not info.key.startswith(subprefix):
                        continue
                    # a real object X and a placeholder X/ both list as X
                    if info.key == last:
                        continue
                    if info.size == 0 and await self._placeholder(info):
                        continue
                    last = info.key
                    page.append(info)
                if page:
                    yield page
        except (BucketError, ObjectChanged):
            raise
        except Exception as e:
            raise self._error(e, "list") from e

    async def head(self, key: str) -> ObjectInfo | None:
        if key.endswith("/") or not key:
            return None  # placeholders are not objects
        meta, _ = self._call_stores("head")
        try:
            async with asyncio.timeout(self.timeouts.guard):
                m = await obstore.head_async(meta, key)
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._error(e, "head", key) from e
        return _info(m)

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        meta, _ = self._call_stores("range")
        try:
            async with asyncio.timeout(self.timeouts.guard):
                data = await obstore.get_range_async(meta, key, start=start, end=end)
        except FileNotFoundError as e:
            raise ObjectChanged(f"{self.object_url(key)} is gone") from e
        except Exception as e:
            if _status(str(e)) == 416 or _PAST_END.search(str(e)):  # start at or past the end
                return b""
            raise self._error(e, "range", key) from e
        return bytes(data)

    async def stream(
        self, key: str, *, etag: str | None = None, chunk: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        _, data = self._call_stores("get")
        resp = await self._get(data, key, etag)
        try:
            chunks = resp.stream(min_chunk_size=max(1, chunk))
            # No asyncio cap per chunk: a slow link may take minutes for one; the
            # client's read timeout ends a stalled body.
            async for piece in chunks:
                yield bytes(piece)
        except (BucketError, ObjectChanged):
            raise
        except Exception as e:
            raise self._error(e, "get", key) from e

    async def download(self, key: str, dest: str, *, etag: str | None = None) -> None:
        """Stream into `dest` through a '.part' file renamed at the end, so a failed
        transfer never leaves a truncated file under the final name."""
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        part = f"{dest}.part"
        try:
            with open(part, "wb") as fh:
                async for piece in self.stream(key, etag=etag, chunk=8 << 20):
                    await asyncio.to_thread(fh.write, piece)
            os.replace(part, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise

    def object_url(self, key: str) -> str:
        return f"{self.url.scheme}://{self.url.bucket}/{self.url.prefix}{key}"

    async def close(self) -> None:
        self._meta = self._data = None
        self._zero.clear()
        # Let client threads finish waking this loop before a caller exits (see top).
        await asyncio.sleep(0.05)

    # -- helpers ---------------------------------------------------------------------------

    def _call_stores(self, op: str) -> tuple[Any, Any]:
        try:
            return self._stores()
        except BucketError:
            raise
        except Exception as e:
            raise self._error(e, op) from e

    async def _get(self, store: Any, key: str, etag: str | None) -> Any:
        opts: dict[str, Any] = {}
        if etag:
            opts["if_match"] = f'"{etag}"'
        try:
            async with asyncio.timeout(self.timeouts.guard):
                resp = await obstore.get_async(store, key, options=opts)  # type: ignore[arg-type]
        except FileNotFoundError as e:
            raise ObjectChanged(f"{self.object_url(key)} is gone") from e
        except PreconditionError as e:
            raise ObjectChanged(f"{self.object_url(key)} changed (ETag is not {etag})") from e
        except Exception as e:
            raise self._error(e, "get", key) from e
        # Not every server honours If-Match (the GCS emulator ignores it): check too.
        got = _etag(resp.meta.get("e_tag"))
        if etag and got and got != etag:
            raise ObjectChanged(f"{self.object_url(key)} changed (ETag {got}, not {etag})")
        return resp

    async def _placeholder(self, info: ObjectInfo) -> bool:
        seen = self._zero.get(info.key)
        if seen is not None and seen[0] == info.etag:
            return seen[1]
        meta, _ = self._stores()
        try:
            async with asyncio.timeout(self.timeouts.guard):
                await obstore.head_async(meta, info.key)
            verdict = False
        except FileNotFoundError:
            verdict = True  # listed as X but no object X: the key was X/
        if len(self._zero) >= 100_000:
            self._zero.clear()
        self._zero[info.key] = (info.etag, verdict)
        return verdict

    def _error(self, e: BaseException, op: str, key: str | None = None) -> BucketError:
        return _map_error(self.url, self.options, e, op, key)


# --- object metadata -------------------------------------------------------------------


def _etag(raw: str | None) -> str:
    if not raw:
        return ""
    tag = raw.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    return tag.strip('"')


def _info(m: Any) -> ObjectInfo:
    modified: datetime = m["last_modified"]
    # Whole seconds: a listing reports milliseconds, a HEAD's Last-Modified header only
    # seconds; truncating makes the two agree for the same version.
    return ObjectInfo(
        key=m["path"],
        size=int(m["size"]),
        etag=_etag(m.get("e_tag")),
        mtime_ns=int(modified.timestamp()) * 1_000_000_000,
    )


# --- building the clients --------------------------------------------------------------


def _client_options(allow_http: bool, t: Timeouts, *, data: bool) -> dict[str, Any]:
    return {
        "allow_http": allow_http,
        "connect_timeout": timedelta(seconds=t.connect),
        "timeout": timedelta(seconds=t.transfer if data else t.request),
        "read_timeout": timedelta(seconds=t.read if data else t.request),
    }


def _retry(t: Timeouts) -> dict[str, Any]:
    return {
        "max_retries": t.retries,
        "retry_timeout": timedelta(seconds=t.retry_window),
        "backoff": {
            "init_backoff": timedelta(milliseconds=200),
            "max_backoff": timedelta(seconds=4),
            "base": 2,
        },
    }


def _build(url: BucketUrl, options: SourceOptions, t: Timeouts) -> tuple[Any, Any]:
    prefix = url.prefix.rstrip("/") or None
    if url.scheme == "s3":
        config, provider, allow_http = _s3_config(url, options)
        make = lambda data: S3Store(  # noqa: E731
            url.bucket,
            prefix=prefix,
            config=config,  # type: ignore[arg-type]
            client_options=_client_options(allow_http, t, data=data),  # type: ignore[arg-type]
            retry_config=_retry(t),  # type: ignore[arg-type]
            credential_provider=provider,
        )
    elif url.scheme == "gs":
        config, allow_http = _gcs_config(options)
        make = lambda data: GCSStore(  # noqa: E731
            url.bucket,
            prefix=prefix,
            config=config,  # type: ignore[arg-type]
            client_options=_client_options(allow_http, t, data=data),  # type: ignore[arg-type]
            retry_config=_retry(t),  # type: ignore[arg-type]
        )
    else:
        config, allow_http = _azure_config(url, options)
        make = lambda data: AzureStore(  # noqa: E731
            url.bucket,
            prefix=prefix,
            config=config,  # type: ignore[arg-type]
            client_options=_client_options(allow_http, t, data=data),  # type: ignore[arg-type]
            retry_config=_retry(t),  # type: ignore[arg-type]
        )
    return make(False), make(True)


def _s3_config(url: BucketUrl, options: SourceOptions) -> tuple[dict[str, Any], Any, bool]:
    """The environment (AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN, AWS_REGION,
    AWS_ENDPOINT_URL, web identity, ECS and instance roles) is read by the client
    itself. Profiles (AWS_PROFILE, ~/.aws files) are read through boto3 when it is
    installed, since the Rust client does not read them."""
    config: dict[str, Any] = {}
    if options.endpoint:
        config["endpoint"] = options.endpoint
    if options.region:
        config["region"] = options.region
    provider = None
    if options.anonymous:
        config["skip_signature"] = True
    elif _wants_aws_profile():
        try:
            from obstore.auth.boto3 import Boto3CredentialProvider
        except ImportError as e:
            raise BucketError(
                "credentials",
                f"{url}: AWS_PROFILE or ~/.aws/credentials is set, and reading AWS profiles "
                "needs boto3; install it (pip install boto3) or set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY",
            ) from e
        try:
            provider = Boto3CredentialProvider()
        except Exception as e:
            raise BucketError(
                "credentials",
                f"{url}: no AWS credentials found in the environment or the AWS profile "
                f"({e}); set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
            ) from e
        if "region" not in config and provider.config.get("region"):
            config["region"] = provider.config["region"]
    # AWS_ENDPOINT_URL is the user's own statement of the endpoint, http or not
    env_http = not options.endpoint and os.environ.get("AWS_ENDPOINT_URL", "").startswith("http:")
    return config, provider, options.allow_http or env_http


def _wants_aws_profile() -> bool:
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return False
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI"
    ):
        return False
    if env.get("AWS_PROFILE"):
        return True
    files = [env.get("AWS_SHARED_CREDENTIALS_FILE"), env.get("AWS_CONFIG_FILE")]
    files += [str(Path.home() / ".aws" / "credentials"), str(Path.home() / ".aws" / "config")]
    return any(f and os.path.isfile(f) for f in files)


def _gcs_config(options: SourceOptions) -> tuple[dict[str, Any], bool]:
    """Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, the gcloud
    file, workload identity through the metadata server) are read by the client.
    STORAGE_EMULATOR_HOST, the variable Google's own libraries honour, points at an
    emulator: plain http and no credentials, as those libraries do."""
    config: dict[str, Any] = {}
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if emulator and "://" not in emulator:
        emulator = f"http://{emulator}"
    base = options.endpoint or emulator.rstrip("/")
    if base:
        config["base_url"] = base
    if options.anonymous or emulator:
        config["skip_signature"] = True
    allow_http = options.allow_http or (bool(emulator) and emulator.startswith("http://"))
    return config, allow_http


_CONN_KEYS = {
    "accountname": "account_name",
    "accountkey": "account_key",
    "sharedaccesssignature": "sas_key",
    "blobendpoint": "endpoint",
}


def _azure_config(url: BucketUrl, options: SourceOptions) -> tuple[dict[str, Any], bool]:
    """The account comes from `options.account`, AZURE_STORAGE_ACCOUNT_NAME or the
    connection string (AZURE_STORAGE_CONNECTION_STRING, which may also carry the key,
    a SAS and the blob endpoint). Without a key or SAS the client uses the Azure
    identity chain: AZURE_CLIENT_ID/AZURE_CLIENT_SECRET/AZURE_TENANT_ID, workload
    identity (AZURE_FEDERATED_TOKEN_FILE), managed identity, or the az CLI when
    AZURE_USE_AZURE_CLI=true."""
    config: dict[str, Any] = {}
    allow_http = options.allow_http
    conn = _parse_connection_string(os.environ.get("AZURE_STORAGE_CONNECTION_STRING", ""))
    env_account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME") or os.environ.get(
        "AZURE_STORAGE_ACCOUNT"
    )
    account = options.account or env_account or conn.get("account_name")
    if conn and (account is None or conn.get("account_name") in (None, account)):
        for key in ("account_key", "sas_key"):
            if key in conn:
                config[key] = conn[key]
        if conn.get("endpoint") and not options.endpoint:
            config["endpoint"] = conn["endpoint"]
            # the connection string is the user's own statement of the endpoint
            allow_http = allow_http or conn["endpoint"].startswith("http://")
        if conn.get("use_emulator"):
            config["use_emulator"] = True
            account = account or "devstoreaccount1"
    if account is None and not config.get("use_emulator"):
        raise BucketError(
            "credentials",
            f"{url}: no Azure storage account; set watches[].source_options.account, "
            "AZURE_STORAGE_ACCOUNT_NAME or AZURE_STORAGE_CONNECTION_STRING",
        )
    if account:
        config["account_name"] = account
    if options.endpoint:
        config["endpoint"] = options.endpoint
    if options.anonymous:
        config["skip_signature"] = True
        config.pop("account_key", None)
        config.pop("sas_key", None)
    return config, allow_http


def _parse_connection_string(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if not sep:
            continue
        name = name.strip().lower()
        if name in _CONN_KEYS:
            out[_CONN_KEYS[name]] = value.strip()
        elif name == "usedevelopmentstorage" and value.strip().lower() == "true":
            out["use_emulator"] = True
        elif name in ("endpointsuffix", "defaultendpointsprotocol"):
            out[name] = value.strip()
    suffix = out.pop("endpointsuffix", "")
    proto = out.pop("defaultendpointsprotocol", "") or "https"
    if not out.get("endpoint") and out.get("account_name") and suffix:
        # sovereign clouds (core.chinacloudapi.cn, ...) name their own blob host
        out["endpoint"] = f"{proto}://{out['account_name']}.blob.{suffix}"
    if out.get("endpoint"):
        out["endpoint"] = out["endpoint"].rstrip("/")
    return out


# --- errors ----------------------------------------------------------------------------

_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AuthenticationFailed",
    "InvalidAuthenticationInfo",
    "NoAuthenticationInformation",
    "AuthenticationRequired",
    "InvalidSecurity",
    "MissingSecurityHeader",
}
_DENIED_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "AuthorizationFailure",
    "AuthorizationPermissionMismatch",
    "AuthorizationSourceIPMismatch",
    "AuthorizationProtocolMismatch",
    "AuthorizationResourceTypeMismatch",
    "AuthorizationServiceMismatch",
    "InsufficientAccountPermissions",
    "AccountIsDisabled",
    "UserProjectAccountProblem",
}
_MISSING_CODES = {"NoSuchBucket", "ContainerNotFound", "ContainerBeingDeleted"}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraint"}
_UNREACHABLE = re.compile(
    r"error sending request|connection refused|tcp connect|dns error|failed to lookup|"
    r"timed out|timeout|connection reset|connection closed|broken pipe|"
    r"no route to host|network is unreachable|unexpected eof|certificate",
    re.IGNORECASE,
)
_CREDENTIAL_TEXT = re.compile(
    r"credential|token|failed to authenticate|metadata endpoint|service account",
    re.IGNORECASE,
)
_PAST_END = re.compile(r"Wanted range starting at|InvalidRange|not satisfiable", re.I)
_BAD_PATH = re.compile(r'(?:Error parsing Path|Could not parse path: Path) "([^"]*)"')


def _status(text: str) -> int | None:
    m = re.search(r"status code: (\d{3})", text)
    return int(m.group(1)) if m else None


def _code(text: str) -> str | None:
    m = re.search(r"<Code>([^<]+)</Code>", text)
    if m:
        return m.group(1).strip()
    m = re.search(r'"(?:code|reason)"\s*:\s*"([A-Za-z]+)"', text)
    return m.group(1) if m else None


def _summary(text: str) -> str:
    """The server's own words (its <Message>), or the client's last clause such as
    "HTTP error: error sending request", without the request dump."""
    head = text.split("Debug source:")[0].strip()
    m = re.search(r"<Message>([^<]+)", head)
    if m:
        line = m.group(1).strip().splitlines()[0]
    else:
        line = head.splitlines()[0] if head else ""
        line = line.rsplit(" - ", 1)[-1]
        if "Server returned" in line:
            line = line.split(":", 1)[-1]
    line = line.strip()
    return line if len(line) <= 200 else line[:197] + "..."


def _map_error(
    url: BucketUrl, options: SourceOptions, e: BaseException, op: str, key: str | None
) -> BucketError:
    """A named error a user can act on, from whatever the client raised. The client
    folds S3/GCS/Azure errors into a few classes; the server's error code, kept in the
    message, tells the rest."""
    if isinstance(e, BucketError):
        return e
    where = f"{url}{key}" if key else str(url)
    text = str(e)
    status, code = _status(text), _code(text)
    detail = f" ({code or status or type(e).__name__}: {_summary(text)})"
    endpoint = (
        options.endpoint or {"s3": "S3", "gs": "Google Cloud Storage", "az": "Azure"}[url.scheme]
    )
    kind: ErrorKind
    if isinstance(e, TimeoutError) and status is None:
        kind, msg = "unreachable", f"no answer from {endpoint} in time"
        fix = "check source_options.endpoint, the network and any proxy"
    elif isinstance(e, InvalidPathError) or _BAD_PATH.search(text):
        bad = _BAD_PATH.search(text)
        name = bad.group(1) if bad else "?"
        kind, msg = "other", f"object key {name!r} has an empty, '.' or '..' path segment"
        fix = (
            "the client cannot list such keys: rename the object (e.g. no '//'), "
            "or point watches[].source at a prefix without it"
        )
    elif re.search(r"BadScheme|URL scheme is not allowed", text):
        kind, msg = "other", f"{endpoint} is plain http"
        fix = "set source_options.allow_http: true, or use an https endpoint"
    elif (
        code in _MISSING_CODES
        or (status == 404 and op == "list")
        or re.search(r"no bucket named|bucket does not exist|container does not exist", text, re.I)
    ):
        noun = "container" if url.scheme == "az" else "bucket"
        kind, msg = "missing_bucket", f"{noun} {url.bucket!r} does not exist"
        fix = "create it or fix watches[].source"
    elif code in _REGION_CODES or status == 301:
        kind, msg = "other", "the bucket is in another region"
        fix = "set source_options.region to the bucket's region"
    elif (
        code in _CREDENTIAL_CODES
        or isinstance(e, UnauthenticatedError)
        or status == 401
        or (code == "AuthorizationFailure" and "failed to authenticate" in text)
    ):
        kind, msg = "credentials", "the credentials were rejected"
        fix = _credential_fix(url)
    elif code in _DENIED_CODES or status == 403:
        kind, msg = "denied", f"access denied ({op})"
        fix = "grant these credentials list and read permission on the bucket prefix"
    elif status is None and _UNREACHABLE.search(text):
        kind, msg = "unreachable", f"cannot reach {endpoint}"
        fix = "check source_options.endpoint, DNS, the network and any proxy"
    elif status is None and _CREDENTIAL_TEXT.search(text):
        kind, msg = "credentials", "no usable credentials"
        fix = _credential_fix(url)
    else:
        kind, msg = "other", f"{op} failed"
        fix = "see the detail; retried with backoff"
    return BucketError(kind, f"{where}: {msg}; {fix}{detail}")


def _credential_fix(url: BucketUrl) -> str:
    if url.scheme == "s3":
        return "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role"
    if url.scheme == "gs":
        return "check GOOGLE_APPLICATION_CREDENTIALS or the workload identity"
    return (
        "check AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_KEY, the SAS "
        "or the Azure identity"
    )
