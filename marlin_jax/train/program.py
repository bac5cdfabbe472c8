"""The compiled pretraining program (model graph, optimisers, shardings, jitted steps), built by
:func:`build_program` for both the trainer and ``python -m marlin_jax.aot``, so that the AOT
tool measures what the trainer runs. It depends on the config, mesh and schedule, never on data.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from marlin_jax import sharding as shd
from marlin_jax.models import MarlinConfig, config_from_mapping
from marlin_jax.models.layers import default_attention_impl
from marlin_jax.train import state as st
from marlin_jax.train import steps


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Steps and learning rates of a run (lr already scaled by the global batch)."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    base_lr: float
    min_lr: float


def schedule_from_config(config: ml_collections.ConfigDict, train_size: int | None) -> Schedule:
    """Epochs -> steps and lr scaled by global_batch / 256. ``train_size``: clips in the train
    split, needed only when ``config.steps_per_epoch <= 0`` (None: one step per epoch, for AOT)."""
    batch = int(config.global_batch_size)
    steps_per_epoch = int(config.steps_per_epoch)
    if steps_per_epoch <= 0:
        steps_per_epoch = 1 if train_size is None else max(1, train_size // batch)
    total = int(config.num_train_steps)
    if total <= 0:
        total = int(config.num_epochs * steps_per_epoch)
    total = max(total, 1)
    warmup = int(config.lr.warmup_steps)
    if warmup < 0:
        warmup = int(round(config.lr.warmup_epochs * steps_per_epoch))
    scale = batch / 256.0 if config.lr.scale_with_batch else 1.0
    return Schedule(steps_per_epoch, total, min(warmup, total), config.lr.base * scale,
                    config.lr.min * scale)


def model_config(config: ml_collections.ConfigDict) -> MarlinConfig:
    """The MarlinConfig: ``config.model.name`` + non-None overrides + the data's clip geometry."""
    values = {k: v for k, v in config.model.to_dict().items() if v is not None}
    d = config.data
    values.update(img_size=d.img_size, n_frames=d.clip_frames, patch_size=d.patch_size,
                  tubelet_size=d.tubelet_size)
    return config_from_mapping(values)


def mesh_platform(mesh: Mesh) -> str:
    """``cpu`` / ``gpu`` / ``tpu`` of the mesh's devices (abstract topology devices included)."""
    platform = mesh.devices.flat[0].platform.lower()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def compute_dtype(name: str, platform: str) -> Any:
    """``auto`` = bfloat16 on GPU/TPU, float32 on CPU."""
    dtypes = {"auto": jnp.float32 if platform == "cpu" else jnp.bfloat16, "float32": jnp.float32,
              "bfloat16": jnp.bfloat16}
    if name not in dtypes:
        raise ValueError(f"config.compute_dtype must be auto|float32|bfloat16, got {name!r}")
    return dtypes[name]


def attention_impl(name: str, platform: str, dtype: Any = jnp.bfloat16) -> str | None:
    """``""`` / ``auto``: :func:`models.layers.default_attention_impl` (training); others as given."""
    return default_attention_impl(platform, dtype, training=True) if name in ("", "auto") else name


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """What the trainer runs: the task, the abstract (``ShapeDtypeStruct`` with shardings) state,
    batch and stop flags, the jitted steps. Trace and lower inside :meth:`mesh_context` (Pallas
    attention is wrapped in ``shard_map`` over the context mesh)."""

    model_cfg: MarlinConfig
    mesh: Mesh
    dtype: Any
    attention_impl: str | None
    global_batch: int
    num_visible: int
    task: steps.Task
    init_fn: Callable[[], st.TrainState]
    abstract_state: st.TrainState
    state_shardings: Any
    batch_shardings: dict[str, Any]
    abstract_batch: dict[str, jax.ShapeDtypeStruct]
    abstract_stop: jax.ShapeDtypeStruct
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]

    def mesh_context(self) -> jax.set_mesh:
        """``with program.mesh_context():`` (``jax.set_mesh`` takes effect when called)."""
        return jax.set_mesh(self.mesh)

    def lower_train_step(self) -> Any:
        """``jax.stages.Lowered`` of the train step on the abstract state, batch and stop flags."""
        with self.mesh_context():
            return self.train_step.lower(self.abstract_state, self.abstract_batch,
                                         self.abstract_stop)

    def stop_flags(self, requested: bool) -> jax.Array:
        """The train step's ``stop`` argument: this process's SIGTERM flag on each of its devices
        (bool ``(mesh.size,)``, one element per device); the step returns their ``any``."""
        return jax.make_array_from_callback(self.abstract_stop.shape, self.abstract_stop.sharding,
                                            lambda _: np.array([requested]))

    def model_flops_per_step(self) -> float:
        """Model FLOPs of one train step over the global batch (see :func:`train_step_flops`)."""
        return train_step_flops(self.model_cfg, self.global_batch, self.num_visible,
                                d_steps=self.task.step.d_steps, g_steps=self.task.step.g_steps,
                                gp=self.task.step.gp_weight > 0)


def model_settings(config: ml_collections.ConfigDict, mesh: Mesh, process_count: int = 1
                   ) -> tuple[MarlinConfig, Any, str | None, int]:
    """(model config, compute dtype, attention implementation, global batch) of ``config`` on
    ``mesh``; ValueError unless the batch is a multiple of the batch shards and processes."""
    platform = mesh_platform(mesh)
    dtype = compute_dtype(config.compute_dtype, platform)
    batch, shards = int(config.global_batch_size), shd.batch_divisor(mesh)
    if batch <= 0 or batch % shards or batch % process_count:
        raise ValueError(f"global_batch_size {batch} must be a positive multiple of the batch shards {shards} "
                         f"(mesh {dict(mesh.shape)}: data x fsdp) and of {process_count} processes")
    return model_config(config), dtype, attention_impl(config.attention_impl, platform, dtype), batch


