"""Faults of the checkpoint interop: crafted files that must fail clearly, with bounded memory.

Everything here is torch-free: the crafted files are hand-assembled pickles in torch's zip layout.
"""

from __future__ import annotations

import os
import pickle
import stat
import struct
import time
import tracemalloc
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from marlin_jax.interop import read_torch_state_dict, torch_format, videomae_to_marlin
from marlin_jax.interop.torch_format import (
    CheckpointFormatError,
    cast_bounded,
    load_torch_file,
    save_torch_file,
)
from marlin_jax.models import get_config

MIB = 1 << 20


def _str(s: str) -> bytes:
    data = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(v: int) -> bytes:
    data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


def _tuple(values) -> bytes:
    return pickle.MARK + b"".join(_int(v) for v in values) + pickle.TUPLE


def _tensor(key: str, storage: str, numel: int, size, stride, metadata: dict | None) -> bytes:
    """A `_rebuild_tensor_v2` call on storage `key` as torch.save writes it."""
    out = pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n" + pickle.MARK + pickle.MARK
    out += _str("storage") + pickle.GLOBAL + f"torch\n{storage}\n".encode()
    out += _str(key) + _str("cpu") + _int(numel) + pickle.TUPLE + pickle.BINPERSID
    out += _int(0) + _tuple(size) + _tuple(stride) + pickle.NEWFALSE
    out += pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE
    if metadata is not None:
        out += pickle.EMPTY_DICT + pickle.MARK
        for name, flag in metadata.items():
            out += _str(name) + (pickle.NEWTRUE if flag else pickle.NEWFALSE)
        out += pickle.SETITEMS
    return out + pickle.TUPLE + pickle.REDUCE


def write_crafted(path: Path, tensors: dict[str, tuple], storage: bytes,
                  storage_type: str = "FloatStorage", itemsize: int = 4) -> Path:
    """A zip checkpoint ``{name: tensor}`` whose tensors all view one storage ``"0"``.

    ``tensors`` maps a name to ``(size, stride, metadata)``.
    """
    pkl = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK
    for name, (size, stride, metadata) in tensors.items():
        pkl += _str(name) + _tensor("0", storage_type, len(storage) // itemsize, size, stride,
                                    metadata)
    pkl += pickle.SETITEMS + pickle.STOP
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/data/0", storage)
    return path


def peak_bytes(fn):
    """(result or exception, peak bytes traced while running fn)."""
    tracemalloc.start()
    try:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - returned for the caller to check
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


ONE = np.float32(1.5).tobytes()


def test_expanded_negated_tensor_stays_a_view_within_bounded_memory(tmp_path):
    # 463 bytes on disk, 2.5e8 elements (1 GB) when materialised
    path = write_crafted(tmp_path / "neg.pt", {"w": ((250_000_000,), (0,), {"neg": True})}, ONE)
    assert path.stat().st_size < 1024
    out, peak = peak_bytes(lambda: load_torch_file(path))
    assert not isinstance(out, Exception), out
    assert peak < 8 * MIB, f"loading allocated {peak} bytes"
    w = out["w"]
    assert w.shape == (250_000_000,) and w.dtype == np.float32 and w.strides == (0,)
    assert not w.flags.writeable and w[0] == w[-1] == -1.5


def test_negated_and_conjugated_tensors_keep_their_values(tmp_path):
    data = np.array([1 + 2j, -3 + 0.5j], np.complex64)
    tensors = {
        "conj": ((2,), (1,), {"conj": True}),
        "neg": ((2,), (1,), {"neg": True}),
        "both_expanded": ((3, 2), (0, 1), {"conj": True, "neg": True}),
    }
    path = write_crafted(tmp_path / "c.pt", tensors, data.tobytes(), "ComplexFloatStorage", 8)
    out = load_torch_file(path)
    np.testing.assert_array_equal(out["conj"], np.conj(data))
    np.testing.assert_array_equal(out["neg"], -data)
    np.testing.assert_array_equal(out["both_expanded"], np.broadcast_to(-np.conj(data), (3, 2)))
    assert out["conj"].flags.writeable and not out["both_expanded"].flags.writeable
    bools = write_crafted(tmp_path / "b.pt", {"b": ((1,), (1,), {"neg": True})}, b"\x01",
                          "BoolStorage", 1)
    with pytest.raises(CheckpointFormatError, match=r"b\.pt.*negated .*bool"):
        load_torch_file(bools)


