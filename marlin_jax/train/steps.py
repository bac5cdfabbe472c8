"""The jit-able MARLIN pretraining step: ``d_steps`` critic then ``g_steps`` generator updates on
one batch ``{"video": uint8 (B, T, H, W, 3), "mask": bool (B, N)}``, two AdamW optimisers (as the
original). The first G update reuses the generator forward of the critic updates (``jax.vjp``
keeps its residuals): the original's numbers with one encoder/decoder forward less per batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from marlin_jax.models.layers import constrain_to_batch, video_to_float
from marlin_jax.train import losses
from marlin_jax.train.state import ModelDef, Params, TrainState, set_learning_rate

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step (hashable: closed over by jit)."""

    num_visible: int
    adv_weight: float = 0.01
    gp_weight: float = 0.0
    d_steps: int = 1
    g_steps: int = 1


@dataclasses.dataclass(frozen=True)
class Task:
    """What the step functions need besides arrays: model graph, optimisers, schedules; gradients
    are constrained to ``grad_shardings`` (generator, critic) so that FSDP reduce-scatters them."""

    model: ModelDef
    g_tx: optax.GradientTransformation
    d_tx: optax.GradientTransformation
    g_schedule: Callable[[jax.Array], jax.Array]
    d_schedule: Callable[[jax.Array], jax.Array]
    step: StepConfig
    grad_shardings: tuple[Any, Any] | None = None


def _shard_grads(grads: Any, shardings: Any) -> Any:
    return grads if shardings is None else jax.lax.with_sharding_constraint(grads, shardings)


def gp_alpha(rng: jax.Array, step: jax.Array, d_update: int) -> jax.Array:
    """The gradient-penalty interpolation weight of D update ``d_update`` at ``step`` (one uniform
    scalar per update, as the original's ``torch.rand(1)``)."""
    key = jax.random.fold_in(jax.random.fold_in(rng, step), d_update)
    return jax.random.uniform(key, (), jnp.float32)


def _critic(task: Task, g_params: Params, d_params: Params) -> Callable[[jax.Array], jax.Array]:
    model = task.model.merge(g_params, d_params)
    return lambda patches: model.discriminator(patches)


def _generator(task: Task, d_params: Params, video: jax.Array, mask: jax.Array
               ) -> Callable[[Params], jax.Array]:
    k = task.step.num_visible
    return lambda g_params: constrain_to_batch(
        task.model.merge(g_params, d_params)(video, mask, num_visible=k))


def _check_batch(task: Task, video: jax.Array, mask: jax.Array) -> None:
    """Static shape checks (trace time): a wrong mask would silently gather out of range."""
    cfg = task.model.config
    expected = (cfg.n_frames, cfg.img_size, cfg.img_size, cfg.in_channels)
    if video.ndim != 5 or tuple(video.shape[1:]) != expected:
        raise ValueError(f"batch['video'] must be (B, {', '.join(map(str, expected))}), "
                         f"got {tuple(video.shape)}")
    if mask.shape != (video.shape[0], cfg.num_tokens) or mask.dtype != jnp.bool_:
        raise ValueError(f"batch['mask'] must be bool (B, {cfg.num_tokens}) for the token grid "
                         f"{cfg.grid}, got {mask.dtype} {tuple(mask.shape)}")
    if not 0 < task.step.num_visible < cfg.num_tokens:
        raise ValueError(f"num_visible must be in (0, {cfg.num_tokens}), got "
                         f"{task.step.num_visible}")


