"""TensorBoard event files without TensorFlow (tensorboardX), the console line, MFU."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from marlin_jax.files import atomic_path


class TensorboardWriter:
    """TensorBoard event files in ``logdir`` (created), written with tensorboardX."""

    def __init__(self, logdir: str | os.PathLike):
        from tensorboardX import SummaryWriter

        os.makedirs(logdir, exist_ok=True)
        self._writer = SummaryWriter(logdir=os.fspath(logdir), flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(np.asarray(value)), global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """images: ``(H, W, C)`` uint8, or float in [0, 1]."""
        for key, value in images.items():
            self._writer.add_image(key, np.asarray(value), global_step=step, dataformats="HWC")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The run's flat ``{name: value}`` config as one text summary."""
        self._writer.add_text("hparams", "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items())))

    def close(self) -> None:
        self._writer.close()


# Dense peak FLOP/s per chip for the MFU estimate (bf16 on accelerators; None = unknown).
_PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l4", 121e12), ("a10", 125e12),
    ("v100", 125e12), ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12), ("tpu v4", 275e12), ("tpu v3", 123e12),
)


def peak_flops_per_device(device: jax.Device | None = None, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device (``override`` when > 0; None for unknown devices, e.g. CPUs)."""
    if override > 0:
        return float(override)
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "").lower()
    return next((flops for name, flops in _PEAK_FLOPS if name in kind), None)


def cost_analysis(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled (sharded: per device) computation; {} when the backend
    (or a compile-only executable) reports none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return {}
    return dict((cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {}))


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled computation (XLA's cost analysis); None when unknown."""
    flops = float(cost_analysis(compiled).get("flops", 0.0))
    return flops if flops > 0 else None


def mfu(flops_per_device_step: float | None, step_time_s: float,
        peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None when a figure is unknown)."""
    if not flops_per_device_step or not peak or step_time_s <= 0:
        return None
    return flops_per_device_step / step_time_s / peak


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def console_line(step: int, total_steps: int, scalars: Mapping[str, float], *,
                 clips_per_s: float, step_time_s: float, mfu_value: float | None,
                 eta_s: float) -> str:
    """One human-readable progress line."""
    def g(name: str) -> str:
        v = scalars.get(name)
        return "-" if v is None else f"{float(v):.4f}"

    mfu_txt = "n/a" if mfu_value is None else f"{100 * mfu_value:.1f}%"
    return (f"step {step}/{total_steps} | rec {g('rec_loss')} adv {g('adv_loss')} "
            f"d {g('d_loss')} gp {g('gp')} | lr {float(scalars.get('g_lr', 0.0)):.3e} | "
            f"{clips_per_s:.1f} clips/s {1000 * step_time_s:.0f} ms/step | MFU {mfu_txt} | "
            f"ETA {format_duration(eta_s)}")


def _row_step(line: str) -> float:
    """The ``"step"`` of a metrics.jsonl line (inf when it has none)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def drop_rows_after(path: str | os.PathLike, step: int) -> int:
    """Removes the rows of a ``metrics.jsonl`` whose ``"step"`` is after ``step`` (a resumed run
    writes them again) and lines that are no JSON object with a step (cut short by a crash);
    returns how many. Rewritten atomically, so each step appears once."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [x for x in f.read().splitlines() if x.strip()]
    kept = [x for x in lines if _row_step(x) <= step]
    dropped = len(lines) - len(kept)
    if dropped:
        with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
            f.write("".join(x + "\n" for x in kept))
    return dropped