def test_a_tiny_file_describing_terabytes_is_refused_quickly(tmp_path):
    path = write_crafted(tmp_path / "huge.pt", {"w": ((10**12,), (0,), {"neg": True})}, ONE)
    start = time.perf_counter()
    err, peak = peak_bytes(lambda: load_torch_file(path))
    assert isinstance(err, CheckpointFormatError), err
    assert time.perf_counter() - start < 5 and peak < 8 * MIB
    message = str(err)
    assert message.startswith(str(path)) and "3.64 TiB" in message and "limit" in message
    assert f"{path.stat().st_size} bytes" in message and "max_bytes" in message


def test_max_bytes_bounds_what_the_tensors_describe(tmp_path):
    storage = np.arange(16, dtype=np.float32).tobytes()
    # three distinct tensors copying the same 64-byte storage: 192 bytes of array data
    tensors = {f"t{i}": ((16,), (1,), None) for i in range(3)}
    path = write_crafted(tmp_path / "shared.pt", tensors, storage)
    out = load_torch_file(path, max_bytes=192)
    assert all(np.array_equal(out[f"t{i}"], np.arange(16)) for i in range(3))
    with pytest.raises(CheckpointFormatError, match=r"shared\.pt: .*more than the limit of 191"):
        load_torch_file(path, max_bytes=191)
    expanded = write_crafted(tmp_path / "exp.pt", {"w": ((1000,), (0,), None)}, ONE)
    assert load_torch_file(expanded)["w"].shape == (1000,)
    with pytest.raises(CheckpointFormatError, match="4000 bytes"):
        load_torch_file(expanded, max_bytes=3999)
    with pytest.raises(ValueError, match="max_bytes"):
        load_torch_file(expanded, max_bytes=-1)


def test_out_of_memory_names_the_file(tmp_path, monkeypatch):
    path = write_crafted(tmp_path / "oom.pt", {"w": ((1,), (1,), None)}, ONE)

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(torch_format._Unpickler, "_tensor", no_memory)
    with pytest.raises(MemoryError, match=r"oom\.pt: out of memory"):
        load_torch_file(path)


def test_videomae_float16_cast_of_an_expanded_tensor_is_bounded(tmp_path):
    half = np.float16(0.25).tobytes()
    path = write_crafted(tmp_path / "videomae.pt",
                         {"encoder.patch_embed.proj.weight": ((250_000_000,), (0,), None)},
                         half, "HalfStorage", 2)
    config = get_config("marlin_vit_small_ytf")
    out, peak = peak_bytes(lambda: read_torch_state_dict(path, config))
    assert not isinstance(out, Exception), out
    assert peak < 64 * MIB, f"reading allocated {peak} bytes"
    w = out["encoder.patch_embedding.projection.weight"]
    assert w.dtype == np.float32 and w.shape == (250_000_000,) and w[-1] == 0.25
    # the same through the mapping function directly, and a plain array is cast as usual
    direct, peak = peak_bytes(lambda: videomae_to_marlin(
        {"encoder.patch_embed.proj.weight": np.broadcast_to(np.float16(2), (10**9,))}, config))
    assert peak < 64 * MIB and direct["encoder.patch_embedding.projection.weight"][5] == 2.0
    plain = cast_bounded(np.arange(4, dtype=np.float16).reshape(2, 2).T, np.float32)
    assert plain.flags.writeable and plain.tolist() == [[0, 2], [1, 3]]


def _ordered_dict_build(state: bytes) -> bytes:
    return (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"collections\nOrderedDict\n"
            + pickle.EMPTY_TUPLE + pickle.REDUCE + state + pickle.BUILD + pickle.STOP)


