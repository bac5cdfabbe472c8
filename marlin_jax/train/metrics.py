"""Metric writers (TensorBoard without TensorFlow), metric accumulation, console line, MFU.

``create_writer`` returns a clu ``MetricWriter``: clu's TensorFlow SummaryWriter when TensorFlow
is installed, otherwise :class:`TensorboardXWriter` (tensorboardX event files behind the same
interface). clu's ``metric_writers/__init__`` imports TensorFlow, so without it the interface
modules (which do not) are loaded directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from clu import metrics as clu_metrics

log = logging.getLogger(__name__)


def _clu_writer_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """clu's ``metric_writers.interface`` and ``multi_writer`` modules, with or without TF."""
    try:
        from clu.metric_writers import interface, multi_writer
        return interface, multi_writer
    except ImportError:
        pass
    # The package __init__ imports TensorFlow; register the package without running it so that
    # its TF-free submodules import normally.
    spec = importlib.util.find_spec("clu")
    pkg_dir = os.path.join(os.path.dirname(spec.origin), "metric_writers")
    pkg = sys.modules.get("clu.metric_writers")
    if pkg is None or not hasattr(pkg, "__path__"):
        pkg = types.ModuleType("clu.metric_writers")
        pkg.__path__ = [pkg_dir]
        pkg.__package__ = "clu.metric_writers"
        sys.modules["clu.metric_writers"] = pkg
    interface = importlib.import_module("clu.metric_writers.interface")
    multi_writer = importlib.import_module("clu.metric_writers.multi_writer")
    return interface, multi_writer


_interface, _multi_writer = _clu_writer_modules()
MetricWriter = _interface.MetricWriter
MultiWriter = _multi_writer.MultiWriter


def _has_tensorflow() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


class TensorboardXWriter(MetricWriter):
    """clu MetricWriter writing TensorBoard event files with tensorboardX (no TensorFlow)."""

    def __init__(self, logdir: str | os.PathLike):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=os.fspath(logdir), flush_secs=30)

    def write_summaries(self, step: int, values: Mapping[str, Any],
                        metadata: Mapping[str, Any] | None = None) -> None:
        for key, value in values.items():
            arr = np.asarray(value)
            if arr.ndim == 0:
                self._writer.add_scalar(key, float(arr), global_step=step)
            else:
                self._writer.add_histogram(key, arr, global_step=step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(np.asarray(value)), global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """images: ``(H, W, C)`` or ``(N, H, W, C)``; uint8, or float in [0, 1]."""
        for key, value in images.items():
            arr = np.asarray(value)
            if arr.ndim == 3:
                arr = arr[None]
            for i, img in enumerate(arr):
                tag = key if len(arr) == 1 else f"{key}/{i}"
                self._writer.add_image(tag, img, global_step=step, dataformats="HWC")

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        """videos: ``(N, T, H, W, C)`` uint8 or float in [0, 1]."""
        for key, value in videos.items():
            arr = np.asarray(value)
            if arr.dtype == np.uint8:
                arr = arr.astype(np.float32) / 255.0
            self._writer.add_video(key, arr.transpose(0, 1, 4, 2, 3), global_step=step)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        for key, value in audios.items():
            self._writer.add_audio(key, np.asarray(value), global_step=step,
                                   sample_rate=sample_rate)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for key, value in texts.items():
            self._writer.add_text(key, value, global_step=step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None) -> None:
        for key, value in arrays.items():
            bins = (num_buckets or {}).get(key)
            self._writer.add_histogram(key, np.asarray(value), global_step=step,
                                       max_bins=bins)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in hparams.items()}
        self._writer.add_text("hparams", "\n".join(f"{k}: {v}" for k, v in sorted(flat.items())))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class NullWriter(MetricWriter):
    """Writes nothing (non-primary processes)."""

    def write_summaries(self, step, values, metadata=None): pass
    def write_scalars(self, step, scalars): pass
    def write_images(self, step, images): pass
    def write_videos(self, step, videos): pass
    def write_audios(self, step, audios, *, sample_rate): pass
    def write_texts(self, step, texts): pass
    def write_histograms(self, step, arrays, num_buckets=None): pass
    def write_hparams(self, hparams): pass
    def flush(self): pass
    def close(self): pass


def create_writer(logdir: str | os.PathLike, *, active: bool = True) -> MetricWriter:
    """A TensorBoard writer for ``logdir`` (clu's own with TensorFlow, tensorboardX without);
    ``active=False`` (non-primary process) writes nothing."""
    if not active:
        return NullWriter()
    os.makedirs(logdir, exist_ok=True)
    if _has_tensorflow():
        from clu.metric_writers import SummaryWriter

        return SummaryWriter(os.fspath(logdir))
    return TensorboardXWriter(logdir)


def average_collection(names: Sequence[str]) -> type[clu_metrics.Collection]:
    """A clu Collection averaging each named scalar over the steps it is merged over."""
    return clu_metrics.Collection.create(
        **{name: clu_metrics.Average.from_output(name) for name in names})


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
    for name, flops in _PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled (sharded: per device) computation from XLA's cost
    analysis; None when the backend does not report it."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - backends without cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    flops = float(cost["flops"])
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
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
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


def drop_rows_after(path: str | os.PathLike, step: int) -> int:
    """Removes the rows of a ``metrics.jsonl`` whose ``"step"`` is after ``step`` (a resumed run
    writes them again) and returns how many; rewritten atomically, so each step appears once.
    Lines that are not JSON objects with a step (e.g. cut short by a crash) are dropped too."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
    dropped = len([x for x in lines if x.strip()]) - len(kept)
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(x + "\n" for x in kept))
        os.replace(tmp, path)
    return dropped
