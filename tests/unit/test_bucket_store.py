"""sources/bucket.py against real emulators: moto (S3), Azurite (Azure Blob) and
fake-gcs-server (GCS). Objects are written with each cloud's official client; our code
only reads."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ingestd.config import SourceOptions, parse_bucket_url
from ingestd.sources.bucket import Timeouts, _parse_connection_string, open_store
from ingestd.sources.objects import BucketError, ObjectChanged, ObjectInfo, ObjectStore

from tests.support.emulators import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    Emulator,
    S3Emulator,
    closed_port,
    unique_name,
)

# Variables of the three clouds that must not leak in from the machine running the tests
_CLOUD_VARS = [
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_SERVICE_ACCOUNT",
]

# How long a failing call may take: the client's own bound (~30 s) plus slack for a
# loaded 2-core machine. Far below pytest's timeout, so a hang fails here.
ERROR_DEADLINE = 45.0


@pytest.fixture(params=["s3", "az", "gs"])
def emu(request: pytest.FixtureRequest) -> Emulator:
    name = {"s3": "s3_emulator", "az": "azure_emulator", "gs": "gcs_emulator"}[request.param]
    return request.getfixturevalue(name)


@pytest.fixture
def use_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, str]], None]:
    """Set exactly these cloud variables for the store under test (it reads them when
    it builds its client, on first use)."""

    def apply(env: dict[str, str]) -> None:
        for var in _CLOUD_VARS:
            monkeypatch.delenv(var, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)

    return apply


def store_for(
    emu: Emulator,
    bucket: str,
    prefix: str = "p",
    page_size: int = 1000,
    options: dict[str, object] | None = None,
    timeouts: Timeouts | None = None,
) -> ObjectStore:
    url = parse_bucket_url(emu.url(bucket, prefix))
    opts = SourceOptions(**(options if options is not None else emu.source_options))
    return open_store(url, opts, page_size=page_size, timeouts=timeouts)


async def all_pages(store: ObjectStore, subprefix: str = "") -> list[list[ObjectInfo]]:
    return [page async for page in store.list_pages(subprefix)]


async def failure(coro_fn: Callable[[], object]) -> tuple[BucketError, float]:
    t0 = time.monotonic()
    with pytest.raises(BucketError) as info:
        await asyncio.wait_for(coro_fn(), ERROR_DEADLINE)  # type: ignore[arg-type]
    return info.value, time.monotonic() - t0


# --- listing -----------------------------------------------------------------------------


async def test_list_pages_strips_prefix_and_skips_placeholders(
    emu: Emulator, use_env: Callable[[dict[str, str]], None]
) -> None:
    use_env(emu.env)
    bucket = emu.create_bucket()
    objects = {
        "p/a.jpg": b"aaaa",
        "p/sub/": b"",  # a folder placeholder with children
        "p/sub/b.jpg": b"bb",
        "p/sub/deeper/c.jpg": b"c",
        "p/empty.bin": b"",  # a real zero-byte object
        "p/zz/": b"",  # a folder placeholder without children
        "pother/x.jpg": b"not under p/",
        "q/outside.jpg": b"outside",
    }
    for key, data in objects.items():
        emu.put(bucket, key, data)
    store = store_for(emu, bucket, page_size=2)
    start = time.time()
    try:
        pages = await all_pages(store)
        assert all(1 <= len(page) <= 2 for page in pages), pages
        listed = [o for page in pages for o in page]
        assert [o.key for o in listed] == ["a.jpg", "empty.bin", "sub/b.jpg", "sub/deeper/c.jpg"]
        by_key = {o.key: o for o in listed}
        assert [by_key[k].size for k in ("a.jpg", "empty.bin", "sub/b.jpg")] == [4, 0, 2]
        for o in listed:
            assert o.etag and '"' not in o.etag
            assert abs(o.mtime_ns / 1e9 - start) < 120
        # the same object HEADs to the same identity as it lists
        assert await store.head("sub/b.jpg") == by_key["sub/b.jpg"]

        sub = [o.key for page in await all_pages(store, "sub/") for o in page]
        assert sub == ["sub/b.jpg", "sub/deeper/c.jpg"]
        partial = [o.key for page in await all_pages(store, "sub/d") for o in page]
        assert partial == ["sub/deeper/c.jpg"]
        assert await all_pages(store, "nothing/") == []
    finally:
        await store.close()


async def test_list_thousands_in_small_pages(
    emu: Emulator, use_env: Callable[[dict[str, str]], None]
) -> None:
    """2,500 objects: several server pages (1,000 per S3/GCS page) handed out 100 at a
    time, in key order, none lost or repeated."""
    use_env(emu.env)
    bucket = emu.create_bucket()
    n = 2500
    keys = [f"big/d{i // 500}/f{i:05d}.bin" for i in range(n)]
    assert emu.put_many(bucket, ((k, k.encode()) for k in keys), threads=8) == n
    store = store_for(emu, bucket, prefix="big", page_size=100)
    try:
        sizes = []
        got: list[str] = []
        async for page in store.list_pages():
            sizes.append(len(page))
            got.extend(o.key for o in page)
        assert sizes == [100] * 25
        assert got == sorted(k.removeprefix("big/") for k in keys)
    finally:
        await store.close()


# --- reading -------------------------------------------------------------------------------


async def test_head_range_stream_download(
    emu: Emulator, use_env: Callable[[dict[str, str]], None], tmp_path: Path
) -> None:
    use_env(emu.env)
    bucket = emu.create_bucket()
    data = os.urandom(3 * 1024 * 1024 + 17)
    emu.put(bucket, "p/media/clip.bin", data)
    store = store_for(emu, bucket)
    try:
        info = await store.head("media/clip.bin")
        assert info is not None and info.key == "media/clip.bin" and info.size == len(data)
        assert await store.head("media/missing.bin") is None
        assert await store.head("media/") is None

        assert await store.read_range("media/clip.bin", 0, 10) == data[:10]
        n = len(data)
        assert await store.read_range("media/clip.bin", n - 5, n + 100) == data[-5:]
        assert await store.read_range("media/clip.bin", n, n + 10) == b""

        chunks = [c async for c in store.stream("media/clip.bin", chunk=1 << 20)]
        assert len(chunks) >= 2 and b"".join(chunks) == data
        same = [c async for c in store.stream("media/clip.bin", etag=info.etag)]
        assert b"".join(same) == data

        dest = tmp_path / "spool" / "x" / "clip.bin"
        await store.download("media/clip.bin", str(dest), etag=info.etag)
        assert dest.read_bytes() == data
        assert list(dest.parent.iterdir()) == [dest]  # no '.part' left behind
    finally:
        await store.close()


async def test_overwrite_changes_etag_and_stale_etag_raises(
    emu: Emulator, use_env: Callable[[dict[str, str]], None], tmp_path: Path
) -> None:
    use_env(emu.env)
    bucket = emu.create_bucket()
    emu.put(bucket, "p/doc.txt", b"version one")
    store = store_for(emu, bucket)
    try:
        v1 = await store.head("doc.txt")
        assert v1 is not None
        emu.put(bucket, "p/doc.txt", b"version two, longer")
        v2 = await store.head("doc.txt")
        assert v2 is not None and v2.etag != v1.etag and v2.size == 19
        listed = [o for page in await all_pages(store) for o in page]
        assert [(o.key, o.etag) for o in listed] == [("doc.txt", v2.etag)]

        with pytest.raises(ObjectChanged):
            async for _ in store.stream("doc.txt", etag=v1.etag):
                pass
        dest = tmp_path / "doc.txt"
        with pytest.raises(ObjectChanged):
            await store.download("doc.txt", str(dest), etag=v1.etag)
        assert not dest.exists() and list(tmp_path.iterdir()) == []
        assert b"".join([c async for c in store.stream("doc.txt", etag=v2.etag)]) == (
            b"version two, longer"
        )

        emu.delete(bucket, "p/doc.txt")
        assert await store.head("doc.txt") is None
        with pytest.raises(ObjectChanged):
            async for _ in store.stream("doc.txt"):
                pass
        with pytest.raises(ObjectChanged):
            await store.read_range("doc.txt", 0, 4)
    finally:
        await store.close()


async def test_object_url(emu: Emulator, use_env: Callable[[dict[str, str]], None]) -> None:
    use_env(emu.env)
    bucket = unique_name()
    store = store_for(emu, bucket, prefix="cams/north")
    bare = store_for(emu, bucket, prefix="")
    assert store.object_url("2024/a.jpg") == f"{emu.scheme}://{bucket}/cams/north/2024/a.jpg"
    assert bare.object_url("a.jpg") == f"{emu.scheme}://{bucket}/a.jpg"
    assert isinstance(store, ObjectStore)
    await store.close()
    await bare.close()


# --- errors --------------------------------------------------------------------------------


async def test_missing_bucket(emu: Emulator, use_env: Callable[[dict[str, str]], None]) -> None:
    use_env(emu.env)
    bucket = unique_name("missing")
    store = store_for(emu, bucket)
    try:
        err, took = await failure(lambda: all_pages(store))
        assert err.kind == "missing_bucket", err.message
        assert f"{emu.scheme}://{bucket}/p/" in err.message
        assert "create it or fix watches[].source" in err.message
        assert took < ERROR_DEADLINE
    finally:
        await store.close()


async def test_unreachable_endpoint(
    emu: Emulator, use_env: Callable[[dict[str, str]], None]
) -> None:
    options, env = emu.unreachable_options()
    use_env(env)
    store = store_for(emu, unique_name(), options=options)
    try:
        err, took = await failure(lambda: all_pages(store))
        assert err.kind == "unreachable", err.message
        assert "source_options.endpoint" in err.message
        assert took < 30
        err, _ = await failure(lambda: store.head("a.jpg"))
        assert err.kind == "unreachable", err.message
    finally:
        await store.close()


async def test_wrong_credentials(emu: Emulator, use_env: Callable[[dict[str, str]], None]) -> None:
    wrong = emu.wrong_credentials_env()
    if wrong is None:
        pytest.skip(f"the {emu.scheme} emulator accepts any credentials")
    use_env(emu.env)
    bucket = emu.create_bucket()
    emu.put(bucket, "p/a.jpg", b"a")
    use_env(wrong)
    store = store_for(emu, bucket)
    try:
        err, _ = await failure(lambda: all_pages(store))
        assert err.kind == "credentials", err.message
        assert str(parse_bucket_url(emu.url(bucket, "p"))) in err.message
    finally:
        await store.close()


async def test_access_denied(emu: Emulator, use_env: Callable[[dict[str, str]], None]) -> None:
    denied = emu.denied_env()
    if denied is None:
        pytest.skip(f"the {emu.scheme} emulator has no permissions to deny")
    use_env(emu.env)
    bucket = emu.create_bucket()
    emu.put(bucket, "p/a.jpg", b"a")
    use_env(denied)
    store = store_for(emu, bucket)
    try:
        err, _ = await failure(lambda: all_pages(store))
        assert err.kind == "denied", err.message
        assert "permission" in err.message
    finally:
        await store.close()


async def test_unlistable_key_is_a_named_error(
    s3_emulator: Emulator, use_env: Callable[[dict[str, str]], None]
) -> None:
    """S3 allows `a//b`; the client cannot represent it. The watch gets an error naming
    the key and the fix instead of a crash or a silent gap."""
    use_env(s3_emulator.env)
    bucket = s3_emulator.create_bucket()
    s3_emulator.put(bucket, "p/ok.jpg", b"ok")
    s3_emulator.put(bucket, "p/x//y.jpg", b"bad")
    store = store_for(s3_emulator, bucket)
    try:
        err, _ = await failure(lambda: all_pages(store))
        assert err.kind == "other"
        assert "p/x//y.jpg" in err.message and "rename the object" in err.message
    finally:
        await store.close()


# --- without emulators ----------------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback server that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join(5)
    for c in held:
        c.close()
    srv.close()


@pytest.mark.parametrize("scheme", ["s3", "gs", "az"])
async def test_silent_endpoint_fails_in_bounded_time(
    scheme: str, silent_server: str, use_env: Callable[[dict[str, str]], None]
) -> None:
    """An endpoint that accepts and never answers fails by the request deadline and
    the retry window, as 'unreachable'. Short limits here; the defaults scale it to
    ~30 s."""
    use_env({"STORAGE_EMULATOR_HOST": silent_server} if scheme == "gs" else {})
    opts = SourceOptions(endpoint=silent_server, allow_http=True, anonymous=True, account="acct")
    limits = Timeouts(connect=1, request=1, retries=1, retry_window=2, guard=20)
    store = open_store(parse_bucket_url(f"{scheme}://bucket-x/p"), opts, timeouts=limits)
    try:
        err, took = await failure(lambda: all_pages(store))
        assert err.kind == "unreachable", err.message
        assert took < 10
    finally:
        await store.close()


async def test_azure_without_account_is_a_credentials_error(
    use_env: Callable[[dict[str, str]], None],
) -> None:
    """open_store never raises; the first call names what is missing."""
    use_env({})
    store = open_store(parse_bucket_url("az://container/p"), SourceOptions())
    err, took = await failure(lambda: all_pages(store))
    assert err.kind == "credentials" and "AZURE_STORAGE_ACCOUNT_NAME" in err.message
    assert "source_options.account" in err.message and took < 1
    await store.close()


async def test_plain_http_endpoint_needs_allow_http(
    s3_emulator: Emulator, use_env: Callable[[dict[str, str]], None]
) -> None:
    use_env({k: v for k, v in s3_emulator.env.items() if k != "AWS_ENDPOINT_URL"})
    opts = {**s3_emulator.source_options, "allow_http": False}
    store = store_for(s3_emulator, unique_name(), options=opts)
    err, _ = await failure(lambda: all_pages(store))
    assert err.kind == "other" and "allow_http: true" in err.message
    await store.close()


# --- credential sources ------------------------------------------------------------------


async def test_s3_credentials_from_an_aws_profile(
    s3_emulator: S3Emulator, use_env: Callable[[dict[str, str]], None], tmp_path: Path
) -> None:
    """AWS_PROFILE and a shared credentials file, as `aws configure` writes them."""
    bucket = s3_emulator.create_bucket()
    s3_emulator.put(bucket, "p/a.jpg", b"a")
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[ingest]\naws_access_key_id = {s3_emulator.access_key}\n"
        f"aws_secret_access_key = {s3_emulator.secret_key}\n"
    )
    use_env(
        {
            "AWS_PROFILE": "ingest",
            "AWS_SHARED_CREDENTIALS_FILE": str(creds),
            "AWS_CONFIG_FILE": str(tmp_path / "config"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    store = store_for(s3_emulator, bucket)
    try:
        assert [o.key for page in await all_pages(store) for o in page] == ["a.jpg"]
    finally:
        await store.close()
    use_env(
        {**{k: v for k, v in os.environ.items() if k.startswith("AWS_")}, "AWS_PROFILE": "nope"}
    )
    store = store_for(s3_emulator, bucket)
    err, _ = await failure(lambda: all_pages(store))
    assert err.kind == "credentials" and "AWS_PROFILE" in err.message
    await store.close()


async def test_azure_account_and_key_from_the_environment(
    azure_emulator: Emulator, use_env: Callable[[dict[str, str]], None]
) -> None:
    """AZURE_STORAGE_ACCOUNT_NAME/AZURE_STORAGE_ACCOUNT_KEY instead of a connection
    string; the endpoint from source_options."""
    use_env(azure_emulator.env)
    bucket = azure_emulator.create_bucket()
    azure_emulator.put(bucket, "p/a.jpg", b"a")
    use_env(
        {"AZURE_STORAGE_ACCOUNT_NAME": AZURITE_ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": AZURITE_KEY}
    )
    options = {k: v for k, v in azure_emulator.source_options.items() if k != "account"}
    store = store_for(azure_emulator, bucket, options=options)
    try:
        assert [o.key for page in await all_pages(store) for o in page] == ["a.jpg"]
    finally:
        await store.close()


def test_connection_string_parsing() -> None:
    conn = _parse_connection_string(
        "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=a2V5;"
        "EndpointSuffix=core.chinacloudapi.cn"
    )
    assert conn == {
        "account_name": "acme",
        "account_key": "a2V5",
        "endpoint": "https://acme.blob.core.chinacloudapi.cn",
    }
    sas = _parse_connection_string("BlobEndpoint=http://h:1/acct/;SharedAccessSignature=sv=1&sig=x")
    assert sas == {"endpoint": "http://h:1/acct", "sas_key": "sv=1&sig=x"}
    assert _parse_connection_string("UseDevelopmentStorage=true") == {"use_emulator": True}


def test_process_exits_cleanly_after_a_failed_call(tmp_path: Path) -> None:
    """A client thread still waking the event loop at interpreter exit used to abort
    the process (exit 134, most runs after a refused connection); the exit hook in
    sources/bucket.py prevents it. No `close()` here on purpose."""
    script = tmp_path / "exit.py"
    script.write_text(
        "import asyncio\n"
        "from ingestd.config import SourceOptions, parse_bucket_url\n"
        "from ingestd.sources.bucket import open_store\n"
        "from ingestd.sources.objects import BucketError\n"
        "store = open_store(parse_bucket_url('s3://bucket-x/p'), SourceOptions(\n"
        f"    endpoint='http://127.0.0.1:{closed_port()}', allow_http=True, anonymous=True))\n"
        "async def main():\n"
        "    try:\n"
        "        await store.head('a.jpg')\n"
        "    except BucketError as e:\n"
        "        print(e.kind)\n"
        "asyncio.run(main())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in _CLOUD_VARS}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    for _ in range(10):  # without the hook about 1 run in 6 aborted here
        out = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
        )
        assert (out.returncode, out.stdout.strip()) == (0, "unreachable"), out.stderr[-2000:]
