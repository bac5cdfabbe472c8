"""Ahead-of-time compile of the pretraining step and the feature forward for a TPU slice or GPUs,
on a CPU host: memory, cost, collectives and a roofline estimate per device.

    python -m marlin_jax.aot --config=configs/vit_base.py --topology=v5p:2x2x1
    python -m marlin_jax.aot --config=configs/vit_large.py --topology=v5e:2x2 --max_batch \\
        --config.mesh.fsdp=4 --config.remat_policy=full

Compiles exactly what the trainer runs (:func:`marlin_jax.train.program.build_program`) with the
real compiler (libtpu: ``pip install -e ".[tpu]"``; the CUDA plugin: ``".[gpu-aot]"``) against
abstract devices (``jax.experimental.topologies``). Figures are per device (one device per chip on
v5e, v5p and v6e). Step times and MFU are ESTIMATES from XLA's cost model and the chip's data sheet
(a roofline: the slowest of compute, HBM traffic and interconnect traffic), not measurements.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from marlin_jax import sharding as shd
from marlin_jax.train import metrics as mt
from marlin_jax.train import program as prog

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Data-sheet figures of one accelerator chip (dense bf16 peak, HBM, bandwidths)."""

    name: str
    peak_flops: float  # bf16 FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    interconnect_bandwidth: float  # bytes/s per chip (ICI), all links


# Google Cloud TPU system-architecture pages (per chip). device_kind -> spec.
TPU_CHIPS: dict[str, ChipSpec] = {
    "TPU v4": ChipSpec("TPU v4", 275e12, 32 * GiB, 1228e9, 300e9),
    "TPU v5 lite": ChipSpec("TPU v5e", 197e12, 16 * GiB, 819e9, 200e9),
    "TPU v5": ChipSpec("TPU v5p", 459e12, 95 * GiB, 2765e9, 600e9),
    "TPU v6 lite": ChipSpec("TPU v6e (Trillium)", 918e12, 32 * GiB, 1640e9, 448e9),
}
TOPOLOGY_EXAMPLES = "v4:2x2x1, v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:4x4x4, v6e:2x2"


class AotError(ValueError):
    """A topology, batch or mesh that cannot be compiled; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Abstract devices of a named slice (TPU) or GPU cluster and the chip they sit on."""

    topology: str
    devices: tuple[Any, ...]
    chip: ChipSpec
    devices_per_chip: int
    # Passed to ``Lowered.compile``: only for compile-only GPU targets (see GPU_COMPILE_OPTIONS).
    compiler_options: tuple[tuple[str, Any], ...] = ()
    interconnect_name: str = "ICI"
    # The share of a device's memory a step may use: a TPU's HBM; on GPUs JAX's default memory pool,
    # about where XLA's GPU scheduler starts rematerialising on its own (80 % less inputs, x 0.95).
    usable_fraction: float = 1.0

    @property
    def device_hbm(self) -> float:
        return self.chip.hbm_bytes / self.devices_per_chip

    @property
    def usable_bytes(self) -> float:
        return self.device_hbm * self.usable_fraction

    @property
    def device_peak(self) -> float:
        return self.chip.peak_flops / self.devices_per_chip


def _require(modules: Sequence[str], platform: str, extra: str, hint: str = "") -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise AotError(f"compiling for {platform} needs {', '.join(missing)}: pip install -e \".[{extra}]\"{hint}")


def _topology_devices(name: str, problem: str, **kwargs: Any) -> tuple[Any, ...]:
    """``topologies.get_topology_desc(**kwargs).devices``; a refusal becomes one clear line."""
    from jax.experimental import topologies

    try:
        return tuple(topologies.get_topology_desc(**kwargs).devices)
    except Exception as e:  # noqa: BLE001 - the compilers' errors are JaxRuntimeErrors with long texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AotError(f"--topology {name!r}: {problem} ({first})") from None