def test_build_on_an_ordered_dict_is_an_error_naming_the_file(tmp_path):
    shadowing = tmp_path / "items.pt"
    shadowing.write_bytes(_ordered_dict_build(pickle.EMPTY_DICT + _str("items") + _int(1)
                                              + pickle.SETITEM))
    with pytest.raises(CheckpointFormatError, match=r"items\.pt: .*\['items'\].*shadow"):
        load_torch_file(shadowing)
    with pytest.raises(CheckpointFormatError, match=r"items\.pt"):  # was a bare TypeError
        read_torch_state_dict(shadowing)
    # the same through a (None, slot state) BUILD, which sets attributes one by one
    slots = tmp_path / "slots.pt"
    slots.write_bytes(_ordered_dict_build(pickle.NONE + pickle.EMPTY_DICT + _str("keys") + _int(1)
                                          + pickle.SETITEM + pickle.TUPLE2))
    with pytest.raises(CheckpointFormatError, match=r"slots\.pt: .*\['keys'\].*shadow"):
        load_torch_file(slots)


def test_state_dict_metadata_as_torch_writes_it_still_loads(tmp_path):
    sd = OrderedDict(w=np.ones(2, np.float32))
    sd._metadata = OrderedDict({"": {"version": 1}})  # what nn.Module.state_dict() attaches
    save_torch_file(tmp_path / "meta.pt", sd)
    out = load_torch_file(tmp_path / "meta.pt")
    assert out._metadata == {"": {"version": 1}} and list(out.items())[0][0] == "w"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_torch_file(tmp_path / "w.pt", {"w": np.zeros(3, np.float32)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.pt").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]  # no temporary file left behind


def test_a_damaged_marlin_config_json_is_an_error_naming_it(tmp_path):
    """A truncated ``marlin_config.json`` beside a checkpoint (a full disk, an interrupted copy)
    is a CheckpointError naming the file, not a bare JSONDecodeError."""
    from marlin_jax.interop.checkpoints import CONFIG_FILE, CheckpointError, read_config_file

    (tmp_path / CONFIG_FILE).write_text('{"encoder_embed_dim": 7')
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE}: damaged model config, not valid JSON"):
        read_config_file(tmp_path / "checkpoints" / "10")


def test_zero_adam_moments_are_not_sized_by_the_checkpoints_own_tensors():
    """A Lightning state saved before the first step gives zero moments; they are built at the
    model's shapes only, never as one float32 array per (possibly expanded) checkpoint tensor."""
    from marlin_jax.interop.optimizer_state import LightningCheckpoint, lightning_adam_moments

    huge = np.broadcast_to(np.float16(1), (250_000_000,))  # what an expanded tensor loads as
    state_dict = OrderedDict([("encoder.w", np.ones((2, 3), np.float32)), ("encoder.big", huge)])

    def entry(shape: tuple[int, ...]) -> dict:  # torch's Adam state of one parameter at step 0
        zeros = np.broadcast_to(np.float32(0), shape)
        return {"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros}

    g_state = {"state": {0: entry((2, 3)), 1: entry(huge.shape)},
               "param_groups": [{"params": [0, 1], "betas": (0.9, 0.95), "eps": 1e-8}]}
    ckpt = LightningCheckpoint("g.ckpt", state_dict, 0, [g_state, {}])
    g_like = {"encoder": {"w": np.zeros((2, 3), np.float32)}}
    out, peak = peak_bytes(lambda: lightning_adam_moments(ckpt, g_like, {}, b1=0.9, b2=0.95,
                                                          eps=1e-8))
    assert not isinstance(out, Exception), out
    assert peak < 64 * MIB, f"zero moments allocated {peak} bytes"
    mu = out[0].mu["encoder"]["w"]
    assert out[0].count == 0 and out[1] is None
    assert mu.shape == (2, 3) and mu.dtype == np.float32 and not mu.any() and mu.flags.writeable
