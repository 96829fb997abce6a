"""The shared parts of the platform sinks (sinks/kit), each tested once here; the
sinks built on them are held to the conformance suite (tests/conformance)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError
from ingestd.core.model import FilePayload
from ingestd.sinks.kit.batches import chunked
from ingestd.sinks.kit.client import Answer, ApiClient, Verdict
from ingestd.sinks.kit.datasets import DatasetCache
from ingestd.sinks.kit.jobs import JobState, poll_job
from ingestd.sinks.kit.pacer import Pacer, parse_retry_after
from ingestd.sinks.kit.verified import VerifiedFile

from tests.support.wait import wait_until

# -- the client, against a real server on 127.0.0.1 ---------------------------------------


class Script:
    """Answers in order (status, headers, body), then 200 {"ok": true}; records bodies."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str], bytes]] = []
        self.seen: list[tuple[str, bytes, str | None]] = []
        self.times: list[float] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, await request.read(), request.headers.get("X-Key")))
        self.times.append(time.monotonic())
        if self.answers:
            status, headers, body = self.answers.pop(0)
            return web.Response(status=status, headers=headers, body=body)
        return web.json_response({"ok": True})


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Script]]:
    script = Script()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", script.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", script
    await runner.cleanup()


def client(**kw: object) -> ApiClient:
    opts: dict[str, object] = {
        "per_minute": None,
        "key_hint": "the ACME_KEY environment variable (backend.api_key_env)",
        "backoff_base": 0.01,
        "backoff_cap": 5.0,
    }
    opts.update(kw)
    return ApiClient("Acme", {"X-Key": "secret"}, **opts)  # type: ignore[arg-type]


async def test_retries_5xx_with_a_fresh_body_each_attempt(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(503, {}, b"busy"), (502, {}, b"")]
    made = 0

    def body() -> bytes:
        nonlocal made
        made += 1
        return f"attempt {made}".encode()

    c = client()
    try:
        ans = await c.request("POST", f"{url}/x", what="creating x", body=body)
    finally:
        await c.close()
    assert ans.json() == {"ok": True}
    assert [b for _, b, _ in script.seen] == [b"attempt 1", b"attempt 2", b"attempt 3"]
    assert c.requests == 3
    assert all(key == "secret" for _, _, key in script.seen)


async def test_retry_after_is_a_floor_for_every_request_of_the_key(
    server: tuple[str, Script],
) -> None:
    url, script = server
    script.answers = [(429, {"Retry-After": "1"}, b"slow down")]
    c = client()
    try:
        first = asyncio.create_task(c.request("GET", f"{url}/a", what="a"))
        await wait_until(lambda: script.seen, what="the first request answered 429")
        await wait_until(lambda: c.pacer.paused_until > 0, what="the pacer holding")
        second = asyncio.create_task(c.request("GET", f"{url}/b", what="b"))
        await asyncio.gather(first, second)
    finally:
        await c.close()
    assert script.seen[0][0] == "/a"
    throttled_at = script.times[0]
    # Both the retried request and the other caller waited out the Retry-After.
    assert all(t - throttled_at >= 0.9 for t in script.times[1:])
    assert len(script.times) == 3


async def test_a_long_retry_after_goes_to_the_ledger(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(503, {"Retry-After": "120"}, b"maintenance")]
    c = client()
    try:
        with pytest.raises(RetriableError) as e:
            await c.request("GET", f"{url}/a", what="listing")
    finally:
        await c.close()
    assert e.value.retry_after == 120
    assert "maintenance" in str(e.value) and len(script.seen) == 1


async def test_gives_up_after_max_attempts(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(500, {}, b"boom")] * 3
    c = client(max_attempts=3)
    try:
        with pytest.raises(RetriableError, match="gave up after 3 attempts"):
            await c.request("GET", f"{url}/a", what="a")
    finally:
        await c.close()


@pytest.mark.parametrize(("status", "words"), [(401, "was refused"), (403, "may not do this")])
async def test_auth_errors_name_the_key_setting(
    server: tuple[str, Script], status: int, words: str
) -> None:
    url, script = server
    script.answers = [(status, {}, b"nope")]
    c = client()
    try:
        with pytest.raises(PermanentError) as e:
            await c.request("GET", f"{url}/a", what="reading a")
    finally:
        await c.close()
    assert words in str(e.value) and "ACME_KEY" in str(e.value)
    assert "secret" not in str(e.value) and len(script.seen) == 1


async def test_a_backend_rule_decides_what_is_retried(server: tuple[str, Script]) -> None:
    """A GraphQL-style API says "rate limited" inside a 200."""
    url, script = server
    script.answers = [(200, {}, b'{"errors": [{"message": "rate limited"}]}')]

    def rule(a: Answer) -> Verdict:
        body = a.json()
        if isinstance(body, dict) and body.get("errors"):
            return "retry"
        return "ok" if a.status == 200 else "reject"

    c = client(rule=rule)
    try:
        ans = await c.request("POST", f"{url}/graphql", what="query")
    finally:
        await c.close()
    assert ans.json() == {"ok": True} and len(script.seen) == 2


