"""Ahead-of-time TPU compiles on this CPU host (`python -m marlin_jax.aot`).

The compiles use libtpu (the `tpu` extra) through abstract `v5e:2x2` devices; small clip
geometries keep each under a minute on two cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import vit_small
from marlin_jax import aot

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("libtpu")  # one worker compiles for TPUs at a time
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not installed (pip install -e ".[tpu]")')

# A scanned two-iteration loop whose body holds one all-gather, and a reduce-scatter written
# the TPU way (a fusion of an all-reduce and a dynamic-slice), in compiled-HLO text form.
HLO = """HloModule jit_step, is_scheduled=true

%all-reduce-scatter.1 (input: bf16[8,128]) -> bf16[4,128] {
  %input = bf16[8,128]{1,0} parameter(0)
  %all-reduce.2 = bf16[8,128]{1,0} all-reduce(%input), replica_groups={{0,1}}, to_apply=%add
  %c = s32[] constant(0)
  ROOT %dynamic-slice.5 = bf16[4,128]{1,0:T(8,128)(2,1)} dynamic-slice(%all-reduce.2, %c, %c)
}

%add (x: bf16[], y: bf16[]) -> bf16[] {
  %x = bf16[] parameter(0)
  %y = bf16[] parameter(1)
  ROOT %sum = bf16[] add(%x, %y)
}

