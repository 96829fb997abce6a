"""The https form of a bucket object, which Labelbox and Nucleus fetch under
`transfer: register` (sources/https_urls.py)."""

from __future__ import annotations

import pytest
from ingestd.config import SourceOptions, parse_bucket_url
from ingestd.sources.https_urls import https_object_url


@pytest.fixture(autouse=True)
def _no_azure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "AZURE_STORAGE_ACCOUNT_NAME",
        "AZURE_STORAGE_ACCOUNT",
        "AZURE_STORAGE_CONNECTION_STRING",
    ):
        monkeypatch.delenv(var, raising=False)


def url(text: str, key: str, **options: object) -> str | None:
    return https_object_url(parse_bucket_url(text), SourceOptions(**options), key)


def test_azure_names_the_account_and_container() -> None:
    got = url("az://scans/ct/", "2024/a b#1.dcm", account="hospitalstore")
    assert got == "https://hospitalstore.blob.core.windows.net/scans/ct/2024/a%20b%231.dcm"


def test_azure_account_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        "DefaultEndpointsProtocol=https;AccountName=labdrop;AccountKey=c2VjcmV0;"
        "EndpointSuffix=core.windows.net",
    )
    assert url("az://cam/", "x.png") == "https://labdrop.blob.core.windows.net/cam/x.png"
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "other")
    assert url("az://cam/", "x.png") == "https://other.blob.core.windows.net/cam/x.png"


def test_azure_without_an_account_has_none() -> None:
    assert url("az://cam/", "x.png") is None


def test_azure_custom_https_endpoint_is_used() -> None:
    got = url("az://cam/p/", "x.png", endpoint="https://blobs.example.org", account="a")
    assert got == "https://blobs.example.org/cam/p/x.png"


def test_s3_on_aws_is_virtual_hosted_and_path_style_for_dotted_names() -> None:
    assert url("s3://cams/in/", "a.jpg") == "https://cams.s3.amazonaws.com/in/a.jpg"
    assert (
        url("s3://cams/", "a.jpg", region="eu-west-1")
        == "https://cams.s3.eu-west-1.amazonaws.com/a.jpg"
    )
    assert url("s3://my.cams/", "a.jpg") == "https://s3.amazonaws.com/my.cams/a.jpg"


def test_s3_compatible_stores_only_over_https() -> None:
    assert url("s3://bkt/", "k.png", endpoint="https://minio.lab.org") == (
        "https://minio.lab.org/bkt/k.png"
    )
    assert url("s3://bkt/", "k.png", endpoint="http://10.0.0.5:9000", allow_http=True) is None


def test_gcs() -> None:
    assert url("gs://bkt/p/", "k?.png") == "https://storage.googleapis.com/bkt/p/k%3F.png"
    assert url("gs://bkt/", "k.png", endpoint="http://127.0.0.1:4443", allow_http=True) is None
