"""Orbax checkpoints of a run, verified: train state, input iterator state, config, checksums.

Saves are asynchronous (training goes on while the arrays are written) and atomic (orbax
writes a temporary directory and renames it when complete). When a save is on disk, each
process records the XXH3-128 checksums of the files it wrote
(`<step>/checksums/process_<i>.json`); older checkpoints are deleted by the keep policy only
after a newer one is complete and recorded.

Restoring tells damage from incompatibility. A checkpoint is *damaged* when its own bytes are
unreadable, fail their checksums, or hold non-finite parameters or optimizer state: it is
renamed `<step>.damaged-<time>` and the one before it is tried. A checkpoint that reads fine
but does not fit the run (another state structure, format or, through `check_meta`, another
config) is *incompatible*: `IncompatibleCheckpoint` is raised before any array is read, and
nothing is renamed. Restoring places every array straight into its target sharding, whatever
mesh wrote it.
"""

import errno
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import xxhash
from jax.experimental import multihost_utils

from bert_jax import files

# Bumped when what a checkpoint holds changes meaning; another format is incompatible.
FORMAT = 2
CHECKSUM = "xxh3_128"
_DAMAGED = re.compile(r"^\d+\.damaged-\d+$")
_PROCESS_DIR = re.compile(r"(?:^|/)ocdbt\.process_(\d+)(?:/|$)")
# Orbax's metadata, manifests and JSON items come on top of the array bytes.
_OVERHEAD_BYTES = 4 << 20


class _OrbaxErrors(logging.Filter):
    """Orbax logs a failed background save at ERROR from each of its threads (hundreds of
    lines of tracebacks for one full disk); the Checkpointer reports it once, itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "/orbax/" in record.pathname and 'Item "checksums"' in record.getMessage():
            return False  # the per-process checksums beside orbax's items (see module doc)
        return not (record.levelno >= logging.ERROR and "/orbax/" in record.pathname)


logging.getLogger("absl").addFilter(_OrbaxErrors())


class _OrbaxTasks(logging.Filter):
    """A failed background save also leaves orbax's write tasks with exceptions nobody
    retrieves; asyncio logs each ("Task exception was never retrieved", with a traceback)
    when they are collected. The Checkpointer reports the failure once, itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.getMessage())


logging.getLogger("asyncio").addFilter(_OrbaxTasks())
_default_unraisablehook = sys.unraisablehook