def build_program(config: ml_collections.ConfigDict, mesh: Mesh, schedule: Schedule,
                  process_count: int = 1) -> TrainProgram:
    """The pretraining program of ``config`` on ``mesh`` (real or abstract topology devices)."""
    model_cfg, dtype, impl, batch = model_settings(config, mesh, process_count)
    k = int(model_cfg.num_tokens * (1 - config.data.mask_ratio))  # as the masking code

    g_tx = d_tx = st.make_optimizer(**config.optimizer)
    per = schedule.steps_per_epoch if config.lr.per_epoch else 1
    lr = st.lr_schedule(schedule.base_lr, schedule.min_lr, schedule.warmup_steps,
                        schedule.total_steps, per)
    init_fn = functools.partial(st.init_train_state, model_cfg, g_tx, d_tx, config.seed,
                                scan_layers=config.scan_layers)
    abstract = jax.eval_shape(init_fn)
    state_shardings = shd.tree_shardings(abstract, mesh)
    task = steps.Task(
        model=st.build_model_def(model_cfg, dtype=dtype, remat_policy=config.remat_policy,
                                 scan_layers=config.scan_layers, attention_impl=impl),
        g_tx=g_tx, d_tx=d_tx, g_schedule=lr, d_schedule=lr,
        step=steps.StepConfig(num_visible=k, adv_weight=config.adv_weight,
                              gp_weight=config.gp_weight, d_steps=config.d_steps,
                              g_steps=config.g_steps),
        grad_shardings=(state_shardings.g_params, state_shardings.d_params))
    abstract_state = shd.abstract_with_shardings(abstract, mesh)
    t, s, c = model_cfg.n_frames, model_cfg.img_size, model_cfg.in_channels
    abstract_batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, len(shape)))
                      for name, shape, dtype in (("video", (batch, t, s, s, c), jnp.uint8),
                                                 ("mask", (batch, model_cfg.num_tokens), jnp.bool_))}
    batch_shardings = {name: x.sharding for name, x in abstract_batch.items()}
    stop_sharding = NamedSharding(mesh, P(mesh.axis_names))
    repl = shd.replicated(mesh)
    return TrainProgram(
        model_cfg=model_cfg, mesh=mesh, dtype=dtype,
        attention_impl=impl, global_batch=batch, num_visible=k, task=task, init_fn=init_fn,
        abstract_state=abstract_state, state_shardings=state_shardings,
        batch_shardings=batch_shardings, abstract_batch=abstract_batch,
        abstract_stop=jax.ShapeDtypeStruct((mesh.size,), jnp.bool_, sharding=stop_sharding),
        train_step=steps.jit_train_step(task, state_shardings, batch_shardings, repl, stop_sharding),
        eval_step=steps.jit_eval_step(task, state_shardings, batch_shardings, repl))


# ----------------------------------------------------------------------------- model FLOPs


def _transformer_flops(tokens: int, dim: int, depth: int, mlp_ratio: float) -> float:
    """Forward matmul FLOPs of ``depth`` ViT blocks over ``tokens`` tokens of width ``dim``
    (qkv, q k^T, p v, proj, fc1, fc2; one multiply-add = 2 FLOPs)."""
    hidden = int(dim * mlp_ratio)
    per_block = (2 * tokens * dim * 3 * dim + 2 * 2 * tokens * tokens * dim
                 + 2 * tokens * dim * dim + 2 * 2 * tokens * dim * hidden)
    return float(depth * per_block)


def train_step_flops(cfg: MarlinConfig, batch: int, num_visible: int, *, d_steps: int = 1,
                     g_steps: int = 1, gp: bool = False) -> float:
    """Model FLOPs of one train step (the MFU numerator; remat's recomputation not counted),
    within a few % of the compiled GPU step's matmul FLOPs. A backward pass costs 2x its forward
    (1x where only input or weight gradients are needed): per clip, each G update is 3x the
    generator (patch embedding 2x) + 2x the critic on the prediction; each D update 2 x 2x the
    critic (fake and real), + 3 critic passes for the gradient penalty."""
    n, k, d, dd, pd = (cfg.num_tokens, num_visible, cfg.encoder_embed_dim, cfg.decoder_embed_dim,
                       cfg.patch_dim)
    patch_embedding = 2.0 * n * pd * d
    gen = (patch_embedding + _transformer_flops(k, d, cfg.encoder_depth, cfg.mlp_ratio)
           + 2.0 * k * d * dd + _transformer_flops(n, dd, cfg.decoder_depth, cfg.mlp_ratio)
           + 2.0 * (n - k) * dd * pd)
    critic = 2.0 * (n - k) * (pd * cfg.discriminator_hidden + cfg.discriminator_hidden)
    per_d = 2 * 2 * critic + (3 * critic if gp else 0)
    per_g = 3 * gen - patch_embedding + 2 * critic
    return float(batch * (d_steps * per_d + g_steps * per_g))


def encoder_forward_flops(cfg: MarlinConfig) -> float:
    """Forward FLOPs of feature extraction for one clip (all ``N`` tokens through the encoder)."""
    n, d = cfg.num_tokens, cfg.encoder_embed_dim
    return 2.0 * n * cfg.patch_dim * d + _transformer_flops(n, d, cfg.encoder_depth, cfg.mlp_ratio)
