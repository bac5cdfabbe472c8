"""Fine-tuning: the MARLIN encoder plus a linear head, trained end to end on raw clips.

As the original ``Classifier(finetune=True)``: ``extract_features(keep_seq=False)`` then one
``Linear(D, C)``, one Adam for both. Ours, as options: a head on every token
(``pooling="tokens"``) and LP-FT (``lp_ft``). The step is sharded with :mod:`marlin_jax.sharding`
(batch over ``data x fsdp``, parameters by ``MARLIN_RULES``); uint8 clips are scaled in the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from marlin_jax.distributed import host_value
from marlin_jax.evaluation.datasets import ClipDataset, FeatureSet
from marlin_jax.evaluation.probe import LinearHead, torch_linear, train_linear_probe
from marlin_jax.evaluation.scores import LabelKind, classification_metrics
from marlin_jax.evaluation.training import (
    FitOptions,
    FitResult,
    array_digest,
    fit,
    make_forward,
    make_train_step,
    read_training_state,
    set_model_params,
    split_model,
)
from marlin_jax.models import MarlinEncoder, video_to_float
from marlin_jax.sharding import (
    batch_divisor,
    batch_sharding,
    global_batch,
    host_to_global,
    make_mesh,
    process_batch_rows,
    replicated,
    tree_shardings,
)

Pooling = Literal["mean", "tokens"]
EVAL_SEED = 12345  # the start frames of every evaluation clip


class FineTuneClassifier(nnx.Module):
    """``(B, T, H, W, 3)`` float clips in [0, 1] -> ``(B, C)`` logits; the head reads the
    mean-pooled ``(B, D)`` feature (``pooling="mean"``, the original) or every token flattened,
    ``(B, N * D)`` (``"tokens"``: for labels carried by a few tokens)."""

    def __init__(self, encoder: MarlinEncoder, num_outputs: int, *, rngs: nnx.Rngs,
                 pooling: Pooling = "mean"):
        if pooling not in ("mean", "tokens"):
            raise ValueError(f"pooling must be 'mean' or 'tokens', got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        dim = encoder.config.encoder_embed_dim
        if pooling == "tokens":
            dim *= encoder.config.num_tokens
        self.head = torch_linear(dim, num_outputs, rngs)

    def features(self, video: jax.Array) -> jax.Array:
        """What the head reads: ``(B, D)`` or ``(B, N * D)``."""
        f = self.encoder.extract_features(video, keep_seq=self.pooling == "tokens")
        return f.reshape(f.shape[0], -1)

    def __call__(self, video: jax.Array) -> jax.Array:
        return self.head(self.features(video))


def effective_batch_size(requested: int, num_samples: int, mesh: Mesh) -> int:
    """The training batch: at most the data size, a multiple of the mesh's batch shards."""
    div = batch_divisor(mesh)
    batch = min(requested, num_samples) // div * div
    if batch < div:
        raise ValueError(f"{num_samples} training samples cannot fill one batch over {div} "
                         "batch shards of the mesh")
    return batch


