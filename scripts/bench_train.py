"""Benchmark of one MARLIN pretraining step (critic update + generator update, AdamW both):
marlin-jax's jitted step vs the PyTorch reference step (marlin-pytorch modules + the original
trainer's training_step), same machine, same run, same batch and mask.

    python scripts/bench_train.py                        # ViT-S and ViT-B, batch 2, CPU
    python scripts/bench_train.py --models base --batch 128 --steps 10 --dtype bfloat16 \
        --attention cudnn --torch-device cuda            # GPU, both sides on the GPU

Prints step time and clips/s of both and the ratio (target >= 1.3x on CPU); on accelerators the
measured MFU: the model FLOPs of a step as the trainer counts them (``program.train_step_flops``)
over the step time and the chip's peak (XLA's compiled count is printed beside it: it leaves out
cuDNN's fused attention). The reference runs on ``--torch-device`` (under bf16 autocast when
``--dtype bfloat16``); ``--no-torch`` skips it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from marlin_jax.models import REMAT_POLICIES, get_config  # noqa: E402
from marlin_jax.train import metrics as mt  # noqa: E402
from marlin_jax.train import program, steps  # noqa: E402
from marlin_jax.train import state as st  # noqa: E402

NAMES = {"small": "marlin_vit_small_ytf", "base": "marlin_vit_base_ytf",
         "large": "marlin_vit_large_ytf", "tiny": "marlin_vit_tiny"}


def _batch(cfg, batch: int, mask_ratio: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = cfg.num_tokens
    k = int(n * (1 - mask_ratio))
    mask = np.zeros((batch, n), bool)
    for i in range(batch):
        mask[i, rng.choice(n, k, replace=False)] = True
    video = rng.integers(0, 256, (batch, cfg.n_frames, cfg.img_size, cfg.img_size, 3), np.uint8)
    return {"video": video, "mask": mask}


def bench_jax(cfg, batch: dict[str, np.ndarray], steps_n: int, dtype, remat_policy: str = "none",
              attention: str | None = None, scan_layers: bool = False) -> dict:
    k = int(batch["mask"][0].sum())
    tx = st.make_optimizer()
    sched = st.lr_schedule(1.5e-4, 1e-5, 10, 1000)
    model = st.build_model_def(cfg, dtype=dtype, remat_policy=remat_policy, scan_layers=scan_layers,
                               attention_impl=attention)
    task = steps.Task(model, tx, tx, sched, sched, steps.StepConfig(num_visible=k))
    state = jax.jit(lambda: st.init_train_state(cfg, tx, tx, 0, scan_layers=scan_layers))()
    dev_batch = jax.device_put(batch)
    t0 = time.perf_counter()
    step = jax.jit(lambda s, b: steps.train_step(task, s, b), donate_argnums=0).lower(
        state, dev_batch).compile()
    compile_s = time.perf_counter() - t0
    state, m = step(state, dev_batch)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps_n):
        state, m = step(state, dev_batch)
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t0) / steps_n
    return {"step_s": dt, "compile_s": compile_s, "xla_flops": mt.compiled_flops(step),
            "model_flops": program.train_step_flops(cfg, len(batch["mask"]), k),
            "rec_loss": float(m["rec_loss"])}


def _torch_modules():
    """marlin-pytorch's model modules, importable without torchvision / ffmpeg binaries."""
    for name in ("torchvision", "torchvision.io", "ffmpeg"):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision"].io = sys.modules["torchvision.io"]
    sys.modules["torchvision.io"].read_video = None
    from marlin_pytorch.model.decoder import MarlinDecoder
    from marlin_pytorch.model.encoder import MarlinEncoder
    from marlin_pytorch.model.modules import MLP

    return MarlinEncoder, MarlinDecoder, MLP


