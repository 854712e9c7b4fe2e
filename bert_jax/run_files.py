"""What a run keeps in its workdir besides checkpoints, local or in a bucket: the lock that
makes it the workdir's only writer, its TensorBoard events, the settings a rerun must repeat,
and the SIGTERM flag that turns a preemption into a save.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import warnings

from bert_jax import cli, files

# A lock whose holder has not touched it for this long is stale (a run on another host that
# died without removing it); the holder touches it every minute.
LOCK_HEARTBEAT_SECONDS = 60.0
LOCK_STALE_SECONDS = 15 * 60.0


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

    Taken with an exclusive create (O_EXCL on a disk, `ifGenerationMatch=0` in a bucket, so two
    launches or two hosts cannot both take it); a lock whose holder is a dead PID on this host,
    or that nobody touched for `stale_seconds`, is taken over with a warning. `heartbeat()`
    touches the lock; `release()` removes it.
    """

    def __init__(self, workdir: str, command: str, stale_seconds: float = LOCK_STALE_SECONDS):
        self.path = files.join(workdir, ".lock")
        self.stale_seconds = stale_seconds
        self.holder = LockHolder(socket.gethostname(), os.getpid(), time.time(), command)
        self._last_beat = 0.0
        self._held = False
        files.makedirs(workdir)
        for _ in range(3):
            if files.create_exclusive(self.path, self._record()):
                self._held, self._last_beat = True, time.time()
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
            files.remove(self.path)
        raise WorkdirInUseError(f"could not take the lock {self.path}; try again")

    def _record(self) -> bytes:
        return json.dumps(dataclasses.asdict(self.holder)).encode()

    def _read(self) -> LockHolder | None:
        try:
            return LockHolder(**json.loads(files.read_bytes(self.path)))
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
            age = time.time() - files.mtime(self.path)
        except FileNotFoundError:
            return True
        return age > self.stale_seconds

    def heartbeat(self) -> None:
        """Touches the lock (at most once a minute), so other hosts see the run is alive."""
        now = time.time()
        if self._held and now - self._last_beat > LOCK_HEARTBEAT_SECONDS:
            if files.is_url(self.path):
                files.atomic_write(self.path, self._record())
            else:
                os.utime(self.path)
            self._last_beat = now

    def release(self) -> None:
        if self._held:
            self._held = False
            files.remove(self.path)

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _import_tensorboardx():
    """tensorboardX, imported here (the library's other modules do not need it) and without
    PyTorch: where torch is installed, tensorboardX imports it (3 s on a 2-core machine) only
    to accept its tensors, and bert_jax writes floats. A torch already imported is kept."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        import tensorboardX

        return tensorboardX
    sys.modules["torch"] = None  # `import torch` raises ImportError, as where it is absent
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


class SummaryWriter:
    """TensorBoard scalars into `logdir`, local or remote.

    tensorboardX writes the event file; for a bucket (whose objects cannot be appended to, and
    whose tensorboardX writer fails) it writes into a local staging folder under
    `cache_root()/tensorboard/` and uploads the event file whole every `upload_seconds` and at
    `close()`; `tensorboard --logdir gs://...` reads it there.
    """

    def __init__(self, logdir: str, upload_seconds: float = 30.0):
        tensorboardX = _import_tensorboardx()
        self.logdir = str(logdir)
        self.remote = files.is_url(self.logdir)
        self.upload_seconds = upload_seconds
        self._last_upload = time.time()
        local = self.logdir
        if self.remote:
            digest = hashlib.sha256(self.logdir.encode()).hexdigest()[:16]
            local = os.path.join(files.cache_root(), "tensorboard", digest)
            shutil.rmtree(local, ignore_errors=True)  # a rerun's own file is the one to upload
        self.local = local
        self._writer = tensorboardX.SummaryWriter(local)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.add_scalar(tag, value, step)
        if self.remote and time.time() - self._last_upload > self.upload_seconds:
            self.flush()

    def flush(self) -> None:
        self._writer.flush()
        if self.remote:
            files.upload_tree(self.local, self.logdir)
            self._last_upload = time.time()

    def close(self) -> None:
        self._writer.close()
        if self.remote:
            files.upload_tree(self.local, self.logdir)


class StopFlag:
    """Set by SIGTERM (a TPU maintenance event, a spot preemption) once installed; a loop
    checks it, saves and stops."""

    requested = False

    def install(self) -> None:
        def handler(signum, frame):
            del signum, frame
            self.requested = True

        cli.take_over_sigterm(handler)


class SettingsChanged(ValueError):
    """A rerun whose settings differ from those the workdir's results were made with."""


def check_settings(workdir: str, name: str, wanted: dict) -> None:
    """Refuses (naming each differing field) settings other than those recorded in
    `<workdir>/<name>`; records them on a first run. `wanted` holds JSON values."""
    path = files.join(workdir, name)
    if not files.exists(path):
        files.atomic_write(path, json.dumps(wanted, indent=2).encode())
        return
    saved = json.loads(files.read_bytes(path))
    differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differing:
        fields = "; ".join(
            f"{k}: {json.dumps(saved.get(k))} there, {json.dumps(wanted.get(k))} now"
            for k in differing
        )
        raise SettingsChanged(
            f"{workdir} holds runs made with other settings ({fields}). Nothing was changed. "
            f"To resume or extend them, use the settings in {path}; for new settings, use a "
            f"new --workdir"
        )
