"""Linear probing: a linear head on frozen, window-reduced MARLIN features.

As the original ``Classifier(finetune=False)``: one ``Linear(D, C)`` on features ``(N, D)``. The
training set lives on the device; an epoch (shuffle, full batches only, as ``drop_last=True``) is
one jitted ``lax.scan``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marlin_jax.evaluation.datasets import FeatureSet
from marlin_jax.evaluation.scores import LabelKind, classification_metrics
from marlin_jax.evaluation.training import (
    FitOptions,
    FitResult,
    array_digest,
    fit,
    make_forward,
    make_train_step,
    set_model_params,
    split_model,
)


def torch_linear(in_dim: int, num_outputs: int, rngs: nnx.Rngs) -> nnx.Linear:
    """``nnx.Linear`` initialised as ``torch.nn.Linear``: kernel and bias U(+-1/sqrt(in_dim))."""
    bound = 1.0 / np.sqrt(in_dim)

    def uniform(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(in_dim, num_outputs, kernel_init=uniform, bias_init=uniform, rngs=rngs)


class LinearHead(nnx.Module):
    """``(B, D) -> (B, C)`` logits. With ``mean``/``std`` ``(D,)`` of the training features the
    input is standardised first (still linear, better conditioned; not in the original)."""

    def __init__(self, in_dim: int, num_outputs: int, *, rngs: nnx.Rngs,
                 mean: np.ndarray | None = None, std: np.ndarray | None = None):
        self.head = torch_linear(in_dim, num_outputs, rngs)
        self.standardize = mean is not None
        if self.standardize:  # plain Variables, not Params: fixed, not trained
            self.mean = nnx.Variable(jnp.asarray(mean, jnp.float32))
            self.inv_std = nnx.Variable(1.0 / jnp.maximum(jnp.asarray(std, jnp.float32), 1e-6))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.standardize:
            x = (x - self.mean[...]) * self.inv_std[...]
        return self.head(x)


def make_linear_head(train_x: np.ndarray, num_outputs: int, *, standardize: bool = False,
                     seed: int = 0) -> LinearHead:
    """A fresh LinearHead for features like ``train_x`` ``(N, D)`` (standardised with their
    statistics when ``standardize``)."""
    stats = dict(mean=train_x.mean(0), std=train_x.std(0)) if standardize else {}
    return LinearHead(train_x.shape[1], num_outputs, rngs=nnx.Rngs(seed), **stats)


def predict_logits(model: nnx.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Logits ``(N, C)`` of features ``(N, D)``."""
    graphdef, params, rest = split_model(model)
    forward = jax.jit(make_forward(graphdef))
    outs = [np.asarray(forward(params, rest, jnp.asarray(x[s:s + batch_size])))
            for s in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


def train_linear_probe(
    train: FeatureSet,
    val: FeatureSet,
    *,
    task: LabelKind,
    num_outputs: int,
    options: FitOptions = FitOptions(),
    standardize: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    state_dir: str | os.PathLike | None = None,
    fresh_start: bool = False,
    save_every_s: float = 0.0,
    run_id: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[LinearHead, FitResult]:
    """Trains a LinearHead on ``train`` features, selecting the epoch by ``val``; returns the
    best-validation head and the fit record. ``state_dir`` saves whole epochs (see :func:`fit`);
    the run identity includes a digest of the features and labels."""
    n, dim = train.x.shape
    if val.x.shape[1] != dim:
        raise ValueError(f"train features are {dim}-d but val features {val.x.shape[1]}-d")
    batch = min(options.batch_size, n)
    num_batches = n // batch
    model = make_linear_head(train.x, num_outputs, standardize=standardize, seed=options.seed)
    graphdef, params, rest = split_model(model)
    tx = options.optimizer()
    step = make_train_step(graphdef, task, tx, weight_decay=options.weight_decay)
    x_train = jnp.asarray(train.x)
    y_train = jnp.asarray(train.labels)
    base_key = jax.random.key(options.seed)

    @jax.jit
    def epoch_fn(params, opt_state, lr, epoch):
        perm = jax.random.permutation(jax.random.fold_in(base_key, epoch), n)
        order = perm[: num_batches * batch].reshape(num_batches, batch)

        def body(carry, idx):
            p, o = carry
            p, o, loss = step(p, o, rest, x_train[idx], y_train[idx], lr)
            return (p, o), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), order)
        return params, opt_state, losses

    forward = jax.jit(make_forward(graphdef))
    x_val = jnp.asarray(val.x)

    def validate(p, stop):
        del stop  # milliseconds: not worth interrupting
        return classification_metrics(np.asarray(forward(p, rest, x_val)), val.labels, task)

    def run_epoch(p, o, lr, epoch, start_batch):
        del start_batch  # always 0: an epoch is one unit (one scan), so fit saves between epochs only
        yield epoch_fn(p, o, jnp.float32(lr), epoch)

    identity = {"probe": {"task": task, "num_outputs": num_outputs, "standardize": standardize,
                          "data": array_digest(train.x, train.labels, val.x, val.labels)},
                **dict(run_id or {})}
    result = fit(params, run_epoch=run_epoch, steps_per_epoch=num_batches, validate=validate,
                 init_opt_state=tx.init, options=options, checkpoint_dir=checkpoint_dir,
                 state_dir=state_dir, run_id=identity, fresh_start=fresh_start,
                 save_every_s=save_every_s, log=log)
    set_model_params(model, result.params)
    return model, result
