"""Benchmark: MARLIN feature extraction, marlin-jax vs marlin-pytorch, same weights, same clips.

    python scripts/bench_extract.py [--model marlin_vit_base_ytf] [--batch 4] [--repeats 5]

Prints clips/s of each implementation and the ratio (jax / torch) for the float32 path and the
bf16-matmul path (bf16 operands, float32 accumulation: uses the bf16 dot-product units of recent
CPUs), plus the difference of the features from the reference (max-abs, relative to the largest
feature, and the lowest cosine similarity). Both run in this process on the same device kind
(CPU here; with a GPU, torch runs on cuda and jax on the default backend).

On CPU the ratio depends on the allocator: with glibc's default malloc, torch pays page faults on
its large freshly mmap'ed buffers and XLA mostly does not; run it also with
``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=8589934592`` (or jemalloc/tcmalloc),
which makes torch ~1.3x faster and leaves marlin-jax unchanged, to see both figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _stub_torchvision() -> None:
    # marlin-pytorch imports torchvision only for read_video; the CPU torch here has no torchvision.
    try:
        import torchvision  # noqa: F401
    except Exception:
        tv = types.ModuleType("torchvision")
        tv.io = types.ModuleType("torchvision.io")
        sys.modules["torchvision"], sys.modules["torchvision.io"] = tv, tv.io
    try:
        import ffmpeg  # noqa: F401
    except ImportError:
        sys.modules["ffmpeg"] = types.ModuleType("ffmpeg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="marlin_vit_base_ytf")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--modes", nargs="+", default=["float32", "bf16-matmul"],
                        choices=["float32", "bf16-matmul", "bfloat16"],
                        help="float32; bf16-matmul: bf16 matmul operands, float32 accumulation and activations; "
                             "bfloat16: bf16 activations too")
    parser.add_argument("--attention", default="auto", choices=["auto", "xla", "per_head", "cudnn"],
                        help="marlin-jax attention: auto (per_head on CPU, xla elsewhere, as Marlin.from_file), "
                             "or cudnn (fused GPU kernel)")
    args = parser.parse_args()

    _stub_torchvision()
    import jax
    import jax.numpy as jnp
    import marlin_pytorch
    import torch

    from marlin_jax.extract import Marlin, resolve_attention_impl
    from marlin_jax.interop import model_from_state_dict
    from marlin_jax.models import get_config
    from tests.oracle_utils import build_torch_marlin, to_numpy_state_dict

    config = get_config(args.model)
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = build_torch_marlin(marlin_pytorch, config, full=False).to(device)
    state_dict = to_numpy_state_dict(("", reference))
    clips = np.random.default_rng(0).random((args.batch, config.n_frames, config.img_size, config.img_size, 3),
                                            dtype=np.float32)
    clips_t = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).contiguous().to(device)

    def run_torch():
        with torch.no_grad():
            out = reference.extract_features(clips_t, keep_seq=False)
            if device == "cuda":
                torch.cuda.synchronize()
            return out

    expected = run_torch().float().cpu().numpy()  # also the warm-up
    mode_kwargs = {"float32": {}, "bf16-matmul": {"matmul_dtype": jnp.bfloat16}, "bfloat16": {"dtype": jnp.bfloat16}}
    runners, errors = {}, {}
    x = jax.device_put(clips)
    for mode in args.modes:
        model = model_from_state_dict(config, state_dict, attention_impl=resolve_attention_impl(args.attention),
                                      **mode_kwargs[mode])
        marlin = Marlin(model, batch_size=args.batch)
        runners[mode] = lambda m=marlin: m.extract_features(x, keep_seq=False).block_until_ready()
        got = np.asarray(runners[mode]())  # compiles too
        cosine = np.sum(got * expected, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(expected, axis=-1))
        max_abs = float(np.max(np.abs(got - expected)))
        errors[mode] = (max_abs, max_abs / float(np.max(np.abs(expected))), float(np.min(cosine)))

    # Interleaved rounds (torch, then each jax mode): machine noise hits both sides alike; the
    # ratio is the median of the per-round ratios.
    times: dict[str, list[float]] = {"torch": [], **{m: [] for m in args.modes}}
    for _ in range(args.repeats):
        for name, fn in (("torch", run_torch), *runners.items()):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f"device: jax={jax.devices()[0].device_kind} torch={device} threads={torch.get_num_threads()} "
          f"model={args.model} batch={args.batch} rounds={args.repeats} "
          f"attention={resolve_attention_impl(args.attention)}")
    torch_s = float(np.median(times["torch"]))
    print(f"marlin-pytorch fp32   : {args.batch / torch_s:8.2f} clips/s ({torch_s * 1e3:.0f} ms/batch, median)")
    for mode in args.modes:
        jax_s = float(np.median(times[mode]))
        ratio = float(np.median(np.array(times["torch"]) / np.array(times[mode])))
        print(f"marlin-jax {mode:11s}: {args.batch / jax_s:8.2f} clips/s ({jax_s * 1e3:.0f} ms/batch, median)  "
              f"ratio vs torch fp32: {ratio:5.2f}x  max-abs diff {errors[mode][0]:.1e} "
              f"({errors[mode][1]:.1e} of max |feature|, min cosine {errors[mode][2]:.6f})")

if __name__ == "__main__":
    main()