def tpu_target(topology: str) -> Target:
    """The abstract devices of a TPU slice named like ``v5p:2x2x1`` (a one-chip slice too)."""
    if not re.fullmatch(r"v\d+[a-z]*(-\w+)?:\d+(x\d+){1,2}", topology):
        raise AotError(f"--topology {topology!r} is not a TPU slice name of the form "
                       f"<generation>:<chips grid>, e.g. {TOPOLOGY_EXAMPLES}")
    _require(["libtpu"], "TPUs", "tpu", f' (or pip install "jax[tpu]=={jax.__version__}": libtpu must match jax)')
    # Compiling needs no chip: let several processes (test workers, a training job) load libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    one_chip = math.prod(int(d) for d in topology.split(":")[1].split("x")) == 1
    devices = _topology_devices(
        topology, f"the TPU compiler does not know this slice; names look like {TOPOLOGY_EXAMPLES}",
        platform="tpu", topology_name=topology,
        **({"chips_per_host_bounds": (1, 1, 1)} if one_chip else {}))  # a single chip is its own host
    kind = devices[0].device_kind
    if kind not in TPU_CHIPS:
        raise AotError(f"--topology {topology!r}: no data sheet for {kind!r}; known chips: "
                       f"{', '.join(TPU_CHIPS)}")
    per_chip = Counter(tuple(getattr(d, "coords", (i,))) for i, d in enumerate(devices))
    return Target(topology, devices, TPU_CHIPS[kind], max(per_chip.values()))


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """A GPU's data-sheet figures: the roofline's (``chip``) and what XLA's compiler needs to
    target it without the device (``stream_executor.GpuTargetConfigProto``)."""

    chip: ChipSpec  # dense bf16 tensor-core peak, memory as CUDA reports it, HBM, NVLink
    description: str  # the device_kind CUDA reports
    sm_count: int
    boost_clock_ghz: float
    compute_capability: tuple[int, int]
    l2_cache_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    fp32_lanes_per_sm: int
    network_bandwidth: float  # bytes/s per GPU between hosts (one 400 Gb/s NIC per GPU)

    def target_config(self) -> str:
        """The text-format ``GpuTargetConfigProto`` for ``topologies.get_topology_desc``."""
        info = {"threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 49152,
                "shared_memory_per_core": self.shared_memory_per_sm, "threads_per_core_limit": 2048,
                "core_count": self.sm_count, "fpus_per_core": self.fp32_lanes_per_sm,
                "block_dim_limit_x": 2147483647, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
                "memory_bandwidth": int(self.chip.hbm_bandwidth), "l2_cache_size": self.l2_cache_bytes,
                "clock_rate_ghz": self.boost_clock_ghz, "device_memory_size": int(self.chip.hbm_bytes),
                "shared_memory_per_block_optin": self.shared_memory_per_block_optin}
        major, minor = self.compute_capability
        return "\n".join([
            "gpu_device_info {", *(f"  {key}: {value}" for key, value in info.items()),
            f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
            "  registers_per_core_limit: 65536", "  registers_per_block_limit: 65536", "}",
            'platform_name: "CUDA"',
            "dnn_version_info { major: 9 minor: 8 patch: 0 }",  # the cuDNN jax[cuda12] needs
            f'device_description_str: "{self.description}"',
        ])


# NVIDIA data sheets (SXM parts; dense bf16 tensor-core peak, i.e. half the "with sparsity"
# figure; NVLink bandwidth per direction, half the bidirectional figure). Memory is the total
# CUDA reports for the device (slightly under the marketing size).
GPU_CHIPS: dict[str, GpuSpec] = {
    "h100": GpuSpec(ChipSpec("H100 SXM 80GB", 989.4e12, 84_942_979_072, 3.35e12, 450e9),
                    "NVIDIA H100 80GB HBM3", 132, 1.98, (9, 0), 50 * 2**20, 228 * 1024,
                    227 * 1024, 128, 50e9),
    "h200": GpuSpec(ChipSpec("H200 SXM 141GB", 989.4e12, 151_397_597_184, 4.8e12, 450e9),
                    "NVIDIA H200", 132, 1.98, (9, 0), 50 * 2**20, 228 * 1024, 227 * 1024, 128,
                    50e9),
    "a100": GpuSpec(ChipSpec("A100 SXM 80GB", 312e12, 85_100_068_864, 2.039e12, 300e9),
                    "NVIDIA A100-SXM4-80GB", 108, 1.41, (8, 0), 40 * 2**20, 164 * 1024,
                    163 * 1024, 64, 25e9),
}
# Compile-only GPU targets have no device to autotune on, and XLA's Triton GEMM emitter then
# finds no tile sizes ("Couldn't find output tile sizes"): use cuBLAS GEMMs, no autotuning.
GPU_COMPILE_OPTIONS = (("xla_gpu_autotune_level", 0), ("xla_gpu_enable_triton_gemm", False))
JAX_GPU_POOL_FRACTION = 0.75  # JAX's default GPU memory pool (XLA_PYTHON_CLIENT_MEM_FRACTION)
GPU_EXAMPLES = "h100:8 (one host of 8), h100:4x8 (4 hosts of 8), h200:8, a100:8"


