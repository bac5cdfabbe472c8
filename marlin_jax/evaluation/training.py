"""The supervised training loop shared by linear probing and fine-tuning.

It follows the original ``model/classifier.py`` + ``evaluate.py`` of MARLIN:

* loss: binary cross-entropy with logits (binary; multilabel over every flattened
  (sample, label) pair) or softmax cross-entropy (multiclass);
* optimiser: Adam with betas (0.5, 0.9), learning rate 1e-4, no weight decay (an optional L2
  penalty, ``FitOptions.weight_decay``, is ours: linear probes on high-dimensional features,
  e.g. every token of a clip, need it);
* schedule: reduce-on-plateau of the *training* loss (factor 0.5, patience 7, min 1e-8), and
  training stops once the learning rate has fallen to 1e-6 (``EarlyStoppingLR``);
* model selection: the epoch with the best validation metric (``val_auc``) is kept and
  checkpointed, then evaluated on the test split.

Differences, on purpose: the validation metric is computed on the whole split (the original
averages per-batch AUROCs), and an optional ``patience`` stops after that many epochs without
a validation improvement, so short runs need not wait for the learning rate to decay.

The model is any ``nnx.Module`` mapping a batch to logits; it is handled functionally
(``nnx.split`` into graph, parameters and other state) so the step is a pure jitted function.

Training is driven step by step: ``run_epoch(params, opt_state, lr, epoch, start_batch)`` is a
generator that trains batches ``start_batch, start_batch + 1, ...`` of the epoch and yields the
state after each unit of work (one batch for fine-tuning; the whole epoch, one ``lax.scan``,
for a linear probe) with that unit's per-batch losses. Between yields :func:`fit` may
checkpoint and stop, so the *position* inside an epoch is part of the loop state.

Resuming (``fit(..., state_dir=...)``): the whole loop state is checkpointed with orbax:
parameters, optimiser state, and as JSON the position (epoch, next batch, running sum of the
epoch's train losses), plateau schedule, best metric and epoch, history, stop reason and the
run identity. Saves happen at the end of an epoch once ``save_every_s`` have passed since the
last one (0: every epoch), and, when ``save_every_s > 0``, also between two training steps once
that time has passed. A rerun with the same ``state_dir`` continues from the saved position and
ends bitwise as an uninterrupted run would, because an epoch's data order and randomness derive
from ``(options.seed, epoch)`` only and a batch's from its index in the epoch (the contract of
``run_epoch``; :meth:`~marlin_jax.evaluation.datasets.ClipDataset.batches` skips to a batch
without decoding the ones before), and the train loss is a float64 sum of per-batch losses in
batch order whichever save points interrupted it. A checkpoint of a different run (options,
parameter shapes, data) is refused.

SIGTERM (preemption) sets a flag; the loop checks it after every unit of work and during
validation (``evaluate(params, stop)`` returns None once ``stop()``), so a fine-tuning run saves
within one training step (or one validation batch) of the signal, then raises
:class:`Preempted`. With several processes a signal to any of them stops all: the flag and the
time-based save decision are OR-ed across processes at each check, so all save together.
A save is synchronous: with a cluster's usual 30 s grace, one step plus one save of parameters
and Adam moments must fit in it (ViT-L: 3 x 1.2 GB).

The best parameters live in ``checkpoint_dir`` (the product of the run); the state checkpoint
also carries them while they are newer than that directory's copy (written right after the
state), so an interruption between the two writes loses nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from marlin_jax.distributed import any_process, host_value
from marlin_jax.evaluation.metrics import Task
from marlin_jax.preemption import SigtermFlag

logger = logging.getLogger(__name__)

Params = Any  # a pure nested dict of arrays (``nnx.to_pure_dict``): paths match sharding rules


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """Hyper-parameters of a supervised run (defaults: the original CelebV-HQ runs)."""

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


def classification_loss(logits: jax.Array, labels: jax.Array, task: Task) -> jax.Array:
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


def make_optimizer(options: FitOptions) -> optax.GradientTransformation:
    """Adam's moment estimates only; the (scheduled) learning rate is applied by the step."""
    return optax.scale_by_adam(b1=options.b1, b2=options.b2, eps=1e-8)


