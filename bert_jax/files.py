"""Files on disk: atomic writes with the user's umask, the cache root, free space, the workdir lock.

Everything bert_jax writes that another run, tool or user reads later goes through here, so
that a crash never leaves a half-written file, files get the permissions the user's umask
gives (not `tempfile`'s private 0600/0700), and two runs never write into one workdir.
"""

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator

# A lock whose holder has not touched it for this long is stale (a run on another host of a
# shared file system that died without removing it); the holder touches it every few minutes.
LOCK_HEARTBEAT_SECONDS = 60.0
LOCK_STALE_SECONDS = 15 * 60.0


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary path beside `path` to write to; renamed onto `path` (with the umask's
    permissions) when the block ends without error, removed when it raises."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def make_temp_dir(beside: str, prefix: str) -> str:
    """A new directory next to `beside` (same file system, so it can be renamed onto it),
    with the permissions a plain `mkdir` would give."""
    parent = os.path.dirname(os.path.abspath(beside))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def cache_root() -> str:
    """Where bert_jax caches corpora, vocabularies, shards and compiled programs.

    $BERT_JAX_CACHE when set, else ~/.cache/bert_jax.
    """
    return os.environ.get("BERT_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "bert_jax"
    )


def writable_problem(directory: str, what: str) -> str | None:
    """Why `directory` cannot be written (created if missing), or None when it can."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".preflight"):
            pass
    except OSError as e:
        return f"cannot write {what} to {directory} ({e.strerror}); choose a writable directory"
    return None


class DiskFullError(OSError):
    """Too little free space for a write, said before (or instead of) a failed write."""


def require_free(directory: str, needed: int, what: str) -> None:
    """Raises DiskFullError naming `what`, the path, and the bytes needed and free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskFullError(
            errno.ENOSPC,
            f"{directory} has {_size(free)} free but {what} needs {_size(needed)}; free space "
            f"or choose another --workdir",
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@dataclasses.dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    started: float
    command: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"PID {self.pid} on {self.host}, started {when} ({self.command})"


class WorkdirInUseError(RuntimeError):
    """Another live run holds the workdir's lock."""


class WorkdirLock:
    """`<workdir>/.lock`: host, PID and start time of the run writing the workdir.

    Taken with an exclusive create (works on local and network file systems alike); a lock
    whose holder is a dead PID on this host, or that nobody touched for `stale_seconds`, is
    taken over with a warning. `heartbeat()` touches the lock; `release()` removes it.
    """

    def __init__(self, workdir: str, command: str, stale_seconds: float = LOCK_STALE_SECONDS):
        self.path = os.path.join(workdir, ".lock")
        self.stale_seconds = stale_seconds
        self.holder = LockHolder(socket.gethostname(), os.getpid(), time.time(), command)
        self._last_beat = 0.0
        self._held = False
        os.makedirs(workdir, exist_ok=True)
        for _ in range(3):
            if self._try_create():
                return
            current = self._read()
            if current is None:
                continue  # removed or half-written between our two looks: try again
            if not self._stale(current):
                raise WorkdirInUseError(
                    f"{workdir} is in use by another run: {current.describe()}; wait for it "
                    f"to end, stop it, or choose another --workdir (lock file {self.path})"
                )
            warnings.warn(
                f"taking over the stale lock of {workdir} ({current.describe()}, no longer "
                f"running)",
                stacklevel=2,
            )
            aside = f"{self.path}.stale-{os.getpid()}"
            try:
                os.replace(self.path, aside)
                os.remove(aside)
            except FileNotFoundError:
                pass
        raise WorkdirInUseError(f"could not take the lock {self.path}; try again")

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(self.holder), f)
        self._held = True
        self._last_beat = time.time()
        return True

    def _read(self) -> LockHolder | None:
        try:
            with open(self.path) as f:
                return LockHolder(**json.load(f))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def _stale(self, holder: LockHolder) -> bool:
        if holder.host == socket.gethostname():
            try:
                os.kill(holder.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False  # alive, another user's
            return False
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_seconds

    def heartbeat(self) -> None:
        """Touches the lock (at most once a minute), so other hosts see the run is alive."""
        now = time.time()
        if self._held and now - self._last_beat > LOCK_HEARTBEAT_SECONDS:
            os.utime(self.path)
            self._last_beat = now

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