def gpu_target(topology: str) -> Target:
    """Compile-only devices of ``<gpu>:<per host>`` or ``<gpu>:<hosts>x<per host>`` GPUs."""
    m = re.fullmatch(r"([a-z]\d+):(?:(\d+)x)?(\d+)", topology)
    if not m or m.group(1) not in GPU_CHIPS:
        raise AotError(f"--topology {topology!r} is not a GPU target of the form "
                       f"<gpu>:[<hosts>x]<gpus per host> with <gpu> one of "
                       f"{', '.join(GPU_CHIPS)}, e.g. {GPU_EXAMPLES}")
    spec = GPU_CHIPS[m.group(1)]
    hosts, per_host = int(m.group(2) or 1), int(m.group(3))
    if hosts < 1 or per_host < 1:
        raise AotError(f"--topology {topology!r}: hosts and GPUs per host must be >= 1")
    _require(["jax_cuda12_plugin", "nvidia.cudnn"], "GPUs", "gpu-aot")
    devices = _topology_devices(topology, "the CUDA plugin cannot make this target", topology_name="",
                                platform="cuda", target_config=spec.target_config(),
                                topology=f"1x{hosts}x{per_host}")
    chip = spec.chip
    if hosts > 1:  # collectives cross the hosts' network: its per-GPU bandwidth bounds them
        chip = dataclasses.replace(chip, interconnect_bandwidth=min(chip.interconnect_bandwidth,
                                                                    spec.network_bandwidth))
    return Target(topology, devices, chip, 1, compiler_options=GPU_COMPILE_OPTIONS,
                  interconnect_name="network" if hosts > 1 else "NVLink",
                  usable_fraction=JAX_GPU_POOL_FRACTION)


def make_target(topology: str) -> Target:
    """A TPU slice (``v5p:2x2x1``) or a GPU target (``h100:8``)."""
    if re.match(r"v\d", topology):
        return tpu_target(topology)
    if re.match(r"[a-z]\d+:", topology):
        return gpu_target(topology)
    raise AotError(f"--topology {topology!r}: name a TPU slice ({TOPOLOGY_EXAMPLES}) or GPUs "
                   f"({GPU_EXAMPLES})")


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
# ``[ROOT ]%name = <shape> <opcode>(<operands>), attrs``; a (tuple) shape holds no " <word>(".
_INSTRUCTION = re.compile(r"\s*(ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(([^)]*)")
_CALLEE = re.compile(r"\b(calls|body|condition|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier",
               "copy-done", "all-gather-done", "all-reduce-done", "collective-permute-done",
               "async-done", "send-done", "recv-done"}


def shape_bytes(shape_text: str) -> int:
    """Bytes of the arrays in an HLO shape (``bf16[8,128]{1,0}`` or a tuple of them)."""
    return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(shape_text))


def _dims(shape_text: str) -> list[int]:
    """The dimensions of the first array in an HLO shape."""
    m = re.search(r"\[([\d,]*)\]", shape_text)  # any dtype (_ARRAY knows only the sized ones)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


class _Instruction(NamedTuple):
    name: str
    shape: str
    opcode: str
    operands: list[str]
    line: str
    root: bool


class HloSummary(NamedTuple):
    """Per-step figures read from a compiled module's text, with loop bodies counted as often
    as they run (XLA's own ``cost_analysis`` counts a ``while`` body once)."""

    collectives: dict[str, dict[str, float]]  # kind -> count and result bytes per device
    bytes_accessed: float  # operands read + results written by every executed instruction
    bytes_accessed_once: float  # the same with every loop body counted once (as XLA does)
    loops: list[int]  # trip counts of the top-level loops
    traffic_by_op: dict[str, float]  # source op -> bytes, largest first
    kernels: list[tuple[int, float | None, float]]  # (times executed, matmul FLOPs or None, bytes) per kernel
    uncounted_kernels: int  # kernels whose FLOPs the text does not give (e.g. Pallas calls)


def _dot_flops(inst: _Instruction, shapes: dict[str, str]) -> float:
    """2 x output elements x contracted size of an HLO ``dot`` or a cuBLAS GEMM custom call."""
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.line) or re.search(
        r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.line)
    if not m or not inst.operands:
        return 0.0
    lhs = _dims(shapes.get(inst.operands[0], ""))
    contracted = [int(d.strip('" ')) for d in m.group(1).split(",") if d.strip('" ')]
    if not lhs or any(d >= len(lhs) for d in contracted):
        return 0.0
    return 2.0 * math.prod(_dims(inst.shape)) * math.prod(lhs[d] for d in contracted)


def _fmha_flops(inst: _Instruction, shapes: dict[str, str]) -> float:
    """cuDNN fused attention: 4 B H T S hd forward (two matmuls), 2.5x that backward."""
    m = re.search(r'"intermediate_tensor_shape":\{"element_type":"?\w+"?,\s*"dimensions":\[([^\]]*)\]',
                  inst.line.replace(" ", ""))
    if not m or not inst.operands:
        return 0.0
    b, h, t, k = (int(d.strip('"')) for d in m.group(1).split(","))
    head_dim = _dims(shapes.get(inst.operands[0], ""))[-1:] or [0]
    forward = 4.0 * b * h * t * k * head_dim[0]
    return 2.5 * forward if "Backward" in inst.line else forward


