"""The MARLIN pretraining recipe shared by `configs/vit_{small,base,large}.py`.

Values are the original's (ControlNet/MARLIN `config/pretrain/marlin_vit_*.yaml` + `train.py`):
fasking at 90 %, 16-frame clips at stride 2, AdamW betas (0.9, 0.95), eps 1e-8, no weight decay,
lr 1.5e-4 (min 1e-5) scaled by global_batch / 256, 40 warm-up epochs of 2000, adv_weight 0.01,
gp_weight 0, one critic and one generator update per batch.
"""

from __future__ import annotations

import dataclasses
import typing

import ml_collections

from marlin_jax.data import default_data_config
from marlin_jax.models import MarlinConfig

# MarlinConfig fields that are not `config.model` overrides: the clip geometry comes from
# `config.data`; the rest are fixed by the architecture (or, downloadable, by the registry).
_NOT_OVERRIDABLE = ("img_size", "n_frames", "patch_size", "tubelet_size", "qk_scale",
                    "norm_layer", "in_channels", "layer_norm_eps", "downloadable")


def _model_fields() -> dict[str, type]:
    """``{field: type}`` of every overridable MarlinConfig field, read from the dataclass."""
    hints = typing.get_type_hints(MarlinConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(MarlinConfig)
            if f.name not in _NOT_OVERRIDABLE}


# MarlinConfig fields that may be overridden (None = the named model's value).
MODEL_FIELDS = _model_fields()


def get_base_config(model_name: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"name": model_name})
    for field, kind in MODEL_FIELDS.items():
        c.model[field] = ml_collections.config_dict.placeholder(kind)

    c.data = default_data_config()
    c.data.source = ""  # "" = not configured: the trainer says so and uses "synthetic"

    c.global_batch_size = 128  # clips per step over all hosts (the lr is scaled by it / 256)
    c.seed = 0

    c.optimizer = ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=0.0))
    c.lr = ml_collections.ConfigDict(dict(
        base=1.5e-4,  # at global batch 256
        min=1e-5,  # at global batch 256
        scale_with_batch=True,  # lr, min *= global_batch_size / 256 (as the original)
        warmup_epochs=40.0,
        warmup_steps=-1,  # > 0 overrides warmup_epochs
        per_epoch=False,  # True: change the lr once per epoch like the original's LambdaLR
    ))
    c.num_epochs = 2000
    c.steps_per_epoch = -1  # -1 = len(train split) // global_batch_size
    c.num_train_steps = -1  # -1 = num_epochs * steps_per_epoch

    c.adv_weight = 0.01
    c.gp_weight = 0.0
    c.d_steps = 1
    c.g_steps = 1

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1 = the rest
    c.compute_dtype = "auto"  # auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16
    # Rematerialisation of the transformer blocks in the backward pass: "none" | "full" (recompute
    # everything, keep block inputs only) | "dots" (keep matmul outputs) | "dots_no_batch" (keep
    # the projection matmuls, recompute attention). See marlin_jax.models.REMAT_POLICIES.
    c.remat_policy = "none"
    c.scan_layers = False  # True: the blocks run as one lax.scan over stacked weights (fast compiles)
    c.attention_impl = ""  # "" = per platform: splash (Pallas) on TPU, cudnn on GPU, xla on CPU

    c.log_every_steps = 50
    c.eval_every_steps = 1000  # validation loss + reconstruction image
    c.num_eval_batches = 8
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    # Start over in a workdir that holds a run (another model, clip geometry or optimiser
    # layout is refused without it; another scan_layers is converted on restore): its contents
    # are moved, not deleted, to <workdir>/previous-<YYYYmmdd-HHMMSS>/. Pass it once, not in a
    # command a scheduler repeats (every restart would start over again).
    c.fresh_start = False
    c.async_checkpointing = True
    c.peak_flops_per_device = 0.0  # > 0 overrides the built-in table for the MFU figure

    # A checkpoint to start from when the workdir has none: VideoMAE (.pth), MARLIN (.pt,
    # .encoder.pt) or the original trainer's Lightning .ckpt (parameters; step with
    # init_step_from_checkpoint).
    c.init_from = ""
    c.init_step_from_checkpoint = True  # Lightning .ckpt: continue from its global_step
    c.init_optimizer_from_checkpoint = True  # Lightning .ckpt: continue its AdamW moments (when present)
    return c


def apply_demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `:demo` variant: the recipe's fasking at 90 %, shrunk to learn visibly in a few minutes
    on one CPU on the built-in synthetic faces: 64 px, 8 frames, 8 px patches (an 8 x 8 grid, so
    that fasking's regions exist at this size), a narrow ViT (width 192 / 96, 2 encoder / 1
    decoder blocks), batch 8, 1500 steps. The adversarial term is off (adv_weight 0): with the
    recipe's 0.01 the critic's gradients keep so young a model at the mean-colour level (validation
    loss 0.86x the mean-colour baseline after 1000 steps, 0.76x without). The data source stays
    unset, so the trainer says it uses the synthetic dataset."""
    c.data.img_size = 64
    c.data.clip_frames = 8
    c.data.patch_size = 8
    c.data.num_threads = 2
    c.data.synthetic_num_videos = 256
    c.model.encoder_embed_dim = 192
    c.model.encoder_num_heads = 3
    c.model.encoder_depth = 2
    c.model.decoder_embed_dim = 96
    c.model.decoder_num_heads = 3
    c.model.decoder_depth = 1
    c.global_batch_size = 8
    c.adv_weight = 0.0
    c.lr.scale_with_batch = False
    c.lr.base = 1e-3
    c.lr.min = 1e-5
    c.lr.warmup_steps = 50
    c.num_train_steps = 1500
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.num_eval_batches = 2
    c.checkpoint_every_steps = 500
    return c


def parse_arg(arg: str | None) -> str:
    arg = (arg or "").strip()
    if arg not in ("", "demo"):
        raise ValueError(f"unknown config variant {arg!r}; use '' or 'demo' (e.g. vit_base.py:demo)")
    return arg
