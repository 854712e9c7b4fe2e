"""Orbax checkpoints of a run: the train state, the input iterator's state and the config.

Saves are asynchronous (training goes on while the arrays are written) and atomic (orbax
writes a temporary directory and renames it when complete), so a crash mid-save leaves the
previous checkpoint intact. Restoring places every array straight into its target sharding.
"""

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores (train state, data iterator state, config) under one directory."""

    def __init__(self, directory: str, *, max_to_keep: int = 3):
        directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "data", "config"),
        )
        self.directory = directory

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: dict, config: dict) -> None:
        """Starts an asynchronous save of `step`; the caller decides when one is due."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data iterator state, config) of `step`, arrays placed as `abstract_state`
        (a tree of `jax.ShapeDtypeStruct` with shardings) says."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"], restored["config"]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
