"""Device meshes and parameter partitioning (big_vision / maxtext style).

A mesh has the axes ``data``, ``fsdp`` and ``tensor`` (``-1`` = all remaining devices). Batches
are split over ``data x fsdp``; parameters, and optimizer states (which hold the same ``/``-joined
paths, e.g. ``encoder/blocks/3/attn/qkv/kernel``, as suffixes), follow the first matching
``(regex, PartitionSpec)`` rule of :data:`MARLIN_RULES`, fitted by :func:`spec_for` to each shape,
so that one table fits any model, mesh and layer layout (per-layer or stacked blocks).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

# First match wins; `re.search` on the parameter path. Kernels are (in, out) for Linear layers.
# Attention heads and MLP hidden units are split over `tensor` (Megatron: column-parallel qkv/fc1,
# row-parallel proj/fc2); the other big dimension of each matrix is FSDP-sharded.
MARLIN_RULES: tuple[tuple[str, P], ...] = (
    (r"patch_embedding/projection/kernel$", P(None, None, None, None, "fsdp")),  # (pt,ph,pw,C,D)
    (r"attn/qkv/kernel$", P("fsdp", None, "tensor", None)),  # (D, 3, H, hd): whole heads
    (r"attn/(q_bias|v_bias)$", P("tensor")),
    (r"attn/proj/kernel$", P("tensor", "fsdp")),
    (r"mlp/fc1/kernel$", P("fsdp", "tensor")),
    (r"mlp/fc1/bias$", P("tensor")),
    (r"mlp/fc2/kernel$", P("tensor", "fsdp")),
    (r"enc_dec_proj/kernel$", P("fsdp", None)),
    (r"decoder/head/kernel$", P(None, "fsdp")),
    (r"discriminator/layers/0/kernel$", P("fsdp", "tensor")),
    (r"discriminator/layers/0/bias$", P("tensor")),
    (r"discriminator/layers/1/kernel$", P("tensor", None)),
    (r"(fc_norm|head)/kernel$", P("fsdp", None)),  # classification heads (fine-tuning)
    (r".*", P()),  # norms, biases, mask token, scalars: replicated
)


# Paths of stacked-layer parameters (``(L, *per-layer shape)``): a ``blocks/`` without a layer index.
STACKED_LAYERS = r"(^|/)blocks/(?!\d+(/|$))"


def resolve_mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves a ``{axis: size}`` mapping where one size may be ``-1`` ("the rest")."""
    sizes = {name: int(size) for name, size in axes.items()}
    unknown = [name for name, size in sizes.items() if size == -1]
    if len(unknown) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh: axis sizes must be positive, and only one axis may be -1; got {sizes}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by {known}")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                         f"but {num_devices} are available")
    return sizes


def make_mesh(axes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); missing axes have size 1, ``-1`` = the rest. All
    devices: ``jax.make_mesh``'s topology-aware device order."""
    axes = dict(axes or {"data": -1})
    if extra := sorted(set(axes) - set(MESH_AXES)):
        raise ValueError(f"mesh: unknown axes {extra}; expected a subset of {MESH_AXES}")
    ordered = {name: axes.get(name, 1) for name in MESH_AXES}
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(resolve_mesh_shape(ordered, len(devices)).values())  # in MESH_AXES order
    auto = (AxisType.Auto,) * len(MESH_AXES)  # GSPMD propagation (no sharding-in-types)
    if len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path as ``a/b/0/c`` (dict keys, sequence indices, attribute names)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
    names = () if axis is None else (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[n] for n in names)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, stacked: str | None = STACKED_LAYERS) -> P:
    """The PartitionSpec of the first :data:`MARLIN_RULES` regex matching ``path``, fitted to
    ``shape``: axes that do not divide their dimension are dropped, and a spec longer than
    ``shape`` (e.g. a kernel's rule hit by a scalar) replicates. Paths matching the regex
    ``stacked`` (None: none) have a leading layer axis: the rule's spec gets a leading ``None``."""
    spec = next(spec for pattern, spec in MARLIN_RULES if re.search(pattern, path))
    if stacked is not None and re.search(stacked, path):
        spec = P(None, *spec)
    if len(spec) > len(shape):
        return P()
    fitted = [axis if _axis_size(mesh, axis) > 1 and dim % _axis_size(mesh, axis) == 0 else None
              for dim, axis in zip(shape, spec, strict=False)]
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every array leaf of ``tree`` (arrays, ShapeDtypeStructs, nnx.State)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec_for(path_str(path), getattr(leaf, "shape", ()), mesh)), tree)


def sharded_init(init_fn: Callable[[], Any], mesh: Mesh) -> Any:
    """Runs ``init_fn`` under jit with the rule shardings as out_shardings, so large parameters
    are created directly in their shards (works across hosts; nothing is gathered)."""
    return jax.jit(init_fn, out_shardings=tree_shardings(jax.eval_shape(init_fn), mesh))()


def abstract_with_shardings(tree: Any, mesh: Mesh) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying the rule shardings (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                        tree_shardings(tree, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's batch shard ``{name: (B_local, ...)}`` (host arrays) -> global arrays
    ``(B_local * process_count, ...)`` sharded over data x fsdp."""
    return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)), np.asarray(value))
            for name, value in local.items()}


def process_batch_rows(mesh: Mesh, batch: int) -> slice:
    """The rows of a global batch of ``batch`` (sharded by :func:`batch_sharding`) that live on
    this process's devices: what this process loads and passes to
    ``jax.make_array_from_process_local_data``. All rows for a single process."""
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((batch,))
    rows = sorted({r for (index,) in index_map.values() for r in range(*index.indices(batch))})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(f"this process's batch rows {rows} are not contiguous: order the mesh "
                         "devices by process")
    return slice(rows[0], rows[-1] + 1)


def host_to_global(tree: Any, shardings: Any) -> Any:
    """Host-local arrays (the same values on every process, e.g. parameters restored from a
    file) -> global jax Arrays with ``shardings``; each process copies in only its shards."""
    return jax.tree.map(lambda value, sharding: jax.make_array_from_callback(
        np.shape(value), sharding, np.asarray(value).__getitem__), tree, shardings)


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (the number of batch shards)."""
    return _axis_size(mesh, BATCH_AXES)