async def test_connection_errors_are_retried_then_retriable() -> None:
    c = client(max_attempts=2)
    try:
        with pytest.raises(RetriableError, match="gave up after 2 attempts"):
            await c.request("GET", "http://127.0.0.1:9/closed", what="probe")
    finally:
        await c.close()


async def test_pacer_spaces_requests_to_the_budget() -> None:
    pacer = Pacer(per_minute=600, burst=1)  # 10 a second
    started = time.monotonic()
    for _ in range(6):
        await pacer.acquire()
    assert time.monotonic() - started >= 0.45  # 5 waits of 0.1 s after the first
    assert pacer.sent == 6


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# -- the verified stream -----------------------------------------------------------------


def payload(p: Path, data: bytes | None = None) -> FilePayload:
    content = p.read_bytes() if data is None else data
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    return FilePayload(p.name, str(p), len(content), digest)


async def drain(v: VerifiedFile) -> bytes:
    return b"".join([b async for b in v.body()])


async def test_verified_file_streams_the_bytes_again_per_attempt(tmp_path: Path) -> None:
    p = tmp_path / "a.bin"
    p.write_bytes(b"x" * 5000)
    v = VerifiedFile(payload(p), chunk=1024)
    assert await drain(v) == b"x" * 5000
    assert await drain(v) == b"x" * 5000
    assert await v.read_all() == b"x" * 5000


@pytest.mark.parametrize(
    ("now", "words"),
    [(b"y" * 5000, "changed after it was hashed"), (b"x" * 6000, "grew"), (b"x" * 10, "shrank")],
)
async def test_verified_file_holds_back_the_last_block_of_a_changed_file(
    tmp_path: Path, now: bytes, words: str
) -> None:
    p = tmp_path / "a.bin"
    v = VerifiedFile(payload(p, b"x" * 5000), chunk=1024)
    p.write_bytes(now)
    sent = b""
    with pytest.raises(SourceChangedError, match=words):
        async for block in v.body():
            sent += block
    assert len(sent) < 5000  # the receiver never got a whole body
    with pytest.raises(SourceChangedError, match=words):  # the failure sticks
        await drain(v)


async def test_verified_file_that_vanished(tmp_path: Path) -> None:
    p = tmp_path / "gone.bin"
    v = VerifiedFile(payload(p, b"abc"))
    with pytest.raises(SourceChangedError, match="vanished"):
        await drain(v)


# -- the job poller ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("final", "state"),
    [
        ("COMPLETE", JobState.DONE),
        ("FAILED", JobState.FAILED),
        ("CANCELED", JobState.CANCELED),
        ("SOMETHING_NEW", JobState.UNKNOWN),
    ],
)
async def test_poll_job_ends_on_every_terminal_state(final: str, state: JobState) -> None:
    answers = iter(["IN_PROGRESS", "IN_PROGRESS", final])

    async def fetch() -> str:
        return next(answers)

    def state_of(s: str) -> tuple[JobState, str]:
        known = {"IN_PROGRESS": JobState.RUNNING, "COMPLETE": JobState.DONE}
        known |= {"FAILED": JobState.FAILED, "CANCELED": JobState.CANCELED}
        return known.get(s, JobState.UNKNOWN), s

    end = await poll_job(fetch, state_of, what="import", first=0.001, most=0.01, timeout=10)
    assert (end.state, end.status, end.polls) == (state, final, 3)


async def test_poll_job_gives_up_after_its_timeout() -> None:
    async def fetch() -> str:
        return "IN_PROGRESS"

    with pytest.raises(RetriableError, match="still IN_PROGRESS"):
        await poll_job(
            fetch,
            lambda s: (JobState.RUNNING, s),
            what="import",
            first=0.01,
            most=0.05,
            timeout=0.2,
        )


# -- the dataset cache and chunks ------------------------------------------------------------


async def test_dataset_cache_finds_or_creates_once() -> None:
    calls: list[str] = []
    fail = [True]

    async def find_or_create(name: str) -> str:
        calls.append(name)
        await asyncio.sleep(0.01)  # the first items of a dataset arrive together
        if fail[0]:
            fail[0] = False
            raise RetriableError("platform busy")
        return f"id-{name}"

    cache: DatasetCache[str] = DatasetCache(find_or_create)
    with pytest.raises(RetriableError):
        await cache.get("cams")
    got = await asyncio.gather(*(cache.get("cams") for _ in range(5)))
    assert got == ["id-cams"] * 5 and calls == ["cams", "cams"]  # a failure is not kept
    cache.forget("cams")
    assert await cache.get("cams") == "id-cams" and len(calls) == 3


def test_chunked_by_count_and_bytes() -> None:
    assert list(chunked([1, 2, 3, 4, 5], 2)) == [[1, 2], [3, 4], [5]]
    sizes = {"a": 5, "b": 5, "c": 20, "d": 1}
    got = list(chunked(list("abcd"), 10, max_bytes=10, size=sizes.__getitem__))
    assert got == [["a", "b"], ["c"], ["d"]]  # an item bigger than the cap goes alone
    with pytest.raises(ValueError):
        list(chunked([1], 0))