def _targets(task: Task, video: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = task.model.config
    _check_batch(task, video, mask)
    return constrain_to_batch(losses.masked_targets(video, mask, task.step.num_visible,
                                                    cfg.patch_size, cfg.tubelet_size))


def train_step(task: Task, state: TrainState, batch: Batch,
               stop: jax.Array | None = None) -> tuple[TrainState, Metrics]:
    """One batch: ``d_steps`` critic updates then ``g_steps`` generator updates. Returns the new
    state and scalar metrics: rec_loss, adv_loss (x adv_weight), g_loss, d_loss (+ gp_weight * gp),
    d_loss0, gp, g_lr, d_lr, grad norms, finite, and with ``stop`` (one SIGTERM flag per device)
    ``stop`` = any of them."""
    cfg = task.step
    video = video_to_float(batch["video"])
    mask = batch["mask"]
    target = _targets(task, video, mask)

    g_lr = task.g_schedule(state.step)
    d_lr = task.d_schedule(state.step)
    g_params, d_params = state.g_params, state.d_params
    g_opt = set_learning_rate(state.g_opt_state, g_lr)
    d_opt = set_learning_rate(state.d_opt_state, d_lr)

    pred, g_vjp = jax.vjp(_generator(task, d_params, video, mask), g_params)
    fake = jax.lax.stop_gradient(pred).astype(jnp.float32)

    d_metrics: Metrics = {}
    for i in range(cfg.d_steps):
        alpha = gp_alpha(state.rng, state.step, i)

        def d_loss_fn(dp, alpha=alpha):
            critic = _critic(task, g_params, dp)
            d0 = losses.critic_loss(critic(fake), critic(target))
            gp = (losses.gradient_penalty(critic, target, fake, alpha) if cfg.gp_weight > 0
                  else jnp.zeros((), jnp.float32))
            return d0 + cfg.gp_weight * gp, {"d_loss0": d0, "gp": gp}

        (d_loss, aux), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_params)
        d_grads = _shard_grads(d_grads, task.grad_shardings and task.grad_shardings[1])
        updates, d_opt = task.d_tx.update(d_grads, d_opt, d_params)
        d_params = optax.apply_updates(d_params, updates)
        d_metrics = {"d_loss": d_loss, **aux, "d_grad_norm": optax.global_norm(d_grads)}

    g_metrics: Metrics = {}
    for j in range(cfg.g_steps):
        if j > 0:  # the generator moved: fresh forward
            pred, g_vjp = jax.vjp(_generator(task, d_params, video, mask), g_params)
        critic = _critic(task, g_params, d_params)

        def g_loss_of_pred(p, critic=critic):
            rec = losses.reconstruction_loss(p, target)
            adv = cfg.adv_weight * losses.generator_adversarial_loss(critic(p))
            return rec + adv, {"rec_loss": rec, "adv_loss": adv}

        (g_loss, aux), d_pred = jax.value_and_grad(g_loss_of_pred, has_aux=True)(pred)
        (g_grads,) = g_vjp(d_pred.astype(pred.dtype))
        g_grads = _shard_grads(g_grads, task.grad_shardings and task.grad_shardings[0])
        updates, g_opt = task.g_tx.update(g_grads, g_opt, g_params)
        g_params = optax.apply_updates(g_params, updates)
        g_metrics = {"g_loss": g_loss, **aux, "g_grad_norm": optax.global_norm(g_grads)}

    metrics = {**d_metrics, **g_metrics, "g_lr": g_lr, "d_lr": d_lr}
    metrics["finite"] = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
    if stop is not None:  # one tiny all-reduce: every process learns of any SIGTERM
        metrics["stop"] = jnp.any(stop)
    new_state = state.replace(step=state.step + 1, g_params=g_params, d_params=d_params,
                              g_opt_state=g_opt, d_opt_state=d_opt)
    return new_state, metrics


def mean_colour_prediction(task: Task, video: jax.Array, mask: jax.Array) -> jax.Array:
    """The trivial baseline: every masked patch painted with its clip's per-channel mean colour
    (over all the clip's pixels). video float ``(B, T, H, W, C)`` -> ``(B, N - k, patch_dim)``."""
    mean = jnp.mean(video, axis=(1, 2, 3), keepdims=True)
    return _targets(task, jnp.broadcast_to(mean, video.shape), mask)


def eval_step(task: Task, state: TrainState, batch: Batch) -> Metrics:
    """Validation losses (the original's validation_step: no gradient penalty), plus
    ``mean_colour_loss`` (of :func:`mean_colour_prediction`) and ``rec_vs_mean_colour`` =
    rec_loss / mean_colour_loss (below 1: the model beats each clip's mean colour)."""
    video = video_to_float(batch["video"])
    mask = batch["mask"]
    target = _targets(task, video, mask)
    pred = _generator(task, state.d_params, video, mask)(state.g_params)
    critic = _critic(task, state.g_params, state.d_params)
    rec = losses.reconstruction_loss(pred, target)
    adv = task.step.adv_weight * losses.generator_adversarial_loss(critic(pred))
    d0 = losses.critic_loss(critic(pred), critic(target))
    base = losses.reconstruction_loss(mean_colour_prediction(task, video, mask), target)
    return {"rec_loss": rec, "adv_loss": adv, "g_loss": rec + adv, "d_loss": d0,
            "mean_colour_loss": base, "rec_vs_mean_colour": rec / jnp.maximum(base, 1e-12)}


def reconstruct(task: Task, state: TrainState, batch: Batch) -> jax.Array:
    """Predicted pixels of the masked tokens ``(B, N - k, patch_dim)`` float32."""
    video = video_to_float(batch["video"])
    pred = _generator(task, state.d_params, video, batch["mask"])(state.g_params)
    return pred.astype(jnp.float32)


def jit_train_step(task: Task, state_shardings: Any, batch_shardings: Any, metric_sharding: Any,
                   stop_sharding: Any = None) -> Callable[..., tuple[TrainState, Metrics]]:
    """``train_step`` jitted with explicit in/out shardings; the input state is donated. With
    ``stop_sharding`` the step takes the SIGTERM flags ``(state, batch, stop)``."""
    in_shardings = (state_shardings, batch_shardings)
    if stop_sharding is not None:
        in_shardings += (stop_sharding,)
    return jax.jit(functools.partial(train_step, task), in_shardings=in_shardings,
                   out_shardings=(state_shardings, metric_sharding), donate_argnums=(0,))


def jit_eval_step(task: Task, state_shardings: Any, batch_shardings: Any,
                  metric_sharding: Any) -> Callable[[TrainState, Batch], Metrics]:
    return jax.jit(functools.partial(eval_step, task),
                   in_shardings=(state_shardings, batch_shardings), out_shardings=metric_sharding)