def bench_torch(cfg, batch: dict[str, np.ndarray], steps_n: int, device: str = "cpu",
                bf16: bool = False) -> dict:
    """The original `training_step` (d_steps = g_steps = 1, gp_weight 0, AdamW both) on
    ``device``, under bf16 autocast when ``bf16`` (the reference's mixed precision)."""
    import contextlib

    import torch

    MarlinEncoder, MarlinDecoder, MLP = _torch_modules()
    c = cfg
    common = dict(img_size=c.img_size, patch_size=c.patch_size, n_frames=c.n_frames,
                  mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, qk_scale=None, drop_rate=0.0,
                  attn_drop_rate=0.0, norm_layer="LayerNorm", init_values=0.0,
                  tubelet_size=c.tubelet_size)
    enc = MarlinEncoder(embed_dim=c.encoder_embed_dim, depth=c.encoder_depth,
                        num_heads=c.encoder_num_heads, **common)
    dec = MarlinDecoder(embed_dim=c.decoder_embed_dim, depth=c.decoder_depth,
                        num_heads=c.decoder_num_heads, **common)
    proj = torch.nn.Linear(c.encoder_embed_dim, c.decoder_embed_dim, bias=False)
    disc = MLP([c.patch_dim, c.discriminator_hidden, 1], build_activation=torch.nn.LeakyReLU)
    for module in (enc, dec, proj, disc):
        module.to(device)
    g_params = [p for m in (enc, dec, proj) for p in m.parameters() if p.requires_grad]
    g_opt = torch.optim.AdamW(g_params, lr=1.5e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=1.5e-4, betas=(0.9, 0.95), eps=1e-8,
                              weight_decay=0)
    x = torch.from_numpy(batch["video"].astype(np.float32) / 255).permute(0, 4, 1, 2, 3)
    x = x.contiguous().to(device)
    mask = torch.from_numpy(batch["mask"]).to(device)
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    pt, p = c.tubelet_size, c.patch_size

    def forward():
        pred = dec(proj(enc(x, mask)), mask)
        y = x.unfold(2, pt, pt).unfold(3, p, p).unfold(4, p, p)
        b = y.shape[0]
        y = y.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(b, -1, 3 * pt * p * p)
        return pred, y[~mask].view(b, -1, y.shape[-1])

    def train_step():
        d_opt.zero_grad()
        with autocast:
            pred, y = forward()
            d_loss = disc(pred).mean() - disc(y).mean()
        d_loss.backward()
        d_opt.step()
        g_opt.zero_grad()
        with autocast:
            pred, y = forward()
            rec = torch.nn.functional.mse_loss(pred.float(), y)
            loss = rec + 0.01 * -disc(pred).mean()
        loss.backward()
        g_opt.step()
        return rec.detach()

    float(train_step())  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(steps_n):
        rec = train_step()
    sync()
    return {"step_s": (time.perf_counter() - t0) / steps_n, "rec_loss": float(rec),
            "threads": torch.get_num_threads()}


def find_max_batch(cfg, args, dtype) -> int:
    """Largest batch (doubling from --batch) whose step compiles and runs in device memory."""
    best, b = 0, args.batch
    while b <= 4096:
        try:
            r = bench_jax(cfg, _batch(cfg, b, args.mask_ratio), 1, dtype, args.remat_policy,
                          args.attention or None, args.scan_layers)
        except Exception as e:  # noqa: BLE001 - XLA reports OOM as several error types
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            print(f"  batch {b}: out of memory", flush=True)
            break
        print(f"  batch {b}: {1000 * r['step_s']:.0f} ms/step, {b / r['step_s']:.1f} clips/s",
              flush=True)
        best, b = b, 2 * b
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="small,base", help="comma list of tiny|small|base|large")
    ap.add_argument("--batch", type=int, default=2, help="clips per step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--mask-ratio", type=float, default=0.9)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--remat-policy", default="none", choices=list(REMAT_POLICIES),
                    help="rematerialisation of the transformer blocks in the backward pass")
    ap.add_argument("--scan-layers", action="store_true", help="run the blocks as one lax.scan")
    ap.add_argument("--attention", default="", help="jax.nn.dot_product_attention "
                    "implementation: '' (XLA) | cudnn")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--torch-device", default="cpu", help="device of the PyTorch reference: cpu | cuda")
    ap.add_argument("--find-max-batch", action="store_true",
                    help="double the batch from --batch until the step runs out of memory")
    args = ap.parse_args()

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} x{jax.device_count()} ({jax.default_backend()}), "
          f"batch {args.batch}, {args.dtype}, mask ratio {args.mask_ratio}, "
          f"{os.cpu_count()} CPU cores", flush=True)
    for name in args.models.split(","):
        cfg = get_config(NAMES[name.strip()])
        if args.find_max_batch:
            print(f"{name}: max batch {find_max_batch(cfg, args, dtype)} "
                  f"(remat {args.remat_policy}, scan {args.scan_layers}, {args.dtype})", flush=True)
            continue
        batch = _batch(cfg, args.batch, args.mask_ratio)
        j = bench_jax(cfg, batch, args.steps, dtype, args.remat_policy, args.attention or None,
                      args.scan_layers)
        peak = mt.peak_flops_per_device(dev)
        mfu = mt.mfu(j["model_flops"], j["step_s"], peak)
        line = (f"{name:>5}: marlin-jax {1000 * j['step_s']:8.1f} ms/step "
                f"{args.batch / j['step_s']:7.2f} clips/s (compile {j['compile_s']:.0f}s, "
                f"{j['model_flops'] / 1e9:.0f} model GFLOP/step"
                + (f", XLA counts {j['xla_flops'] / 1e9:.0f}" if j["xla_flops"] else "")
                + (f", measured MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s" if mfu else "")
                + f", rec_loss {j['rec_loss']:.4f})")
        if not args.no_torch:
            t = bench_torch(cfg, batch, args.steps, args.torch_device, dtype == jnp.bfloat16)
            t_mfu = mt.mfu(j["model_flops"], t["step_s"], peak)
            line += (f" | pytorch ({args.torch_device}) {1000 * t['step_s']:8.1f} ms/step "
                     f"{args.batch / t['step_s']:7.2f} clips/s"
                     + (f", MFU {100 * t_mfu:.1f}%" if t_mfu and args.torch_device != "cpu" else
                        f" ({t['threads']} threads)")
                     + f", rec_loss {t['rec_loss']:.4f} | speed-up {t['step_s'] / j['step_s']:.2f}x")
        print(line, flush=True)


if __name__ == "__main__":
    main()
