"""Fuzz: random byte mutations of valid checkpoints only ever raise the reader's own errors."""

from __future__ import annotations

import collections
import io
import signal
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marlin_jax.interop.torch_format import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    load_torch_file,
    save_torch_file,
)

torch = pytest.importorskip("torch")

SECONDS_PER_LOAD = 5  # a valid few-KB file loads in milliseconds; more than this is a hang


def _sample_checkpoints(root: Path) -> dict[str, bytes]:
    """Small valid files: torch zip (views, shared storage, Parameter, Size, bfloat16, 0-d), our
    own writer, a zip carrying opaque metadata, and a legacy file (refused; mutated, a bare pickle)."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = collections.OrderedDict(
        w=base,
        t=base.t(),
        s=base[1:3, 2:5],
        e=torch.ones(3).expand(2, 3),
        p=torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16)),
        z=torch.tensor(7, dtype=torch.int64),
        meta={"size": torch.Size([2, 3]), "list": [1, 2.5, "x", None, b"b"]},
    )
    files = {}
    torch.save(obj, root / "zip.pt")
    torch.save(obj, root / "legacy.pt", _use_new_zipfile_serialization=False)
    save_torch_file(root / "ours.pt", {"a": np.arange(6, dtype=np.float16).reshape(2, 3)})
    torch.save({"state_dict": obj, "hp": collections.Counter(a=1)}, root / "lightning.ckpt")
    for name in ("zip.pt", "legacy.pt", "ours.pt", "lightning.ckpt"):
        files[name] = (root / name).read_bytes()
    return files


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, bytes]:
    return _sample_checkpoints(tmp_path_factory.mktemp("fuzz_samples"))


def _pickle_span(data: bytes) -> tuple[int, int]:
    """Byte range of data.pkl inside a zip checkpoint (where mutations matter most)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
    n, e = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + n + e
    return start, start + info.compress_size


def _timeout(signum, frame):
    raise TimeoutError(f"load took more than {SECONDS_PER_LOAD} s")


MUTATION = st.tuples(
    st.sampled_from(["set", "flip", "delete", "insert", "truncate"]),
    st.integers(0, 2**32),  # position, reduced modulo the target range
    st.integers(0, 255),  # byte value / bit index / run length
    st.binary(min_size=1, max_size=8),  # inserted bytes
)


def mutate_pickle(data: bytes, ops: list[tuple]) -> bytes:
    """Applies `ops` to the zip's data.pkl and writes the archive again with valid CRCs, so the
    mutations reach the unpickler rather than the zip checksum."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            record = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                record = mutate(record, False, ops)
            zout.writestr(info.filename, record)
    return out.getvalue()


def mutate(data: bytes, in_pickle: bool, ops: list[tuple]) -> bytes:
    """Applies `ops` to `data`; with `in_pickle`, positions fall inside the zip's data.pkl."""
    out = bytearray(data)
    lo, hi = _pickle_span(data) if in_pickle else (0, len(data))
    for kind, where, value, blob in ops:
        if not out:
            break
        pos = lo + where % max(1, min(hi, len(out)) - lo)
        pos = min(pos, len(out) - 1)
        if kind == "set":
            out[pos] = value
        elif kind == "flip":
            out[pos] ^= 1 << (value % 8)
        elif kind == "delete":
            del out[pos : pos + 1 + value % 8]
        elif kind == "insert":
            out[pos:pos] = blob
        else:
            del out[pos:]
    return bytes(out)


def test_mutated_checkpoints_only_raise_reader_errors(samples, tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    counts = collections.Counter()

    @settings(
        max_examples=250,  # a few seconds
        deadline=None,  # the SIGALRM guard below is the hang check
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(
        st.sampled_from(sorted(samples)),
        st.sampled_from(["file", "pickle bytes", "pickle content"]),
        st.lists(MUTATION, min_size=1, max_size=4),
    )
    def check(name, where, ops):
        if name == "legacy.pt" or where == "file":
            data = mutate(samples[name], False, ops)
        elif where == "pickle bytes":  # the zip CRC catches most of these
            data = mutate(samples[name], True, ops)
        else:
            data = mutate_pickle(samples[name], ops)
        path = work / name
        path.write_bytes(data)
        previous = signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(SECONDS_PER_LOAD)
        try:
            load_torch_file(path, allow_opaque=counts.total() % 2 == 0)
            counts["loaded"] += 1
        except (CheckpointFormatError, UnsafeCheckpointError) as e:
            assert str(path) in str(e)
            counts[type(e).__name__] += 1
            counts["reached the unpickler"] += "corrupt pickle" in str(e) or isinstance(e, UnsafeCheckpointError)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    check()
    assert counts["CheckpointFormatError"] > 0, counts  # the mutations did reach the parser
    assert counts["reached the unpickler"] > 0, counts


def test_quick_mutation_smoke(samples, tmp_path):
    """A fixed, seeded set of byte overwrites of every sample (same check, reproducible)."""
    rng = np.random.default_rng(0)
    for name, original in samples.items():
        for _ in range(25):
            data = bytearray(original)
            for pos in rng.integers(0, len(data), size=3):
                data[pos] = rng.integers(0, 256)
            path = tmp_path / name
            path.write_bytes(bytes(data))
            try:
                load_torch_file(path, allow_opaque=True)
            except (CheckpointFormatError, UnsafeCheckpointError) as e:
                assert str(path) in str(e)