%body (p: (s32[], f32[4,128])) -> (s32[], f32[4,128]) {
  %p = (s32[], f32[4,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = f32[4,128]{1,0} get-tuple-element(%p), index=1
  %all-gather.1 = f32[8,128]{1,0:T(8,128)} all-gather(%w), dimensions={0}
  %slice.1 = f32[4,128]{1,0} slice(%all-gather.1), slice={[0:4], [0:128]}
  ROOT %t = (s32[], f32[4,128]{1,0}) tuple(%i, %slice.1)
}

%cond (q: (s32[], f32[4,128])) -> pred[] {
  %limit = s32[]{:T(128)} constant(12)
  %q = (s32[], f32[4,128]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %limit), direction=LT
}

ENTRY %main (a: f32[4,128], g: bf16[8,128]) -> (s32[], f32[4,128]) {
  %a = f32[4,128]{1,0} parameter(0)
  %g = bf16[8,128]{1,0} parameter(1)
  %fusion = bf16[4,128]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,128]{1,0}) tuple(%zero, %a)
  ROOT %while = (s32[], f32[4,128]{1,0}) while(%init), condition=%cond, body=%body
}
"""


def test_analyse_hlo_counts_loop_bodies_and_tpu_reduce_scatters():
    summary = aot.analyse_hlo(HLO)
    assert summary.loops == [12]
    assert summary.collectives["all-gather"] == {"count": 12.0, "bytes": 12 * 8 * 128 * 4}
    assert summary.collectives["reduce-scatter"] == {"count": 1.0, "bytes": 4 * 128 * 2}
    assert "all-reduce" not in summary.collectives  # inside the reduce-scatter fusion
    # traffic: the fusion reads 8x128 bf16 and writes 4x128 bf16; per iteration the all-gather
    # reads 4x128 and writes 8x128 f32, the slice reads 8x128 and writes 4x128 f32, the loop
    # condition compares two s32 into a pred.
    per_iteration = 4 * (4 * 128 + 8 * 128) * 2 + 9
    assert summary.bytes_accessed == 2 * (8 * 128 + 4 * 128) + 12 * per_iteration
    assert summary.bytes_accessed_once == 2 * (8 * 128 + 4 * 128) + per_iteration  # as XLA counts
    assert aot.shape_bytes("(bf16[2,3]{1,0:T(8,128)(2,1)}, f32[4]{0}, pred[])") == 12 + 16 + 1


def _test_target() -> aot.Target:
    """One 16 GiB test device."""
    return aot.Target("test", tuple(jax.devices()[:1]), aot.ChipSpec("test chip", 1e14, 16 * aot.GiB, 1e12, 1e11), 1)


def _memory_report(batch: int, gib: float, target: aot.Target) -> aot.CompileReport:
    """A train-step report of ``gib`` GiB in all (2 GiB of arguments) at ``batch`` clips."""
    total = gib * aot.GiB
    return aot.CompileReport(
        what="step", global_batch=batch, batch_per_device=batch, compile_s=0.0, argument_bytes=2 * aot.GiB,
        output_bytes=0.0, alias_bytes=0.0, temp_bytes=total - 2 * aot.GiB, total_bytes=total,
        hbm_bytes=target.device_hbm, usable_bytes=target.usable_bytes, fits=total <= target.usable_bytes,
        xla_flops=None, xla_bytes_accessed=None, bytes_accessed=0.0, loops=[], traffic_top=[], model_flops=1.0,
        collectives={}, compute_s=1.0, memory_s=0.0, interconnect_s=0.0, estimated_step_s=1.0, estimated_mfu=0.5,
        bound="compute")


def test_max_batch_search_brackets_the_largest_fitting_batch(monkeypatch):
    """Memory linear in the batch (2 GiB + 0.3 GiB per clip) on a 16 GiB device, and the
    compiler refusing batches above 60: the search lands on 46 in a handful of compiles."""
    target = _test_target()
    compiled = []

    def fake_report(config, target):
        b = int(config.global_batch_size)
        compiled.append(b)
        if b > 60:
            raise aot.DoesNotFitError("RESOURCE_EXHAUSTED: out of memory")
        return _memory_report(b, 2 + 0.3 * b, target)

    monkeypatch.setattr(aot, "report_train_step", fake_report)
    config = _tiny_config(global_batch_size=4)
    config.mesh.data, config.mesh.fsdp = 1, 1
    best, report, history = aot.find_max_batch(config, target, log=lambda *_: None)
    assert best == 46 and report.global_batch == 46  # 2 + 0.3 * 46 = 15.8 GiB; 47 -> 16.1
    assert 47 in compiled and len(compiled) <= 4
    assert [b for b, _ in history] == sorted(set(compiled))

    # The compiler refusing far below the linear prediction (its own HBM accounting): bisection.
    def refusing_above_30(config, target):
        if int(config.global_batch_size) > 30:
            compiled.append(int(config.global_batch_size))
            raise aot.DoesNotFitError("RESOURCE_EXHAUSTED: out of memory")
        return fake_report(config, target)

    monkeypatch.setattr(aot, "report_train_step", refusing_above_30)
    compiled.clear()
    best, report, _ = aot.find_max_batch(config, target, log=lambda *_: None)
    assert best == 30 and 31 in compiled and len(compiled) <= 8


def test_out_of_memory_compiles_raise_does_not_fit():
    """XLA's out-of-memory refusals (generic runtime errors) become DoesNotFitError with their
    first line; other compile errors pass through unchanged."""
    target = _test_target()

    class Lowered:
        def __init__(self, error):
            self.error = error

        def compile(self, compiler_options=None):
            raise self.error

    with pytest.raises(aot.DoesNotFitError, match="^RESOURCE_EXHAUSTED: Ran out of memory in hbm$"):
        aot._compile(Lowered(RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in hbm\ndetails")), target)
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        aot._compile(Lowered(RuntimeError("INVALID_ARGUMENT: bad layout")), target)


def _tiny_config(**overrides):
    """ViT-tiny (2 + 1 blocks) on 4 x 64 x 64 clips: 32 tokens, 3 visible."""
    c = vit_small.get_config("demo")
    c.model.name = "marlin_vit_tiny"
    for field in ("encoder_embed_dim", "encoder_num_heads", "decoder_embed_dim", "decoder_num_heads"):
        c.model[field] = None  # ViT-tiny's own widths, not the demo's
    c.data.patch_size = 16
    c.adv_weight = 0.01
    c.model.encoder_depth = 2
    c.model.decoder_depth = 1
    c.data.img_size = 64
    c.data.clip_frames = 4
    c.global_batch_size = 8
    c.compute_dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 1
    c.update_from_flattened_dict(overrides)
    return c


@needs_libtpu
def test_unknown_topology_and_bad_batch_are_clear_errors():
    with pytest.raises(aot.AotError, match="not a TPU slice name"):
        aot.tpu_target("h100")
    with pytest.raises(aot.AotError, match="does not know this slice"):
        aot.tpu_target("v5e:3x3")
    target = aot.tpu_target("v5e:2x2")
    assert (len(target.devices), target.devices_per_chip, target.chip.name) == (4, 1, "TPU v5e")
    with pytest.raises(ValueError, match="global_batch_size 6 must be a positive multiple of the batch shards 4"):
        aot.report_train_step(_tiny_config(global_batch_size=6), target)


def _state_shard_bytes(program) -> int:
    """Bytes one device holds of the sharded train state (what the step's arguments are)."""
    total = 0
    for leaf in jax.tree.leaves(program.abstract_state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


@needs_libtpu
@pytest.mark.parametrize("scan_layers", [False, True], ids=["looped", "scanned"])
def test_v5e_train_step_data_x_fsdp(scan_layers):
    """The trainer's own step compiles for v5e:2x2 with data 2 x fsdp 2 and splash attention:
    the arguments are the state's shards (FSDP halves the big matrices), the gradients of the
    FSDP-sharded matrices are reduce-scattered, parameters all-gathered, and nothing is
    resharded all-to-all; scanned blocks run as loops of depth trips."""
    target = aot.tpu_target("v5e:2x2")
    config = _tiny_config(scan_layers=scan_layers)
    program, compiled, _ = aot.compile_train_step(config, target)
    assert program.attention_impl == "splash"
    assert "tpu_custom_call" in compiled.as_text()  # the Pallas (Mosaic) kernel is in the program
    report = aot.analyse(compiled, target, what="step", global_batch=8, batch_shards=4,
                         model_flops_per_device=program.model_flops_per_step() / 4, compile_s=0.0)
    state_bytes = _state_shard_bytes(program)
    batch_bytes = 2 * (4 * 64 * 64 * 3 + 32)  # two clips + masks per device
    # TPU tiles pad small arrays (8 x 128): the tiny model's arguments grow by < 40 %.
    assert state_bytes + batch_bytes <= report.argument_bytes < 1.4 * (state_bytes + batch_bytes)
    assert report.alias_bytes >= 0.95 * state_bytes  # the state is donated: updated in place
    assert report.fits and 0 < report.total_bytes < 0.05 * target.device_hbm
    kinds = report.collectives
    assert kinds["reduce-scatter"]["count"] >= 1 and kinds["all-gather"]["count"] >= 8
    assert "all-to-all" not in kinds
    # the encoder's 2 blocks loop forward and backward (a 1-block decoder loop is unrolled)
    assert (sorted(report.loops) == [2, 2]) if scan_layers else report.loops == []
    assert 0 < report.estimated_mfu < 1


@needs_libtpu
@pytest.mark.slow
def test_cli_report_json_and_errors(tmp_path):
    """`python -m marlin_jax.aot` with config overrides: text report with the estimated MFU line,
    the JSON beside it; an unknown slice exits 2 with one clear line."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "marlin_jax.aot", "--config=configs/vit_small.py:demo",
           "--topology=v5e:2x2", "--config.model.name=marlin_vit_tiny",
           "--config.model.encoder_depth=1", "--config.model.decoder_depth=1",
           "--config.data.img_size=64", "--config.data.clip_frames=4", "--config.global_batch_size=8",
           "--config.scan_layers=True", "--config.mesh.data=4", f"--report={report}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "v5e:2x2 = 4 x TPU v5e" in out.stdout
    assert "estimated MFU: " in out.stdout and "feature forward" in out.stdout
    data = json.loads(report.read_text())
    assert data["train_step"]["fits"] and data["features"]["fits"]
    assert data["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}

    bad = subprocess.run(cmd[:4] + ["--topology=v5e:3x3"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert bad.returncode == 2 and "does not know this slice" in bad.stderr


def test_max_batch_search_bisects_when_memory_bends(monkeypatch):
    """XLA's GPU scheduler rematerialises near its limit, so memory flattens there (0.3 GiB per
    clip up to 40 clips, 0.02 after): linear fits keep landing just under the bracket's top, and
    the search must bisect instead of creeping down one fit at a time."""
    target = _test_target()

    def bent_report(config, target):
        b = int(config.global_batch_size)
        return _memory_report(b, 2 + 0.3 * min(b, 40) + 0.02 * max(b - 40, 0), target)  # 16 GiB at 140

    monkeypatch.setattr(aot, "report_train_step", bent_report)
    config = _tiny_config(global_batch_size=4)
    config.mesh.data, config.mesh.fsdp = 1, 1
    best, _, history = aot.find_max_batch(config, target, max_compiles=12, log=lambda *_: None)
    assert best == 140 and len(history) <= 12
