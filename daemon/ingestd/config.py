"""The YAML config: schema (pydantic), loading, validation with field-named problems.

Every model forbids unknown keys so a typo (`setle: 2s`) is an error, not a silent
default. Relative paths are resolved against the folder holding the config file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ingestd.core.filters import PathFilter
from ingestd.core.fingerprint import fingerprint
from ingestd.core.names import check_sidecar_template, compile_path_pattern

DEFAULT_LOCATIONS = ("ingestd.yaml", "/etc/ingestd/config.yaml")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """`2s`, `500ms`, `10m`, `1h`, `1d`, or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 2s, 10m or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        if value.strip().startswith("-"):
            raise ValueError(f"must not be negative (got {value!r})")
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration; use e.g. 500ms, 2s, 10m, 1h or seconds")
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError("expected a duration such as 2s, 10m or a number of seconds")
    if seconds < 0:
        raise ValueError(f"must not be negative (got {value!r})")
    return seconds


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h|d)?$"},
            ],
            "description": "a duration: 500ms, 2s, 10m, 1h, 1d or a number of seconds",
        }
    ),
]


@dataclass(frozen=True, slots=True)
class MaxDelete:
    """Largest deletion one pass may apply: a share of the watch's items, or a count."""

    share: float | None = None
    count: int | None = None

    def allows(self, deletions: int, total: int) -> bool:
        if deletions == 0:
            return True
        if self.count is not None:
            return deletions <= self.count
        assert self.share is not None
        return total > 0 and deletions / total <= self.share

    def __str__(self) -> str:
        return f"{self.share * 100:g}%" if self.share is not None else str(self.count)


def parse_max_delete(value: Any) -> MaxDelete:
    if isinstance(value, MaxDelete):
        return value
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            raise ValueError(f"{value!r} is not a percentage such as 50%") from None
        if not 0 <= pct <= 100:
            raise ValueError(f"must be between 0% and 100% (got {value!r})")
        return MaxDelete(share=pct / 100)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return MaxDelete(count=value)
    raise ValueError("use a share such as 50% or a number of items such as 100")


MaxDeleteField = Annotated[
    MaxDelete,
    BeforeValidator(parse_max_delete),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\d+(\.\d+)?%$"},
                {"type": "integer", "minimum": 0},
            ],
            "description": "refuse a pass that would delete more than this share (50%) "
            "or number (100) of the watch's items",
        }
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class LogConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json"] = "auto"


class LocalBackend(_Strict):
    kind: Literal["local"]
    path: Path = Path("var/datasets")

    @field_validator("path", mode="after")
    @classmethod
    def _resolve(cls, v: Path, info: ValidationInfo) -> Path:
        return _resolve_path(v, info)


def _http_url(v: str, example: str, secrets: str) -> str:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{v!r} is not an http(s) URL such as {example}")
    if parts.username or parts.password:
        raise ValueError(f"put no credentials in the URL; use {secrets}")
    return v.rstrip("/")


def _secret_env(v: str | None, info: ValidationInfo, what: str) -> str | None:
    """An environment variable named for a secret must be set (when paths are checked)."""
    if v is not None and (info.context or {}).get("check_paths", True) and not os.environ.get(v):
        raise ValueError(f"environment variable {v} is not set (it must hold {what})")
    return v


def _secret_file(v: Path | None, info: ValidationInfo) -> Path | None:
    if v is None:
        return v
    v = _resolve_path(v, info)
    if (info.context or {}).get("check_paths", True) and not os.access(v, os.R_OK):
        raise ValueError(f"{v} does not exist or is not readable")
    return v


