"""torch-free checkpoint reader/writer, checked against torch.save/torch.load as the oracle."""

from __future__ import annotations

import argparse
import builtins
import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from marlin_jax.interop.torch_format import (
    CheckpointFormatError,
    OpaqueObject,
    UnsafeCheckpointError,
    load_torch_file,
    save_torch_file,
)

torch = pytest.importorskip("torch")

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.uint16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 4)]


def random_tensor(shape: tuple[int, ...], dtype, seed: int = 0):
    """Random bits of `dtype` (every bit pattern, NaNs included, for the float types)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=g)
    nbytes = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape, nbytes), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def torch_bytes(t) -> bytes:
    return t.detach().resolve_conj().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy, for any dtype (bfloat16/float8 through ml_dtypes)."""
    name = str(t.dtype).removeprefix("torch.")
    dtype = np.dtype(getattr(ml_dtypes, name, None) or name)
    return np.frombuffer(torch_bytes(t), dtype).reshape(tuple(t.shape)).copy()


def np_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


def assert_same_tensor(arr, t) -> None:
    """Bit-exact equality of a loaded array and a torch tensor (dtype, shape and bytes)."""
    assert isinstance(arr, np.ndarray), type(arr)
    assert arr.dtype.name == str(t.dtype).removeprefix("torch."), (arr.dtype, t.dtype)
    assert arr.shape == tuple(t.shape)
    assert np_bytes(arr) == torch_bytes(t)


def save(tmp_path: Path, obj, name: str = "ckpt.pt", **kwargs) -> Path:
    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return path