def _source_op(line: str) -> str:
    """The JAX operation an HLO instruction came from (its ``op_name`` without the jit and
    transform wrappers), e.g. ``fwd decoder/.../dot_general``; ``?`` without metadata."""
    m = re.search(r'op_name="([^"]*)"', line)
    if not m:
        return "?"
    parts = [p for p in m.group(1).split("/") if not p.startswith(("jit(", "jvp(", "transpose(",
                                                                   "checkpoint", "while", "body",
                                                                   "shard_map", "vmap("))]
    return ("bwd " if "transpose(" in m.group(1) else "fwd ") + "/".join(parts[-2:])


def analyse_hlo(hlo_text: str) -> HloSummary:
    """Collectives (count, result bytes per device) and HBM traffic of a compiled module: each
    executed top-level instruction's operands and results (a fusion's inside stays on chip), as
    XLA's cost analysis counts, with ops in a ``while`` body counted ``trip count`` times
    (``known_trip_count``, or the bound of the condition's ``i < constant``, as ``lax.scan`` emits)."""
    computations: dict[str, list[_Instruction]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split()
            current = (head[1] if head[0] == "ENTRY" else head[0]).lstrip("%")
            computations[current] = []
            entry = current if head[0] == "ENTRY" else entry
        elif current is not None and (m := _INSTRUCTION.match(line)):
            root, name, shape, opcode, args = m.groups()
            operands = re.findall(r"%([\w.\-]+)", args)
            computations[current].append(_Instruction(name, shape, opcode, operands, line, bool(root)))

    def called(inst: _Instruction, attr: str = "calls") -> list[_Instruction]:
        m = re.search(rf"\b{attr}=%?([\w.\-]+)", inst.line)
        return computations.get(m.group(1), []) if m else []

    def trip_count(inst: _Instruction) -> int:
        if known := _TRIP.search(inst.line):
            return int(known.group(1))
        cond = called(inst, "condition")
        consts = [int(m.group(1)) for i in cond if i.opcode == "constant" and i.shape.startswith("s32[]")
                  for m in [re.search(r"constant\((\d+)\)", i.line)] if m]
        compares = [i for i in cond if i.opcode == "compare" and "direction=LT" in i.line]
        return consts[0] if len(consts) == 1 and compares else 1

    def is_reduce_scatter(comp: str) -> bool:
        """TPU XLA writes a reduce-scatter as a fusion of an all-reduce and a dynamic-slice."""
        insts = computations.get(comp, ())
        return any(i.opcode == "all-reduce" for i in insts) and (
            comp.startswith("all-reduce-scatter")
            or any(i.root and i.opcode == "dynamic-slice" for i in insts))

    def in_place_savings(body: list[_Instruction], roots: list[_Instruction], scope: dict[str, str]) -> int:
        """A dynamic-update-slice (a kernel, or a fusion's root) updates its buffer in place: only
        the update is read and written (e.g. a scan storing one layer's residuals)."""
        by_name = {i.name: i for i in body}
        outputs = roots + [by_name[o] for r in roots if r.opcode == "tuple"
                           for o in r.operands if o in by_name]
        return sum(2 * (shape_bytes(u.shape) - shape_bytes(scope.get(u.operands[1], "")))
                   for u in outputs if u.opcode == "dynamic-update-slice" and len(u.operands) > 1)

    def kernel_flops(inst: _Instruction, body: list[_Instruction], scope: dict[str, str]) -> float | None:
        """Matmul FLOPs of one kernel (a fusion: of the dots in its ``body``); None when unreadable."""
        if inst.opcode == "custom-call":
            m = re.search(r'custom_call_target="([^"]*)"', inst.line)
            target = m.group(1) if m else ""
            if "fmha" in target:
                return _fmha_flops(inst, scope)
            if "gemm" in target or "matmul" in target:  # cuBLAS / cuBLASLt
                return _dot_flops(inst, scope)
            return None if target == "tpu_custom_call" or target.startswith("__cudnn") else 0.0
        if any(i.opcode == "convolution" for i in body):
            return None
        return sum(_dot_flops(i, scope) for i in body if i.opcode == "dot")

    totals = {kind: {"count": 0.0, "bytes": 0.0} for kind in COLLECTIVES}
    by_op: Counter[str] = Counter()
    kernels: list[tuple[int, float | None, float]] = []
    loops: list[int] = []

    def visit(name: str, times: int, control: bool) -> None:
        shapes = {i.name: i.shape for i in computations.get(name, ())}
        for inst in computations.get(name, ()):
            callees = _CALLEE.findall(inst.line) + [
                ("branch", c) for group in _BRANCHES.findall(inst.line) for c in re.findall(r"%?([\w.\-]+)", group)]
            scatter = inst.opcode == "fusion" and any(is_reduce_scatter(c) for _, c in callees)
            kind = "reduce-scatter" if scatter else inst.opcode.removesuffix("-done")  # async: at -done
            if kind in totals:
                totals[kind]["count"] += times
                totals[kind]["bytes"] += times * shape_bytes(inst.shape)
            if control and inst.opcode not in _NO_TRAFFIC:
                nbytes = shape_bytes(inst.shape) + sum(shape_bytes(shapes.get(o, "")) for o in inst.operands)
                fusion = inst.opcode == "fusion"
                body = called(inst) if fusion else [inst]  # what the kernel runs, and the shapes it names
                scope = {i.name: i.shape for i in body} if fusion else shapes
                nbytes -= in_place_savings(body, [i for i in body if i.root] if fusion else body, scope)
                by_op[_source_op(inst.line)] += times * nbytes
                kernels.append((times, kernel_flops(inst, body, scope), float(nbytes)))
            n = trip_count(inst) if inst.opcode == "while" else 1
            if inst.opcode == "while" and name == entry:
                loops.append(n)
            for role, callee in callees:
                loop = role in ("body", "condition")
                if callee in computations and not scatter:
                    # fused computations and reducers run on chip: collectives only
                    inner = control and (loop or role == "branch" or inst.opcode in ("call", "async-start"))
                    visit(callee, times * (n if loop else 1), inner)

    visit(entry, 1, True)
    traffic = sum([t * b for t, _, b in kernels], 0.0)
    traffic_once = sum([b for _, _, b in kernels], 0.0)
    return HloSummary({k: v for k, v in totals.items() if v["count"]}, traffic, traffic_once, loops,
                      dict(by_op.most_common()), kernels, sum(f is None for _, f, _ in kernels))


@dataclasses.dataclass
class CompileReport:
    """Per-device figures of one compiled program (JSON-serialisable via ``asdict``)."""

    what: str
    global_batch: int
    batch_per_device: float
    compile_s: float
    argument_bytes: float
    output_bytes: float
    alias_bytes: float
    temp_bytes: float
    total_bytes: float
    hbm_bytes: float  # the device's memory
    usable_bytes: float  # what a step may use of it (GPUs: JAX's default pool)
    fits: bool
    xla_flops: float | None  # XLA's cost analysis (a while body counted once)
    xla_bytes_accessed: float | None  # likewise
    bytes_accessed: float  # XLA's figure with loop bodies times their trip counts
    loops: list[int]
    traffic_top: list[tuple[str, float]]  # the source ops moving the most bytes (executed)
    model_flops: float
    collectives: dict[str, dict[str, float]]
    compute_s: float
    memory_s: float
    interconnect_s: float
    estimated_step_s: float
    estimated_mfu: float
    bound: str
    traffic_source: str = "XLA's cost model"
    kernel_flops: float = 0.0  # matmul FLOPs read from the module's kernels (0: unreadable)
    kernel_s: float | None = None  # per-kernel roofline: sum of max(FLOPs / peak, bytes / bandwidth)


def analyse(compiled: Any, target: Target, *, what: str, global_batch: int, batch_shards: int,
            model_flops_per_device: float, compile_s: float) -> CompileReport:
    """Memory, cost, collectives and the roofline estimate of one compiled executable."""
    mem = compiled.memory_analysis()
    args, out = float(mem.argument_size_in_bytes), float(mem.output_size_in_bytes)
    alias, temp = float(mem.alias_size_in_bytes), float(mem.temp_size_in_bytes)
    total = args + out - alias + temp + float(mem.generated_code_size_in_bytes)
    cost = mt.cost_analysis(compiled)
    xla_flops = float(cost["flops"]) if cost.get("flops", 0) > 0 else None
    accessed = float(cost["bytes accessed"]) if cost.get("bytes accessed", 0) > 0 else None
    hlo = analyse_hlo(compiled.as_text())
    hbm_bandwidth = target.chip.hbm_bandwidth / target.devices_per_chip
    compute_s = max(xla_flops or 0.0, model_flops_per_device) / target.device_peak
    # XLA's cost model, with every loop body counted as often as it runs: its own figure
    # scaled by the module text's ratio of executed to counted-once traffic (1 without loops).
    traffic = hlo.bytes_accessed if accessed is None or not hlo.bytes_accessed_once else (
        accessed * hlo.bytes_accessed / hlo.bytes_accessed_once)
    memory_s = traffic / hbm_bandwidth
    # Bytes one device sends, roughly: a ring all-reduce sends its array twice (reduce-scatter +
    # all-gather), the other collectives about their array once.
    sent = sum((2 if kind == "all-reduce" else 1) * c["bytes"] for kind, c in hlo.collectives.items())
    ici_s = sent / (target.chip.interconnect_bandwidth / target.devices_per_chip)
    bounds = {"compute": compute_s, "HBM bandwidth": memory_s, "interconnect": ici_s}
    kernel_flops = 0.0 if hlo.uncounted_kernels else sum(t * f for t, f, _ in hlo.kernels)
    kernel_s = None
    if kernel_flops > 0:
        # every kernel's matmul FLOPs are readable (GPU): kernels run one after another, so the
        # per-kernel roofline is tighter than the aggregate compute and memory bounds
        kernel_s = sum(t * max(f / target.device_peak, b / hbm_bandwidth) for t, f, b in hlo.kernels)
        bounds = {"per-kernel compute / HBM": kernel_s, "interconnect": ici_s}
    bound = max(bounds, key=bounds.get)
    step_s = bounds[bound]
    return CompileReport(
        what=what, global_batch=global_batch, batch_per_device=global_batch / batch_shards,
        compile_s=compile_s, argument_bytes=args, output_bytes=out, alias_bytes=alias,
        temp_bytes=temp, total_bytes=total, hbm_bytes=target.device_hbm,
        usable_bytes=target.usable_bytes, fits=total <= target.usable_bytes, xla_flops=xla_flops,
        xla_bytes_accessed=accessed, bytes_accessed=traffic, loops=hlo.loops,
        traffic_top=list(hlo.traffic_by_op.items())[:5],
        model_flops=model_flops_per_device, collectives=hlo.collectives, compute_s=compute_s,
        memory_s=memory_s, interconnect_s=ici_s, estimated_step_s=step_s,
        estimated_mfu=model_flops_per_device / target.device_peak / step_s if step_s else 0.0,
        bound=bound, kernel_flops=kernel_flops, kernel_s=kernel_s,
        traffic_source="XLA's cost model" if accessed is not None else (
            "the compiled module's text (operands + results of each kernel; XLA reports no costs "
            "for this target)"))


_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds the memory|Ran out of memory")


class DoesNotFitError(Exception):
    """The compiler refused the program for lack of device memory."""


def with_batch(config: ml_collections.ConfigDict, global_batch: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({**config.to_dict(), "global_batch_size": int(global_batch)})


def _compile(lowered: Any, target: Target) -> tuple[Any, float]:
    """(executable, seconds); an out-of-memory refusal raises :class:`DoesNotFitError`."""
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile(compiler_options=dict(target.compiler_options) or None)
    except Exception as e:  # noqa: BLE001 - XLA reports OOM as a generic runtime error
        if _OOM.search(str(e)):
            raise DoesNotFitError(str(e).strip().splitlines()[0]) from None
        raise
    return compiled, time.perf_counter() - t0


def compile_train_step(config: ml_collections.ConfigDict, target: Target
                       ) -> tuple[prog.TrainProgram, Any, float]:
    """(program, compiled executable, compile seconds) of the trainer's step for ``target``."""
    mesh = shd.make_mesh(config.mesh.to_dict(), devices=target.devices)
    program = prog.build_program(config, mesh, prog.schedule_from_config(config, None))
    return program, *_compile(program.lower_train_step(), target)


def report_train_step(config: ml_collections.ConfigDict, target: Target) -> CompileReport:
    program, compiled, seconds = compile_train_step(config, target)
    return analyse(compiled, target, what="train step (G + D)", global_batch=program.global_batch,
                   batch_shards=shd.batch_divisor(program.mesh),
                   model_flops_per_device=program.model_flops_per_step() / len(target.devices),
                   compile_s=seconds)


def report_features(config: ml_collections.ConfigDict, target: Target) -> CompileReport:
    """The feature-extraction forward (``Marlin.extract_features``, mean-pooled) of the trainer's
    model at the config's global batch, parameters replicated, clips split over the batch axes."""
    from flax import nnx

    from marlin_jax.extract import Marlin
    from marlin_jax.models import MarlinModel

    mesh = shd.make_mesh(config.mesh.to_dict(), devices=target.devices)
    cfg, dtype, impl, batch = prog.model_settings(config, mesh)  # not the whole train program
    model = nnx.eval_shape(lambda: MarlinModel(cfg, rngs=nnx.Rngs(0), with_decoder=False, dtype=dtype,
                                               attention_impl=impl))
    clips = jax.ShapeDtypeStruct((batch, cfg.n_frames, cfg.img_size, cfg.img_size, cfg.in_channels),
                                 jnp.uint8, sharding=shd.batch_sharding(mesh, 5))
    with jax.set_mesh(mesh):
        compiled, seconds = _compile(Marlin(model).lower_features(
            clips, keep_seq=False, state_sharding=shd.replicated(mesh)), target)
    flops = batch * prog.encoder_forward_flops(cfg) / len(target.devices)
    return analyse(compiled, target, what="feature forward", global_batch=batch,
                   batch_shards=shd.batch_divisor(mesh), model_flops_per_device=flops,
                   compile_s=seconds)


def find_max_batch(config: ml_collections.ConfigDict, target: Target, *, max_compiles: int = 8,
                   log=print) -> tuple[int, CompileReport | None, list[tuple[int, float | None]]]:
    """The largest batch per batch shard whose train step fits in memory, from the config's
    batch: guesses where the least-squares line through the measured (batch, bytes) reaches the
    usable memory, kept inside the bracket (largest that fits, smallest that does not). Returns
    (batch, report at it, history of (batch, total bytes or None when the compiler refused it))."""
    shards = shd.batch_divisor(shd.make_mesh(config.mesh.to_dict(), devices=target.devices))
    tried: dict[int, CompileReport | None] = {}
    lo, hi = 0, None  # largest batch that fits, smallest that does not
    b = max(1, int(config.global_batch_size) // shards)
    widths: list[int] = []  # bracket width after each compile (once there is a bracket)
    for _ in range(max_compiles):
        try:
            rep = report_train_step(with_batch(config, b * shards), target)
            log(f"  batch {b}/shard: {_gib(rep.total_bytes)} of {_gib(target.usable_bytes)} "
                f"({'fits' if rep.fits else 'does not fit'}; compiled in {rep.compile_s:.0f}s)")
        except DoesNotFitError as e:
            rep = None
            log(f"  batch {b}/shard: refused by the compiler ({e})")
        tried[b] = rep
        if rep is not None and rep.fits:
            lo = max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
        if hi is not None and hi <= lo + 1:
            break
        points = [(x, r.total_bytes) for x, r in sorted(tried.items()) if r is not None]
        if len(points) == 1:
            points.insert(0, (0, tried[points[0][0]].argument_bytes))
        fit = None
        if points:  # least squares: XLA's layouts make memory slightly non-monotonic
            slope, intercept = np.polyfit(*zip(*points, strict=True), 1)
            fit = math.floor((target.usable_bytes - intercept) / slope) if slope > 0 else None
        if hi is None:  # everything fitted so far (lo >= 1): the fit, or double when it says stop
            b = fit if fit is not None and fit > lo + max(1, lo // 8) else 2 * lo
            continue
        # Near the limit memory bends (XLA's GPU scheduler rematerialises on its own; TPU layouts
        # jump): bisect when the fit overshoots the bracket or the last fit did not halve it.
        widths.append(hi - lo)
        stalled = len(widths) >= 2 and widths[-1] > widths[-2] / 2
        b = max(fit, lo + 1) if fit is not None and fit < hi - 1 and not stalled else (lo + hi) // 2
    history = [(x, None if r is None else r.total_bytes) for x, r in sorted(tried.items())]
    return lo, tried.get(lo), history


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def format_report(rep: CompileReport, target: Target) -> str:
    margin = rep.usable_bytes - rep.total_bytes
    of = (f"{_gib(rep.hbm_bytes)} HBM" if rep.usable_bytes >= rep.hbm_bytes else
          f"{_gib(rep.usable_bytes)} usable ({100 * rep.usable_bytes / rep.hbm_bytes:.0f} % of "
          f"{_gib(rep.hbm_bytes)}: JAX's default GPU memory pool)")
    lines = [
        f"{rep.what}: global batch {rep.global_batch} ({rep.batch_per_device:g} clips per batch "
        f"shard), compiled in {rep.compile_s:.1f}s",
        f"  memory per device: arguments {_gib(rep.argument_bytes)}, temporaries "
        f"{_gib(rep.temp_bytes)}, outputs {_gib(rep.output_bytes)} (aliased {_gib(rep.alias_bytes)})"
        f" -> {_gib(rep.total_bytes)} of {of}: "
        + (f"fits, {_gib(margin)} to spare" if rep.fits else f"DOES NOT FIT by {_gib(-margin)}"),
        f"  FLOPs per device: model {rep.model_flops / 1e12:.3f} T"
        + (f", XLA cost analysis {rep.xla_flops / 1e12:.3f} T" if rep.xla_flops else "")
        + f"; HBM traffic {_gib(rep.bytes_accessed)}"
        + (f" (XLA cost analysis {_gib(rep.xla_bytes_accessed)} counts each of the "
           f"{len(rep.loops)} loops' body once; scaled by the trip counts {rep.loops})"
           if rep.loops and rep.xla_bytes_accessed else ""),
        "  largest HBM traffic (module text): " + ", ".join(
            f"{name} {_gib(b)}" for name, b in rep.traffic_top[:3]),
        "  collectives per step: " + (", ".join(
            f"{kind} x{c['count']:.0f} ({_gib(c['bytes'])})" for kind, c in rep.collectives.items())
            or "none"),
        f"  roofline (estimate: traffic from {rep.traffic_source}; peaks from the "
        f"{target.chip.name} data sheet): compute {1e3 * rep.compute_s:.1f} ms, HBM "
        f"{1e3 * rep.memory_s:.1f} ms, "
        + (f"per kernel (sum of each kernel's max(matmul FLOPs / peak, bytes / bandwidth); "
           f"{rep.kernel_flops / 1e12:.3f} T matmul FLOPs in the kernels) {1e3 * rep.kernel_s:.1f} ms, "
           if rep.kernel_s is not None else "")
        + f"{target.interconnect_name} {1e3 * rep.interconnect_s:.1f} ms"
        f" -> {rep.bound}-bound, step >= {1e3 * rep.estimated_step_s:.1f} ms",
        f"  estimated MFU: {100 * rep.estimated_mfu:.1f} %",
    ]
    if not rep.fits and rep.total_bytes <= rep.hbm_bytes:
        lines.insert(2, "  with XLA_PYTHON_CLIENT_MEM_FRACTION="
                        f"{min(0.99, rep.total_bytes / rep.hbm_bytes + 0.02):.2f} and "
                        "--xla_gpu_memory_limit_slop_factor raised to match it may run; XLA's "
                        "GPU scheduler otherwise rematerialises to its limit (more FLOPs than counted)")
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, topology: str, *, max_batch: bool = False,
        features: bool = True, report_path: str | None = None, max_compiles: int = 8,
        log=print) -> dict[str, Any]:
    """Compiles and reports; returns the JSON-able report (also written to ``report_path``)."""
    target = make_target(topology)
    mesh = shd.make_mesh(config.mesh.to_dict(), devices=target.devices)
    platform = prog.mesh_platform(mesh)
    dtype = prog.compute_dtype(config.compute_dtype, platform)
    log(f"marlin-jax aot: {topology} = {len(target.devices) // target.devices_per_chip} x {target.chip.name} "
        f"({len(target.devices)} devices, {_gib(target.device_hbm)} HBM and "
        f"{target.device_peak / 1e12:.0f} TFLOP/s bf16 each), mesh {dict(mesh.shape)}; model "
        f"{config.model.name}, {config.data.clip_frames}x{config.data.img_size}^2 clips, "
        f"{jnp.dtype(dtype).name} compute, attention "
        f"{prog.attention_impl(config.attention_impl, platform, dtype) or 'xla'}, scan_layers "
        f"{config.scan_layers}, remat {config.remat_policy}")
    if target.compiler_options:
        log("compile-only GPU target (no device to autotune on): compiled with "
            + ", ".join(f"{k}={v}" for k, v in target.compiler_options))
    out: dict[str, Any] = {
        "topology": topology, "chip": dataclasses.asdict(target.chip),
        "devices": len(target.devices), "devices_per_chip": target.devices_per_chip,
        "mesh": dict(mesh.shape), "config": json.loads(config.to_json_best_effort()),
        "jax": jax.__version__, "compiler_options": dict(target.compiler_options),
    }
    if max_batch:
        log("searching the largest batch per device that fits:")
        best, step, history = find_max_batch(config, target, max_compiles=max_compiles, log=log)
        out["max_batch"] = {"batch_per_device": best, "tried": history}
        if step is None:
            raise AotError(f"not even 1 clip per batch shard fits on {topology} (mesh "
                           f"{dict(mesh.shape)}): use remat, FSDP or a larger slice")
        log(f"largest batch per device that fits: {best}")
    else:
        try:
            step = report_train_step(config, target)
        except DoesNotFitError as e:
            raise AotError(f"the train step at global batch {config.global_batch_size} does not "
                           f"fit {topology}: {e}; try --max_batch, remat or FSDP") from None
    log(format_report(step, target))
    out["train_step"] = dataclasses.asdict(step)
    if features:
        feat = report_features(with_batch(config, step.global_batch), target)
        log(format_report(feat, target))
        clips_s = feat.global_batch / len(target.devices) / feat.estimated_step_s
        log(f"  estimated feature throughput: {clips_s:.0f} clips/s per device")
        out["features"] = dataclasses.asdict(feat)
    if report_path:
        os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
        with open(report_path, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, default=float)
        log(f"report written to {report_path}")
    return out


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")  # host backend
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(f["config"])))[0]
    report = f.report or f"aot_{name}_{f.topology.replace(':', '_')}.json"
    try:
        run(f.config, f.topology, max_batch=f.max_batch, features=not f.skip_features,
            report_path=report)
    except AotError as e:
        print(f"marlin-jax aot: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "ml_collections config file, e.g. "
                                    "configs/vit_base.py", lock_config=True)
    flags.DEFINE_string("topology", None, f"TPU slice or GPUs, e.g. {TOPOLOGY_EXAMPLES}; {GPU_EXAMPLES}")
    flags.DEFINE_bool("max_batch", False, "find the largest batch per device that fits, and "
                      "report at it")
    flags.DEFINE_bool("skip_features", False, "do not compile the feature-extraction forward")
    flags.DEFINE_string("report", None, "JSON report path (default aot_<config>_<topology>.json)")
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
