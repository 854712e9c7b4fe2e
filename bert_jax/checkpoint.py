"""Orbax checkpoints of a run: train state, input iterator state, config and tokenizer identity.

Saves are asynchronous (training goes on while the arrays are written) and atomic (orbax
writes a temporary directory and renames it when complete; old checkpoints are deleted only
after a newer one is complete), so a crash mid-save leaves the previous checkpoint intact.
Restoring places every array straight into its target sharding, whatever mesh wrote it, and
skips a damaged checkpoint for the newest readable one.
"""

import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class Checkpointer:
    """Saves and restores (train state, data iterator state, metadata) under one directory.

    Args:
      directory: where step folders go (created if missing).
      max_to_keep: the newest checkpoints kept.
      keep_period: also keep every checkpoint whose step is a multiple of this, forever.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, keep_period: int | None = None):
        self.directory = os.path.abspath(directory)
        preflight(self.directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, keep_period=keep_period or None, create=True
            ),
            item_names=("state", "data", "meta"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: dict, meta: dict) -> None:
        """Starts an asynchronous save of `step`; the caller decides when one is due."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

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
        return restored["state"], restored["data"], restored["meta"]

    def restore_latest(
        self, abstract_state: Any, check_meta: Callable[[dict, str], None] | None = None
    ) -> tuple[int, Any, dict, dict] | None:
        """The newest checkpoint that reads back whole, warning about each damaged one.

        Args:
          abstract_state: the target shapes, dtypes and shardings.
          check_meta: called with (metadata, path) before any array is read; raises when the
            checkpoint belongs to an incompatible run (that error is not swallowed).

        Returns:
          (step, state, data iterator state, metadata), or None when there is no checkpoint.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = os.path.join(self.directory, str(step))
            try:
                meta = self.read_meta(step)
            except Exception as e:  # unreadable metadata
                self._set_aside(path, e)
                continue
            if check_meta is not None:
                check_meta(meta, path)
            try:
                return (step, *self.restore(step, abstract_state))
            except Exception as e:  # truncated or missing array files
                self._set_aside(path, e)
        return None

    def _set_aside(self, path: str, error: Exception) -> None:
        """Warns, and renames a damaged checkpoint out of the way (kept for inspection, no
        longer a step, so the run can save that step again)."""
        aside = f"{path}.damaged-{int(time.time())}"
        warnings.warn(
            f"checkpoint {path} is damaged or incomplete ({type(error).__name__}: "
            f"{str(error)[:200]}); moved to {aside}, trying the one before",
            stacklevel=3,
        )
        if jax.process_index() == 0:
            os.replace(path, aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"bert_jax: set aside {path}")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def preflight(directory: str, bytes_needed: int = 0) -> None:
    """Fails now, not hours later, when checkpoints could not be written to `directory`.

    Raises:
      PermissionError when the directory cannot be created or written;
      OSError when it has less free space than `bytes_needed` (one checkpoint, twice over,
      since the previous one stays until the new one is complete).
    """
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".preflight"):
            pass
    except OSError as e:
        raise PermissionError(
            f"cannot write checkpoints to {directory} ({e.strerror}); choose a writable --workdir"
        ) from e
    free = shutil.disk_usage(directory).free
    if bytes_needed and free < 2 * bytes_needed:
        raise OSError(
            f"{directory} has {free / 2**30:.2f} GiB free but a checkpoint needs "
            f"{bytes_needed / 2**30:.2f} GiB (twice that while the previous one is kept); free "
            f"space or choose another --workdir"
        )


def restore_subtree(directory: str, step: int, path: tuple[str, ...], abstract: Any) -> Any:
    """One subtree of a checkpoint's parameters, read alone: for example the encoder
    (`("bert",)`) of a pretraining checkpoint for a fine-tuning model whose head starts fresh.

    Args:
      directory: the checkpoints folder of a run.
      step: which checkpoint.
      path: keys under `params`, e.g. `("bert",)`.
      abstract: ShapeDtypeStructs (with shardings) of that subtree in the new model.

    Raises:
      ValueError naming the checkpoint when the subtree does not fit `abstract`.
    """
    target: Any = abstract
    for key in reversed(("params", *path)):
        target = {key: target}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.CheckpointManager(os.path.abspath(directory), item_names=("state",)) as manager:
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
                f"params/{'/'.join(path)} of checkpoint {directory}/{step} does not fit the "
                f"model: {str(e)[:300]}"
            ) from e
    node = restored["params"]
    for key in path:
        node = node[key]
    # Orbax hands back the target's own placeholders for keys the checkpoint does not have.
    if any(not isinstance(x, jax.Array) for x in jax.tree.leaves(node)):
        raise ValueError(
            f"checkpoint {directory}/{step} has no params/{'/'.join(path)} (or only part of it)"
        )
    return node