def rewrite_zip(src: Path, dst: Path, edit) -> None:
    """Copies a zip archive, passing each (name, data) through `edit` (None drops a member)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


# ----------------------------------------------------------------------------------------------
# Reading what torch.save wrote
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_and_shapes_match_torch_bit_exactly(tmp_path, dtype):
    tensors = {f"t{i}": random_tensor(s, dtype, seed=i) for i, s in enumerate(SHAPES)}
    out = load_torch_file(save(tmp_path, tensors))
    assert list(out) == list(tensors)
    for key, t in tensors.items():
        assert_same_tensor(out[key], t)
        assert out[key].flags.writeable


def test_views_offsets_strides_and_shared_storage(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(5, 12)
    obj = {
        "base": base,
        "transposed": base.t(),
        "slice": base[1:4, 3:9],  # storage offset + non-contiguous
        "stepped": base[:, ::3],
        "row": base[2],
        "scalar_view": base[4, 5],
        "same_object": base,  # the same tensor twice -> one array
        "expanded": torch.ones(4).expand(3, 4),  # stride 0
    }
    out = load_torch_file(save(tmp_path, obj))
    for key, t in obj.items():
        assert_same_tensor(out[key], t)
    assert out["same_object"] is out["base"]
    # arrays never alias: writing one leaves the others (shared in torch) untouched
    out["transposed"][0, 0] = -1.0
    assert out["base"][0, 0] == 0.0 and out["slice"][0, 0] == base[1, 3].item()
    # an expanded tensor stays a read-only view (like np.broadcast_to), not a copy
    assert not out["expanded"].flags.writeable and out["expanded"].strides[0] == 0


def test_conj_and_neg_bits_match_torch_and_expanded_ones_stay_views(tmp_path):
    z = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    obj = {
        "conj": z.conj(),  # torch saves the conj / neg bits as metadata, not resolved values
        "neg": torch.arange(3.0)._neg_view(),
        "expanded_neg": torch.full((1,), 1.5)._neg_view().expand(2_000_000),
        "expanded_conj": z.conj().expand(4, 2),
    }
    out = load_torch_file(save(tmp_path, obj))
    for key, t in obj.items():
        assert_same_tensor(out[key], t.resolve_conj().resolve_neg())
    assert out["conj"].flags.writeable and out["neg"].flags.writeable
    # the sign is applied to the one stored element: still a read-only stride-0 view
    assert out["expanded_neg"].strides == (0,) and not out["expanded_neg"].flags.writeable
    assert out["expanded_conj"].strides == (0, 8)


def test_array_data_beyond_max_bytes_is_refused(tmp_path):
    huge = {"w": torch.ones(1).expand(10**12), "b": torch.zeros(3)}  # 4 TB described by 4 bytes
    path = save(tmp_path, huge)
    with pytest.raises(CheckpointFormatError, match=r"ckpt\.pt: .*3\.64 TiB.*more than the limit"):
        load_torch_file(path)
    small = save(tmp_path, {"w": torch.ones(1).expand(8)}, "small.pt")
    assert load_torch_file(small, max_bytes=32)["w"].shape == (8,)
    with pytest.raises(CheckpointFormatError, match=r"small\.pt: .*32 bytes.*limit of 31 bytes"):
        load_torch_file(small, max_bytes=31)


def test_nested_containers_and_python_values(tmp_path):
    obj = {
        "list": [1, -7, 2**40, -(2**70), 1.5, float("inf"), "text", "ünïcode", None, True],
        "tuple": (1, (2, (3, torch.tensor([4.0])))),
        "dict": {1: "int key", ("a", 2): "tuple key", "inner": collections.OrderedDict(z=1)},
        "set": {1, 2, 3},
        "bytes": b"\x00\xffraw",
        "bytearray": bytearray(b"abc"),
        "complex": 1 + 2j,
        "size": torch.Size([2, 3]),
        "device": torch.device("cpu"),
        "empty": {},
        "empty_list": [],
    }
    out = load_torch_file(save(tmp_path, obj))
    assert_same_tensor(out["tuple"][1][1][1], obj["tuple"][1][1][1])
    out["tuple"] = obj["tuple"] = None
    assert type(out["dict"]["inner"]) is collections.OrderedDict
    assert out["size"] == (2, 3) and type(out["size"]) is tuple
    assert out["device"] == "cpu"
    assert {k: v for k, v in out.items() if k != "device"} == {
        k: v for k, v in obj.items() if k != "device"
    }


def test_state_dict_of_a_module_with_parameters(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    sd = model.state_dict()
    out = load_torch_file(save(tmp_path, sd))
    assert type(out) is collections.OrderedDict and list(out) == list(sd)
    for key, t in sd.items():
        assert_same_tensor(out[key], t)
    # nn.Parameter objects themselves (_rebuild_parameter)
    params = dict(model.named_parameters())
    out = load_torch_file(save(tmp_path, params, "params.pt"))
    for key, p in params.items():
        assert_same_tensor(out[key], p)


class SubTensor(torch.Tensor):
    pass


def test_tensors_with_attributes_and_tensor_subclasses(tmp_path):
    t = random_tensor((3,), torch.float32)
    t.note = "extra state"  # saved through torch._tensor._rebuild_from_type_v2
    obj = {"attr": t, "sub": random_tensor((2,), torch.float16).as_subclass(SubTensor)}
    path = save(tmp_path, obj)
    with pytest.raises(UnsafeCheckpointError, match=r"global .*\.SubTensor"):
        load_torch_file(path)
    out = load_torch_file(path, allow_opaque=True)
    assert_same_tensor(out["attr"], t)
    sub = out["sub"]
    assert isinstance(sub, OpaqueObject) and sub.name.endswith(".SubTensor")
    assert_same_tensor(sub.args[0], obj["sub"].as_subclass(torch.Tensor))


def test_legacy_and_big_endian_files_are_refused_clearly(tmp_path):
    obj = {"f": random_tensor((5,), torch.float32), "meta": [1, "x", None]}
    legacy = save(tmp_path, obj, "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointFormatError, match=r"old\.pt: a legacy \(torch < 1\.6\) checkpoint"):
        load_torch_file(legacy)
    with pytest.raises(CheckpointFormatError, match=r"old\.pt: a legacy"):
        load_torch_file(legacy, allow_opaque=True)
    tar = tmp_path / "older.pt"  # torch < 0.4 wrote a tar archive
    tar.write_bytes(b"sys_info".ljust(257, b"\0") + b"ustar\x0000" + b"\0" * 250)
    with pytest.raises(CheckpointFormatError, match=r"older\.pt: a legacy"):
        load_torch_file(tar)

    def to_big(name: str, data: bytes):
        return b"big" if name.endswith("/byteorder") else data

    rewrite_zip(save(tmp_path, obj), tmp_path / "big.pt", to_big)
    with pytest.raises(CheckpointFormatError, match=r"big\.pt: a big-endian checkpoint: not supported"):
        load_torch_file(tmp_path / "big.pt")


# ----------------------------------------------------------------------------------------------
# Writing files torch can load
# ----------------------------------------------------------------------------------------------


def test_saved_file_loads_in_torch_bit_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for i, dtype in enumerate(DTYPES):
        for j, shape in enumerate(SHAPES):
            arrays[f"{dtype}_{j}"] = to_numpy(random_tensor(shape, dtype, seed=10 * i + j))
    arrays["non_contiguous"] = rng.standard_normal((4, 6)).astype(np.float32).T
    arrays["big_endian"] = np.arange(5, dtype=">i4")
    path = tmp_path / "ours.pt"
    save_torch_file(path, arrays)

    for kwargs in ({"weights_only": True}, {"weights_only": False}, {"mmap": True}):
        loaded = torch.load(path, **kwargs)
        assert type(loaded) is collections.OrderedDict and list(loaded) == list(arrays)
        for key, arr in arrays.items():
            assert_same_tensor(np.asarray(arr, arr.dtype.newbyteorder("=")), loaded[key])
    # and our own reader gives the arrays back
    ours = load_torch_file(path)
    for key, arr in arrays.items():
        assert ours[key].dtype == arr.dtype.newbyteorder("=")
        assert np_bytes(ours[key]) == np_bytes(arr.astype(arr.dtype.newbyteorder("=")))


def test_saved_nested_checkpoint_round_trips(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    obj = {
        "state_dict": collections.OrderedDict(w=w, b=np.zeros((), np.int64)),
        "shared": [w, w],  # one array object twice -> one tensor
        "meta": {"epoch": 3, "lr": 1e-3, "name": "marlin", "flags": (True, None), "raw": b"\x01", "no": b""},
        "big_int": 2**100,
    }
    path = tmp_path / "nested.pt"
    save_torch_file(path, obj)
    loaded = torch.load(path, weights_only=True)
    assert loaded["shared"][0] is loaded["shared"][1]
    assert loaded["meta"] == obj["meta"] and loaded["big_int"] == 2**100
    assert torch.equal(loaded["state_dict"]["w"], torch.from_numpy(w))
    ours = load_torch_file(path)
    assert ours["shared"][0] is ours["shared"][1]
    assert ours["meta"] == obj["meta"] and ours["big_int"] == 2**100
    np.testing.assert_array_equal(ours["state_dict"]["w"], w)
    assert ours["state_dict"]["b"].shape == () and ours["state_dict"]["b"].dtype == np.int64


def test_saved_pickle_is_byte_identical_to_torch_save(tmp_path):
    sd = collections.OrderedDict(w=random_tensor((2, 3), torch.float32), step=torch.tensor(7),
                                 u=random_tensor((4,), torch.uint16))  # uint16: _rebuild_tensor_v3
    sd._metadata = collections.OrderedDict({"": {"version": 1}})  # as nn.Module.state_dict() attaches
    ours = collections.OrderedDict((k, to_numpy(v)) for k, v in sd.items())
    ours._metadata = sd._metadata
    save_torch_file(tmp_path / "ours.pt", ours)
    with zipfile.ZipFile(save(tmp_path, sd, "theirs.pt")) as theirs, zipfile.ZipFile(tmp_path / "ours.pt") as zf:
        assert zf.read("archive/data.pkl") == theirs.read("theirs/data.pkl")


def test_save_is_deterministic_and_records_are_aligned(tmp_path):
    obj = {"a": np.ones((3, 5), np.float16), "b": np.arange(7, dtype=np.int64)}
    save_torch_file(tmp_path / "1.pt", obj)
    save_torch_file(tmp_path / "2.pt", obj)
    data = (tmp_path / "1.pt").read_bytes()
    assert data == (tmp_path / "2.pt").read_bytes()
    with zipfile.ZipFile(tmp_path / "1.pt") as zf:
        names = zf.namelist()
        assert names[0] == "archive/data.pkl" and "archive/version" in names
        assert zf.read("archive/byteorder") == b"little"
        for info in zf.infolist():  # same 64-byte alignment torch uses (mmap loading)
            n, e = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
            assert (info.header_offset + 30 + n + e) % 64 == 0, info.filename


def test_save_rejects_what_checkpoints_do_not_hold(tmp_path):
    with pytest.raises(TypeError, match="cannot save a object"):
        save_torch_file(tmp_path / "x.pt", {"a": {"b": object()}})
    with pytest.raises(TypeError, match="cannot save a set"):
        save_torch_file(tmp_path / "x.pt", {"a": [{1, 2}]})
    with pytest.raises(TypeError, match="dtype <U1"):
        save_torch_file(tmp_path / "x.pt", {"s": np.array(["a"])})
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# Lightning checkpoints: strict refuses metadata classes, allow_opaque skips them
# ----------------------------------------------------------------------------------------------


class CustomConfig:
    def __init__(self, depth: int):
        self.depth = depth


def lightning_checkpoint():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, {
        "epoch": 2,
        "global_step": 10,
        "pytorch-lightning_version": "1.9.5",
        "state_dict": collections.OrderedDict(
            (f"encoder.{k}", v) for k, v in model.state_dict().items()
        ),
        "hyper_parameters": {
            "args": argparse.Namespace(lr=1e-3, name="marlin"),
            "config": CustomConfig(depth=12),
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": None}},
    }


def test_lightning_ckpt_strict_refuses_and_opaque_reads_state_dict(tmp_path):
    model, ckpt = lightning_checkpoint()
    path = save(tmp_path, ckpt, "model.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"model\.ckpt.*global argparse\.Namespace"):
        load_torch_file(path)

    out = load_torch_file(path, allow_opaque=True)
    for key, t in ckpt["state_dict"].items():
        assert_same_tensor(out["state_dict"][key], t)
    args = out["hyper_parameters"]["args"]
    assert isinstance(args, OpaqueObject) and args.name == "argparse.Namespace"
    assert args.state == {"lr": 1e-3, "name": "marlin"}
    config = out["hyper_parameters"]["config"]
    assert isinstance(config, OpaqueObject) and config.name.endswith(".CustomConfig")
    assert config.state == {"depth": 12}
    # optimizer state is plain tensors and containers
    state = out["optimizer_states"][0]["state"]
    ref = ckpt["optimizer_states"][0]["state"]
    assert set(state) == set(ref)
    for idx in ref:
        for name, value in ref[idx].items():
            assert_same_tensor(state[idx][name], value)
    assert out["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-3
    assert out["epoch"] == 2 and out["callbacks"] == ckpt["callbacks"]


def test_opaque_globals_are_never_imported(tmp_path):
    # a global naming a module that does not exist must still be read as an inert placeholder
    payload = b"\x80\x02}(X\x01\x00\x00\x00acnot_a_module_xyz\nThing\nX\x01\x00\x00\x00bcos\nsystem\nu."
    path = tmp_path / "names.pkl"
    path.write_bytes(payload)
    out = load_torch_file(path, allow_opaque=True)
    assert all(issubclass(v, OpaqueObject) for v in out.values())  # inert placeholder classes
    assert out["a"].name == "not_a_module_xyz.Thing" and out["b"].name == "os.system"
    assert "not_a_module_xyz" not in sys.modules
    with pytest.raises(AttributeError, match="read-only"):  # what a pickle's BUILD would try
        out["a"].__reduce__ = print


# ----------------------------------------------------------------------------------------------
# Malicious pickles: refused, and the payload never runs
# ----------------------------------------------------------------------------------------------


def make_payloads(marker: Path) -> dict[str, object]:
    class ViaSystem:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    class ViaExec:
        def __reduce__(self):
            return builtins.exec, (f"open({str(marker)!r}, 'w').close()",)

    class ViaSubprocess:
        def __reduce__(self):
            return subprocess.call, (["touch", str(marker)],)

    return {"system": ViaSystem(), "exec": ViaExec(), "subprocess": ViaSubprocess()}


REFUSED_NAMES = {"system": r"(posix|os)\.system", "exec": r"builtins\.exec", "subprocess": r"subprocess\.call"}


@pytest.mark.parametrize("kind", sorted(REFUSED_NAMES))
def test_planted_payload_never_runs(tmp_path, kind):
    marker = tmp_path / f"pwned_{kind}"
    payload = make_payloads(marker)[kind]
    # premise: a plain unpickler really would run it
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()
    marker.unlink()

    legacy = save(tmp_path, [payload], "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointFormatError, match="legacy"):  # refused before its payload
        load_torch_file(legacy, allow_opaque=True)
    assert not marker.exists()
    files = {"in_torch_zip.pt": save(tmp_path, {"w": torch.ones(2), "x": payload}, "in_torch_zip.pt")}
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        files[f"bare{protocol}.pkl"] = tmp_path / f"bare{protocol}.pkl"
        files[f"bare{protocol}.pkl"].write_bytes(pickle.dumps({"x": payload}, protocol=protocol))

    for name, path in files.items():
        with pytest.raises(UnsafeCheckpointError, match=REFUSED_NAMES[kind]) as err:
            load_torch_file(path)
        assert str(path) in str(err.value), name
        assert not marker.exists(), name
        assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)  # e.g. from workers
        # even when told to skip unknown globals, nothing is called
        out = load_torch_file(path, allow_opaque=True)
        assert not marker.exists(), name
        evil = out["x"]
        assert isinstance(evil, OpaqueObject) and evil.args[0] in (
            f"touch {marker}",
            f"open({str(marker)!r}, 'w').close()",
            ["touch", str(marker)],
        )


def test_refused_opcodes_and_calls(tmp_path):
    refused = {
        b"\x80\x02\x82\x01.": "EXT1",  # copyreg extension registry lookup
    }
    corrupt = {
        b"\x80\x02}}b.": "AttributeError",  # BUILD (__setstate__) on a plain dict
        b"\x80\x02ctorch\nfloat32\n)R.": "not callable",  # calling an allow-listed value (a dtype)
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)\x81.": "NEWOBJ",  # NEWOBJ of a function
        # BUILD editing an allow-listed function (its name, its defaults) or a value
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x02\x00\x00\x00fnNs\x86b.": "AttributeError",
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x04\x00\x00\x00nameNsb.": "AttributeError",
        b"\x80\x02ctorch\nfloat32\nN}X\x05\x00\x00\x00dtypeNs\x86b.": "AttributeError",
        b"\x80\x02c__builtin__\nbytearray\nJ\x00\xca\x9a;\x85R.": "bytearray arguments",  # 1 GB
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.": "latin-1",
    }
    for i, (payload, what) in enumerate({**refused, **corrupt}.items()):
        path = tmp_path / f"case{i}.pkl"
        path.write_bytes(payload)
        error = UnsafeCheckpointError if payload in refused else CheckpointFormatError
        with pytest.raises(error, match=rf"case{i}\.pkl: .*{what}"):
            load_torch_file(path)
    # a registered copyreg extension would reach the C unpickler without find_class: still refused
    import copyreg

    copyreg.add_extension("os", "system", 0x7F0001)
    try:
        path.write_bytes(b"\x80\x02\x84\x01\x00\x7f\x00X\x04\x00\x00\x00true\x85R.")
        with pytest.raises(UnsafeCheckpointError, match="EXT4"):
            load_torch_file(path)
    finally:
        copyreg.remove_extension("os", "system", 0x7F0001)


def test_memo_and_length_bombs_are_refused_without_allocating(tmp_path):
    # the C unpickler sizes its memo array by the largest index: 2**28 would take 4 GB
    bombs = {
        "memo.pkl": b"\x80\x02N" + pickle.LONG_BINPUT + struct.pack("<I", 1 << 28) + b".",
        "bytes8.pkl": b"\x80\x04" + pickle.BINBYTES8 + struct.pack("<Q", 1 << 40) + b"x.",
        "unicode8.pkl": b"\x80\x04" + pickle.BINUNICODE8 + struct.pack("<Q", 1 << 36) + b"x.",
    }
    for name, payload in bombs.items():
        (tmp_path / name).write_bytes(payload)
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointFormatError, match=name.replace(".", r"\.")):
                load_torch_file(tmp_path / name)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, (name, peak)


def test_tensor_is_never_built_from_a_placeholder(tmp_path):
    # _rebuild_tensor_v2 handed an opaque object instead of a storage record
    payload = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"
        b"(cevil\nStorage\n)RK\x00K\x02\x85K\x01\x85\x89ccollections\nOrderedDict\n)Rt"
        b"R."
    )
    path = tmp_path / "fake_storage.pkl"
    path.write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match="evil.Storage"):
        load_torch_file(path)
    with pytest.raises(CheckpointFormatError, match="not a storage record"):
        load_torch_file(path, allow_opaque=True)


# ----------------------------------------------------------------------------------------------
# Corrupt and foreign files: clear errors naming the file
# ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_torch_file(tmp_path / "nope.pt")


def test_truncated_and_corrupt_zip(tmp_path):
    good = save(tmp_path, {"w": random_tensor((64,), torch.float32)})
    data = good.read_bytes()
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "no_directory.pt": data[:-30],
        "empty.pt": b"",
        "text.pt": b"this is not a checkpoint\n",
        "npy.pt": b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}",
    }
    # one flipped bit inside the tensor data: the zip CRC catches it
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("ckpt/data/0")
    n, e = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    flipped = bytearray(data)
    flipped[info.header_offset + 30 + n + e + 100] ^= 0x01
    cases["flipped.pt"] = bytes(flipped)
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(CheckpointFormatError, match=name.replace(".", r"\.")) as err:
            load_torch_file(path)
        assert err.value.path == str(path)
        assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)

    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointFormatError, match=r"foreign\.zip.*data\.pkl"):
        load_torch_file(foreign)


def test_inconsistent_records(tmp_path):
    good = save(tmp_path, {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    rewrite_zip(good, tmp_path / "short.pt", lambda n, d: d[:8] if n.endswith("data/0") else d)
    with pytest.raises(CheckpointFormatError, match=r"short\.pt.*data/0 holds 8 bytes"):
        load_torch_file(tmp_path / "short.pt")
    rewrite_zip(good, tmp_path / "gone.pt", lambda n, d: None if n.endswith("data/0") else d)
    with pytest.raises(CheckpointFormatError, match=r"gone\.pt.*data/0 is missing"):
        load_torch_file(tmp_path / "gone.pt")

    def bigger_shape(name: str, data: bytes):  # shape (2, 3) -> (2, 9): past the storage end
        if name.endswith("data.pkl"):
            return data.replace(b"K\x02K\x03\x86", b"K\x02K\x09\x86", 1)
        return data

    rewrite_zip(good, tmp_path / "oob.pt", bigger_shape)
    with pytest.raises(CheckpointFormatError, match=r"oob\.pt.*reads past the end of storage"):
        load_torch_file(tmp_path / "oob.pt")


def test_torchscript_archive_is_refused_clearly(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointFormatError, match="TorchScript"):
        load_torch_file(path)


def test_reader_works_without_torch(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.arange(4, dtype=torch.bfloat16)}, path)
    save_torch_file(tmp_path / "ours.pt", {"w": np.ones(2, np.float32)})
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now fails
        from marlin_jax.interop.torch_format import load_torch_file
        out = load_torch_file({str(path)!r})
        assert out["w"].dtype.name == "bfloat16" and out["w"].tolist() == [0, 1, 2, 3]
        assert load_torch_file({str(tmp_path / "ours.pt")!r})["w"].tolist() == [1.0, 1.0]
        assert "torch" not in [m.split(".")[0] for m in sys.modules if sys.modules[m]]
        """
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_in_memory_bytes_pickles_are_refused_the_same_way(tmp_path):
    # protocol-0 text pickle of os.system reached through INST rather than GLOBAL+REDUCE
    path = tmp_path / "inst.pkl"
    path.write_bytes(b"(S'touch x'\nios\nsystem\n.")
    with pytest.raises(UnsafeCheckpointError, match=r"os\.system"):
        load_torch_file(path)
    assert not (Path.cwd() / "x").exists()
    path.write_bytes(io.BytesIO(pickle.dumps([1, 2.0, "three"], protocol=0)).getvalue())
    assert load_torch_file(path) == [1, 2.0, "three"]


def test_whole_module_pickle_is_opaque_but_its_tensors_are_read(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    path = save(tmp_path, model, "module.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.container\.Sequential"):
        load_torch_file(path)
    out = load_torch_file(path, allow_opaque=True)
    assert isinstance(out, OpaqueObject) and out.name == "torch.nn.modules.container.Sequential"
    linear = out.state["_modules"]["0"]
    assert linear.name == "torch.nn.modules.linear.Linear"
    for name, param in model[0].named_parameters():
        assert_same_tensor(linear.state["_parameters"][name], param)


def test_tensors_saved_from_a_gpu_load_on_the_host(tmp_path):
    t = random_tensor((3, 2), torch.float32)
    src = save(tmp_path, {"w": t})

    def on_cuda(name: str, data: bytes):  # what torch.save writes for a tensor on cuda:0
        if name.endswith("data.pkl"):
            return data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
        return data

    rewrite_zip(src, tmp_path / "gpu.pt", on_cuda)
    assert b"cuda:0" in zipfile.ZipFile(tmp_path / "gpu.pt").read("ckpt/data.pkl")
    assert_same_tensor(load_torch_file(tmp_path / "gpu.pt")["w"], t)
