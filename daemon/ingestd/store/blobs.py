"""Content-addressed blobs: `blobs/sha256/<first 2 hex>/<64 hex>` under the store root.

A blob only ever appears under its final name complete and fsynced: bytes go to a
temp file in `tmp/`, are hashed on the way, fsynced, checked, then renamed into place
(rename is atomic on POSIX). A crash therefore leaves at most a stray temp file, which
the next open removes.

Durability of the rename itself: the shard directories are all created (and fsynced)
when the store opens, so a put never creates a directory. The rename is made durable by
an fsync of its shard directory before the put returns, and so before any catalog entry
that names the blob is committed: without it a power cut could keep the catalog's
commit and lose the rename (ext4 orders metadata, but other file systems need not, and
the catalog's file is not in the blob's directory). A group publishes its renames and
then fsyncs each directory it touched once, on a few threads at once (one journal
commit covers them), not once per file.

Many small blobs at once (`stage` each, then one `publish`): the temp files are written
without syncing, their writeback is started together (sync_file_range on Linux), then
they are fsynced on a few threads at once, so that one journal commit covers the group,
and renamed. A group of 64 10 KB files takes ~3 ms to sync here, against ~0.4 ms per
file for put_file's fsync one by one. Every blob is still fsynced before it gets its
final name, and before any catalog entry that refers to it is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import itertools
import os
import re
import secrets
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

CHUNK = 1 << 20
_IOV_MAX = 1024  # Linux's limit on buffers per writev
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")

# Temp files are named `<pid>-<instance token>-<serial>.tmp`. Cleanup on open must not
# delete the temp files of a live writer: the daemon keeps writing while another
# process (`ingestd items`, `ingestd serve`) or a second Store in this process opens
# the same root. Tokens of the stores open in this process live here.
_LIVE_TOKENS: set[str] = set()
_LIVE_TOKENS_LOCK = threading.Lock()


def _writeback_starter() -> Callable[[int], None] | None:
    """sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) where the C library has it: start
    writing a file's dirty pages without waiting (a hint; durability still comes from
    fsync). None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    fn.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int) -> None:
        fn(fd, 0, 0, write)  # a failure only means fsync does all the work

    return start


_start_writeback = _writeback_starter()

# A group's fsyncs run on a few threads at once. On ext4 an fsync that finds its file's
# metadata already committed by an earlier one still flushes the disk's cache, one flush
# per file, whereas fsyncs issued while a commit runs share that commit's single flush
# (64 new 10 KB files: 2 ms on 8 threads vs 6-9 ms one after the other).
GROUP_THREADS = 8
_group_pool: ThreadPoolExecutor | None = None
_group_pool_lock = threading.Lock()

T = TypeVar("T")


def _on_threads(fn: Callable[[int], T], n: int, threads: int) -> list[T | Exception]:
    """fn(0) .. fn(n - 1) on up to `threads` threads (this one included); each result
    or the Exception it raised, in order. Returns once every call has returned."""
    out: list[T | Exception | None] = [None] * n

    def part(indices: range) -> None:
        for i in indices:
            try:
                out[i] = fn(i)
            except Exception as e:
                out[i] = e

    k = max(1, min(threads, n, GROUP_THREADS))
    futures = []
    if k > 1:
        global _group_pool
        with _group_pool_lock:
            if _group_pool is None:
                _group_pool = ThreadPoolExecutor(
                    GROUP_THREADS - 1, thread_name_prefix="ingestd-blobs"
                )
        for j in range(1, k):
            try:
                futures.append(_group_pool.submit(part, range(j, n, k)))
            except RuntimeError:  # the interpreter is shutting down: no new threads
                part(range(j, n, k))
    try:
        part(range(0, n, k))
    finally:
        for f in futures:
            f.exception()  # wait: no call may outlive this one
    for f in futures:
        f.result()  # a BaseException from a helper thread
    return out  # type: ignore[return-value]


