"""The supervised training loop shared by linear probing and fine-tuning.

It follows the original ``model/classifier.py`` + ``evaluate.py`` of MARLIN:

* loss: binary cross-entropy with logits (binary; multilabel over every flattened
  (sample, label) pair) or softmax cross-entropy (multiclass);
* optimiser: Adam with betas (0.5, 0.9), learning rate 1e-4, no weight decay;
* schedule: reduce-on-plateau of the *training* loss (factor 0.5, patience 7, min 1e-8), and
  training stops once the learning rate has fallen to 1e-6 (``EarlyStoppingLR``);
* model selection: the epoch with the best validation metric (``val_auc``) is kept and
  checkpointed, then evaluated on the test split.

Differences, on purpose: the validation metric is computed on the whole split (the original
averages per-batch AUROCs), and an optional ``patience`` stops after that many epochs without
a validation improvement, so short runs need not wait for the learning rate to decay.

The model is any ``nnx.Module`` mapping a batch to logits; it is handled functionally
(``nnx.split`` into graph, parameters and other state) so the step is a pure jitted function.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from marlin_jax.evaluation.metrics import Task

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


def make_optimizer(options: FitOptions) -> optax.GradientTransformation:
    """Adam's moment estimates only; the (scheduled) learning rate is applied by the step."""
    return optax.scale_by_adam(b1=options.b1, b2=options.b2, eps=1e-8)


def make_train_step(
    graphdef: nnx.GraphDef,
    task: Task,
    tx: optax.GradientTransformation,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable:
    """``step(params, opt_state, rest, x, y, lr) -> (params, opt_state, loss)``, unjitted.

    ``rest`` is the model's non-parameter state (e.g. fixed position tables); ``preprocess`` maps
    the raw batch inside the step (e.g. uint8 clips to float [0, 1]).
    """

    def loss_fn(params, rest, x, y):
        model = nnx.merge(graphdef, params, rest)
        logits = model(preprocess(x) if preprocess is not None else x)
        return classification_loss(logits, y, task)

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
    """Outcome of :func:`fit`: the best parameters and the per-epoch history."""

    params: Params
    best_epoch: int
    best_metric: float
    history: list[dict[str, float]]
    stop_reason: str


class BestCheckpoint:
    """Keeps the best parameters on disk (orbax, one checkpoint, chosen by the monitored metric)."""

    def __init__(self, directory: str | os.PathLike, monitor: str):
        self.monitor = monitor
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m[monitor], best_mode="max",
            enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def save(self, epoch: int, params: Params, metrics: Mapping[str, float]) -> None:
        self.manager.save(epoch, args=ocp.args.StandardSave(params),
                          metrics={k: float(v) for k, v in metrics.items()})
        self.manager.wait_until_finished()

    def restore(self, params_like: Params) -> Params:
        """The saved best parameters, in the structure (and shardings) of ``params_like``."""
        return restore_best(self.manager.directory, params_like)

    def close(self) -> None:
        self.manager.close()


def restore_best(directory: str | os.PathLike, params_like: Params) -> Params:
    """Loads the best checkpoint in ``directory`` into the structure of ``params_like``."""
    directory = os.path.abspath(os.fspath(directory))
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            read_only=True)) as manager:
        step = manager.best_step() if manager.best_step() is not None else manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint to restore")
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
            params_like)
        return manager.restore(step, args=ocp.args.StandardRestore(target))


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Params, nnx.State]:
    """``(graphdef, params as a pure dict, other state)`` of a module."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def load_params(model: nnx.Module, params: Params) -> None:
    """Writes pure-dict ``params`` into ``model``'s parameters (in place)."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


def fit(
    params: Params,
    *,
    run_epoch: Callable[[Params, Any, float, int], tuple[Params, Any, float]],
    evaluate: Callable[[Params], Mapping[str, float]],
    init_opt_state: Callable[[Params], Any],
    options: FitOptions,
    checkpoint_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Trains until the learning rate decays to ``stop_lr``, ``patience`` epochs pass without a
    validation improvement, or ``max_epochs``; returns the best-validation parameters.

    Args:
      params: initial trainable parameters.
      run_epoch: ``(params, opt_state, lr, epoch) -> (params, opt_state, mean train loss)``.
      evaluate: ``params -> validation metrics`` (must contain ``options.monitor``).
      init_opt_state: ``params -> optimiser state`` (e.g. ``tx.init``, or a sharded jitted init).
      checkpoint_dir: where the best parameters are saved (orbax); None keeps them in memory only.
    """
    opt_state = init_opt_state(params)
    schedule = Plateau(lr=options.learning_rate)
    best_metric, best_epoch, best_params = -math.inf, -1, None
    history: list[dict[str, float]] = []
    ckpt = BestCheckpoint(checkpoint_dir, options.monitor) if checkpoint_dir else None
    stop_reason = f"max_epochs ({options.max_epochs})"
    try:
        for epoch in range(options.max_epochs):
            if schedule.lr <= options.stop_lr:
                stop_reason = f"learning rate {schedule.lr:.2e} <= {options.stop_lr:.0e}"
                break
            t0 = time.perf_counter()
            params, opt_state, train_loss = run_epoch(params, opt_state, schedule.lr, epoch)
            train_loss = float(train_loss)
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"epoch {epoch}: training loss is {train_loss}")
            val = dict(evaluate(params))
            if options.monitor not in val:
                raise KeyError(f"validation metrics lack {options.monitor!r}: {sorted(val)}")
            score = float(val[options.monitor])
            record = {"epoch": epoch, "lr": schedule.lr, "train_loss": train_loss,
                      **{f"val_{k}": float(v) for k, v in val.items()},
                      "seconds": time.perf_counter() - t0}
            history.append(record)
            improved = math.isfinite(score) and score > best_metric
            log(f"epoch {epoch:4d}  lr {schedule.lr:.2e}  train_loss {train_loss:.4f}  "
                f"val_{options.monitor} {score:.4f}{'  *' if improved else ''}")
            if improved:
                best_metric, best_epoch = score, epoch
                best_params = jax.tree.map(jnp.copy, params)
                if ckpt is not None:
                    ckpt.save(epoch, params, {options.monitor: score})
            schedule = plateau_step(schedule, train_loss, factor=options.plateau_factor,
                                    patience=options.plateau_patience, min_lr=options.min_lr)
            if options.patience is not None and epoch - best_epoch >= options.patience:
                stop_reason = f"no validation improvement for {options.patience} epochs"
                break
    finally:
        if ckpt is not None:
            ckpt.close()
    if best_params is None:
        raise RuntimeError(f"no epoch produced a finite validation {options.monitor}; "
                           "is a class missing from the validation split?")
    log(f"stopped: {stop_reason}; best epoch {best_epoch} "
        f"(val_{options.monitor} {best_metric:.4f})")
    return FitResult(best_params, best_epoch, best_metric, history, stop_reason)


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive slices covering ``range(n)`` (the last may be short)."""
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the leading axis to ``size`` by repeating the last row (keeps jit shapes static)."""
    if x.shape[0] == size:
        return x
    reps = np.repeat(x[-1:], size - x.shape[0], axis=0)
    return np.concatenate([x, reps], axis=0)
