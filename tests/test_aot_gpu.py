"""Ahead-of-time GPU compiles on this CPU host (`python -m marlin_jax.aot --topology=h100:2`).

The compiles use the CUDA PJRT plugin and cuDNN (the `gpu-aot` extra) through compile-only
devices described by the project's own target configs (`aot.GPU_CHIPS`); no GPU is needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from marlin_jax import aot
from marlin_jax.train import program as prog
from tests.test_aot import _state_shard_bytes, _tiny_config

ROOT = Path(__file__).resolve().parent.parent
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None or importlib.util.find_spec("nvidia.cudnn") is None,
    reason='the CUDA plugin or cuDNN is not installed (pip install -e ".[gpu-aot]")')


def test_target_configs_hold_the_data_sheets():
    """Each GPU's target config carries its figures (the compiler sizes kernels from them)."""
    for key, spec in aot.GPU_CHIPS.items():
        text = spec.target_config()
        assert f"core_count: {spec.sm_count}" in text
        assert f"device_memory_size: {int(spec.chip.hbm_bytes)}" in text
        assert f"major: {spec.compute_capability[0]}" in text
        assert f'device_description_str: "{spec.description}"' in text, key
    h100, h200 = aot.GPU_CHIPS["h100"].chip, aot.GPU_CHIPS["h200"].chip
    assert h100.peak_flops == h200.peak_flops and h200.hbm_bandwidth > h100.hbm_bandwidth
    assert 79 * aot.GiB < h100.hbm_bytes < 80 * aot.GiB < 140 * aot.GiB < h200.hbm_bytes


def test_gpu_topology_names_are_checked():
    with pytest.raises(aot.AotError, match="not a GPU target"):
        aot.make_target("b300:8")
    with pytest.raises(aot.AotError, match="not a GPU target"):
        aot.make_target("h100:8x")
    with pytest.raises(aot.AotError, match="name a TPU slice"):
        aot.make_target("gpu")


@needs_cuda_plugin
def test_gpu_targets_have_the_named_devices_and_hosts():
    one_host = aot.make_target("h100:2")
    assert len(one_host.devices) == 2
    assert {d.device_kind for d in one_host.devices} == {"NVIDIA H100 80GB HBM3"}
    assert one_host.interconnect_name == "NVLink" and one_host.chip.interconnect_bandwidth == 450e9
    assert dict(one_host.compiler_options) == {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False}
    two_hosts = aot.make_target("a100:2x4")
    assert len(two_hosts.devices) == 8
    assert sorted({d.process_index for d in two_hosts.devices}) == [0, 1]
    assert two_hosts.interconnect_name == "network" and two_hosts.chip.interconnect_bandwidth == 25e9


@needs_cuda_plugin
@pytest.mark.parametrize("attention", ["cudnn", "xla"])
def test_h100_train_step_data_parallel(attention):
    """The trainer's own step compiles for two H100s (data 2): arguments are the replicated state
    and the batch, the gradients are all-reduced, cuDNN attention is a fused custom call, and XLA
    gives no cost analysis, so the traffic comes from the module text."""
    target = aot.make_target("h100:2")
    config = _tiny_config(attention_impl=attention)
    config.mesh.data, config.mesh.fsdp = 2, 1
    program, compiled, _ = aot.compile_train_step(config, target)
    assert prog.mesh_platform(program.mesh) == "gpu"
    assert program.attention_impl == (attention if attention == "cudnn" else "xla")
    text = compiled.as_text()
    assert ("__cudnn$fmha" in text) == (attention == "cudnn")
    report = aot.analyse(compiled, target, what="step", global_batch=8, batch_shards=2,
                         model_flops_per_device=program.model_flops_per_step() / 2, compile_s=0.0)
    state_bytes = _state_shard_bytes(program)
    batch_bytes = 4 * 4 * 64 * 64 * 3  # four uint8 clips per device (and their small masks)
    assert state_bytes + batch_bytes <= report.argument_bytes < 1.05 * (state_bytes + batch_bytes)
    assert report.alias_bytes >= 0.95 * state_bytes  # the state is donated: updated in place
    assert report.fits and report.xla_flops is None and report.bytes_accessed > state_bytes
    assert report.collectives["all-reduce"]["count"] >= 1
    assert set(report.collectives) == {"all-reduce"}  # pure data parallelism
    assert "compiled module's text" in report.traffic_source
    # every kernel's matmul FLOPs are read from the module (cuBLAS GEMMs, cuDNN attention, dots):
    # they match the model's count, and the per-kernel roofline sets the step estimate
    assert 0.9 < report.kernel_flops / report.model_flops < 1.1, (report.kernel_flops, report.model_flops)
    assert report.bound.startswith("per-kernel") and report.kernel_s == report.estimated_step_s
    assert report.kernel_s >= 0.999 * max(report.compute_s, report.memory_s)
    text = aot.format_report(report, target)
    assert "usable (75 % of 79.11 GiB: JAX's default GPU memory pool)" in text and "NVLink" in text
    assert report.usable_bytes == 0.75 * report.hbm_bytes


@needs_cuda_plugin
@pytest.mark.slow
def test_cli_gpu_report(tmp_path):
    """`python -m marlin_jax.aot --topology=h100:2`: the text report says which figures are
    estimates and from what, the JSON holds the compile-only flags; a bad name exits 2."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "marlin_jax.aot", "--config=configs/vit_small.py:demo",
           "--topology=h100:2", "--config.model.name=marlin_vit_tiny",
           "--config.model.encoder_depth=1", "--config.model.decoder_depth=1",
           "--config.data.img_size=64", "--config.data.clip_frames=4", "--config.global_batch_size=4",
           f"--report={report}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "h100:2 = 2 x H100 SXM 80GB" in out.stdout
    assert "compiled module's text" in out.stdout and "estimated MFU: " in out.stdout
    assert "compiled with xla_gpu_autotune_level=0, xla_gpu_enable_triton_gemm=False" in out.stdout
    data = json.loads(report.read_text())
    assert data["compiler_options"] == {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False}
    assert data["train_step"]["fits"] and data["features"]["fits"]
    assert data["train_step"]["traffic_source"].startswith("the compiled module's text")

    bad = subprocess.run(cmd[:4] + ["--topology=h100:0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 2 and "GPUs per host must be >= 1" in bad.stderr
