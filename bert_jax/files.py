"""Every file bert_jax reads or writes, on a local disk or in a bucket (`gs://...`).

A path is a string: a local path, or a URL whose scheme has an fsspec backend (`gs://` through
gcsfs, the client Google's own tools use; `s3://` through s3fs, ...). The functions here take
either, so a run's workdir, its corpus, vocabulary, shards, models and exports may each live
on a local disk or in Cloud Storage. fsspec rather than `etils.epath` (which orbax uses, and
which wraps fsspec for `gs://`): fsspec exposes the store's create-if-absent precondition
(`pipe(mode="create")`, GCS's `ifGenerationMatch=0`) that the workdir lock needs, object
listings that keep their scheme, and uploads and downloads of whole files.

What holds on both: a file appears whole or not at all (a local file is written beside its
target and renamed; an object is one upload, visible only when complete); written files get
the permissions the user's umask gives (not `tempfile`'s private 0600/0700). A scheme with no
backend installed is refused with the package to install, and no code path turns a URL into a
local folder named `gs:`. The workdir's lock and TensorBoard events are `workdir.py`'s.

An emulator is honoured: with `STORAGE_EMULATOR_HOST` set (fake-gcs-server, or Google's own),
gcsfs, tensorstore (under orbax) and ArrayRecord's reader are all pointed at it.
"""

import builtins
import contextlib
import errno
import functools
import glob as globlib
import hashlib
import io
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import IO, Any

# The package that serves each scheme, to name in the error when it is missing.
_BACKENDS = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "az": "adlfs", "abfs": "adlfs"}


class StorageError(OSError):
    """A store that cannot be used as asked: no backend, no bucket, no access, no credentials."""


def is_url(path: Any) -> bool:
    """True for `scheme://...` paths (a bucket), False for local ones."""
    return "://" in str(path)


def scheme(path: str) -> str:
    return str(path).split("://", 1)[0] if is_url(path) else ""


