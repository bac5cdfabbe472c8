"""marlin_jax.files.atomic_path: what every atomic writer of the package (features, crops, .pt,
safetensors) goes through."""

import os
import stat

import numpy as np
import pytest

from marlin_jax.extract import save_npy_atomic
from marlin_jax.files import atomic_path


def test_a_written_file_takes_the_name_with_open_s_mode(tmp_path):
    old = os.umask(0o022)
    try:
        save_npy_atomic(tmp_path / "sub" / "x.npy", np.arange(3))
    finally:
        os.umask(old)
    target = tmp_path / "sub" / "x.npy"
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert [p.name for p in target.parent.iterdir()] == ["x.npy"]


def test_a_failed_write_leaves_neither_the_name_nor_a_part_file(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert os.path.basename(tmp).startswith(".part-") and tmp.endswith(".bin")
        with open(tmp, "xb") as f:
            f.write(b"partial")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
