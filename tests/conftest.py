"""Shared fixtures: sample videos, the marlin-pytorch oracle, small model configs."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

# libtpu (the `tpu` extra) and the CUDA plugin (the `gpu-aot` extra), there for ahead-of-time
# compiles, make every JAX process on a machine without those accelerators try their backends
# first and print initialisation errors; the tests run on the host (and compile for TPUs and GPUs
# through abstract topology devices, which do not need those backends).
_NO_TPU = importlib.util.find_spec("libtpu") is not None and not glob.glob("/dev/accel*") \
    and not glob.glob("/dev/vfio/[0-9]*")
_NO_GPU = importlib.util.find_spec("jax_cuda12_plugin") is not None and not glob.glob("/dev/nvidia[0-9]*")
if "JAX_PLATFORMS" not in os.environ and (_NO_TPU or _NO_GPU):
    os.environ["JAX_PLATFORMS"] = "cpu"

ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = ROOT.parent / "shared" / "samples"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The real face videos in ../shared/samples; skips the test when absent (fresh clone)."""
    if not (SAMPLES_DIR / "cropped01.mp4").exists():
        pytest.skip(f"sample videos not found at {SAMPLES_DIR} (only present beside a checkout)")
    return SAMPLES_DIR


def _install_torchvision_stub() -> None:
    """marlin-pytorch imports torchvision only for `read_video`; PyPI's torchvision does not
    import beside the CPU torch used here, so stand in a module reading frames with OpenCV."""
    if "torchvision" in sys.modules:
        return
    import numpy as np
    import torch

    from marlin_jax.video_io import read_frames

    def read_video(path, *args, **kwargs):
        frames = read_frames(path)
        return torch.from_numpy(np.ascontiguousarray(frames)), torch.zeros(0), {}

    tv = types.ModuleType("torchvision")
    tv_io = types.ModuleType("torchvision.io")
    tv_io.read_video = read_video
    tv.io = tv_io
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.io"] = tv_io


def _install_ffmpeg_probe_stub() -> None:
    """marlin-pytorch's extract_video calls ffmpeg.probe for the frame count; answer it with an
    exact OpenCV count so no ffmpeg binary is needed."""
    from marlin_jax.video_io import count_frames

    try:
        import ffmpeg  # noqa: F401
    except ImportError:
        mod = types.ModuleType("ffmpeg")
        sys.modules["ffmpeg"] = mod
    mod = sys.modules["ffmpeg"]
    mod.probe = lambda path, *a, **k: {"streams": [{"nb_frames": str(count_frames(path))}]}


@pytest.fixture(scope="session")
def marlin_pytorch():
    """The marlin_pytorch package (the numerical oracle), importable without torchvision/ffmpeg."""
    pytest.importorskip("torch")
    _install_torchvision_stub()
    _install_ffmpeg_probe_stub()
    mp = pytest.importorskip("marlin_pytorch")
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return mp
