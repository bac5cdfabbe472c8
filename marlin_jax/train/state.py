"""Train state, optimisers and learning-rate schedules of MARLIN pretraining. The state is a
pytree of arrays: generator (encoder, enc_dec_proj, decoder) and critic (discriminator) parameters
keyed like the nnx module tree, each with its own AdamW state (as the original's two optimisers);
``scan_layers`` stacks the blocks (:func:`marlin_jax.models.stack_layers`) in both alike.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from marlin_jax.models import MarlinConfig, MarlinModel, stack_layers

Params = dict[str, Any]
GENERATOR_KEYS = ("encoder", "enc_dec_proj", "decoder")
CRITIC_KEYS = ("discriminator",)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (checkpointed as one pytree). ``step``: int32,
    completed batches; ``rng``: uint32 ``(2,)`` key of the run (constant: folded with the step)."""

    step: jax.Array
    g_params: Params
    d_params: Params
    g_opt_state: optax.OptState
    d_opt_state: optax.OptState
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of the model: nnx graph definition and non-parameter state."""

    graphdef: Any
    rest: Any
    config: MarlinConfig

    def merge(self, g_params: Params, d_params: Params) -> MarlinModel:
        """A MarlinModel bound to the given parameters (use inside jit; cheap at trace time)."""
        return nnx.merge(self.graphdef, {**g_params, **d_params}, self.rest)


def build_model_def(config: MarlinConfig, *, dtype: Any = jnp.float32, remat_policy: str = "none",
                    scan_layers: bool = False, attention_impl: str | None = None) -> ModelDef:
    """The graph of a MarlinModel with decoder and discriminator, without materialising its
    parameters (the non-parameter tables come from a jitted build whose parameter initialisers
    XLA removes). ``remat_policy``: a :data:`marlin_jax.models.REMAT_POLICIES` name."""

    def build():
        return MarlinModel(config, rngs=nnx.Rngs(0), with_decoder=True, with_discriminator=True,
                           dtype=dtype, param_dtype=jnp.float32, remat_policy=remat_policy,
                           scan_layers=scan_layers, attention_impl=attention_impl)

    graphdef, _, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
    return ModelDef(graphdef, rest, config)


def init_params(config: MarlinConfig, rng: jax.Array, *, scan_layers: bool = False
                ) -> tuple[Params, Params]:
    """Fresh (generator, critic) parameters with the original initialisers (pure: jit-able);
    ``scan_layers``: stacked, the same values as the per-layer layout for the same ``rng``."""
    model = MarlinModel(config, rngs=nnx.Rngs(rng), with_decoder=True,
                        with_discriminator=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if scan_layers:
        params = stack_layers(params)
    return split_params(params)


def split_params(params: Params) -> tuple[Params, Params]:
    """Full model params -> (generator params, critic params)."""
    unknown = sorted(set(params) - set(GENERATOR_KEYS) - set(CRITIC_KEYS))
    if unknown:
        raise ValueError(f"unexpected top-level parameter groups {unknown}")
    return ({k: params[k] for k in GENERATOR_KEYS if k in params},
            {k: params[k] for k in CRITIC_KEYS if k in params})


def lr_schedule(base_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                steps_per_update: int = 1) -> Callable[[jax.Array], jax.Array]:
    """The original schedule: linear warm-up from 0 to ``base_lr`` (``np.linspace(0, lr, W)``),
    then half-cosine to ``min_lr`` at ``total_steps``. ``steps_per_update`` > 1 holds the rate
    over blocks of steps (the original: once per epoch)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    q = max(int(steps_per_update), 1)

    def schedule(step: jax.Array) -> jax.Array:
        s = (jnp.asarray(step, jnp.int32) // q) * q
        warm = base_lr * s.astype(jnp.float32) / max(warmup_steps - 1, 1)
        i = jnp.clip(s - warmup_steps, 0, max(total_steps - warmup_steps, 1))
        frac = i.astype(jnp.float32) / max(total_steps - warmup_steps, 1)
        cosine = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(s < warmup_steps, warm, cosine).astype(jnp.float32)

    return schedule


def make_optimizer(*, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.0, grad_clip: float = 0.0) -> optax.GradientTransformation:
    """AdamW (PyTorch semantics: decoupled decay on every parameter) with the learning rate as an
    injected hyper-parameter that the step sets from the schedule of the *batch* step, so that
    d_steps / g_steps > 1 do not advance the schedule faster (as the original's LambdaLR)."""

    def make(learning_rate):
        tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
        if grad_clip > 0:
            tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
        return tx

    return optax.inject_hyperparams(make)(learning_rate=0.0)


def set_learning_rate(opt_state: optax.OptState, lr: jax.Array) -> optax.OptState:
    """The injected-hyper-parameter state with ``learning_rate`` replaced."""
    hyper = dict(opt_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(lr, hyper["learning_rate"].dtype)
    return opt_state._replace(hyperparams=hyper)


def init_train_state(config: MarlinConfig, g_tx: optax.GradientTransformation,
                     d_tx: optax.GradientTransformation, seed: int, *,
                     scan_layers: bool = False) -> TrainState:
    """A fresh TrainState (pure; run under ``sharding.sharded_init`` for sharded creation);
    ``scan_layers``: stacked blocks (see :func:`init_params`)."""
    params_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    g_params, d_params = init_params(config, params_key, scan_layers=scan_layers)
    return TrainState(step=jnp.zeros((), jnp.int32), g_params=g_params, d_params=d_params,
                      g_opt_state=g_tx.init(g_params), d_opt_state=d_tx.init(d_params), rng=rng)


def with_adam_moments(opt_state: optax.OptState, mu: Params, nu: Params, count: int
                      ) -> optax.OptState:
    """``opt_state`` with its one ``ScaleByAdamState`` replaced by moments ``mu`` / ``nu`` (shaped
    like the parameters, as :func:`interop.optimizer_state.lightning_adam_moments` makes them; cast
    to the state's dtypes) and step ``count``. ValueError when the state has no or several Adam
    states, or the moments' tree structure differs."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    if len(found) != 1:
        raise ValueError(f"expected one ScaleByAdamState in the optimiser state, found {len(found)}")
    old = found[0]
    cast = functools.partial(jax.tree.map, lambda a, b: jnp.asarray(a, b.dtype))
    adam = optax.ScaleByAdamState(count=jnp.asarray(count, old.count.dtype),
                                  mu=cast(mu, old.mu), nu=cast(nu, old.nu))
    return jax.tree.map(lambda x: adam if is_adam(x) else x, opt_state, is_leaf=is_adam)