def _quiet_closed_loops(unraisable) -> None:
    """After a failed save, orbax's writer threads still schedule callbacks on the event loop
    it has closed; asyncio's "Event loop is closed" then reaches the unraisable hook once per
    thread, as tracebacks between the progress bar and the one error line the Checkpointer
    gives. Those alone are dropped."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    _default_unraisablehook(unraisable)


sys.unraisablehook = _quiet_closed_loops


class IncompatibleCheckpoint(ValueError):
    """A readable checkpoint that does not fit this run (nothing was renamed or read)."""


class NoUsableCheckpoint(RuntimeError):
    """A directory whose checkpoints are all damaged: there is nothing to resume from."""


# Over 200 lines: one directory's save, verify, set-aside and restore protocol, whose state
# (the pending save, its failure, the newest verified step) every method shares.
class Checkpointer:
    """Saves and restores (train state, data iterator state, metadata) under one directory.

    Args:
      directory: where step folders go (created if missing).
      max_to_keep: the newest checkpoints kept.
      keep_period: also keep every checkpoint whose step is a multiple of this, forever.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, keep_period: int | None = None):
        self.directory = files.absolute(directory)
        problem = files.writable_problem(self.directory, "checkpoints")
        if problem:
            raise PermissionError(problem)
        self.max_to_keep, self.keep_period = max_to_keep, keep_period or None
        self.manager = ocp.CheckpointManager(
            self.directory,
            # The keep policy is applied here, after a newer save is verified (`_prune`).
            options=ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._pending: threading.Thread | None = None
        self._failure: tuple[int, BaseException] | None = None
        self._bytes = 0
        self._reported = False
        self._saving: int | None = None  # the step being saved in the background
        self._verified: int | None = None  # the newest step saved and recorded by this run

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: dict, meta: dict) -> None:
        """Starts an asynchronous save of `step`; the caller decides when one is due.

        Raises:
          files.DiskFullError before writing anything when the disk cannot hold it, or when
          the previous save failed for want of space (the checkpoints before it are intact).
        """
        self.wait()
        self._prune()
        self._bytes = tree_bytes(state) + _OVERHEAD_BYTES
        files.require_free(self.directory, self._bytes, f"the checkpoint of step {step}")
        try:  # orbax writes some of it before returning, the rest in the background
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data),
                    meta=ocp.args.JsonSave({**meta, "format": FORMAT}),
                ),
                force=True,
            )
        except Exception as e:
            self._failure = (step, e)
            self._raise_failure()
        self._saving = step
        self._pending = threading.Thread(target=self._finalize, args=(step,), daemon=True)
        self._pending.start()

    def _finalize(self, step: int) -> None:
        """In the background: waits for orbax, then records this process's checksums."""
        try:
            self.manager.wait_until_finished()
            write_checksums(self.step_dir(step), jax.process_index())
        except BaseException as e:  # reported by check() / wait() in the main thread
            self._failure = (step, e)

    def check(self) -> None:
        """Raises, without waiting, when a background save has failed (cheap: call often)."""
        if self._failure is not None and not (self._pending and self._pending.is_alive()):
            self._raise_failure()

    def wait(self) -> None:
        """Blocks until the pending save is on disk and verified; raises if it failed."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
            if self._failure is None:
                self._verified = self._saving
        if self._failure is not None:
            self._raise_failure()

    def _raise_failure(self) -> None:
        step, error = self._failure
        self._failure, self._reported = None, True
        try:
            self.manager.reload()
        except Exception:  # orbax raises the same failure again: it is reported below
            pass
        if jax.process_index() == 0:  # a half-written save only takes space
            for tmp in files.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
                files.rmtree(tmp)
        if _is_disk_full(error) and not files.is_url(self.directory):
            free = shutil.disk_usage(self.directory).free
            raise files.DiskFullError(
                errno.ENOSPC,
                f"the checkpoint of step {step} could not be written to {self.directory}: the "
                f"disk is full ({free / 2**20:.1f} MiB free, the checkpoint needs about "
                f"{self._bytes / 2**20:.1f} MiB). The checkpoints before it are intact: free "
                f"space and run the same command again to resume",
            ) from None
        raise RuntimeError(
            f"the checkpoint of step {step} could not be written to {self.directory} "
            f"({type(error).__name__}: {str(error)[:300]}); the checkpoints before it are intact"
        ) from error

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def read_meta(self, step: int) -> dict:
        """The metadata of `step` alone (config, vocabulary hash), without the arrays."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data iterator state, metadata) of `step`, arrays placed as `abstract_state`
        (a tree of `jax.ShapeDtypeStruct` with shardings) says."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        meta = {k: v for k, v in restored["meta"].items() if k != "format"}
        return restored["state"], restored["data"], meta

    def latest_meta(self) -> tuple[int, dict] | None:
        """(step, metadata) of the newest checkpoint whose metadata reads, without renaming
        anything: what a run checks against its config before any expensive work."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, self.read_meta(step)
            except Exception:  # damaged: restore_latest sets it aside
                continue
        return None

    def restore_latest(
        self,
        abstract_state: Any,
        check_meta: Callable[[dict, str], None] | None = None,
        *,
        start_over: bool = False,
    ) -> tuple[int, Any, dict, dict] | None:
        """The newest checkpoint that is whole, verified and finite, setting aside (with a
        warning) each damaged one.

        Args:
          abstract_state: the target shapes, dtypes and shardings.
          check_meta: called with (metadata, path) before any array is read; raises
            `IncompatibleCheckpoint` when the checkpoint belongs to another run.
          start_over: return None instead of raising when every checkpoint is damaged.

        Returns:
          (step, state, data iterator state, metadata), or None when there is no checkpoint.

        Raises:
          IncompatibleCheckpoint: a readable checkpoint of another run (nothing renamed).
          NoUsableCheckpoint: every checkpoint is damaged (and `start_over` is False).
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            found = self._usable(step, abstract_state, check_meta)
            if found is not None:
                return step, *found
        damaged = self.damaged()
        if damaged and not start_over:
            raise NoUsableCheckpoint(
                f"every checkpoint in {self.directory} is damaged ({', '.join(damaged)}); "
                f"there is nothing to resume from"
            )
        return None

    def _usable(self, step: int, abstract_state: Any, check_meta) -> tuple | None:
        """(state, data iterator state, metadata) of `step` when it is whole, verified and
        finite; otherwise None, the checkpoint set aside. Raises IncompatibleCheckpoint."""
        path = self.step_dir(step)
        try:
            meta = self.read_meta(step)
        except Exception as e:
            return self._set_aside(path, f"its metadata cannot be read ({_brief(e)})")
        if meta.get("format", 1) != FORMAT:
            workdir = os.path.dirname(self.directory)
            raise IncompatibleCheckpoint(
                f"checkpoint {path} has format {meta.get('format', 1)} (an older bert_jax); "
                f"this version reads format {FORMAT}: use a new --workdir, or start a new "
                f"run from its weights with --config.init_from={workdir}"
            )
        if check_meta is not None:
            check_meta(meta, path)
        damage = self._structure_damage(step, abstract_state, path) or _agreed(self._verify(step))
        if damage:
            return self._set_aside(path, damage)
        try:
            state, data, meta = self.restore(step, abstract_state)
        except Exception as e:
            return self._set_aside(path, f"its arrays cannot be read ({_brief(e)})")
        bad = non_finite(state)
        if bad:
            return self._set_aside(path, f"it holds non-finite values in {', '.join(bad[:5])}")
        return state, data, meta

    def _structure_damage(self, step: int, abstract_state: Any, path: str) -> str | None:
        """Raises IncompatibleCheckpoint when the saved tree is not the one this run holds;
        returns the damage when the tree's own metadata cannot be read."""
        try:
            saved = _signature(self.manager.item_metadata(step)["state"])
        except Exception as e:
            return f"its array metadata cannot be read ({_brief(e)})"
        wanted = _signature(abstract_state)
        if saved == wanted:
            return None
        only_saved = sorted(set(saved) - set(wanted))
        only_here = sorted(set(wanted) - set(saved))
        other = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
        parts = []
        if only_saved:
            parts.append(f"{len(only_saved)} arrays only there (e.g. {only_saved[0]})")
        if only_here:
            parts.append(f"{len(only_here)} arrays only here (e.g. {only_here[0]})")
        if other:
            parts.append(
                f"{len(other)} of other shape or dtype (e.g. {other[0]}: {saved[other[0]]} "
                f"there, {wanted[other[0]]} here)"
            )
        raise IncompatibleCheckpoint(
            f"checkpoint {path} holds another train state than this run ({'; '.join(parts)}): "
            f"another model, optimizer or bert_jax version wrote it"
        )

    def _verify(self, step: int) -> str | None:
        """The checksum failures among the files this process verifies, or None."""
        problems = verify_checksums(self.step_dir(step), jax.process_index(), jax.process_count())
        return f"{len(problems)} file(s) fail their checksums ({problems[0]})" if problems else None

    def damaged(self) -> list[str]:
        """The step folders set aside as damaged, by name."""
        return [n for n in files.listdir(self.directory) if _DAMAGED.match(n)]

    def _set_aside(self, path: str, reason: str) -> None:
        """Warns, and renames a damaged checkpoint out of the way (kept for inspection, no
        longer a step, so the run can save that step again). Returns None."""
        aside = f"{path}.damaged-{int(time.time())}"
        warnings.warn(
            f"checkpoint {path} is damaged: {reason}; moved to {aside}, trying the one before",
            stacklevel=4,
        )
        if jax.process_index() == 0:
            files.rename(path, aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"bert_jax: set aside {path}")
        self.manager.reload()

    def _prune(self) -> None:
        """The keep policy: the newest `max_to_keep` steps and every `keep_period`-th, applied
        only to steps older than the newest save this process waited for and recorded (the
        same step on every process, so all take the same decision)."""
        if self._verified is None:
            return
        steps = sorted(self.manager.all_steps())
        keep = set(steps[-self.max_to_keep :]) if self.max_to_keep else set(steps)
        if self.keep_period:
            keep |= {s for s in steps if s % self.keep_period == 0}
        for step in steps:
            if step < self._verified and step not in keep:
                self.manager.delete(step)

    def close(self) -> None:
        self.wait()
        self._prune()
        try:
            self.manager.close()
        except Exception:
            if not self._reported:  # orbax raises a failure again that wait() reported
                raise


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ShapeDtypeStruct) of `tree`, over all devices."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def non_finite(state: Any) -> list[str]:
    """Paths of the floating-point arrays of `state` that hold a NaN or an infinity.

    Each process checks the shards it holds, on the host (no device program: multi-device
    programs queued behind a restore's transfers can deadlock XLA:CPU's collectives, and a
    restore is rare enough for one host copy), and all processes learn the verdict."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    floats = [(p, x) for p, x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    verdicts = [
        [np.isfinite(np.asarray(s.data)).all() for s in x.addressable_shards if s.replica_id == 0]
        for _, x in floats
    ]
    bad = [
        "/".join(_key(k) for k in p)
        for (p, _), ok in zip(floats, verdicts, strict=True)
        if not all(ok)
    ]
    if jax.process_count() > 1:
        anyone = multihost_utils.process_allgather(np.array(bool(bad))).any()
        if anyone and not bad:
            bad = ["arrays held by another process"]
    return bad


def _signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """path -> (shape, dtype) of every array, with dict keys, sequence indices and attribute
    names spelled alike (orbax's metadata tree and a TrainState of ShapeDtypeStructs)."""
    return {
        "/".join(_key(k) for k in path): (tuple(x.shape), str(np.dtype(x.dtype)))
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _key(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _owner(relpath: str) -> int:
    """The process that wrote a file of a step folder: orbax's `ocdbt.process_<i>` folders
    are process i's; everything else is process 0's."""
    match = _PROCESS_DIR.search(relpath)
    return int(match.group(1)) if match else 0


def _checksum_path(step_dir: str, process: int) -> str:
    return os.path.join(step_dir, "checksums", f"process_{process}.json")


def _step_files(step_dir: str) -> list[str]:
    return [f for f in files.walk_files(step_dir) if not f.startswith("checksums/")]


def file_checksum(path: str) -> str:
    """XXH3-128 of a file's bytes: a checksum for accidental damage (flipped, lost or foreign
    bytes), several GB/s on one core where SHA-256 manages about one."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(1 << 23)
    view = memoryview(buffer)
    with files.open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def write_checksums(step_dir: str, process: int) -> None:
    """Records the checksum of every file of `step_dir` that `process` wrote."""
    mine = [f for f in _step_files(step_dir) if _owner(f) == process]
    digests = {f: file_checksum(os.path.join(step_dir, f)) for f in mine}
    record = {"algorithm": CHECKSUM, "process": process, "files": digests}
    files.atomic_write(_checksum_path(step_dir, process), json.dumps(record, indent=1).encode())


def verify_checksums(step_dir: str, process: int = 0, process_count: int = 1) -> list[str]:
    """Files of `step_dir` that are missing or differ from their recorded checksum, among
    the records `process` verifies (record j goes to process j % process_count). A step
    without records (written before checksums existed, or cut off between the save and its
    record) has nothing to verify: its arrays are still checked finite when restored."""
    problems = []
    for record_file in files.glob(os.path.join(step_dir, "checksums", "process_*.json")):
        try:
            record = json.loads(files.read_bytes(record_file))
        except (OSError, ValueError) as e:
            problems.append(f"{record_file} is unreadable ({e})")
            continue
        if record.get("process", 0) % process_count != process:
            continue
        if record.get("algorithm") != CHECKSUM:
            problems.append(f"{record_file} uses checksum {record.get('algorithm')!r}")
            continue
        for relpath, digest in record["files"].items():
            path = os.path.join(step_dir, relpath)
            if not files.isfile(path):
                problems.append(f"{relpath} is missing")
            elif file_checksum(path) != digest:
                problems.append(f"{relpath} differs from its checksum")
    return problems


def _agreed(problem: str | None) -> str | None:
    """Every process learns whether any found damage (each verified its share)."""
    if jax.process_count() == 1:
        return problem
    anyone = multihost_utils.process_allgather(np.array(problem is not None)).any()
    return problem or ("another process found files that fail their checksums" if anyone else None)


def _is_disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error) or "RESOURCE_EXHAUSTED" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _brief(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error)[:200]}"


def preflight(directory: str, checkpoint_bytes: int = 0, saves: int = 1) -> None:
    """Fails now, not hours later, when checkpoints could not be written to `directory`.

    Raises:
      PermissionError when the directory cannot be created or written;
      files.DiskFullError when it has less free space than `saves` more checkpoints of
      `checkpoint_bytes` (the kept ones plus the one being written).
    """
    problem = files.writable_problem(directory, "checkpoints")
    if problem:
        raise PermissionError(problem)
    if checkpoint_bytes:
        files.require_free(
            directory,
            saves * (checkpoint_bytes + _OVERHEAD_BYTES),
            f"{saves} more checkpoint(s) of {checkpoint_bytes / 2**20:.1f} MiB (the kept ones and "
            f"the one being written)",
        )


def read_meta(step_dir: str) -> dict | None:
    """The metadata item of a step folder, read without a manager (nothing is created or
    cleaned up); None when it has none."""
    path = os.path.join(step_dir, "meta", "metadata")
    if not files.isfile(path):
        return None
    return json.loads(files.read_bytes(path))


def restore_subtree(
    directory: str,
    step: int,
    path: tuple[str, ...],
    abstract: Any,
    root: tuple[str, ...] = ("params",),
) -> Any:
    """One subtree of a checkpoint's state, read alone: for example the encoder (`("bert",)`
    of the parameters) of a pretraining checkpoint for a fine-tuning model whose head starts
    fresh, or (with `root=()`) the optimizer state `("opt_state",)`.

    Args:
      directory: the checkpoints folder of a run.
      step: which checkpoint.
      path: keys under `root`, e.g. `("bert",)`.
      abstract: ShapeDtypeStructs (with shardings) of that subtree in the new model.
      root: where `path` starts in the saved train state.

    Raises:
      ValueError naming the checkpoint when the subtree does not fit `abstract`.
    """
    target: Any = abstract
    for key in reversed((*root, *path)):
        target = {key: target}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.CheckpointManager(files.absolute(directory), item_names=("state",)) as manager:
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        target, restore_args=restore_args, partial_restore=True
                    )
                ),
            )["state"]
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"{'/'.join((*root, *path))} of checkpoint {directory}/{step} does not fit "
                f"the model: {str(e)[:300]}"
            ) from e
    node = restored
    for key in (*root, *path):
        node = node[key]
    # Orbax hands back the target's own placeholders for keys the checkpoint does not have.
    if any(not isinstance(x, jax.Array) for x in jax.tree.leaves(node)):
        raise ValueError(
            f"checkpoint {directory}/{step} has no {'/'.join((*root, *path))} (or only part of it)"
        )
    return node
