"""The README's accelerator tables: ahead-of-time compiles of the pretraining step for TPU
slices and GPUs.

    JAX_PLATFORMS=cpu python scripts/aot_table.py --models small,base,large \\
        --topologies v5e:2x2,v5p:2x2x1 --variants after --out aot_table.md
    JAX_PLATFORMS=cpu python scripts/aot_table.py --topologies h100:8,h200:8 \\
        --variants xla,xla_remat,fused,fused_remat --out aot_gpu.md --json aot_gpu.json

Each row is ``marlin_jax.aot.run(..., max_batch=True)`` for one model x slice x variant:
``before`` = unrolled blocks, batched XLA attention, no remat (the trainer as of 2026-12-01);
``after`` = scanned blocks and splash attention, with remat only where the model does not fit
otherwise (``full``), FSDP over the slice when the parameters would not fit replicated;
``xla`` / ``fused`` = unrolled blocks with batched XLA attention / the platform's fused attention
(splash on TPU, cuDNN on GPU), ``*_remat`` the same with full remat, ``xla_scan_remat`` scanned
blocks, XLA attention, full remat (on GPUs under data parallelism remat only holds with scanned
blocks: see the README). Step time and MFU are
estimates from XLA's cost model or the module text (see marlin_jax/aot.py), not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from marlin_jax import aot  # noqa: E402

VARIANTS = {
    "before": {"scan_layers": False, "attention_impl": "xla", "remat_policy": "none"},
    "after": {"scan_layers": True, "attention_impl": "", "remat_policy": "none"},
    "after_remat": {"scan_layers": True, "attention_impl": "", "remat_policy": "full"},
    "xla": {"scan_layers": False, "attention_impl": "xla", "remat_policy": "none"},
    "xla_remat": {"scan_layers": False, "attention_impl": "xla", "remat_policy": "full"},
    "fused": {"scan_layers": False, "attention_impl": "", "remat_policy": "none"},
    "fused_remat": {"scan_layers": False, "attention_impl": "", "remat_policy": "full"},
    "xla_scan_remat": {"scan_layers": True, "attention_impl": "xla", "remat_policy": "full"},
}


def config_for(model: str, variant: str, topology: str, per_device_batch: int, fsdp: bool):
    from configs import vit_base, vit_large, vit_small

    module = {"small": vit_small, "base": vit_base, "large": vit_large}[model]
    c = module.get_config()
    c.compute_dtype = "bfloat16"
    for key, value in VARIANTS[variant].items():
        c[key] = value
    target = aot.make_target(topology)
    n = len(target.devices)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (1, n, 1) if fsdp else (n, 1, 1)
    c.global_batch_size = per_device_batch * n
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small,base,large")
    ap.add_argument("--topologies", default="v5e:2x2,v5p:2x2x1")
    ap.add_argument("--variants", default="before,after")
    ap.add_argument("--start_batch", type=int, default=16, help="first per-device batch tried")
    ap.add_argument("--max_compiles", type=int, default=8, help="compiles per --max_batch search")
    ap.add_argument("--fsdp", action="store_true", help="shard parameters over the slice (FSDP)")
    ap.add_argument("--out", default="aot_table.md")
    ap.add_argument("--json", default="aot_table.json")
    args = ap.parse_args()
    jax.config.update("jax_platforms", "cpu")
    rows, records = [], []
    for model in args.models.split(","):
        for topology in args.topologies.split(","):
            for variant in args.variants.split(","):
                config = config_for(model, variant, topology, args.start_batch, args.fsdp)
                print(f"== ViT-{model[0].upper()} {topology} {variant}", flush=True)
                t0 = time.perf_counter()
                try:
                    out = aot.run(config, topology, max_batch=True, features=False,
                                  max_compiles=args.max_compiles)
                except aot.AotError as e:
                    print(f"   {e}", flush=True)
                    rows.append(f"| ViT-{model[0].upper()} | {topology} | {variant} | does not fit "
                                "| | | | |")
                    continue
                step = out["train_step"]
                records.append({"model": model, "topology": topology, "variant": variant, **out})
                rows.append(
                    f"| ViT-{model[0].upper()} | {topology} | {variant} "
                    f"| {out['max_batch']['batch_per_device']} "
                    f"| {step['total_bytes'] / aot.GiB:.1f} / {step['usable_bytes'] / aot.GiB:.0f} "
                    f"| {step['compile_s']:.0f} s | {1e3 * step['estimated_step_s']:.0f} ms "
                    f"| {100 * step['estimated_mfu']:.1f} % |")
                print(f"   {time.perf_counter() - t0:.0f} s for this row", flush=True)
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(records, f, indent=1, default=float)
    header = ("| model | slice | variant | max clips / chip | memory GiB (of HBM) | compile "
              "| est. step | est. MFU |\n|---|---|---|---|---|---|---|---|")
    table = header + "\n" + "\n".join(rows)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