def make_train_step(
    graphdef: nnx.GraphDef,
    task: Task,
    tx: optax.GradientTransformation,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
    weight_decay: float = 0.0,
) -> Callable:
    """``step(params, opt_state, rest, x, y, lr) -> (params, opt_state, loss)``, unjitted.

    ``rest`` is the model's non-parameter state (e.g. fixed position tables); ``preprocess`` maps
    the raw batch inside the step (e.g. uint8 clips to float [0, 1]). ``weight_decay`` adds
    ``weight_decay * l2_penalty(params)`` to the loss (so the returned loss is the objective:
    for a binary probe, scikit-learn's ``LogisticRegression(C=1 / (weight_decay * N))`` scaled
    by ``1 / N``).
    """

    def loss_fn(params, rest, x, y):
        model = nnx.merge(graphdef, params, rest)
        logits = model(preprocess(x) if preprocess is not None else x)
        loss = classification_loss(logits, y, task)
        if weight_decay:
            loss = loss + weight_decay * l2_penalty(params)
        return loss

    def step(params, opt_state, rest, x, y, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_forward(graphdef: nnx.GraphDef,
                 preprocess: Callable[[jax.Array], jax.Array] | None = None) -> Callable:
    """``forward(params, rest, x) -> logits`` (float32), unjitted."""

    def forward(params, rest, x):
        model = nnx.merge(graphdef, params, rest)
        return model(preprocess(x) if preprocess is not None else x).astype(jnp.float32)

    return forward


@dataclasses.dataclass
class FitResult:
    """Outcome of :func:`fit`: the best parameters and the per-epoch history.

    ``resumed_at`` is the ``(epoch, batch)`` position restored from ``state_dir`` (None: a
    fresh run); ``already_finished`` says that the restored run had finished, so nothing was
    trained.
    """

    params: Params
    best_epoch: int
    best_metric: float
    history: list[dict[str, float]]
    stop_reason: str
    resumed_at: tuple[int, int] | None = None
    already_finished: bool = False


class Preempted(Exception):  # noqa: N818  (a signal, not an error of the run)
    """SIGTERM arrived: the loop state was checkpointed in ``directory`` and training stopped.

    ``(epoch, batch)`` is where a rerun of the same command with the same state directory
    continues: batch ``batch`` of epoch ``epoch`` (``batch == num_batches``: the epoch's
    validation; ``batch == 0``: the epoch's start, i.e. it stopped after epoch ``epoch - 1``).
    """

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


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with the arrays' shardings) of a pytree: an orbax restore target."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
        tree)


class BestCheckpoint:
    """Keeps the best parameters on disk (orbax, one checkpoint, chosen by the monitored metric)."""

    def __init__(self, directory: str | os.PathLike, monitor: str):
        self.monitor = monitor
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m[monitor], best_mode="max",
            enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    @property
    def directory(self) -> str:
        return os.fspath(self.manager.directory)

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, epoch: int, params: Params, metrics: Mapping[str, float]) -> None:
        self.manager.save(epoch, args=ocp.args.StandardSave(params),
                          metrics={k: float(v) for k, v in metrics.items()})
        self.manager.wait_until_finished()

    def restore(self, params_like: Params, step: int | None = None) -> Params:
        """The saved parameters of ``step`` (default: the best), in the structure (and
        shardings) of ``params_like``."""
        if step is None:
            return restore_best(self.manager.directory, params_like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(_abstract(params_like)))

    def clear(self) -> None:
        """Deletes every saved step (only orbax step folders are touched)."""
        for step in self.steps():
            self.manager.delete(step)

    def close(self) -> None:
        self.manager.close()


# Opens existing checkpoints without creating or deleting anything (``read_only=True`` does the
# same but warns about each option it overrides).
_READER = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)


def restore_best(directory: str | os.PathLike, params_like: Params) -> Params:
    """Loads the best checkpoint in ``directory`` into the structure of ``params_like``."""
    directory = os.path.abspath(os.fspath(directory))
    with ocp.CheckpointManager(directory, options=_READER) as manager:
        step = manager.best_step() if manager.best_step() is not None else manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint to restore")
        return manager.restore(step, args=ocp.args.StandardRestore(_abstract(params_like)))


# ----------------------------------------------------------------------------- resumable state

