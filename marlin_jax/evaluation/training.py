"""The supervised training loop shared by linear probing and fine-tuning.

As MARLIN's ``model/classifier.py``: BCE with logits (binary / multilabel) or softmax CE
(multiclass), Adam (0.5, 0.9, lr 1e-4), reduce-on-plateau of the training loss, stop at lr 1e-6,
keep the best validation epoch. Ours: validation metrics on the whole split, optional
``patience`` and L2 ``weight_decay``, and resuming (``state_dir``, see :func:`fit`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from marlin_jax.distributed import any_process, host_value
from marlin_jax.evaluation.scores import LabelKind
from marlin_jax.preemption import SigtermFlag
from marlin_jax.train.checkpointing import DATA_ITER, Checkpointer
from marlin_jax.train.state import make_optimizer, set_learning_rate

Params = Any  # a pure nested dict of arrays (``nnx.to_pure_dict``): paths match sharding rules

STATE_FORMAT = 3  # version of the JSON part of a training-state checkpoint (3: Checkpointer)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """Hyper-parameters of a supervised run: the one place of their defaults (the original
    CelebV-HQ runs; ``marlin_jax.evaluate.default_config`` reads them from here)."""

    learning_rate: float = 1e-4
    b1: float = 0.5
    b2: float = 0.9
    max_epochs: int = 2000
    batch_size: int = 32
    monitor: str = "auroc"  # validation metric to maximise
    patience: int | None = None  # epochs without validation improvement before stopping
    plateau_patience: int = 7
    plateau_factor: float = 0.5
    min_lr: float = 1e-8
    stop_lr: float = 1e-6
    weight_decay: float = 0.0  # L2 penalty wd/2 * sum(kernel**2) added to the training loss
    seed: int = 0

    def optimizer(self) -> optax.GradientTransformation:
        """Adam with these betas (the trainer's factory; the step sets the learning rate)."""
        return make_optimizer(b1=self.b1, b2=self.b2)


def classification_loss(logits: jax.Array, labels: jax.Array, task: LabelKind) -> jax.Array:
    """Mean loss of logits ``(B, C)`` (``(B, 1)`` or ``(B,)`` for binary) against labels
    (bool ``(B,)`` / bool ``(B, L)`` / int ``(B,)``)."""
    if task == "multiclass":
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels.astype(jnp.int32)).mean()
    if task == "binary":
        logits = logits.reshape(labels.shape)
    elif task != "multilabel":
        raise ValueError(f"unknown task {task!r}")
    return optax.sigmoid_binary_cross_entropy(
        logits.astype(jnp.float32), labels.astype(jnp.float32)).mean()


class Plateau(NamedTuple):
    """Reduce-on-plateau state (PyTorch ``ReduceLROnPlateau``, mode min, relative threshold)."""

    lr: float
    best: float = math.inf
    num_bad: int = 0


def plateau_step(state: Plateau, value: float, *, factor: float, patience: int, min_lr: float,
                 threshold: float = 1e-4) -> Plateau:
    """Updates the schedule with this epoch's monitored value (lower is better)."""
    if value < state.best * (1.0 - threshold):
        return Plateau(state.lr, value, 0)
    num_bad = state.num_bad + 1
    if num_bad > patience:
        return Plateau(max(state.lr * factor, min_lr), state.best, 0)
    return Plateau(state.lr, state.best, num_bad)


def l2_penalty(params: Params) -> jax.Array:
    """``0.5 * sum(w**2)`` over the weight matrices / kernels (leaves of rank >= 2): biases and
    normalisation scales are not decayed."""
    squares = [jnp.sum(jnp.square(w.astype(jnp.float32)))
               for w in jax.tree.leaves(params) if w.ndim >= 2]
    return 0.5 * sum(squares, jnp.float32(0.0))


