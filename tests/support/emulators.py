"""The storage emulators the bucket tests use, as clients: where they are and the clouds'
official clients to fill them. Our own code never writes test objects.

- S3: moto's server, with IAM authentication on (wrong keys and missing permissions
  fail as they do on AWS); `S3Emulator`.
- Azure Blob: Azurite; `AzureEmulator`.
- GCS: fake-gcs-server; `GcsEmulator`.

Nothing here starts or installs anything: `.ci/run` starts the three
(tests/support/services.py) and passes their endpoints in the INGESTD_TEST_* variables
below (`ENV_VARS`); `from_env` builds an emulator handle from them. By hand:
`. .ci/services.sh && start_services` sets them in your shell.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tests.support.ports import closed_port, free_port

__all__ = ["closed_port", "free_port"]  # re-exported: the bucket tests import them here

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's documented development key (public, the same in every installation)
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
REGION = "us-east-1"

# What tests/support/services.py exports and the session fixtures read.
ENV_S3_ENDPOINT = "INGESTD_TEST_S3_ENDPOINT"  # http://127.0.0.1:PORT (moto)
ENV_S3_ACCESS_KEY = "INGESTD_TEST_S3_ACCESS_KEY_ID"  # the IAM admin user's key
ENV_S3_SECRET_KEY = "INGESTD_TEST_S3_SECRET_ACCESS_KEY"
ENV_S3_DENIED_ACCESS_KEY = "INGESTD_TEST_S3_DENIED_ACCESS_KEY_ID"  # a user without rights
ENV_S3_DENIED_SECRET_KEY = "INGESTD_TEST_S3_DENIED_SECRET_ACCESS_KEY"
ENV_AZURE_ENDPOINT = "INGESTD_TEST_AZURE_ENDPOINT"  # http://127.0.0.1:PORT/devstoreaccount1
ENV_GCS_ENDPOINT = "INGESTD_TEST_GCS_ENDPOINT"  # http://127.0.0.1:PORT (fake-gcs-server)
ENV_SERVICES_PGID = "INGESTD_TEST_SERVICES_PGID"  # the process group to kill to stop them
ENV_VARS = (
    ENV_S3_ENDPOINT,
    ENV_S3_ACCESS_KEY,
    ENV_S3_SECRET_KEY,
    ENV_S3_DENIED_ACCESS_KEY,
    ENV_S3_DENIED_SECRET_KEY,
    ENV_AZURE_ENDPOINT,
    ENV_GCS_ENDPOINT,
    ENV_SERVICES_PGID,
)


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


# --- the emulator handle ------------------------------------------------------------------


@dataclass
class Emulator:
    """A running emulator.

    - `scheme`: "s3", "gs" or "az" (the bucket URL scheme)
    - `endpoint`: the base URL on 127.0.0.1
    - `env`: the variables a daemon process needs (credentials from the cloud's standard
      variables; never in the config)
    - `source_options`: the watch's `source_options` for this emulator
    """

    scheme: str
    endpoint: str
    env: dict[str, str]
    source_options: dict[str, Any]

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


# --- Azure: Azurite --------------------------------------------------------------------------


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


# --- GCS: fake-gcs-server ---------------------------------------------------------------------


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


# --- from the environment ------------------------------------------------------------------

# scheme -> the variable with its endpoint, and a name for messages
ENDPOINT_VARS = {"s3": ENV_S3_ENDPOINT, "az": ENV_AZURE_ENDPOINT, "gs": ENV_GCS_ENDPOINT}
NAMES = {"s3": "S3 (moto)", "az": "Azure Blob (Azurite)", "gs": "GCS (fake-gcs-server)"}


def from_env(scheme: str, environ: Mapping[str, str] = os.environ) -> Emulator | None:
    """The emulator for `scheme` ("s3", "az", "gs") that the INGESTD_TEST_* variables
    describe, or None when its endpoint variable is not set."""
    endpoint = environ.get(ENDPOINT_VARS[scheme], "")
    if not endpoint:
        return None
    if scheme == "s3":
        return _s3(endpoint, environ)
    if scheme == "az":
        return _azure(endpoint)
    return _gcs(endpoint)


def answers(endpoint: str, timeout: float = 5.0) -> bool:
    """Whether anything listens at `endpoint` (a TCP connect: an HTTP probe would make
    moto log a traceback for the unsigned request)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout):
            return True
    except OSError:
        return False


def _s3(endpoint: str, environ: Mapping[str, str]) -> S3Emulator:
    access = environ.get(ENV_S3_ACCESS_KEY, "")
    secret = environ.get(ENV_S3_SECRET_KEY, "")
    denied = (environ.get(ENV_S3_DENIED_ACCESS_KEY, ""), environ.get(ENV_S3_DENIED_SECRET_KEY, ""))
    if not (access and secret):
        raise LookupError(
            f"{ENV_S3_ENDPOINT} is set but {ENV_S3_ACCESS_KEY} or {ENV_S3_SECRET_KEY} not"
        )
    home = tempfile.mkdtemp(prefix="ingestd-aws-")  # no shared credentials or config file
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
        access_key=access,
        secret_key=secret,
        denied_key=denied,
    )


def _azure(endpoint: str) -> AzureEmulator:
    conn = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={endpoint};"
    )
    return AzureEmulator(
        scheme="az",
        endpoint=endpoint,
        env={"AZURE_STORAGE_CONNECTION_STRING": conn},
        source_options={"endpoint": endpoint, "account": AZURITE_ACCOUNT, "allow_http": True},
        connection_string=conn,
    )


def _gcs(endpoint: str) -> GcsEmulator:
    return GcsEmulator(
        scheme="gs",
        endpoint=endpoint,
        # Google's libraries (and sources/bucket.py) talk to this emulator, unsigned
        env={"STORAGE_EMULATOR_HOST": endpoint},
        source_options={"endpoint": endpoint, "allow_http": True},
    )