STATE_FORMAT = 2  # version of the JSON part of a training-state checkpoint (2: mid-epoch)


@dataclasses.dataclass(frozen=True)
class LoopState:
    """Host-side state of :func:`fit` (JSON-serialisable): ``next_epoch`` epochs are complete
    and the first ``next_batch`` batches of epoch ``next_epoch`` are trained, their losses
    summing (float64, in batch order) to ``loss_sum``.

    The early-stopping counter is derived (``next_epoch - 1 - best_epoch``), and the data order
    of epoch ``e`` is a function of ``(seed, e)``, so ``(next_epoch, next_batch)`` is the data
    position. ``stop_reason`` is set once the run has finished.
    """

    schedule: Plateau
    next_epoch: int = 0
    next_batch: int = 0
    loss_sum: float = 0.0
    best_metric: float = -math.inf
    best_epoch: int = -1
    history: tuple[dict[str, float], ...] = ()
    stop_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"next_epoch": self.next_epoch, "next_batch": self.next_batch,
                "loss_sum": self.loss_sum, "schedule": self.schedule._asdict(),
                "best_metric": self.best_metric, "best_epoch": self.best_epoch,
                "history": list(self.history), "stop_reason": self.stop_reason}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoopState:
        return cls(schedule=Plateau(**d["schedule"]), next_epoch=int(d["next_epoch"]),
                   next_batch=int(d["next_batch"]), loss_sum=float(d["loss_sum"]),
                   best_metric=float(d["best_metric"]), best_epoch=int(d["best_epoch"]),
                   history=tuple(d["history"]), stop_reason=d["stop_reason"])

    def add_losses(self, losses: list[jax.Array]) -> LoopState:
        """The state after the batches whose losses ``[(k,), ...]`` are given (in order);
        fetches them from the device (one sync)."""
        total, count = self.loss_sum, self.next_batch
        for chunk in losses:
            for value in np.asarray(host_value(chunk), np.float64).ravel():
                total += float(value)
                count += 1
        return dataclasses.replace(self, next_batch=count, loss_sum=total)


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


