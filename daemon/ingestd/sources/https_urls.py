"""The https URL of a bucket object, for the platforms that register objects by https
URL only (Labelbox's and Nucleus's Azure integrations read
`https://<account>.blob.core.windows.net/<container>/<key>`; both also take the https
form of S3 and GCS objects). The canonical `s3://`, `gs://`, `az://` URL stays what the
ledger records; this is the form a platform can fetch.

None when no such URL exists: an http-only endpoint of an S3-compatible store (a MinIO
on the LAN cannot be fetched by a SaaS platform) or an Azure source with no account."""

from __future__ import annotations

import os
from urllib.parse import quote

from ingestd.config import BucketUrl, SourceOptions


def https_object_url(url: BucketUrl, options: SourceOptions, key: str) -> str | None:
    # '#', '?', '%' and spaces must not end or bend the URL
    path = quote(f"{url.prefix}{key}", safe="/")
    endpoint = (options.endpoint or "").rstrip("/")
    if url.scheme == "az":
        account = options.account or _azure_account()
        if endpoint.startswith("https://"):  # a custom domain or a sovereign cloud
            return f"{endpoint}/{url.bucket}/{path}"
        if not account:
            return None
        return f"https://{account}.blob.core.windows.net/{url.bucket}/{path}"
    if url.scheme == "gs":
        if endpoint and not endpoint.startswith("https://"):
            return None
        return f"{endpoint or 'https://storage.googleapis.com'}/{url.bucket}/{path}"
    if endpoint:  # an S3-compatible store: path style on its own endpoint
        return f"{endpoint}/{url.bucket}/{path}" if endpoint.startswith("https://") else None
    host = f"s3.{options.region}.amazonaws.com" if options.region else "s3.amazonaws.com"
    if "." in url.bucket:  # virtual-hosted TLS fails for dotted names; path style works
        return f"https://{host}/{url.bucket}/{path}"
    return f"https://{url.bucket}.{host}/{path}"


def _azure_account() -> str | None:
    env = os.environ
    account = env.get("AZURE_STORAGE_ACCOUNT_NAME") or env.get("AZURE_STORAGE_ACCOUNT")
    if account:
        return account
    for part in env.get("AZURE_STORAGE_CONNECTION_STRING", "").split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() == "accountname" and value.strip():
            return value.strip()
    if "usedevelopmentstorage=true" in env.get("AZURE_STORAGE_CONNECTION_STRING", "").lower():
        return "devstoreaccount1"
    return None