def make_train_step(graphdef: nnx.GraphDef, task: LabelKind, tx: optax.GradientTransformation,
                    preprocess: Callable[[jax.Array], jax.Array] | None = None,
                    weight_decay: float = 0.0) -> Callable:
    """``step(params, opt_state, rest, x, y, lr) -> (params, opt_state, loss)``, unjitted.

    ``tx``: :meth:`FitOptions.optimizer`; ``rest``: the model's non-parameter state;
    ``preprocess`` maps the raw batch inside the step; the loss includes
    ``weight_decay * l2_penalty(params)``.
    """

    forward = make_forward(graphdef, preprocess)

    def loss_fn(params, rest, x, y):
        loss = classification_loss(forward(params, rest, x), y, task)
        if weight_decay:
            loss = loss + weight_decay * l2_penalty(params)
        return loss

    def step(params, opt_state, rest, x, y, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, x, y)
        updates, opt_state = tx.update(grads, set_learning_rate(opt_state, lr), params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_forward(graphdef: nnx.GraphDef, preprocess: Callable[[jax.Array], jax.Array] | None = None,
                 method: str = "__call__") -> Callable:
    """``forward(params, rest, x) -> logits`` (or another ``method``'s output; float32), unjitted."""

    def forward(params, rest, x):
        model = nnx.merge(graphdef, params, rest)
        return getattr(model, method)(preprocess(x) if preprocess is not None else x).astype(jnp.float32)

    return forward


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Params, nnx.State]:
    """``(graphdef, params as a pure dict, other state)`` of a module."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def set_model_params(model: nnx.Module, params: Params) -> None:
    """Writes pure-dict ``params`` into ``model``'s parameters (in place)."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


@dataclasses.dataclass
class FitResult:
    """Outcome of :func:`fit`. ``resumed_at``: ``(epoch, batch)`` restored from ``state_dir``
    (None: fresh); ``already_finished``: the restored run had finished, nothing was trained."""

    params: Params
    best_epoch: int
    best_metric: float
    history: list[dict[str, float]]
    stop_reason: str
    resumed_at: tuple[int, int] | None = None
    already_finished: bool = False


class Preempted(Exception):  # noqa: N818  (a signal, not an error of the run)
    """SIGTERM arrived: the loop state was saved in ``directory``; a rerun continues at batch
    ``batch`` of ``epoch`` (``num_batches``: its validation)."""

    def __init__(self, directory: str, epoch: int, batch: int = 0, num_batches: int = 0):
        self.directory, self.epoch, self.batch = directory, epoch, batch
        if batch == 0:
            where = f"after epoch {epoch - 1}"
        elif batch >= num_batches:
            where = f"in epoch {epoch} before its validation"
        else:
            where = f"in epoch {epoch} after {batch} of {num_batches} batches"
        super().__init__(f"SIGTERM: stopped {where}, saved in {directory}; rerun the same "
                         "command to resume")


class CheckpointMismatchError(ValueError):
    """The state directory holds a checkpoint of a different run (config, shapes or data)."""


@dataclasses.dataclass(frozen=True)
class LoopState:
    """Host-side, JSON-able state of :func:`fit`: ``next_epoch`` epochs done plus ``next_batch``
    batches of the next, whose losses sum (float64, in order) to ``loss_sum``; ``stop_reason``
    is set once the run has finished."""

    schedule: Plateau
    next_epoch: int = 0
    next_batch: int = 0
    loss_sum: float = 0.0
    best_metric: float = -math.inf
    best_epoch: int = -1
    history: tuple[dict[str, float], ...] = ()
    stop_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "schedule": self.schedule._asdict(),
                "history": list(self.history)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoopState:
        return cls(**{**d, "schedule": Plateau(**d["schedule"]), "history": tuple(d["history"])})

    def add_losses(self, losses: list[jax.Array]) -> LoopState:
        """The state after the batches whose losses ``[(k,), ...]`` are given (in order)."""
        total = self.loss_sum
        values = [float(v) for chunk in losses for v in np.asarray(host_value(chunk), np.float64).ravel()]
        for value in values:
            total += value
        return dataclasses.replace(self, next_batch=self.next_batch + len(values), loss_sum=total)

    def stop_reason_for(self, options: FitOptions) -> str | None:
        """Why training ends before epoch ``next_epoch`` (None: it continues)."""
        last = self.next_epoch - 1
        if options.patience is not None and last >= 0 and last - self.best_epoch >= options.patience:
            return f"no validation improvement for {options.patience} epochs"
        if self.schedule.lr <= options.stop_lr:
            return f"learning rate {self.schedule.lr:.2e} <= {options.stop_lr:.0e}"
        if self.next_epoch >= options.max_epochs:
            return f"max_epochs ({options.max_epochs})"
        return None