class HttpBackend(_Strict):
    """An `ingestd serve` ingestion server. The token comes from the environment or a
    file, never from this file."""

    kind: Literal["http"]
    url: str = Field(description="e.g. http://ingest.example:8750")
    token_env: str | None = Field(
        default=None, description="environment variable holding the token"
    )
    token_file: Path | None = Field(default=None, description="file holding the token")
    # TLS settings change how the server is reached, not where items go: excluded from
    # model_dump so backend_identity stays (fixing ca_file re-sends nothing), while an
    # edit still differs (==) and so rebuilds the sink on reload.
    ca_file: Path | None = Field(
        default=None,
        exclude=True,
        description="PEM CA certificate(s) to trust for an https url instead of the "
        "system's (a private CA)",
    )
    client_cert: Path | None = Field(
        default=None, exclude=True, description="this daemon's certificate (PEM), mutual TLS"
    )
    client_key: Path | None = Field(
        default=None, exclude=True, description="the private key of client_cert (PEM)"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _http_url(v, "http://ingest.example:8750", "token_env or token_file")

    @field_validator("ca_file", "client_cert", "client_key", mode="after")
    @classmethod
    def _tls_file(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _secret_file(v, info)

    @model_validator(mode="after")
    def _tls(self, info: ValidationInfo) -> HttpBackend:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together (mutual TLS)")
        tls_files = self.ca_file or self.client_cert
        if tls_files is not None and not self.url.startswith("https:"):
            raise ValueError("ca_file, client_cert and client_key need an https:// url")
        if tls_files is not None and (info.context or {}).get("check_paths", True):
            import ssl  # only here: most configs have no TLS files

            context = ssl.create_default_context()
            try:
                if self.ca_file is not None:
                    context.load_verify_locations(cafile=self.ca_file)
                if self.client_cert is not None:
                    context.load_cert_chain(self.client_cert, self.client_key)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"the TLS files do not load as PEM ({e})") from None
        return self

    @field_validator("token_env")
    @classmethod
    def _env(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _secret_env(v, info, "the token")

    @field_validator("token_file", mode="after")
    @classmethod
    def _file(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _secret_file(v, info)

    def token(self) -> str | None:
        if self.token_file is not None:
            return self.token_file.read_text(encoding="utf-8").strip() or None
        if self.token_env is not None:
            return os.environ.get(self.token_env) or None
        return None


class _PlatformBackend(_Strict):
    """A labeling platform. The API key comes from the environment or a file, never
    from this file, and is never logged."""

    api_key_env: str | None = Field(
        default=None, description="environment variable holding the API key"
    )
    api_key_file: Path | None = Field(default=None, description="file holding the API key")
    base_url: str | None = Field(
        default=None, description="the platform's API root (default: the public service)"
    )
    requests_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="client-side request budget (default: V7 1,000 and Nucleus the "
        "documented limit; Labelbox none, as in its SDK: a 429 pauses every request)",
    )

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        return _http_url(v, "https://api.example.com", "api_key_env or api_key_file")

    @field_validator("api_key_env")
    @classmethod
    def _key_env(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _secret_env(v, info, "the API key")

    @field_validator("api_key_file", mode="after")
    @classmethod
    def _key_file(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _secret_file(v, info)

    def api_key(self) -> str:
        if self.api_key_file is not None:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
        elif self.api_key_env is not None:
            key = os.environ.get(self.api_key_env, "").strip()
        else:
            key = ""
        if not key:
            raise ValueError("no API key: set api_key_env or api_key_file")
        return key


class DarwinBackend(_PlatformBackend):
    """V7 Darwin (see docs/platforms.md)."""

    kind: Literal["darwin"]
    team: str = Field(description="the team slug")
    storage_slug: str | None = Field(
        default=None, description="external storage name, for transfer: register"
    )
    replace: Literal["archive", "delete"] = Field(
        default="archive", description="what happens to the old item when its content changes"
    )


class LabelboxBackend(_PlatformBackend):
    """Labelbox (see docs/platforms.md)."""

    kind: Literal["labelbox"]


class NucleusBackend(_PlatformBackend):
    """Scale Nucleus (see docs/platforms.md)."""

    kind: Literal["nucleus"]


Backend = Annotated[
    LocalBackend | HttpBackend | DarwinBackend | LabelboxBackend | NucleusBackend,
    Field(discriminator="kind"),
]
AVAILABLE_BACKENDS = ("local", "http", "darwin", "labelbox", "nucleus")


class StatusConfig(_Strict):
    listen: str | None = Field(
        default="127.0.0.1:8751",
        description="HOST:PORT, or unix:PATH (relative to state_dir), or null for none",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None or v.startswith("unix:"):
            if v is not None and len(v) <= len("unix:"):
                raise ValueError("unix: needs a socket path, e.g. unix:ingestd.sock")
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{v!r} is not HOST:PORT (e.g. 127.0.0.1:8751) or unix:PATH")
        return v


class SourceOptions(_Strict):
    """Bucket connection settings. Credentials come from each cloud's standard chain
    (environment, profile, workload identity), never from this file."""

    endpoint: str | None = Field(
        default=None, description="S3-compatible stores (MinIO, Ceph) or an emulator"
    )
    region: str | None = None
    allow_http: bool = False
    anonymous: bool = False
    account: str | None = Field(default=None, description="Azure storage account")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        return _http_url(v, "http://127.0.0.1:9000", "the cloud's environment")


@dataclass(frozen=True, slots=True)
class BucketUrl:
    scheme: Literal["s3", "gs", "az"]
    bucket: str  # the bucket (S3, GCS) or container (Azure)
    prefix: str  # '' or ends with '/'

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}"


_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$")


def parse_bucket_url(url: str) -> BucketUrl:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("s3", "gs", "az"):
        raise ValueError(
            f"{url!r}: use s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"
        )
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_NAME.match(bucket):
        raise ValueError(
            f"{url!r}: {bucket!r} is not a valid bucket or container name "
            "(3-63 lower-case letters, digits, '.', '-')"
        )
    prefix = prefix.strip("/")
    return BucketUrl(scheme, bucket, prefix + "/" if prefix else "")  # type: ignore[arg-type]


class MetadataConfig(_Strict):
    static: dict[str, Any] = Field(default_factory=dict)
    path_pattern: str | None = Field(
        default=None,
        description='binds named folders of the relative path, e.g. "{camera}/{date}/*"',
    )
    sidecar: str | None = Field(
        default=None, description='JSON beside the file: "{name}.json" or "{stem}.json"'
    )

    @field_validator("static")
    @classmethod
    def _static_scalars(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            if not isinstance(key, str):
                raise ValueError(f"key {key!r} must be a string")
            if value is not None and not isinstance(value, str | int | float | bool):
                raise ValueError(f"{key}: values must be strings, numbers or booleans")
        return v

    @field_validator("path_pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            if v.startswith("/") or not v.strip():
                raise ValueError("must be a relative pattern such as {camera}/{date}/*")
            compile_path_pattern(v)
        return v

    @field_validator("sidecar")
    @classmethod
    def _sidecar(cls, v: str | None) -> str | None:
        if v is not None:
            check_sidecar_template(v)
        return v


class ImagesConfig(_Strict):
    max_dimension: int = Field(default=5000, ge=16, le=100_000, description="longest side, px")
    oversize: Literal["downscale", "reject"] = "downscale"


class VideoConfig(_Strict):
    mode: Literal["native", "frames"] = Field(
        default="native",
        description="native: upload the file (fps is a hint); frames: sample frames here",
    )
    fps: float = Field(default=1.0, gt=0, le=1000)
    format: Literal["jpeg", "png"] = "jpeg"
    quality: int = Field(default=90, ge=1, le=100)


class GroupConfig(_Strict):
    mode: Literal["slots", "channels", "series"]
    depth: int = Field(default=1, ge=1, le=32)
    ready_marker: str | None = Field(
        default=None, description="a file whose appearance marks the folder complete, e.g. .done"
    )
    max_channels: int = Field(default=16, ge=1, le=256)
    series_by: Literal["folder", "uid"] = "folder"
    name: str = Field(
        default="{PatientID}_{SeriesNumber}_{SeriesDescription}",
        description="series_by: uid only: the item name, from DICOM tags",
    )

    @field_validator("ready_marker")
    @classmethod
    def _marker(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v in (".", "..")):
            raise ValueError("must be a file name such as .done")
        return v


class DicomConfig(_Strict):
    deidentify: bool = False
    tags: list[str] = Field(
        default_factory=lambda: [
            "Modality",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SeriesDescription",
            "BodyPartExamined",
            "Manufacturer",
        ],
        description="DICOM header keywords copied into the item's metadata",
    )


class QueueConfig(_Strict):
    """A bucket watch's event queue: the bucket's change notifications, consumed as hints
    (docs/bucket-events.md). Credentials come from the cloud's standard chain, like the
    bucket's."""

    url: str = Field(
        description="the queue's URL: an SQS queue URL "
        "(https://sqs.REGION.amazonaws.com/ACCOUNT/NAME) for s3://, an Azure Storage queue "
        "URL (https://ACCOUNT.queue.core.windows.net/NAME) for az://"
    )
    kind: Literal["sqs", "azure_queue"] | None = Field(
        default=None,
        description="sqs (S3 event notifications) or azure_queue (Event Grid blob events); "
        "default: the one that fits the bucket's scheme",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        url = _http_url(
            v, "https://sqs.us-east-1.amazonaws.com/123456789012/uploads", "the cloud's environment"
        )
        if len([s for s in urlsplit(url).path.split("/") if s]) < 1:
            raise ValueError(f"{v!r} names no queue (its path is empty)")
        return url


# A queue names what changed; the listing is only the repair path and can be slow.
QUEUE_POLL_INTERVAL = 3600.0


# Unset poll_interval: a bucket listing costs requests (and money); a polled folder is
# a share where files should not wait long, and unchanged folders are not re-listed.
BUCKET_POLL_INTERVAL = 60.0
FOLDER_POLL_INTERVAL = 5.0

_WATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _normalise_dataset_path(v: str) -> str:
    if not v.startswith("/"):
        v = "/" + v
    parts = [p for p in v.split("/") if p]
    for p in parts:
        if p in (".", ".."):
            raise ValueError("must not contain . or .. segments")
    return "/" + "/".join(parts)


class Watch(_Strict):
    name: str = Field(description="unique; the key for status and reload diffs")
    source: str = Field(
        description="a local folder (relative to this file), or s3://bucket/prefix, "
        "gs://bucket/prefix, az://container/prefix"
    )
    source_options: SourceOptions = Field(default_factory=SourceOptions)
    transfer: Literal["copy", "register"] | None = Field(
        default=None,
        description="buckets: register (reference the object URL; the default where the "
        "backend takes remote URLs) or copy (move the bytes)",
    )
    poll_interval: Duration = Field(
        default=BUCKET_POLL_INTERVAL,
        description="how often a polled source is listed: a bucket prefix, or a folder on a "
        f"network or FUSE mount or with watch_mode: poll (default {BUCKET_POLL_INTERVAL:g}s "
        f"for buckets, {FOLDER_POLL_INTERVAL:g}s for folders)",
    )
    queue: QueueConfig | None = Field(
        default=None,
        description="buckets: the queue receiving the bucket's event notifications; a "
        "full listing then runs every poll_interval (default 1h) as the repair path",
    )
    watch_mode: Literal["auto", "events", "poll"] = Field(
        default="auto",
        description="folders: auto (poll network and FUSE mounts, inotify events "
        "elsewhere), events, or poll",
    )
    dataset: str
    path: str = "/"
    preserve_folders: bool = True
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    follow_symlinks: bool = False
    settle: Duration = 2.0
    rescan: Duration = 600.0
    on_delete: Literal["keep", "delete"] = "keep"
    max_delete: MaxDeleteField = MaxDelete(share=0.5)
    metadata: MetadataConfig = Field(default_factory=MetadataConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    group: GroupConfig | None = None
    dicom: DicomConfig = Field(default_factory=DicomConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _WATCH_NAME.match(v):
            raise ValueError(
                "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return v

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, Path):
            v = str(v)
        if not isinstance(v, str) or not v:
            raise ValueError("must be a folder or a bucket URL")
        if "://" in v:
            return str(parse_bucket_url(v))
        path = _resolve_path(Path(v), info)
        # A folder that is not there yet is no error: a mount may arrive after the
        # daemon starts, and the watch waits for it (`config_warnings` says so). Something
        # else at that path is a mistake the daemon cannot wait out.
        if (info.context or {}).get("check_paths", True) and path.exists() and not path.is_dir():
            raise ValueError(f"{path} is not a folder")
        return str(path)

    @model_validator(mode="after")
    def _bucket_only(self) -> Watch:
        if self.bucket is None:
            for key in ("source_options", "transfer", "queue"):
                if key in self.model_fields_set:
                    raise ValueError(
                        f"{key} applies to bucket sources only; {self.source} is a folder"
                    )
        elif self.watch_mode == "events":
            raise ValueError(
                "watch_mode: events applies to folders only; a bucket prefix has no "
                "events and is listed every poll_interval"
            )
        elif self.queue is not None:
            fits = {"s3": "sqs", "az": "azure_queue"}.get(self.bucket.scheme)
            if fits is None:
                raise ValueError(
                    "queue: gs:// buckets have no supported queue yet (Pub/Sub needs an "
                    "emulator this project cannot run); remove queue, the prefix is listed "
                    "every poll_interval"
                )
            if self.queue.kind not in (None, fits):
                raise ValueError(
                    f"queue.kind: {self.queue.kind} does not fit {self.bucket.scheme}:// "
                    f"(use {fits})"
                )
        return self

    @property
    def queue_kind(self) -> Literal["sqs", "azure_queue"] | None:
        """The kind of the watch's queue (given, or the one its bucket's scheme fits)."""
        if self.queue is None:
            return None
        return self.queue.kind or ("azure_queue" if self.source.startswith("az://") else "sqs")

    @model_validator(mode="before")
    @classmethod
    def _poll_default(cls, data: Any) -> Any:
        # Unset means the default for the kind of source: a folder is polled only where
        # inotify is blind (a share), and files there should not wait a minute.
        if isinstance(data, dict) and data.get("poll_interval") is None:
            source = data.get("source")
            bucket = isinstance(source, str) and "://" in source
            interval = BUCKET_POLL_INTERVAL if bucket else FOLDER_POLL_INTERVAL
            if bucket and data.get("queue") is not None:
                interval = QUEUE_POLL_INTERVAL
            data = {**data, "poll_interval": interval}
        return data

    @property
    def bucket(self) -> BucketUrl | None:
        """The bucket prefix this watch polls, or None for a local folder."""
        return parse_bucket_url(self.source) if "://" in self.source else None

    @property
    def folder(self) -> Path:
        assert "://" not in self.source, "a bucket watch has no folder"
        return Path(self.source)

    def plan_identity(self) -> str:
        """The settings that shape the watch's items (folders, names, grouping,
        metadata, which files count). When it differs from the one the ledger recorded,
        every file is planned again, so an edit applies to the items already synced."""
        return fingerprint(self.model_dump(mode="json", include=_PLAN_FIELDS))

    def send_identity(self) -> str:
        """The settings that change what is sent for an item without changing its plan
        (media preparation, bucket transfer). A change queues the synced items again;
        each is sent again only if what it would send differs."""
        return fingerprint(self.model_dump(mode="json", include=_SEND_FIELDS))

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if not v or "/" in v or v in (".", "..") or "\x00" in v or len(v) > 128:
            raise ValueError("must be a non-empty name without '/' (at most 128 characters)")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _normalise_dataset_path(v)

    @field_validator("rescan", "poll_interval")
    @classmethod
    def _rescan(cls, v: float) -> float:
        if v < 1:
            raise ValueError("must be at least 1s")
        return v

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, v: list[str], info: ValidationInfo) -> list[str]:
        for p in v:
            if not p or p.strip() != p:
                raise ValueError(f"{p!r} is not a usable pattern")
        # Compiling here means a bad pattern is a config error, not a crash at start.
        PathFilter(
            v if info.field_name == "include" else (), v if info.field_name == "exclude" else ()
        )
        return v


_PLAN_FIELDS = {
    "source",
    "dataset",
    "path",
    "preserve_folders",
    "include",
    "exclude",
    "follow_symlinks",
    "metadata",
    "group",
    "dicom",  # its tags become metadata
}
_SEND_FIELDS = {"images", "video", "dicom", "transfer"}


class StateConfig(_Strict):
    """Where the ledger lives (docs/multi-daemon.md). The password of a PostgreSQL
    ledger comes from `password_env` or `password_file`, or libpq's own PGPASSFILE
    (~/.pgpass), never from this file."""

    ledger: str = Field(
        default="sqlite",
        description="sqlite (state_dir/ledger.sqlite; one daemon) or "
        "postgresql://USER@HOST:PORT/DATABASE (shared by several daemons; no password in it)",
    )
    password_env: str | None = Field(
        default=None, description="environment variable holding the PostgreSQL password"
    )
    password_file: Path | None = Field(
        default=None, description="file holding the PostgreSQL password"
    )
    lease: Duration = Field(
        default=60.0,
        description="how long a claimed item or a watch's listing stays with a daemon that "
        "stopped renewing it (died) before another takes it over (5s to 1h)",
    )

    @field_validator("ledger")
    @classmethod
    def _ledger(cls, v: str) -> str:
        if v == "sqlite":
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(
                f"{v!r} is neither sqlite nor a postgresql:// URL such as "
                "postgresql://ingestd@db.example:5432/ingestd"
            )
        if parts.password:
            raise ValueError(
                "put no password in the URL; use password_env or password_file (or PGPASSFILE)"
            )
        return v

    @field_validator("lease")
    @classmethod
    def _lease(cls, v: float) -> float:
        if not 5 <= v <= 3600:
            raise ValueError(f"must be between 5s and 1h (got {v:g}s)")
        return v

    @field_validator("password_env")
    @classmethod
    def _pw_env(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _secret_env(v, info, "the PostgreSQL password")

    @field_validator("password_file", mode="after")
    @classmethod
    def _pw_file(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _secret_file(v, info)

    @property
    def dsn(self) -> str | None:
        """The PostgreSQL URL, or None for the embedded SQLite ledger."""
        return None if self.ledger == "sqlite" else self.ledger

    def password(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").strip() or None
        if self.password_env is not None:
            return os.environ.get(self.password_env) or None
        return None


class Config(_Strict):
    state_dir: Path = Path("var/state")
    state: StateConfig = Field(
        default_factory=StateConfig,
        description="where the ledger lives: SQLite in state_dir, or a shared PostgreSQL",
    )
    log: LogConfig = Field(default_factory=LogConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)
    watch_config: bool = Field(
        default=True,
        description="reload when this file is edited (SIGHUP and `ingestd reload` always work)",
    )
    workers: int = Field(default=8, ge=1, le=256)
    backend: Backend = Field(default_factory=lambda: LocalBackend(kind="local"))
    watches: list[Watch] = Field(default_factory=list)

    @field_validator("state_dir", mode="after")
    @classmethod
    def _state(cls, v: Path, info: ValidationInfo) -> Path:
        return _resolve_path(v, info)

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_kind(cls, v: Any) -> Any:
        if isinstance(v, dict):
            kind = v.get("kind")
            if kind is None:
                raise ValueError(f"needs a kind ({', '.join(AVAILABLE_BACKENDS)})")
            if kind not in AVAILABLE_BACKENDS:
                raise ValueError(
                    f"kind {kind!r} is not available in this version "
                    f"(available: {', '.join(AVAILABLE_BACKENDS)})"
                )
        return v

    def watch(self, name: str) -> Watch:
        for w in self.watches:
            if w.name == name:
                return w
        raise KeyError(name)


def _resolve_path(v: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    v = Path(os.path.expanduser(v))
    if not v.is_absolute() and base is not None:
        v = Path(base) / v
    return Path(os.path.normpath(v))


# --- loading -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    field: str
    error: str

    def __str__(self) -> str:
        return f"{self.field}: {self.error}" if self.field else self.error


class ConfigError(Exception):
    def __init__(self, path: Path | None, problems: Sequence[Problem]) -> None:
        self.path = path
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def find_config(explicit: str | None) -> Path:
    """-c, then $INGESTD_CONFIG, then ./ingestd.yaml, then /etc/ingestd/config.yaml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("INGESTD_CONFIG")
    if env:
        return Path(env)
    for candidate in DEFAULT_LOCATIONS:
        if Path(candidate).exists():
            return Path(candidate)
    raise ConfigError(
        None,
        [
            Problem(
                "",
                "no config file: pass -c FILE, set INGESTD_CONFIG, or create ./ingestd.yaml "
                "or /etc/ingestd/config.yaml",
            )
        ],
    )


def _field_name(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before", "function-wrap") or "[" in part:
            continue
        elif out == "backend" and part in AVAILABLE_BACKENDS:
            continue  # pydantic names the union member; users know the field
        else:
            out += f".{part}" if out else part
    return out


def _problems(err: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    for e in err.errors(include_url=False):
        field = _field_name(e["loc"])
        msg = e["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `ingestd schema` lists the keys)"
        elif e["type"] == "missing":
            msg = "required"
        problems.append(Problem(field, msg))
    return problems


def parse_config(data: Any, base_dir: Path, *, check_paths: bool = True) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(None, [Problem("", "the config must be a mapping of keys to values")])
    problems = _duplicate_names(data.get("watches"))
    try:
        config = Config.model_validate(
            data, context={"base_dir": base_dir, "check_paths": check_paths}
        )
    except ValidationError as e:
        problems = _problems(e) + problems
    if problems:
        raise ConfigError(None, problems)
    return config


def _duplicate_names(watches: Any) -> list[Problem]:
    # Checked on the raw list so a duplicate is reported even when other fields fail.
    if not isinstance(watches, list):
        return []
    seen: dict[str, int] = {}
    problems = []
    for i, w in enumerate(watches):
        name = w.get("name") if isinstance(w, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            problems.append(
                Problem(f"watches[{i}].name", f"{name!r} is already used by watches[{seen[name]}]")
            )
        seen.setdefault(name, i)
    return problems


def load_config(path: Path, *, check_paths: bool = True) -> Config:
    return parse_config_bytes(path, read_config_file(path), check_paths=check_paths)


def read_config_file(path: Path) -> bytes:
    """The config file's bytes, or ConfigError saying why they cannot be read."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, [Problem("", f"{path}: no such file")]) from None
    except OSError as e:
        raise ConfigError(path, [Problem("", f"{path}: cannot read: {e.strerror}")]) from None


def parse_config_bytes(path: Path, content: bytes, *, check_paths: bool = True) -> Config:
    """The config in `content`, the bytes of the file at `path` as already read (a live
    reload reads the file once, for its digest and its config alike)."""
    path = Path(path)
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, [Problem("", f"{path}: not UTF-8 text ({e.reason})")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(path, [Problem("", f"{where}: YAML syntax error: {problem}")]) from None
    try:
        return parse_config(data, path.resolve().parent, check_paths=check_paths)
    except ConfigError as e:
        raise ConfigError(path, e.problems) from None


def config_warnings(config: Config) -> list[str]:
    """What is valid but worth saying before the daemon runs: each local source folder
    that does not exist yet (its watch waits for it, creating nothing)."""
    return [
        f"watch {w.name!r}: folder {w.source} does not exist yet; the watch waits for it"
        for w in config.watches
        if w.bucket is None and not os.path.isdir(w.source)
    ]


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ingestd config"
    return schema


# --- reload ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What a reload changes, by watch name (Vector-style: only what changed restarts)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    backend: bool  # the backend settings differ (a new sink is built)
    workers: bool
    log: bool
    status: bool
    state_dir: bool  # cannot move while running: applies at the next start
    watch_config: bool

    @property
    def empty(self) -> bool:
        return not (
            self.added
            or self.removed
            or self.changed
            or self.backend
            or self.workers
            or self.log
            or self.status
            or self.state_dir
            or self.watch_config
        )

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: list(v)
            for k, v in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
            )
            if v
        }
        out.update(
            {
                k: True
                for k in ("backend", "workers", "log", "status", "state_dir", "watch_config")
                if getattr(self, k)
            }
        )
        return out


def diff_config(old: Config, new: Config) -> ConfigDiff:
    before = {w.name: w for w in old.watches}
    after = {w.name: w for w in new.watches}
    return ConfigDiff(
        added=tuple(n for n in after if n not in before),
        removed=tuple(n for n in before if n not in after),
        changed=tuple(n for n in after if n in before and after[n] != before[n]),
        unchanged=tuple(n for n in after if n in before and after[n] == before[n]),
        backend=old.backend != new.backend,
        workers=old.workers != new.workers,
        log=old.log != new.log,
        status=old.status != new.status,
        state_dir=old.state_dir != new.state_dir,
        watch_config=old.watch_config != new.watch_config,
    )


def backend_identity(config: Config) -> str:
    """Where items go, without credentials: when it changes, every item must be sent
    again (the new backend has none of them)."""
    b = config.backend
    fields = {
        k: str(v)
        for k, v in b.model_dump().items()
        if k
        not in (
            "token_env",
            "token_file",
            "api_key_env",
            "api_key_file",
            "requests_per_minute",
            "replace",
        )
    }
    return ",".join(f"{k}={fields[k]}" for k in sorted(fields))
