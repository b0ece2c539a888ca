"""Orbax checkpointing of the train state and the data-iterator state, as two items.

* ``state``: any PyTree of jax arrays (params, optimizer state, step). Restored onto an abstract
  target (`jax.ShapeDtypeStruct`s carrying shardings), so each device reads only its shards.
* ``data``: a grain `DatasetIterator`'s position (optional), so a resumed run sees exactly the
  batches an uninterrupted run would have seen.

Saves are asynchronous by default; `wait()` blocks until the last one is on disk. Orbax writes
each step into a temporary directory and renames it when complete, so an interrupted save never
looks like a finished checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from unif2ace_jax.errors import UserError


def _grain_args():
    import grain.checkpoint as grain_ckpt  # imported lazily: only runs that checkpoint data need it

    return grain_ckpt.CheckpointSave, grain_ckpt.CheckpointRestore, grain_ckpt.CheckpointHandler


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints of a run under `directory`."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
                 async_save: bool = True, with_data: bool = True):
        self.directory = os.path.abspath(directory)
        self.with_data = with_data
        handlers = {"state": ocp.StandardCheckpointHandler()}
        if with_data:
            handlers["data"] = _grain_args()[2]()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False) -> bool:
        """Saves `state` (and the iterator position) at `step`; returns whether it saved."""
        items = {"state": ocp.args.StandardSave(state)}
        if self.with_data and data_iterator is not None:
            items["data"] = _grain_args()[0](data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None) -> Any:
        """Restores the state at `step` (default latest) onto `abstract_state`.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` with `.sharding` set (the restore
        lays arrays out as it says). `data_iterator`, if given, is moved to the saved position.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint found in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if self.with_data and data_iterator is not None:
            items["data"] = _grain_args()[1](data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s (with each array's sharding) for a tree of concrete arrays."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