def absolute(path: Any) -> str:
    """A local path made absolute; a URL unchanged (never `<cwd>/gs:/...`)."""
    path = str(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(path: str, *parts: str) -> str:
    return os.path.join(str(path), *parts)


def backend_problem(path: Any) -> str | None:
    """Why `path` cannot be opened here (its scheme has no backend installed), or None."""
    if not is_url(path):
        return None
    try:
        _filesystem(scheme(path))
    except (ImportError, ValueError):
        package = _BACKENDS.get(scheme(path))
        install = f"pip install {package}" if package else "install the fsspec backend for it"
        return f"{path}: no backend for {scheme(path)}:// paths is installed ({install})"
    return None


@functools.cache
def _filesystem(name: str):
    _configure_emulator()
    import fsspec  # imported here: local runs never load a cloud client

    if name in ("gs", "gcs"):  # the client etils.epath makes (orbax's), so one listing cache
        return fsspec.filesystem(name, finalize_on_close=True)
    return fsspec.filesystem(name)


def _changed(path: str) -> None:
    """Forgets every cached listing: gcsfs caches directory listings per process (orbax's
    among them, the same client), and a listing that still shows a deleted or renamed step
    would be trusted."""
    fs = _fs(path)
    for client in (fs, *getattr(type(fs), "_cache", {}).values()):  # every cached client
        client.invalidate_cache()


def _fs(path: str):
    problem = backend_problem(path)
    if problem:
        raise StorageError(errno.EPROTONOSUPPORT, problem)
    return _filesystem(scheme(path))


@functools.cache
def _configure_emulator() -> None:
    """Points every client at `STORAGE_EMULATOR_HOST` when set, and counts gcsfs's retries."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        url = host if "://" in host else f"http://{host}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)  # tensorstore (orbax's arrays)
        # Without a token tensorstore looks for credentials on the GCE metadata server first,
        # a minute of timeouts per attempt off Google Cloud; the emulator checks no token.
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)  # ArrayRecord's reader
        # gcsfs asks the storage-control gRPC API for the bucket's layout; emulators lack it.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    logger = logging.getLogger("gcsfs")
    logger.addFilter(_RETRIES)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(_RETRIES)


class _RetryCounter(logging.Handler, logging.Filter):
    """gcsfs retries 429s, 5xxs and dropped connections with backoff and says so at DEBUG;
    each retry becomes one counted warning line, everything else it logs below WARNING is
    dropped."""

    def __init__(self):
        logging.Handler.__init__(self)
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "retrying" in record.getMessage()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "retrying" in message:
            self.count += 1
            logging.getLogger("bert_jax").warning(
                "storage request retried (%d so far): %s", self.count, message[:200]
            )
        elif record.levelno >= logging.ERROR and "out of retries" not in message:
            logging.getLogger("bert_jax").warning("storage: %s", message.splitlines()[0][:300])


_RETRIES = _RetryCounter()


def retries() -> int:
    """How many storage requests gcsfs retried in this process."""
    return _RETRIES.count


# ---- reading and querying ------------------------------------------------------------------


def open(path: str, mode: str = "r", encoding: str | None = None, errors: str | None = None,
         newline: str | None = None) -> IO:  # fmt: skip
    """A file object for `path`, local or remote, in `mode` ("r", "rb", "w", "wb").

    Writing a remote object in place is not atomic on failure (the part written is kept):
    write with `atomic_write`/`atomic_path` unless the file is a stream whose end is checked.
    """
    path = str(path)
    if not is_url(path):
        if "b" in mode:
            return builtins.open(path, mode)
        return builtins.open(path, mode, encoding=encoding, errors=errors, newline=newline)
    raw = _fs(path).open(path, mode.replace("t", "").replace("b", "") + "b")
    if "b" in mode:
        return raw
    return io.TextIOWrapper(raw, encoding=encoding or "utf-8", errors=errors, newline=newline)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str, errors: str | None = None) -> str:
    return read_bytes(path).decode("utf-8", errors=errors or "strict")


def exists(path: str) -> bool:
    return _fs(path).exists(path) if is_url(path) else os.path.exists(path)


def isfile(path: str) -> bool:
    return _fs(path).isfile(path) if is_url(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs = _fs(path)
    fs.invalidate_cache(path)
    return fs.isdir(path)


def listdir(path: str) -> list[str]:
    """The names in a directory (a bucket's prefix); [] when it does not exist."""
    if not is_url(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs = _fs(path)
    fs.invalidate_cache(path)
    try:
        return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def glob(pattern: str) -> list[str]:
    """Paths matching `pattern` (`*`, `?`, `**` as the shell), files and directories."""
    if not is_url(pattern):
        return sorted(globlib.glob(os.path.expanduser(pattern), recursive=True))
    prefix = scheme(pattern) + "://"
    return sorted(prefix + p for p in _fs(pattern).glob(pattern))


def walk_files(root: str) -> list[str]:
    """Every file under `root`, as paths relative to it, sorted."""
    root = str(root).rstrip("/")
    if not is_url(root):
        out = []
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            out.extend(os.path.relpath(os.path.join(folder, n), root) for n in sorted(names))
        return out
    fs = _fs(root)
    fs.invalidate_cache(root)
    bare = fs._strip_protocol(root)
    return sorted(p[len(bare) + 1 :] for p in fs.find(root) if p.startswith(bare + "/"))


def size(path: str) -> int:
    return int(_fs(path).size(path)) if is_url(path) else os.path.getsize(path)


def mtime(path: str) -> float:
    """When the file was last written, in seconds since the epoch."""
    if not is_url(path):
        return os.stat(path).st_mtime
    fs = _fs(path)
    fs.invalidate_cache(path)
    return fs.modified(path).timestamp()


def local_copy(path: str) -> str:
    """A local path holding `path`'s bytes, for libraries that only read local files
    (safetensors' lazy reader, SentencePiece): the path itself when local, else a copy under
    `cache_root()/remote/` that is reused while the object is unchanged."""
    if not is_url(path):
        return path
    info = _fs(path).info(path)
    tag = f"{path}|{info.get('generation') or info.get('etag') or info.get('size')}"
    digest = hashlib.sha256(tag.encode()).hexdigest()[:20]
    local = os.path.join(cache_root(), "remote", digest, os.path.basename(path.rstrip("/")))
    if not os.path.isfile(local):
        with atomic_path(local) as tmp:
            _fs(path).get_file(path, tmp)
    return local


# ---- writing ------------------------------------------------------------------------------


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def makedirs(path: str) -> None:
    """Creates a local directory and its parents; nothing for a bucket (no directories)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """A local temporary path to write to; it becomes `path` (with the umask's permissions)
    when the block ends without error, and is removed when it raises. For a local `path` it
    lies beside it and is renamed; for a remote one it is uploaded in one piece."""
    path = str(path)
    remote = is_url(path)
    if remote:
        _fs(path)
        fd, tmp = tempfile.mkstemp(suffix=suffix)
    else:
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        if remote:
            _fs(path).put_file(tmp, path)
            _changed(path)
        else:
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str, data: bytes) -> None:
    """Writes `data` to `path` whole: a local file renamed into place, or one upload."""
    if is_url(path):
        _fs(path).pipe_file(str(path), data)
        _changed(path)
        return
    with atomic_path(path) as tmp, builtins.open(tmp, "wb") as f:
        f.write(data)


def create_exclusive(path: str, data: bytes) -> bool:
    """Writes `data` to `path` only if no file is there (O_EXCL on a disk, the store's
    create-if-absent precondition in a bucket); False when one was."""
    if is_url(path):
        try:
            _fs(path).pipe_file(str(path), data, mode="create")
        except FileExistsError:
            return False
        _changed(path)
        return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def remove(path: str) -> None:
    """Removes a file; nothing when it is already gone."""
    try:
        if is_url(path):
            _fs(path).rm_file(path)
            _changed(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass


def rmtree(path: str) -> None:
    """Removes a directory (every object under a prefix) and all it holds."""
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        _fs(path).rm(path, recursive=True)
    _changed(path)


def rename(source: str, target: str) -> None:
    """Moves a file or directory; a bucket has no rename, so its objects are copied and the
    originals deleted (not atomic: used to set damaged checkpoints aside)."""
    if not is_url(source):
        os.replace(source, target)
        return
    fs = _fs(source)
    for relpath in walk_files(source) or [""]:
        fs.copy(join(source, relpath).rstrip("/"), join(target, relpath).rstrip("/"))
    rmtree(source)


def copy(source: str, target: str) -> None:
    """Copies one file, between any two of local disk and buckets (atomic at the target)."""
    if is_url(source) and is_url(target) and scheme(source) == scheme(target):
        _fs(source).copy(source, target)
        _changed(target)
    elif not is_url(source):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    else:
        atomic_write(target, read_bytes(source))


def upload_tree(local_dir: str, target: str) -> None:
    """Copies every file of a local directory to `target` (a directory or a prefix)."""
    for relpath in walk_files(local_dir):
        if is_url(target):
            _fs(target).put_file(os.path.join(local_dir, relpath), join(target, relpath))
            _changed(target)
        else:
            copy(os.path.join(local_dir, relpath), join(target, relpath))


def make_temp_dir(beside: str, prefix: str) -> str:
    """A new local directory next to `beside` (same file system, so it can be renamed onto
    it; in the system's temporary folder when `beside` is remote), with the permissions a
    plain `mkdir` would give."""
    if is_url(beside):
        tmp = tempfile.mkdtemp(prefix=prefix)
    else:
        parent = os.path.dirname(os.path.abspath(beside))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def cache_root() -> str:
    """Where bert_jax caches corpora, vocabularies, shards, compiled programs and local copies
    of remote files: $BERT_JAX_CACHE when set, else ~/.cache/bert_jax (always local)."""
    return os.environ.get("BERT_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "bert_jax"
    )


def writable_problem(directory: str, what: str) -> str | None:
    """Why `directory` cannot be written (created if missing), or None when it can.

    For a bucket a small probe object is written and deleted: a missing bucket, a refused
    permission and absent credentials each come back as one line naming the fix."""
    directory = str(directory)
    if is_url(directory):
        problem = backend_problem(directory)
        if problem:
            return problem
        probe = join(directory, f".preflight-{socket.gethostname()}-{os.getpid()}")
        try:
            _fs(directory).pipe_file(probe, b"")
            _fs(directory).rm_file(probe)
        except Exception as e:  # noqa: BLE001 (classified into one line)
            return remote_problem(e, directory, f"write {what} to")
        return None
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".preflight"):
            pass
    except OSError as e:
        return f"cannot write {what} to {directory} ({e.strerror}); choose a writable directory"
    return None


def readable_problem(path: str, what: str) -> str | None:
    """Why `path` (a file or a directory) cannot be read, or None when it can."""
    try:
        if exists(path):
            return None
    except Exception as e:  # noqa: BLE001 (classified into one line)
        return remote_problem(e, path, f"read {what} from")
    return f"{what} {path} does not exist"


def remote_problem(error: BaseException, path: str, doing: str) -> str:
    """One line for a failed bucket request: what failed and what fixes it."""
    bucket = path.split("://", 1)[-1].split("/", 1)[0]
    root = f"{scheme(path)}://{bucket}"
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, StorageError):
        return str(error.strerror or error)
    if "credentials" in text.lower() or "RefreshError" in text or _http_status(error, 401):
        return (
            f"cannot {doing} {path}: no usable Google Cloud credentials ({_first(text)}); on a "
            f"Cloud VM the VM's service account is used, elsewhere run `gcloud auth "
            f"application-default login` or set GOOGLE_APPLICATION_CREDENTIALS to a key file"
        )
    if isinstance(error, FileNotFoundError) and not _bucket_exists(path):
        return (
            f"cannot {doing} {path}: the bucket {root} does not exist (create it with `gcloud "
            f"storage buckets create {root}`, or fix the path)"
        )
    if _http_status(error, 403) or "Forbidden" in text or isinstance(error, PermissionError):
        return (
            f"cannot {doing} {path}: permission refused ({_first(text)}); grant the account in "
            f"use a role such as roles/storage.objectAdmin on {root}"
        )
    return f"cannot {doing} {path} ({_first(text)})"


def _http_status(error: BaseException, status: int) -> bool:
    """Whether `error` reports HTTP `status`: by its code, or by the number standing alone in
    its text (a URL's port such as :40123 in a FileNotFoundError is not a status)."""
    if getattr(error, "code", None) == status or getattr(error, "status", None) == status:
        return True
    return re.search(rf"(?<![\w:./-]){status}(?![\w.:/-])", str(error)) is not None


def _first(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else "no detail"


def _bucket_exists(path: str) -> bool:
    bucket = path.split("://", 1)[-1].split("/", 1)[0]
    try:
        return bool(_fs(path).exists(bucket))
    except Exception:  # noqa: BLE001 (the caller reports the original error)
        return True


class DiskFullError(OSError):
    """Too little free space for a write, said before (or instead of) a failed write."""


def require_free(directory: str, needed: int, what: str) -> None:
    """Raises DiskFullError naming `what`, the path, and the bytes needed and free.

    A bucket has no free space to check (its limits are quotas, reported by the store when a
    write exceeds them): nothing is checked there."""
    if is_url(directory):
        return
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