class _Sharded:
    """The jitted, sharded train step and forward of one model on one mesh."""

    def __init__(self, model: FineTuneClassifier, task: LabelKind, options: FitOptions,
                 mesh: Mesh):
        self.mesh = mesh
        self.graphdef, params, rest = split_model(model)
        self.tx = options.optimizer()
        self.param_sh = tree_shardings(params, mesh)
        self.params = host_to_global(params, self.param_sh)
        self.rest = host_to_global(rest, jax.tree.map(lambda _: replicated(mesh), rest))
        opt_sh = tree_shardings(jax.eval_shape(self.tx.init, params), mesh)
        self.init_opt = jax.jit(self.tx.init, out_shardings=opt_sh)
        x_sh, y_sh = batch_sharding(mesh, 5), batch_sharding(mesh, 2 if task == "multilabel" else 1)
        step = make_train_step(self.graphdef, task, self.tx, preprocess=video_to_float,
                               weight_decay=options.weight_decay)
        self.step = jax.jit(
            step,
            in_shardings=(self.param_sh, opt_sh, replicated(mesh), x_sh, y_sh, None),
            out_shardings=(self.param_sh, opt_sh, replicated(mesh)),
            donate_argnums=(0, 1),
        )
        self.forward, self.features = (
            jax.jit(make_forward(self.graphdef, video_to_float, method),
                    in_shardings=(self.param_sh, replicated(mesh), x_sh), out_shardings=replicated(mesh))
            for method in ("__call__", "features"))

    def put(self, *arrays: np.ndarray) -> list[jax.Array]:
        """This process's rows (``process_batch_rows``) of global batches -> global arrays."""
        return list(global_batch({str(i): a for i, a in enumerate(arrays)}, self.mesh).values())

    def predict(self, dataset: ClipDataset, batch: int, seed: int, num_threads: int, *,
                params=None, features: bool = False, stop: Callable[[], bool] | None = None
                ) -> tuple[np.ndarray, np.ndarray] | None:
        """Logits ``(N, C)`` (or the head's input ``features``) and labels of every sample, one
        clip each (from ``seed``), with ``params`` (default: current); None once ``stop()``."""
        fn = self.features if features else self.forward
        params = self.params if params is None else params
        sizes = [len(c) for c in dataset.batch_indices(batch, shuffle=False, seed=seed)]
        batches = dataset.batches(batch, shuffle=False, seed=seed, num_threads=num_threads,
                                  pad=True, rows=process_batch_rows(self.mesh, batch))
        outs = []
        with contextlib.closing(batches):  # stopped early: no more prefetching
            for n, (x, _) in zip(sizes, batches, strict=True):
                if stop is not None and stop():
                    return None
                outs.append(host_value(fn(params, self.rest, self.put(x)[0]))[:n])
        return np.concatenate(outs), dataset.labelset.labels.copy()


def fold_standardization(head: LinearHead) -> tuple[np.ndarray, np.ndarray]:
    """``(kernel (D, C), bias (C,))`` of a plain linear layer equal to ``head`` (its feature
    standardisation folded into the weights)."""
    kernel = np.asarray(head.head.kernel[...], np.float64)
    bias = np.asarray(head.head.bias[...], np.float64)
    if head.standardize:
        kernel = np.asarray(head.inv_std[...], np.float64)[:, None] * kernel
        bias = bias - np.asarray(head.mean[...], np.float64) @ kernel
    return kernel.astype(np.float32), bias.astype(np.float32)


def make_predictor(
    model: FineTuneClassifier,
    task: LabelKind,
    *,
    mesh: Mesh | None = None,
    batch_size: int = FitOptions.batch_size,
    eval_seed: int = EVAL_SEED,
    num_threads: int = 4,
) -> Callable[[ClipDataset], tuple[np.ndarray, np.ndarray]]:
    """``predict(dataset) -> (logits (N, C), labels)`` with ``model``'s current parameters,
    sharded over ``mesh`` (e.g. to evaluate a restored checkpoint)."""
    mesh = mesh if mesh is not None else make_mesh({"data": -1})
    sharded = _Sharded(model, task, FitOptions(), mesh)
    batch = effective_batch_size(batch_size, batch_size, mesh)
    return functools.partial(sharded.predict, batch=batch, seed=eval_seed,
                             num_threads=num_threads)