def _plain(x: Any) -> Any:
    """JSON-normal form (tuples -> lists, numpy scalars -> Python), for comparisons."""
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def param_signature(params: Params) -> dict[str, str]:
    """``{"a/b/kernel": "float32[192,3]"}``: the shapes and dtypes a checkpoint must match."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
            f"{jnp.dtype(a.dtype).name}{list(a.shape)}" for path, a in flat}


def array_digest(*arrays: Any) -> str:
    """A short content hash of arrays / strings (the data identity of a run)."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, str):
            h.update(a.encode())
        else:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` of nested dicts."""
    if not isinstance(d, dict):
        return {prefix: d}
    return {key: leaf for k, v in d.items()
            for key, leaf in _flat(v, f"{prefix}.{k}" if prefix else str(k)).items()}


def check_identity(directory: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raises CheckpointMismatchError naming ``directory`` and every differing (dotted) key when
    the identities differ."""
    a, b = _flat(_plain(dict(saved))), _flat(_plain(dict(current)))
    missing = object()
    diffs = [f"{k}: saved {a.get(k, '(absent)')!r}, now {b.get(k, '(absent)')!r}"
             for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; ... ({len(diffs)} differences)"
                                        if len(diffs) > 6 else "")
        raise CheckpointMismatchError(
            f"{directory}: holds the checkpoint of a different run ({shown}). Use another "
            "workdir, or start over with fresh_start=True (--config.fresh_start=True), which "
            "deletes it.")


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with the arrays' shardings) of a pytree: a restore target."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
        tree)


def _steps(directory: str) -> list[int]:
    """The finished step folders of ``directory`` (orbax renames a step into place when done),
    listed without opening a manager: a reader beside a running writer changes nothing."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _state_json(loop: LoopState, identity: Mapping[str, Any], best_in_state: bool) -> Any:
    """The JSON part of a training-state checkpoint, as the Checkpointer's ``data_iter`` item."""
    meta = {"format": STATE_FORMAT, "loop": loop.to_json(), "identity": identity,
            "best_in_state": best_in_state}
    return types.SimpleNamespace(get_state=json.dumps(meta).encode)


def _read_state_json(directory: str, step: int) -> dict[str, Any]:
    """The JSON part of training-state checkpoint ``step`` (format-checked; any process's copy)."""
    files = sorted(Path(directory, str(step), DATA_ITER).glob("process_*.json"))
    try:
        meta = json.loads(files[0].read_text()) if files else None
    except (OSError, ValueError) as e:
        raise CheckpointMismatchError(f"{files[0]}: unreadable training state ({e})") from e
    if not isinstance(meta, Mapping) or meta.get("format") != STATE_FORMAT:
        found = meta.get("format") if isinstance(meta, Mapping) else None
        raise CheckpointMismatchError(
            f"{directory}: not a training-state checkpoint of format {STATE_FORMAT} (found "
            f"{found!r}); finish that run with the version that wrote it, or start over with "
            "fresh_start=True")
    return dict(meta)


def read_training_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON part (``{"format", "loop", "identity", "best_in_state"}``) of the newest
    training-state checkpoint in ``directory``, or None when there is none. Reads only."""
    directory = os.path.abspath(os.fspath(directory))
    steps = _steps(directory)
    return _read_state_json(directory, steps[-1]) if steps else None


def restore_best(directory: str | os.PathLike, params_like: Params) -> Params:
    """Loads the best parameters saved in ``directory`` into the structure of ``params_like``."""
    directory = os.path.abspath(os.fspath(directory))
    steps = _steps(directory)
    if not steps:
        raise FileNotFoundError(f"{directory}: no checkpoint to restore")
    with Checkpointer(directory, async_save=False) as best:
        return best.restore(steps[-1], _abstract(params_like))


def _delete_steps(directory: str) -> None:
    """Removes the step folders of ``directory`` (process 0; the others wait at a barrier)."""
    if jax.process_index() == 0:
        for step in _steps(directory):
            shutil.rmtree(os.path.join(directory, str(step)))
    any_process(False)


class _Checkpoints:
    """The best parameters (in memory; on disk in ``checkpoint_dir``, step = epoch), the loop
    state (``state_dir``) and the one save / stop decision. The best are written right after the
    state that carries them (``best_pending``), so an interruption between the two loses nothing."""

    def __init__(self, checkpoint_dir: str | os.PathLike | None, state_dir: str | os.PathLike | None,
                 identity: dict[str, Any], save_every_s: float, fresh_start: bool,
                 log: Callable[[str], None]):
        self.identity = identity
        self.best_dir = os.path.abspath(checkpoint_dir) if checkpoint_dir else None
        self.state_dir = os.path.abspath(state_dir) if state_dir is not None else None
        self.save_every_s = save_every_s
        self.sigterm = SigtermFlag("SIGTERM received: saving after the current training step",
                                   enabled=self.state_dir is not None)
        self.best_params: Params | None = None
        self.best_pending = False  # best_params not yet in best_dir
        self.last_save = time.monotonic()
        if fresh_start and self.state_dir is not None:
            log(f"fresh start: deleting the checkpoints in {self.state_dir} and {self.best_dir}")
            _delete_steps(self.state_dir)
            _delete_steps(self.best_dir)
        self.best = self.state = None
        try:
            if self.best_dir:
                self.best = Checkpointer(self.best_dir, max_to_keep=1, async_save=False)
            if self.state_dir is not None:
                self.state = Checkpointer(self.state_dir, max_to_keep=1, async_save=False)
        except BaseException:  # the one already open is closed
            self.close()
            raise

    def close(self) -> None:
        for ckpt in (self.best, self.state):
            if ckpt is not None:
                ckpt.close()

    def new_best(self, epoch: int, params: Params) -> None:
        """Epoch ``epoch`` improved: its parameters are kept (saved now without a state dir)."""
        self.best_params = jax.tree.map(jnp.copy, params)
        self.best_pending = True
        if self.state is None and self.best is not None:
            self._write_best(epoch)

    def _write_best(self, epoch: int) -> None:
        self.best.save(epoch, self.best_params)
        self.best_pending = False

    def save(self, params: Params, opt_state: Any, loop: LoopState) -> None:
        """The loop state (with the best parameters while pending), then the best parameters."""
        state = {"params": params, "opt_state": opt_state}
        if self.best_pending:
            state["best"] = self.best_params
        step = self.state.latest_step()
        self.state.save(0 if step is None else step + 1, state,
                        _state_json(loop, self.identity, self.best_pending))
        if self.best_pending:
            self._write_best(loop.best_epoch)
        self.last_save = time.monotonic()

    def safe_point(self, params: Params, opt_state: Any, loop: LoopState, num_batches: int,
                   pending: list[jax.Array], *, mid_epoch: bool = False) -> LoopState:
        """The one save / stop decision, agreed by all processes: saves on SIGTERM (then raises
        Preempted unless the run has finished), when due (every ``save_every_s``; mid-epoch
        only when > 0) and when the run has finished. ``pending`` losses are added to the saved
        loop (and emptied); returns the loop."""
        if self.state is None:
            return loop
        elapsed = time.monotonic() - self.last_save
        stop, due = any_process(self.sigterm.requested, elapsed >= self.save_every_s and
                                (self.save_every_s > 0 or not mid_epoch))
        finished = loop.stop_reason is not None
        if stop or due or finished:
            loop = loop.add_losses(pending)
            pending.clear()
            self.save(params, opt_state, loop)
        if stop and not finished:
            raise Preempted(self.state_dir, loop.next_epoch, loop.next_batch, num_batches)
        return loop

    def resume(self, params: Params, opt_state: Any) -> tuple[Params, Any, LoopState] | None:
        """``(params, opt_state, loop)`` of the newest state checkpoint, which must belong to
        this run (None: there is none); sets the best parameters and repairs a best checkpoint
        that lags behind the state."""
        step = self.state.latest_step()
        best_steps = self.best.all_steps()
        if step is None:
            if best_steps:
                raise FileExistsError(
                    f"{self.best_dir}: holds best-parameter checkpoints (epochs {best_steps}) but "
                    f"{self.state_dir} has no training state to resume; use another workdir or "
                    "fresh_start=True")
            return None
        meta = _read_state_json(self.state_dir, step)
        check_identity(self.state_dir, meta["identity"], self.identity)
        loop = LoopState.from_json(meta["loop"])
        target = {"params": params, "opt_state": opt_state}
        if meta["best_in_state"]:
            target["best"] = params
        restored = self.state.restore(step, _abstract(target))
        if loop.best_epoch < 0:
            self.best.close()  # reopened empty: orbax must not remember the deleted steps
            _delete_steps(self.best_dir)
            self.best = Checkpointer(self.best_dir, max_to_keep=1, async_save=False)
        elif meta["best_in_state"]:
            self.best_params = restored["best"]
            if loop.best_epoch not in best_steps:
                self._write_best(loop.best_epoch)
        elif loop.best_epoch in best_steps:
            self.best_params = self.best.restore(loop.best_epoch, _abstract(params))
        else:
            raise FileNotFoundError(f"{self.best_dir}: the best checkpoint (epoch "
                                    f"{loop.best_epoch}) recorded by the training state is "
                                    "missing")
        return restored["params"], restored["opt_state"], loop


def fit(
    params: Params,
    *,
    run_epoch: Callable[[Params, Any, float, int, int], Iterator[tuple[Params, Any, jax.Array]]],
    steps_per_epoch: int,
    validate: Callable[[Params, Callable[[], bool]], Mapping[str, float] | None],
    init_opt_state: Callable[[Params], Any],
    options: FitOptions,
    checkpoint_dir: str | os.PathLike | None = None,
    state_dir: str | os.PathLike | None = None,
    run_id: Mapping[str, Any] | None = None,
    fresh_start: bool = False,
    save_every_s: float = 0.0,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Trains until the learning rate decays to ``stop_lr``, ``patience`` epochs pass without a
    validation improvement, or ``max_epochs``; returns the best-validation parameters.

    Args:
      params: initial trainable parameters.
      run_epoch: ``(params, opt_state, lr, epoch, start_batch)`` -> generator training batches
        ``start_batch ..< steps_per_epoch`` of ``epoch``, yielding ``(params, opt_state, losses
        (k,))`` after every ``k >= 1`` of them; batch ``b`` of epoch ``e`` must derive from
        ``(options.seed, e, b)`` only (resume).
      steps_per_epoch: the number of batches of an epoch.
      validate: ``(params, stop) -> metrics`` (with ``options.monitor``), or None when it gave
        up because ``stop()`` became true (SIGTERM).
      init_opt_state: ``params -> optimiser state``.
      checkpoint_dir: where the best parameters are saved (None: memory only).
      state_dir: where the training state is saved (needs ``checkpoint_dir``): a checkpoint of
        this run is continued (a finished one returned untrained), one of another run (options,
        shapes, ``run_id``) raises CheckpointMismatchError; SIGTERM saves and raises Preempted.
      run_id: JSON-able identity of the run beyond options and shapes (e.g. a data digest).
      fresh_start: delete the checkpoints in ``state_dir`` and ``checkpoint_dir`` first.
      save_every_s: least seconds between two state saves (0: at every epoch end only); the
        last epoch and SIGTERM are always saved.
    """
    if state_dir is not None and checkpoint_dir is None:
        raise ValueError("state_dir needs checkpoint_dir (the best parameters are kept there)")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    identity = _plain({"options": dataclasses.asdict(options), "params": param_signature(params),
                       "run": dict(run_id or {})})  # what makes two runs the same run
    ckpts = _Checkpoints(checkpoint_dir, state_dir, identity, save_every_s, fresh_start, log)
    try:
        opt_state = init_opt_state(params)
        resumed = ckpts.resume(params, opt_state) if ckpts.state is not None else None
        if resumed is None:
            loop = LoopState(schedule=Plateau(lr=options.learning_rate))
            loop = dataclasses.replace(loop, stop_reason=loop.stop_reason_for(options))
        else:
            params, opt_state, loop = resumed
            if loop.stop_reason is not None:
                log(f"{ckpts.state_dir}: this run already finished ({loop.stop_reason}); "
                    "not training")
            else:
                log(f"resuming from {ckpts.state_dir}: epoch {loop.next_epoch}, batch "
                    f"{loop.next_batch} (lr {loop.schedule.lr:.2e}, best val_"
                    f"{options.monitor} {loop.best_metric:.4f} at epoch {loop.best_epoch})")
        with ckpts.sigterm:
            while loop.stop_reason is None:
                params, opt_state, loop = _epoch(params, opt_state, loop, run_epoch, steps_per_epoch,
                                                 validate, options, ckpts, log)
    except Preempted as e:
        log(str(e))
        raise
    finally:
        ckpts.close()
    if ckpts.best_params is None:
        raise RuntimeError(f"no epoch produced a finite validation {options.monitor}; "
                           "is a class missing from the validation split?")
    log(f"stopped: {loop.stop_reason}; best epoch {loop.best_epoch} "
        f"(val_{options.monitor} {loop.best_metric:.4f})")
    start = None if resumed is None else resumed[2]
    return FitResult(ckpts.best_params, loop.best_epoch, loop.best_metric, list(loop.history),
                     str(loop.stop_reason), None if start is None else (start.next_epoch, start.next_batch),
                     start is not None and start.stop_reason is not None)


def _epoch(params, opt_state, loop: LoopState, run_epoch, steps_per_epoch: int, validate,
           options: FitOptions, ckpts: _Checkpoints, log: Callable[[str], None]
           ) -> tuple[Params, Any, LoopState]:
    """Trains the rest of epoch ``loop.next_epoch`` (a safe point after every unit of work),
    validates it, steps the schedule, keeps the best and decides on saving and stopping."""
    t0 = time.perf_counter()
    epoch, lr = loop.next_epoch, loop.schedule.lr
    pending: list[jax.Array] = []  # losses of batches not yet added to loop.loss_sum
    done = loop.next_batch
    with contextlib.closing(run_epoch(params, opt_state, lr, epoch, done)) as steps:
        for params, opt_state, losses in steps:
            pending.append(losses)
            done += len(losses)
            if done < steps_per_epoch:
                loop = ckpts.safe_point(params, opt_state, loop, steps_per_epoch, pending, mid_epoch=True)
    loop = loop.add_losses(pending)
    if loop.next_batch != steps_per_epoch:
        raise RuntimeError(f"run_epoch trained {loop.next_batch} batches of epoch {epoch}, "
                           f"expected {steps_per_epoch}")
    train_loss = loop.loss_sum / steps_per_epoch
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"epoch {epoch}: training loss is {train_loss}")
    val = validate(params, lambda: any_process(ckpts.sigterm.requested)[0])
    if val is None:  # SIGTERM during validation: saved trained, not validated (a rerun validates)
        if not any_process(ckpts.sigterm.requested)[0]:
            raise RuntimeError("validate returned None without a stop request")
        ckpts.save(params, opt_state, loop)
        raise Preempted(ckpts.state_dir, loop.next_epoch, loop.next_batch, steps_per_epoch)
    if options.monitor not in val:
        raise KeyError(f"validation metrics lack {options.monitor!r}: {sorted(val)}")
    score = float(val[options.monitor])
    record = {"epoch": epoch, "lr": lr, "train_loss": train_loss,
              **{f"val_{k}": float(v) for k, v in val.items()},
              "seconds": time.perf_counter() - t0}
    improved = math.isfinite(score) and score > loop.best_metric
    log(f"epoch {epoch:4d}  lr {lr:.2e}  train_loss {train_loss:.4f}  "
        f"val_{options.monitor} {score:.4f}{'  *' if improved else ''}")
    schedule = plateau_step(loop.schedule, train_loss, factor=options.plateau_factor,
                            patience=options.plateau_patience, min_lr=options.min_lr)
    loop = dataclasses.replace(
        loop, next_epoch=epoch + 1, next_batch=0, loss_sum=0.0, schedule=schedule,
        history=(*loop.history, record),
        **({"best_metric": score, "best_epoch": epoch} if improved else {}))
    loop = dataclasses.replace(loop, stop_reason=loop.stop_reason_for(options))
    if improved:
        ckpts.new_best(epoch, params)
    return params, opt_state, ckpts.safe_point(params, opt_state, loop, steps_per_epoch, [])
