"""scripts/bench_data.py: its stand-in for the original MARLIN loader computes what the original
computes (the timing calibration against the real code is the script's ``--original``), and the
benchmark runs end to end."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from marlin_jax.data.records import load_frame_parsing
from marlin_jax.data.synthetic import write_ytf_layout
from marlin_jax.masking import fasking_slice_masks
from tests.script_utils import load_script

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return write_ytf_layout(tmp_path_factory.mktemp("bench") / "ytf", 1, num_frames=34, size=224,
                            val_fraction=0.0)


def test_stand_in_gives_the_originals_video_and_fasking_mask(layout):
    bench = load_script("bench_data")
    stand_in = bench.OriginalStandIn(str(layout))
    torch.manual_seed(3)
    np.random.seed(5)
    video, mask = stand_in[0]
    # replay the original's draws: torch start, then the numpy keep queue
    torch.manual_seed(3)
    start = int(torch.randint(0, 34 - 32 + 1, ()))
    np.random.seed(5)
    queue = np.concatenate([[6, 5], np.random.permutation(5)])

    rel = stand_in.table.iloc[0].path
    names = sorted(os.listdir(layout / "crop_images_DB" / rel))
    picks = [names[start + 2 * t] for t in range(16)]
    frames = np.stack([cv2.cvtColor(cv2.imread(str(layout / "crop_images_DB" / rel / n)),
                                    cv2.COLOR_BGR2RGB) for n in picks])
    assert video.dtype == torch.float32 and tuple(video.shape) == (3, 16, 224, 224)
    np.testing.assert_allclose(video.permute(1, 2, 3, 0).numpy(), frames / 255, atol=1e-6)

    maps = np.stack([load_frame_parsing(str(layout / "face_parsing_images_DB" / rel /
                                             n.replace(".jpg", ".npy"))) for n in picks[::2]])
    before_drop = fasking_slice_masks(maps, queue, 1 - 0.9).reshape(-1)
    mask = mask.numpy()
    assert mask.dtype == bool and mask.shape == (1568,) and mask.sum() == int(1568 * (1 - 0.9))
    assert not (mask & ~before_drop).any()  # dropped down from the original's fasking slices


@pytest.mark.slow
def test_benchmark_runs(layout, capsys, monkeypatch):
    bench = load_script("bench_data")
    monkeypatch.setattr("sys.argv", ["bench_data.py", "--dir", str(layout), "--clips", "4",
                                     "--rounds", "1", "--batch", "2", "--threads", "1",
                                     "--no-tfds", "--list", "3"])
    bench.main()
    out = capsys.readouterr().out
    for row in ("original (stand-in), per clip", "ytf layout (1 thread)",
                "ytf layout, 1st epoch (1 thread)"):
        assert row in out


@pytest.mark.slow
def test_benchmark_times_the_records_jpeg_and_raw(layout, capsys, monkeypatch):
    bench = load_script("bench_data")
    monkeypatch.setattr("sys.argv", ["bench_data.py", "--dir", str(layout), "--clips", "2",
                                     "--rounds", "1", "--batch", "2", "--threads", "1",
                                     "--list", "3"])
    bench.main()
    out = capsys.readouterr().out
    for row in ("records (1 thread)", "records, raw frames (1 thread)"):
        assert row in out


@pytest.mark.slow
def test_benchmark_only_raw_records_with_two_threads_reports_scaling_and_bandwidth(
        layout, capsys, monkeypatch):
    bench = load_script("bench_data")
    monkeypatch.setattr("sys.argv", ["bench_data.py", "--dir", str(layout), "--clips", "2",
                                     "--rounds", "1", "--batch", "2", "--threads", "2",
                                     "--list", "3", "--only", "raw frames"])
    bench.main()
    out = capsys.readouterr().out
    timed = [line.split("  ")[0] for line in out.splitlines() if "clips/s" not in line]
    assert "records, raw frames (1 thread)" in out and "records, raw frames (2 threads)" in out
    assert "original (stand-in), per clip" in out  # the baseline of the ratios stays
    assert not any(t.startswith(("ytf layout", "records (")) for t in timed)
    assert "scaling of records, raw frames (wall): 2 threads / 1 thread = " in out
    assert "memory bandwidth: clip copies (2.4 MB) per second, 1 thread " in out