class DigestMismatch(Exception):
    """The source's bytes are not the ones the caller hashed: it changed in between."""

    def __init__(self, expected: str, actual: str, what: str = "digest") -> None:
        super().__init__(f"{what} mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual
        self.what = what


class StoreIOError(OSError):
    """Writing inside the store failed (disk full, I/O error), as opposed to reading the
    source: callers retry the former and blame the input for the latter."""


@dataclass(frozen=True, slots=True)
class BlobWrite:
    digest: str  # "sha256:<hex>"
    size: int
    created: bool  # False when the store already held these bytes


def check_digest(digest: str) -> str:
    """Return `digest` if it is `sha256:` + 64 lowercase hex, so it cannot escape the root."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest


@dataclass(slots=True)
class StagedBlob:
    """A blob's bytes in a temp file, not yet fsynced nor under its final name: pass it
    to `BlobStore.publish` (or `discard`)."""

    digest: str
    size: int
    tmp: str
    final: str
    fd: int  # the temp file, open for writing; -1 once closed


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dirs(
    staged: Sequence[StagedBlob], done: list[BlobWrite | StoreIOError]
) -> list[BlobWrite | StoreIOError]:
    """fsync each directory that got a blob in `done`, once; a blob whose directory
    cannot be synced is not durable, so its result becomes the error."""
    dirs = sorted(
        {
            os.path.dirname(s.final)
            for s, r in zip(staged, done, strict=True)
            if isinstance(r, BlobWrite)
        }
    )
    if not dirs:
        return done
    synced = _on_threads(lambda i: fsync_dir(Path(dirs[i])), len(dirs), len(dirs) // 4)
    failed = {d: e for d, e in zip(dirs, synced, strict=True) if isinstance(e, OSError)}
    if not failed:
        return done
    return [
        _store_error(failed[d], d) if isinstance(r, BlobWrite) and d in failed else r
        for s, r in zip(staged, done, strict=True)
        for d in (os.path.dirname(s.final),)
    ]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _store_error(exc: OSError, path: str | Path) -> StoreIOError:
    return StoreIOError(exc.errno or errno.EIO, exc.strerror or str(exc), str(path))


class BlobStore:
    """Thread-safe: the shared state is immutable paths, an atomic counter and per-thread
    buffers; every put writes its own temp file and publishes it with one rename."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs" / "sha256"
        self._tmp = self.root / "tmp"
        # Plain strings for the per-put paths: pathlib costs ~10 us per join, which at
        # thousands of small files per second is a real share of a put.
        self._blobs_s = str(self._blobs) + os.sep
        self._tmp_s = str(self._tmp) + os.sep
        self._token = secrets.token_hex(4)
        self._serial = itertools.count()  # next() on it is atomic under the GIL
        self._prepare_dirs()
        with _LIVE_TOKENS_LOCK:
            _LIVE_TOKENS.add(self._token)
        self._remove_stale_temps()

    def close(self) -> None:
        with _LIVE_TOKENS_LOCK:
            _LIVE_TOKENS.discard(self._token)

    def _prepare_dirs(self) -> None:
        created = False
        for d in (self.root, self.root / "blobs", self._blobs, self._tmp):
            if not d.is_dir():
                d.mkdir(parents=True, exist_ok=True)
                created = True
        for i in range(256):
            shard = self._blobs / f"{i:02x}"
            if not shard.is_dir():
                shard.mkdir(exist_ok=True)
                created = True
        if created:
            # Once, so that puts never have to fsync a directory (see module docstring).
            for d in (self._blobs, self.root / "blobs", self.root):
                fsync_dir(d)

    def _remove_stale_temps(self) -> None:
        me = os.getpid()
        with os.scandir(self._tmp) as it:
            for entry in it:
                pid_s, _, rest = entry.name.partition("-")
                token = rest.partition("-")[0]
                if pid_s.isdigit():
                    pid = int(pid_s)
                    if pid == me:
                        with _LIVE_TOKENS_LOCK:
                            if token in _LIVE_TOKENS:
                                continue
                    elif _pid_alive(pid):
                        continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    # --- lookups ---------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        return Path(self.path_str(digest))

    def path_str(self, digest: str) -> str:
        """`path` as a string (cheaper, for the hot paths)."""
        hexd = check_digest(digest)[7:]
        return f"{self._blobs_s}{hexd[:2]}{os.sep}{hexd}"

    def has(self, digest: str) -> bool:
        return os.path.isfile(self.path_str(digest))

    def _tmp_name(self) -> str:
        return f"{self._tmp_s}{os.getpid()}-{self._token}-{next(self._serial)}.tmp"

    def digests(self) -> Iterator[str]:
        for shard in sorted(os.listdir(self._blobs)):
            if len(shard) != 2 or not (self._blobs / shard).is_dir():
                continue
            with os.scandir(self._blobs / shard) as it:
                for entry in it:
                    if _HEX64_RE.fullmatch(entry.name) and entry.name[:2] == shard:
                        yield "sha256:" + entry.name

    def verify_all(self) -> list[str]:
        """Digests whose file content does not hash to its name (bit rot, tampering)."""
        bad = []
        for digest in self.digests():
            try:
                with open(self.path(digest), "rb", buffering=0) as f:
                    actual = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError:
                bad.append(digest)
                continue
            if "sha256:" + actual != digest:
                bad.append(digest)
        return bad

    # --- writing ---------------------------------------------------------------------

    def put_file(
        self,
        src: str | Path,
        expected_digest: str | None = None,
        expected_size: int | None = None,
    ) -> BlobWrite:
        """Copy `src` into the store. Errors reading the source propagate as they are
        (FileNotFoundError, PermissionError, ...); errors writing the store raise
        StoreIOError; bytes that differ from the expected ones raise DigestMismatch."""
        staged = self.stage(src, expected_digest, expected_size)
        if isinstance(staged, BlobWrite):
            return staged
        if expected_digest is None and os.path.isfile(staged.final):
            self.discard([staged])
            return BlobWrite(staged.digest, staged.size, created=False)
        (result,) = self.publish([staged])
        if isinstance(result, BaseException):
            raise result
        return result

    def stage(
        self,
        src: str | Path,
        expected_digest: str | None = None,
        expected_size: int | None = None,
    ) -> StagedBlob | BlobWrite:
        """The first half of a put: copy `src` to a temp file, hashing and checking it on
        the way, without syncing. Returns a BlobWrite (created=False) when the store holds
        `expected_digest` already, else a StagedBlob to `publish` (or `discard`). Raises
        as put_file does; nothing is left behind when it raises."""
        if expected_digest is not None:
            try:
                stored_size = os.stat(self.path_str(expected_digest)).st_size
            except FileNotFoundError:
                pass
            else:
                # The caller has hashed the source already; only a cheap check remains.
                if expected_size is not None:
                    size = os.stat(src).st_size
                    if size != expected_size:
                        raise DigestMismatch(f"{expected_size} bytes", f"{size} bytes", "size")
                return BlobWrite(expected_digest, stored_size, created=False)

        source = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            tmp = self._tmp_name()
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            except OSError as e:
                raise _store_error(e, tmp) from e
            try:
                digest, size = _copy(source, fd, tmp)
                if expected_digest is not None and digest != expected_digest:
                    raise DigestMismatch(expected_digest, digest)
                if expected_size is not None and size != expected_size:
                    raise DigestMismatch(f"{expected_size} bytes", f"{size} bytes", "size")
                return StagedBlob(digest, size, tmp, self.path_str(digest), fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        finally:
            os.close(source)

    def stage_many(
        self, files: Sequence[tuple[str | Path, str | None, int | None]]
    ) -> list[StagedBlob | BlobWrite | Exception]:
        """`stage` for many (src, expected_digest, expected_size): each result, or the
        exception stage raised. One after the other: copies on several threads were
        slower here (more CPU, no less wall time), unlike fsyncs."""
        out: list[StagedBlob | BlobWrite | Exception] = []
        try:
            for src, digest, size in files:
                try:
                    out.append(self.stage(src, digest, size))
                except Exception as e:
                    out.append(e)
        except BaseException:
            self.discard([s for s in out if isinstance(s, StagedBlob)])
            raise
        return out

    def publish(self, staged: Sequence[StagedBlob]) -> list[BlobWrite | StoreIOError]:
        """The second half of a put, for many staged blobs at once: fsync each, then
        rename it into place. One blob's failure (disk full, I/O error) is returned in
        its place and leaves no temp file; the others go ahead. Closes every temp file."""
        out: list[BlobWrite | StoreIOError] = []
        try:
            if _start_writeback is not None and len(staged) > 1:
                for s in staged:
                    _start_writeback(s.fd)
            synced = _on_threads(lambda i: os.fsync(staged[i].fd), len(staged), len(staged) // 4)
            for s, fsync_error in zip(staged, synced, strict=True):
                try:
                    try:
                        if isinstance(fsync_error, OSError):
                            raise _store_error(fsync_error, s.tmp) from fsync_error
                    finally:
                        fd, s.fd = s.fd, -1
                        os.close(fd)
                    try:
                        # Two writers of the same new bytes may both get here; rename
                        # replaces identical content atomically, so both say created.
                        os.rename(s.tmp, s.final)
                    except OSError as e:
                        raise _store_error(e, s.final) from e
                except StoreIOError as e:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(s.tmp)
                    out.append(e)
                else:
                    out.append(BlobWrite(s.digest, s.size, created=True))
        except BaseException:
            self.discard(staged[len(out) :])
            raise
        return _sync_dirs(staged, out)

    @staticmethod
    def discard(staged: Iterable[StagedBlob]) -> None:
        """Drop staged blobs that will not be published."""
        for s in staged:
            if s.fd >= 0:
                fd, s.fd = s.fd, -1
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s.tmp)

    # --- streaming writers (for bytes that arrive in pieces, e.g. an HTTP body) -------

    def begin(self) -> BlobWriter:
        """A writer to feed a blob's bytes in pieces, then `commit` (or `abort`).

        Its temp file follows put_file's naming, so the stale-temp cleanup on open treats
        both alike. Nothing touches the disk until the first `write`, so creating a writer
        is safe on an event loop; every other method does blocking I/O."""
        return BlobWriter(self, Path(self._tmp_name()))

    def adopt(
        self, src: str | Path, expected_digest: str, actual_digest: str | None = None
    ) -> BlobWrite:
        """Move the file `src` (on the store's filesystem) into place as a blob.

        For bytes that were staged elsewhere under the root, e.g. a resumable upload.
        `actual_digest` is the digest the caller computed while writing `src`; without
        it the file is hashed here. A mismatch raises DigestMismatch and leaves `src`
        alone (the caller decides what to do with it); on success `src` is gone."""
        check_digest(expected_digest)
        src = Path(src)
        try:
            fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _store_error(e, src) from e
        try:
            if actual_digest is None:
                with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                    actual_digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
            if actual_digest != expected_digest:
                raise DigestMismatch(expected_digest, actual_digest)
            size = os.fstat(fd).st_size
            # The caller may not have fsynced (or may have crashed and come back since):
            # a blob must be durable before it has its final name.
            os.fsync(fd)
        except OSError as e:
            raise _store_error(e, src) from e
        finally:
            os.close(fd)
        final = self.path(expected_digest)
        try:
            if final.is_file():
                os.unlink(src)
                return BlobWrite(expected_digest, size, created=False)
            os.chmod(src, 0o444)  # blobs are read-only, as put_file creates them
            os.rename(src, final)
            fsync_dir(final.parent)
        except OSError as e:
            raise _store_error(e, final) from e
        return BlobWrite(expected_digest, size, created=True)


def _copy(source: int, fd: int, tmp: str) -> tuple[str, int]:
    """Copy the file `source` into `fd`, hashing on the way (no fsync).

    Reads into a buffer sized to the file (at most CHUNK), made per call: a small file
    costs a small allocation, and no buffer outlives the copy (a per-thread 1 MiB buffer
    stayed resident in every thread that ever copied)."""
    # +1: a file that grew is noticed by the first read; 64 KiB at least, for pipes and
    # files that report no size.
    buf = bytearray(min(CHUNK, max(os.fstat(source).st_size + 1, 1 << 16)))
    view = memoryview(buf)
    h = hashlib.sha256()
    size = 0
    while n := os.readv(source, (buf,)):
        chunk = view[:n]
        h.update(chunk)
        try:
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
        except OSError as e:
            raise _store_error(e, tmp) from e
        size += n
    return "sha256:" + h.hexdigest(), size


class BlobWriter:
    """One blob being written in pieces: `write` each piece, then `commit` or `abort`.

    Used by one task at a time (its calls may run on different threads, one after the
    other). Leaving without commit or abort leaves a temp file that the next open of
    the store removes, like a crash in put_file."""

    def __init__(self, store: BlobStore, tmp: Path) -> None:
        self._store = store
        self.tmp = tmp
        self._fd: int | None = None
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False

    @property
    def done(self) -> bool:
        """Committed or aborted: nothing is left to clean up."""
        return self._done

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.write_many((data,))

    def write_many(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        """Append several pieces with as few system calls as the kernel allows (writev),
        so a caller holding pieces as they arrived need not join them first."""
        if self._done:
            raise ValueError("blob writer already committed or aborted")
        if self._fd is None:
            try:
                self._fd = os.open(
                    self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444
                )
            except OSError as e:
                raise _store_error(e, self.tmp) from e
        views = [memoryview(p).cast("B") for p in parts]
        for v in views:
            self._hash.update(v)
        views = [v for v in views if v.nbytes]
        try:
            while views:
                n = os.writev(self._fd, views[:_IOV_MAX])
                self.size += n
                # Keep what the kernel did not take: the rest of a part written in half.
                while views and n >= views[0].nbytes:
                    n -= views.pop(0).nbytes
                if n:
                    views[0] = views[0][n:]
        except OSError as e:
            raise _store_error(e, self.tmp) from e

    def commit(
        self, expected_digest: str | None = None, expected_size: int | None = None
    ) -> BlobWrite:
        """Fsync, check, and rename into place. DigestMismatch (and any error) aborts:
        no blob and no temp file remain."""
        if self._done:
            raise ValueError("blob writer already committed or aborted")
        try:
            if expected_digest is not None:
                check_digest(expected_digest)
            digest = "sha256:" + self._hash.hexdigest()
            if expected_digest is not None and digest != expected_digest:
                raise DigestMismatch(expected_digest, digest)
            if expected_size is not None and self.size != expected_size:
                raise DigestMismatch(f"{expected_size} bytes", f"{self.size} bytes", "size")
            if self._fd is None:  # the empty blob: nothing was written yet
                self.write(b"")
            assert self._fd is not None
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise _store_error(e, self.tmp) from e
            final = self._store.path(digest)
            if final.is_file():
                self.abort()
                return BlobWrite(digest, self.size, created=False)
            try:
                os.rename(self.tmp, final)
                fsync_dir(final.parent)
            except OSError as e:
                raise _store_error(e, final) from e
            self._close()
            return BlobWrite(digest, self.size, created=True)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the bytes written so far. Idempotent."""
        if self._done:
            return
        self._close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)

    def _close(self) -> None:
        self._done = True
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
