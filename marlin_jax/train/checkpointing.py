"""Orbax checkpoints of the train state and the grain data iterator.

A checkpoint ``<workdir>/checkpoints/<step>/`` holds two items:
``state`` (the TrainState pytree: both models' params, both optimiser states, step, rng; saved
asynchronously, sharded arrays written by their owners) and ``data_iter`` (one JSON per process
with the grain iterator position, so a resumed run sees exactly the batches it would have seen).
Orbax writes into a temporary directory and renames it when complete (atomic), keeps the last
``max_to_keep`` checkpoints, and restores onto any mesh given an abstract target with shardings.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE = "state"
DATA_ITER = "data_iter"


class Checkpointer:
    """Thin policy layer over ``ocp.CheckpointManager`` for the trainer.

    Args:
      directory: where step folders go (created; local path or gs://).
      max_to_keep: keep the newest K checkpoints (None = all).
      async_save: write arrays in a background thread (the step loop continues).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_save: bool = True):
        self.directory = os.fspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=1,
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE, DATA_ITER))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None when there is none)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any | None = None, *,
             force: bool = True) -> bool:
        """Starts saving ``state`` (and the iterator position) as ``step`` (the caller decides
        when); returns whether a save was started. Array writes continue in the background;
        call :meth:`wait`."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """The state of checkpoint ``step`` laid out like ``abstract_state`` (a pytree of
        ``jax.ShapeDtypeStruct`` with shardings: any mesh). Restores ``data_iter`` in place."""
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step}") from e
        return restored[STATE]

    def wait(self) -> None:
        """Blocks until background writes are finished (and committed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