def train_finetune(
    encoder: MarlinEncoder,
    train: ClipDataset,
    val: ClipDataset,
    *,
    task: LabelKind,
    num_outputs: int,
    options: FitOptions = FitOptions(),
    mesh: Mesh | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    state_dir: str | os.PathLike | None = None,
    fresh_start: bool = False,
    save_every_s: float = 0.0,
    run_id: Mapping[str, Any] | None = None,
    eval_seed: int = EVAL_SEED,
    num_threads: int = 4,
    pooling: Pooling = "mean",
    lp_ft: FitOptions | None = None,
    log: Callable[[str], None] = print,
) -> tuple[FineTuneClassifier, FitResult, Callable[[ClipDataset], tuple[np.ndarray, np.ndarray]]]:
    """Fine-tunes ``encoder`` with a new linear head, selecting the epoch by ``val``.

    ``lp_ft`` (LP-FT, Kumar et al. 2022): the head starts as a linear probe trained with these
    options on the initial features (only when the run starts, not on resume). Training clips
    are re-sampled every epoch (seed ``options.seed + epoch``), evaluation clips fixed by
    ``eval_seed``. ``state_dir`` etc.: see :func:`~marlin_jax.evaluation.training.fit` (resumes
    onto any mesh); the run identity includes the train / val keys, labels and clip sampling.

    Returns the best-validation classifier, the fit record, and ``predict(dataset) -> (logits,
    labels)`` bound to the sharded forward.
    """
    mesh = mesh if mesh is not None else make_mesh({"data": -1})
    model = FineTuneClassifier(encoder, num_outputs, rngs=nnx.Rngs(options.seed), pooling=pooling)
    sharded = _Sharded(model, task, options, mesh)
    batch = effective_batch_size(options.batch_size, len(train), mesh)
    starts = fresh_start or state_dir is None or read_training_state(state_dir) is None
    if lp_ft is not None and starts:  # LP-FT: a standardised probe on the initial features
        feats = [FeatureSet(*sharded.predict(d, batch, eval_seed, num_threads, features=True),
                            d.labelset.keys, {}) for d in (train, val)]
        head, probe = train_linear_probe(*feats, task=task, num_outputs=num_outputs, options=lp_ft,
                                         standardize=True, log=lambda line: None)
        kernel, bias = fold_standardization(head)
        sharded.params["head"] = host_to_global({"kernel": kernel, "bias": bias}, sharded.param_sh["head"])
        log(f"LP-FT: head initialised by a linear probe on the initial features "
            f"({feats[0].x.shape[1]}-d; best epoch {probe.best_epoch}, "
            f"val_{lp_ft.monitor} {probe.best_metric:.4f})")

    steps_per_epoch = len(train) // batch

    def run_epoch(params, opt_state, lr, epoch, start_batch):
        """Yields the state after each step (asynchronously dispatched: no host sync)."""
        lr = jnp.float32(lr)
        for x, y in train.batches(batch, shuffle=True, seed=options.seed + epoch, drop_last=True,
                                  start_batch=start_batch, num_threads=num_threads,
                                  rows=process_batch_rows(mesh, batch)):
            xs, ys = sharded.put(x, y)
            params, opt_state, loss = sharded.step(params, opt_state, sharded.rest, xs, ys, lr)
            yield params, opt_state, loss[None]

    predict = functools.partial(sharded.predict, batch=batch, seed=eval_seed,
                                num_threads=num_threads)

    def validate(params, stop):
        out = predict(val, params=params, stop=stop)
        return None if out is None else classification_metrics(*out, task)

    identity = {"finetune": {
        "task": task, "num_outputs": num_outputs, "batch": batch, "eval_seed": eval_seed,
        "pooling": pooling, "lp_ft": None if lp_ft is None else dataclasses.asdict(lp_ft),
        "clips": [train.clip_frames, train.sample_rate, train.size],
        "data": array_digest("\n".join(train.labelset.keys), train.labelset.labels,
                             "\n".join(val.labelset.keys), val.labelset.labels)},
        **dict(run_id or {})}
    result = fit(sharded.params, run_epoch=run_epoch, steps_per_epoch=steps_per_epoch,
                 validate=validate, init_opt_state=sharded.init_opt, options=options,
                 checkpoint_dir=checkpoint_dir, state_dir=state_dir, run_id=identity,
                 fresh_start=fresh_start, save_every_s=save_every_s, log=log)
    sharded.params = result.params
    set_model_params(model, result.params)
    return model, result, predict
