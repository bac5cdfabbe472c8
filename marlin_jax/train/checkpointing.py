"""Orbax checkpoints ``<directory>/<step>/`` of the train state (async, sharded; restored onto
any mesh) and the grain iterator (one JSON per process, so a resumed run sees the same batches).
A step that does not read back is renamed to ``<step>.damaged`` and the newest readable one
restored; a state saved in the other ``scan_layers`` layout is restored through :class:`OtherLayout`.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from marlin_jax.interop.checkpoints import TRAINER_DATA_ITER_ITEM as DATA_ITER
from marlin_jax.interop.checkpoints import TRAINER_STATE_ITEM as STATE

log = logging.getLogger(__name__)


class CheckpointLayoutError(ValueError):
    """A readable checkpoint whose arrays do not fit the run's train state (another model or
    layout): not damage, so it is left in place and the run stops."""


class SkippedStep(NamedTuple):
    """A damaged step that :meth:`Checkpointer.restore_newest` renamed aside."""

    step: int
    reason: str
    moved_to: str


class OtherLayout(NamedTuple):
    """Another layout a checkpoint's state may be saved in: its abstract state (with shardings)
    and the (jitted) conversion of a state restored in it to the run's layout."""

    abstract_state: Any
    convert: Callable[[Any], Any]


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` or anything it wraps (cause, context, exception group) is ENOSPC."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return False


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A one-line summary of ``exc`` (tensorstore specs and tracebacks cut off)."""
    text = (str(exc).strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0]
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shape_multiset(tree: Any) -> collections.Counter:
    return collections.Counter(tuple(x.shape) for x in jax.tree.leaves(tree)
                               if hasattr(x, "shape"))


class Checkpointer:
    """``ocp.CheckpointManager`` of step folders in ``directory`` (created; local or gs://),
    keeping the newest ``max_to_keep`` (None: all); ``async_save`` writes in the background."""

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

    def save(self, step: int, state: Any, data_iter: Any | None = None) -> bool:
        """Starts saving ``state`` (and the iterator position) as ``step``; returns whether a save
        was started. Array writes continue in the background (:meth:`wait`)."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """The state of checkpoint ``step`` laid out like ``abstract_state`` (``ShapeDtypeStruct``
        with shardings: any mesh); restores ``data_iter`` in place."""
        return self._restore_as_saved(step, abstract_state, data_iter, ())[0]

    def _restore_as_saved(self, step: int, abstract_state: Any, data_iter: Any | None,
                          other_layouts: Sequence[OtherLayout]) -> tuple[Any, Callable | None]:
        """Step's state in the layout it was saved in (one of ``other_layouts``, told apart by its
        array shapes, or the run's), and the conversion to the run's (or None)."""
        target, convert = abstract_state, None
        try:
            saved = self._saved_shapes(step)
        except Exception:  # noqa: BLE001  (a damaged step: the restore reports it)
            saved = None
        if saved is not None and saved != _shape_multiset(abstract_state):
            other = next((o for o in other_layouts if saved == _shape_multiset(o.abstract_state)), None)
            if other is not None:
                target, convert = other
        items = {STATE: ocp.args.StandardRestore(target)}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step}") from e
        return restored[STATE], convert

    def _saved_shapes(self, step: int) -> collections.Counter:
        """The array shapes of step's state, from its metadata."""
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(self.step_path(step)) / STATE)
        return _shape_multiset(getattr(meta, "tree", meta))

    def step_path(self, step: int) -> str:
        """The folder of checkpoint ``step``."""
        return os.path.join(self.directory, str(step))

    def restore_newest(self, abstract_state: Any, data_iter: Any | None = None, *,
                       rename: bool = True, other_layouts: Sequence[OtherLayout] = ()
                       ) -> tuple[int | None, Any, list[SkippedStep]]:
        """Restores the newest step that reads back: ``(step or None, state, skipped)``. Damaged
        steps are logged, renamed to ``<step>.damaged`` (if ``rename``) and skipped; a readable
        step that fits no layout raises :class:`CheckpointLayoutError` (left in place)."""
        skipped: list[SkippedStep] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, convert = self._restore_as_saved(step, abstract_state, data_iter,
                                                        other_layouts)
            except Exception as e:  # noqa: BLE001  (any read failure: classified below)
                reason = self._diagnose(step, abstract_state, e, other_layouts)
                moved = self._move_aside(step) if rename else self.step_path(step)
                self._manager.reload()  # forget the step (else a new save of it is refused)
                log.warning("checkpoint: skipped damaged step %d of %s (%s); renamed it to %s",
                            step, self.directory, reason, moved)
                skipped.append(SkippedStep(step, reason, moved))
                continue
            if convert is not None:
                log.info("checkpoint: step %d of %s was saved in another layout; converting it",
                         step, self.directory)
                state = convert(state)
            return step, state, skipped
        return None, None, skipped

    def _diagnose(self, step: int, abstract_state: Any, error: BaseException,
                  other_layouts: Sequence[OtherLayout] = ()) -> str:
        """Why step failed to restore, in a few words; raises CheckpointLayoutError when its
        metadata reads and its array shapes differ from ``abstract_state``'s (another run)."""
        folder = Path(self.step_path(step))
        for name in (STATE, f"{STATE}/_METADATA"):
            if not (folder / name).exists():
                return f"{name} is missing"
        try:
            saved = self._saved_shapes(step)
        except Exception as e:  # noqa: BLE001  (unreadable metadata: damage)
            return f"{STATE}/_METADATA unreadable: {first_line(e)}"
        wanted = _shape_multiset(abstract_state)
        fits = [wanted] + [_shape_multiset(o.abstract_state) for o in other_layouts]
        if saved and saved not in fits:
            extra = sorted((saved - wanted).elements())[:3]
            missing = sorted((wanted - saved).elements())[:3]
            raise CheckpointLayoutError(
                f"{folder}: the checkpoint's arrays do not fit this run's train state (saved "
                f"shapes not wanted: {extra}; wanted shapes not saved: {missing}): it holds "
                f"another model or layout. Orbax said: {first_line(error)}") from error
        wrapped = isinstance(error, FileNotFoundError) and error.__cause__ is not None
        return first_line(error.__cause__ if wrapped else error)

    def _move_aside(self, step: int) -> str:
        src = self.step_path(step)
        dst, n = src + ".damaged", 1
        while os.path.exists(dst):
            dst, n = f"{src}.damaged.{n}", n + 1
        os.rename(src, dst)
        return dst

    def wait(self) -> None:
        """Blocks until background writes are finished (and committed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()  # waits for background writes first

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