def run_identity(options: FitOptions, params: Params,
                 run_id: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What makes two runs the same run: the options, the parameter shapes and the caller's
    ``run_id`` (e.g. the data digest and config fields), in JSON-normal form."""
    return _plain({"options": dataclasses.asdict(options), "params": param_signature(params),
                   "run": dict(run_id or {})})


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: saved X, now Y"`` for every differing (dotted) key of two identities."""
    a, b = _flat(_plain(dict(saved))), _flat(_plain(dict(current)))
    missing = object()
    return [f"{k}: saved {a.get(k, '(absent)')!r}, now {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def check_identity(directory: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raises CheckpointMismatchError naming ``directory`` when the identities differ."""
    diffs = identity_differences(saved, current)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; ... ({len(diffs)} differences)"
                                        if len(diffs) > 6 else "")
        raise CheckpointMismatchError(
            f"{directory}: holds the checkpoint of a different run ({shown}). Use another "
            "workdir, or start over with fresh_start=True (--config.fresh_start=True), which "
            "deletes it.")


_STATE_ITEMS = ("state", "meta", "best")


class TrainingStateCheckpoint:
    """The loop-state checkpoint of :func:`fit` (orbax; the newest only, written atomically).

    Items: ``state`` = ``{"params", "opt_state"}`` (arrays, any sharding), ``meta`` (JSON: the
    :class:`LoopState`, the run identity, the format version and ``best_in_state``) and, when
    ``best_in_state``, ``best`` (the best parameters, not yet in the best checkpoint). Steps
    count the saves (the position is in ``meta``).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=_STATE_ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict[str, Any]:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return _check_format(self.directory, meta["meta"])

    def save(self, params: Params, opt_state: Any, loop: LoopState,
             identity: Mapping[str, Any], best_params: Params | None = None) -> None:
        """Writes a new step (the previous one is deleted once it is complete)."""
        latest = self.manager.latest_step()
        meta = {"format": STATE_FORMAT, "loop": loop.to_json(), "identity": dict(identity),
                "best_in_state": best_params is not None}
        items = {"state": ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                 "meta": ocp.args.JsonSave(meta)}
        if best_params is not None:
            items["best"] = ocp.args.StandardSave(best_params)
        self.manager.save(0 if latest is None else latest + 1,
                          args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, params_like: Params, opt_like: Any) -> tuple[Params, Any]:
        """Parameters and optimiser state of ``step``, laid out like the ``*_like`` trees."""
        target = _abstract({"params": params_like, "opt_state": opt_like})
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
        return state["params"], state["opt_state"]

    def restore_best(self, step: int, params_like: Params) -> Params:
        """The best parameters carried by ``step`` (its meta says ``best_in_state``)."""
        return self.manager.restore(step, args=ocp.args.Composite(
            best=ocp.args.StandardRestore(_abstract(params_like))))["best"]

    def clear(self) -> None:
        for step in list(self.manager.all_steps()):
            self.manager.delete(step)

    def close(self) -> None:
        self.manager.close()


def _check_format(directory: str, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    if not isinstance(meta, Mapping) or meta.get("format") != STATE_FORMAT:
        found = meta.get("format") if isinstance(meta, Mapping) else None
        hint = (" (epoch-level, written before mid-epoch resuming); finish that run with the "
                "version that wrote it, or start over with fresh_start=True"
                if found == 1 else "")
        raise CheckpointMismatchError(
            f"{directory}: not a training-state checkpoint of format {STATE_FORMAT} "
            f"(found {found!r}){hint}")
    return dict(meta)


def read_training_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON part (``{"format", "loop", "identity"}``) of the newest training-state checkpoint
    in ``directory``, or None when there is none. Reads only; creates nothing."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        return None
    with ocp.CheckpointManager(directory, options=_READER,
                               item_names=_STATE_ITEMS) as manager:
        step = manager.latest_step()
        if step is None:
            return None
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return _check_format(directory, meta["meta"])


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Params, nnx.State]:
    """``(graphdef, params as a pure dict, other state)`` of a module."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def load_params(model: nnx.Module, params: Params) -> None:
    """Writes pure-dict ``params`` into ``model``'s parameters (in place)."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


def _stop_reason(loop: LoopState, options: FitOptions) -> str | None:
    """Why training ends before epoch ``loop.next_epoch`` (None: it continues)."""
    last = loop.next_epoch - 1
    if options.patience is not None and last >= 0 and last - loop.best_epoch >= options.patience:
        return f"no validation improvement for {options.patience} epochs"
    if loop.schedule.lr <= options.stop_lr:
        return f"learning rate {loop.schedule.lr:.2e} <= {options.stop_lr:.0e}"
    if loop.next_epoch >= options.max_epochs:
        return f"max_epochs ({options.max_epochs})"
    return None


def _restore_best_params(store: TrainingStateCheckpoint, best: BestCheckpoint, step: int,
                         meta: Mapping[str, Any], loop: LoopState, params_like: Params
                         ) -> Params | None:
    """The best-epoch parameters of the state saved at ``step`` (None: no best epoch yet).

    The state carries them while the best checkpoint may lag (see :func:`fit`); they are then
    written there now, so the two agree again.
    """
    if loop.best_epoch < 0:
        best.clear()
        return None
    if meta.get("best_in_state"):
        params = store.restore_best(step, params_like)
        if loop.best_epoch not in best.steps():
            best.save(loop.best_epoch, params, {best.monitor: loop.best_metric})
        return params
    if loop.best_epoch in best.steps():
        return best.restore(params_like, step=loop.best_epoch)
    raise FileNotFoundError(f"{best.directory}: the best checkpoint (epoch {loop.best_epoch}) "
                            "recorded by the training state is missing")


def _resume(store: TrainingStateCheckpoint, best: BestCheckpoint, identity: Mapping[str, Any],
            params: Params, opt_state: Any, monitor: str, log: Callable[[str], None]
            ) -> tuple[Params, Any, LoopState, Params | None] | None:
    """``(params, opt_state, loop, best_params)`` of the newest checkpoint in ``store`` (None:
    there is none). A finished run's params and optimiser state are not read."""
    latest = store.latest_step()
    if latest is None:
        if best.steps():
            raise FileExistsError(
                f"{best.directory}: holds best-parameter checkpoints (epochs {best.steps()}) but "
                f"{store.directory} has no training state to resume; use another workdir or "
                "fresh_start=True")
        return None
    meta = store.read_meta(latest)
    check_identity(store.directory, meta["identity"], identity)
    loop = LoopState.from_json(meta["loop"])
    best_params = _restore_best_params(store, best, latest, meta, loop, params)
    if loop.stop_reason is None:
        params, opt_state = store.restore(latest, params, opt_state)
        log(f"resuming from {store.directory}: epoch {loop.next_epoch}, batch "
            f"{loop.next_batch} (lr {loop.schedule.lr:.2e}, best val_{monitor} "
            f"{loop.best_metric:.4f} at epoch {loop.best_epoch})")
    else:
        log(f"{store.directory}: this run already finished ({loop.stop_reason}); not training")
    return params, opt_state, loop, best_params


def fit(
    params: Params,
    *,
    run_epoch: Callable[[Params, Any, float, int, int], Iterator[tuple[Params, Any, jax.Array]]],
    steps_per_epoch: int,
    evaluate: Callable[[Params, Callable[[], bool]], Mapping[str, float] | None],
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
      run_epoch: ``(params, opt_state, lr, epoch, start_batch)`` -> a generator training
        batches ``start_batch ..< steps_per_epoch`` of ``epoch`` and yielding
        ``(params, opt_state, losses (k,))`` after every ``k`` of them (``k >= 1``; a yielded
        state may be donated by the next step, so it is used before resuming the generator).
        Batch ``b`` of epoch ``e`` and its randomness must derive from ``(options.seed, e, b)``
        only, so that a resumed epoch sees the same batches.
      steps_per_epoch: the number of batches of an epoch.
      evaluate: ``(params, stop) -> validation metrics`` (containing ``options.monitor``), or
        None when it gave up because ``stop()`` became true (SIGTERM); ``stop`` may be ignored.
      init_opt_state: ``params -> optimiser state`` (e.g. ``tx.init``, or a sharded jitted init).
      checkpoint_dir: where the best parameters are saved (orbax); None keeps them in memory only.
      state_dir: where the whole training state is saved (needs ``checkpoint_dir``). If it holds
        a checkpoint of this run, training continues from its position (a finished run returns
        its saved result without training); a checkpoint of another run (options, parameter
        shapes, ``run_id``) raises CheckpointMismatchError. SIGTERM then saves at the next
        yield of ``run_epoch`` (or during validation) and raises Preempted.
      run_id: JSON-able identity of the run beyond options and shapes (e.g. a data digest).
      fresh_start: delete the checkpoints in ``state_dir`` and ``checkpoint_dir`` first.
      save_every_s: with ``state_dir``, the least time between two saves: 0 saves at the end
        of every epoch (only), ``s > 0`` at the first epoch end or, inside an epoch, the first
        yield of ``run_epoch`` ``s`` seconds after the last save (so a SIGKILL loses about that
        much). The last epoch, and SIGTERM, are always saved.
    """
    if state_dir is not None and checkpoint_dir is None:
        raise ValueError("state_dir needs checkpoint_dir (the best parameters are kept there)")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    identity = run_identity(options, params, run_id)
    opt_state = init_opt_state(params)
    loop = LoopState(schedule=Plateau(lr=options.learning_rate))
    best_params = None
    resumed_at = None
    best = BestCheckpoint(checkpoint_dir, options.monitor) if checkpoint_dir else None
    store = TrainingStateCheckpoint(state_dir) if state_dir is not None else None
    best_unsaved, last_save = False, time.monotonic()

    def save(params: Params, opt_state: Any, loop: LoopState) -> None:
        """The loop state, then the best parameters if they changed since the last save (the
        state carries them until then)."""
        nonlocal best_unsaved, last_save
        assert store is not None and best is not None
        store.save(params, opt_state, loop, identity, best_params if best_unsaved else None)
        if best_unsaved:
            best.save(loop.best_epoch, best_params, {options.monitor: loop.best_metric})
        best_unsaved, last_save = False, time.monotonic()

    def preempted(loop: LoopState) -> Preempted:
        assert store is not None
        error = Preempted(store.directory, loop.next_epoch, loop.next_batch, steps_per_epoch)
        log(str(error))
        return error

    try:
        if store is not None and best is not None:
            if fresh_start:
                log(f"fresh start: deleting the checkpoints in {store.directory} and "
                    f"{best.directory}")
                store.clear()
                best.clear()
            resumed = _resume(store, best, identity, params, opt_state, options.monitor, log)
            if resumed is not None:
                params, opt_state, loop, best_params = resumed
                resumed_at = (loop.next_epoch, loop.next_batch)
        if resumed_at is None:
            loop = dataclasses.replace(loop, stop_reason=_stop_reason(loop, options))
        finished_before = loop.stop_reason is not None and resumed_at is not None
        with SigtermFlag("SIGTERM received: saving after the current training step",
                         enabled=store is not None) as sigterm:
            while loop.stop_reason is None:
                epoch, lr = loop.next_epoch, loop.schedule.lr
                t0 = time.perf_counter()
                losses: list[jax.Array] = []  # of batches not yet added to loop.loss_sum
                done = loop.next_batch
                with contextlib.closing(run_epoch(params, opt_state, lr, epoch, done)) as steps:
                    for params, opt_state, step_losses in steps:
                        losses.append(step_losses)
                        done += len(step_losses)
                        if done >= steps_per_epoch or store is None:
                            continue
                        stop, due = any_process(
                            sigterm.requested, 0 < save_every_s <= time.monotonic() - last_save)
                        if stop or due:
                            loop = loop.add_losses(losses)
                            losses = []
                            save(params, opt_state, loop)
                            if stop:
                                raise preempted(loop)
                loop = loop.add_losses(losses)
                if loop.next_batch != steps_per_epoch:
                    raise RuntimeError(f"run_epoch trained {loop.next_batch} batches of epoch "
                                       f"{epoch}, expected {steps_per_epoch}")
                train_loss = loop.loss_sum / steps_per_epoch
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"epoch {epoch}: training loss is {train_loss}")
                val = evaluate(params, lambda: any_process(sigterm.requested)[0])
                if val is None:
                    if not any_process(sigterm.requested)[0]:
                        raise RuntimeError("evaluate returned None without a stop request")
                    save(params, opt_state, loop)  # trained, not validated: a rerun validates
                    raise preempted(loop)
                val = dict(val)
                if options.monitor not in val:
                    raise KeyError(f"validation metrics lack {options.monitor!r}: {sorted(val)}")
                score = float(val[options.monitor])
                record = {"epoch": epoch, "lr": lr, "train_loss": train_loss,
                          **{f"val_{k}": float(v) for k, v in val.items()},
                          "seconds": time.perf_counter() - t0}
                improved = math.isfinite(score) and score > loop.best_metric
                log(f"epoch {epoch:4d}  lr {lr:.2e}  train_loss {train_loss:.4f}  "
                    f"val_{options.monitor} {score:.4f}{'  *' if improved else ''}")
                loop = dataclasses.replace(
                    loop, next_epoch=epoch + 1, next_batch=0, loss_sum=0.0,
                    history=(*loop.history, record),
                    schedule=plateau_step(loop.schedule, train_loss,
                                          factor=options.plateau_factor,
                                          patience=options.plateau_patience,
                                          min_lr=options.min_lr),
                    **({"best_metric": score, "best_epoch": epoch} if improved else {}))
                loop = dataclasses.replace(loop, stop_reason=_stop_reason(loop, options))
                if improved:
                    best_params = jax.tree.map(jnp.copy, params)
                    best_unsaved = True
                stop, due = any_process(sigterm.requested,
                                        time.monotonic() - last_save >= save_every_s)
                if store is None:
                    if improved and best is not None:
                        best.save(epoch, params, {options.monitor: score})
                elif loop.stop_reason is not None or stop or due:
                    save(params, opt_state, loop)
                if stop and loop.stop_reason is None and store is not None:
                    raise preempted(loop)
    finally:
        for manager in (best, store):
            if manager is not None:
                manager.close()
    if best_params is None:
        raise RuntimeError(f"no epoch produced a finite validation {options.monitor}; "
                           "is a class missing from the validation split?")
    log(f"stopped: {loop.stop_reason}; best epoch {loop.best_epoch} "
        f"(val_{options.monitor} {loop.best_metric:.4f})")
    return FitResult(best_params, loop.best_epoch, loop.best_metric, list(loop.history),
                     str(loop.stop_reason), resumed_at, finished_before)

