"""The grain pipeline: batch contract, masks, sharding, determinism, bad input and the error
budget, multiprocessing workers, and resuming from an orbax checkpoint in a fresh process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from marlin_jax.data import (
    BadRecordError,
    ErrorBudgetError,
    VideoRecord,
    default_data_config,
    make_dataset,
)
from marlin_jax.masking import num_visible
from tests.test_data_sources import parsing_map, write_ytf_tree

ROOT = Path(__file__).resolve().parent.parent


def small_config(**overrides):
    """4 frames of 32x32 -> grid (2, 2, 2) = 8 tokens; mask_ratio 0.5 -> 4 visible."""
    c = default_data_config()
    c.clip_frames, c.img_size, c.patch_size, c.tubelet_size = 4, 32, 16, 2
    c.mask_ratio, c.num_threads, c.prefetch = 0.5, 1, 2
    c.update(overrides)
    return c


class IdSource:
    """In-memory source whose frame pixels encode (video id, frame index): red = id, green = frame.

    ``bad`` ids raise BadRecordError (as an unreadable file would); ``lengths`` override 40."""

    has_labels = True

    def __init__(self, n: int, size: int = 32, bad=(), lengths=None, empty_parsing=()):
        self.n, self.size, self.bad = n, size, set(bad)
        self.lengths, self.empty_parsing = lengths or {}, set(empty_parsing)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise BadRecordError(f"/data/video_{i}.mp4: corrupt")
        n, s = self.lengths.get(i, 40), self.size

        def frames(idx):
            out = np.zeros((len(idx), s, s, 3), np.uint8)
            out[..., 0] = i
            out[..., 1] = np.asarray(idx)[:, None, None]
            return out

        def parsing(idx):
            if i in self.empty_parsing:
                return [np.zeros((0,), np.uint8) for _ in idx]
            return [parsing_map(s) for _ in idx]

        return VideoRecord(f"video_{i}", n, frames, parsing, np.array([i % 2, i], np.int32))


def take(it, k):
    return [next(it) for _ in range(k)]


def ids_of(batch):
    return batch["video"][:, 0, 0, 0, 0].tolist()


def test_batch_contract_and_masks():
    c = small_config(mask_strategy="fasking", mask_ratio=0.75)
    c.clip_frames, c.img_size = 8, 64  # grid (4, 4, 4) = 64 tokens
    it = iter(make_dataset(c, split="train", global_batch_size=3, source=IdSource(7, 64)))
    for batch in take(it, 3):
        assert set(batch) == {"video", "mask", "labels"}
        assert batch["video"].shape == (3, 8, 64, 64, 3) and batch["video"].dtype == np.uint8
        assert batch["mask"].shape == (3, 64) and batch["mask"].dtype == np.bool_
        assert (batch["mask"].sum(1) == num_visible(0.75, 64)).all()
        assert batch["labels"].dtype == np.int32
        np.testing.assert_array_equal(batch["labels"][:, 1], ids_of(batch))
        # temporal sampling: stride 2 over a 40-frame video
        assert (np.diff(batch["video"][:, :, 0, 0, 1].astype(int), axis=1) == 2).all()
        # fasking keeps the background group first: it alone covers > 25% of the patches, so
        # every visible token is a patch touching background
        bg = (parsing_map(64) == 0).reshape(4, 16, 4, 16).any(axis=(1, 3)).reshape(-1)
        assert bg.mean() > 0.25
        assert not (batch["mask"].reshape(3, 4, 16) & ~bg).any()


def test_synthetic_default_source_end_to_end():
    pytest.importorskip("marlin_jax.data.synthetic")
    c = small_config(synthetic_num_videos=4, synthetic_num_frames=12, mask_ratio=0.75)
    c.img_size, c.clip_frames = 64, 8
    assert c.source == "synthetic"
    it = iter(make_dataset(c, split="train", global_batch_size=2))
    batch = next(it)
    assert batch["video"].shape == (2, 8, 64, 64, 3) and batch["labels"].shape == (2, 3)
    assert (batch["mask"].sum(1) == num_visible(0.75, 64)).all()
    assert it.stats["short_video"] == 2  # 12 frames < 8 * 2: stride 1


def test_full_size_defaults_give_the_marlin_shapes():
    c = default_data_config()
    c.num_threads = 1
    it = iter(make_dataset(c, split="train", global_batch_size=2, source=IdSource(3, 224)))
    batch = next(it)
    assert batch["video"].shape == (2, 16, 224, 224, 3) and batch["mask"].shape == (2, 1568)
    assert (batch["mask"].sum(1) == 156).all()


def test_frames_of_other_sizes_are_resized():
    it = iter(make_dataset(small_config(), split="train", global_batch_size=2,
                           source=IdSource(4, size=48)))
    assert next(it)["video"].shape == (2, 4, 32, 32, 3)


@pytest.mark.parametrize("shuffle", [False, True])
def test_process_shards_are_disjoint_and_cover_the_source(shuffle):
    n, procs = 11, 3
    seen = []
    for p in range(procs):
        c = small_config(drop_remainder=False)
        ds = make_dataset(c, split="train", global_batch_size=procs, process_index=p,
                          process_count=procs, shuffle=shuffle, repeat=False,
                          source=IdSource(n))
        ids = [i for b in ds for i in ids_of(b)]
        assert len(ids) == len(set(ids)) == len(range(p, n, procs))
        seen.append(set(ids))
    assert set.union(*seen) == set(range(n))
    assert sum(map(len, seen)) == n


def test_one_pass_with_drop_remainder_gives_every_process_the_same_steps():
    n, procs = 11, 3
    counts, seen = [], set()
    for p in range(procs):
        ds = make_dataset(small_config(), split="val", global_batch_size=2 * procs,
                          process_index=p, process_count=procs, repeat=False,
                          source=IdSource(n))
        batches = list(ds)
        counts.append(len(batches))
        seen.update(i for b in batches for i in ids_of(b))
        assert all(b["video"].shape[0] == 2 for b in batches)
    assert counts == [1, 1, 1]
    assert len(seen) == 6 and seen <= set(range(9))  # only the 11 % 3 = 2 last are never used


def test_deterministic_given_seed_and_epochs_reshuffle():
    def run(seed):
        it = iter(make_dataset(small_config(), split="train", global_batch_size=2, seed=seed,
                               source=IdSource(6)))
        return take(it, 6)

    a, b, c = run(0), run(0), run(1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["video"], y["video"])
        np.testing.assert_array_equal(x["mask"], y["mask"])
    assert any(not np.array_equal(x["video"], y["video"]) for x, y in zip(a, c, strict=True))
    epoch1 = [i for batch in a[:3] for i in ids_of(batch)]
    epoch2 = [i for batch in a[3:] for i in ids_of(batch)]
    assert sorted(epoch1) == sorted(epoch2) == list(range(6)) and epoch1 != epoch2


def test_short_videos_use_smaller_stride_or_padding_and_are_counted(caplog):
    src = IdSource(3, lengths={0: 6, 1: 3, 2: 40})
    ds = make_dataset(small_config(), split="train", global_batch_size=3, shuffle=False,
                      repeat=False, source=src)
    it = iter(ds)
    with caplog.at_level(logging.INFO, logger="marlin_jax.data.pipeline"):
        batch = next(it)
    frames = batch["video"][:, :, 0, 0, 1].astype(int)  # green = source frame index
    assert (np.diff(frames[0]) == 1).all()  # 6 frames < 4 * 2: stride 6 // 4 = 1
    np.testing.assert_array_equal(frames[1], [0, 1, 2, 2])  # 3 frames <= 4: pad with last
    assert (np.diff(frames[2]) == 2).all()
    assert it.stats["short_video"] == 2 and it.stats["skipped"] == 0
    assert "video_1: 3 frames < 8 (padded)" in caplog.text


def test_empty_parsing_maps_are_counted_and_give_valid_masks():
    it = iter(make_dataset(small_config(), split="train", global_batch_size=2, shuffle=False,
                           source=IdSource(2, empty_parsing={1})))
    batch = next(it)
    assert (batch["mask"].sum(1) == 4).all()
    assert it.stats["empty_parsing"] == 1 and it.stats["skipped"] == 0


def test_bad_records_are_replaced_counted_logged_and_budgeted(caplog):
    src = IdSource(8, bad={2, 5})
    it = iter(make_dataset(small_config(error_budget=100), split="train", global_batch_size=4,
                           shuffle=False, source=src))
    with caplog.at_level(logging.WARNING, logger="marlin_jax.data.pipeline"):
        batches = take(it, 4)  # 2 epochs
    ids = [i for b in batches for i in ids_of(b)]
    assert not {2, 5} & set(ids) and len(ids) == 16
    assert it.stats["skipped"] >= 4  # each epoch meets both bad videos at least once
    assert "/data/video_2.mp4: corrupt" in caplog.text
    assert "/data/video_5.mp4: corrupt" in caplog.text

    it = iter(make_dataset(small_config(error_budget=1), split="train", global_batch_size=4,
                           shuffle=False, source=src))
    with pytest.raises(ErrorBudgetError, match=r"error budget of 1 .*video_[25].mp4: corrupt"):
        take(it, 4)


class CountingSource(IdSource):
    """IdSource that counts how often each record is opened."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.opened: dict[int, int] = {}

    def __getitem__(self, i):
        self.opened[i] = self.opened.get(i, 0) + 1
        return super().__getitem__(i)


def test_error_budget_counts_distinct_bad_records_and_skips_known_ones_unread(caplog):
    src = CountingSource(8, bad={3})
    ds = make_dataset(small_config(error_budget=1), split="train", global_batch_size=4, source=src)
    it = iter(ds)
    with caplog.at_level(logging.WARNING, logger="marlin_jax.data.pipeline"):
        batches = take(it, 12)  # 6 epochs, each meeting video 3
    assert 3 not in {i for b in batches for i in ids_of(b)}
    assert src.opened[3] == 1  # read once, then skipped without reading
    assert it.stats["skipped"] >= 6 and it.bad_records == {3: "/data/video_3.mp4: corrupt"}
    assert caplog.text.count("video_3.mp4") == 1

    # the bad records are part of the iterator state: a resumed iterator skips them unread and
    # yields exactly what the uninterrupted one does
    state = it.get_state()
    assert json.loads(json.dumps(state))["bad_records"] == {"3": "/data/video_3.mp4: corrupt"}
    expected = take(it, 4)
    src2 = CountingSource(8, bad={3})
    resumed = iter(make_dataset(small_config(error_budget=1), split="train", global_batch_size=4,
                                source=src2))
    resumed.set_state(state)
    for a, b in zip(take(resumed, 4), expected, strict=True):
        np.testing.assert_array_equal(a["video"], b["video"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    assert 3 not in src2.opened and resumed.bad_records == it.bad_records

    # a second distinct bad record is over a budget of 1
    it = iter(make_dataset(small_config(error_budget=1), split="train", global_batch_size=4,
                           source=CountingSource(8, bad={3, 6})))
    with pytest.raises(ErrorBudgetError, match="2 distinct bad records skipped"):
        take(it, 4)


def test_unreadable_everything_fails_clearly():
    it = iter(make_dataset(small_config(max_retries=3), split="train", global_batch_size=2,
                           source=IdSource(4, bad=range(4))))
    with pytest.raises(ErrorBudgetError, match="4 records in a row were unreadable"):
        next(it)


def test_bad_files_in_ytf_layout(tmp_path, caplog):
    root = write_ytf_tree(tmp_path / "ytf", {f"P{i}/0": 12 for i in range(6)}, size=32)
    (root / "crop_images_DB/P0/0").rename(root / "gone")  # missing video folder
    for f in (root / "crop_images_DB/P1/0").glob("*.jpg"):
        f.write_bytes(b"\xff\xd8\xff garbage")  # corrupt JPEGs
    for f in (root / "face_parsing_images_DB/P2/0").glob("*.npy"):
        f.unlink()  # missing parsing maps
    for f in (root / "face_parsing_images_DB/P3/0").glob("*.npy"):
        f.write_bytes(b"garbage")  # corrupt parsing maps
    for f in (root / "face_parsing_images_DB/P4/0").glob("*.npy"):
        np.save(f, np.zeros((0, 32, 32), np.int64))  # no face found
    c = small_config(source="ytf", root_dir=str(root), error_budget=1000)
    it = iter(make_dataset(c, split="train", global_batch_size=2, shuffle=False, repeat=False))
    with caplog.at_level(logging.WARNING, logger="marlin_jax.data.pipeline"):
        batches = list(it)
    assert len(batches) == 3 and all((b["mask"].sum(1) == 4).all() for b in batches)
    assert it.stats["skipped"] >= 4 and it.stats["empty_parsing"] >= 1
    for needle in ["P0/0: cannot list folder", "P1/0/00", "not a decodable image",
                   "P2/0/00", "parsing map not found", "P3/0/00", "corrupt parsing map"]:
        assert needle in caplog.text, needle


def test_corrupt_and_missing_video_files_are_skipped(tmp_path, caplog):
    from marlin_jax.video_io import write_video

    vdir = tmp_path / "vids"
    for i in range(3):
        write_video(vdir / f"ok{i}.mp4", np.full((12, 32, 32, 3), 40 * i, np.uint8))
    (vdir / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    c = small_config(source="videos", root_dir=str(vdir), mask_strategy="random")
    ds = make_dataset(c, split="train", global_batch_size=2, shuffle=False)
    it = iter(ds)
    with caplog.at_level(logging.WARNING, logger="marlin_jax.data.pipeline"):
        batches = take(it, 4)
    assert all(b["video"].shape == (2, 4, 32, 32, 3) for b in batches)
    assert it.stats["skipped"] >= 2 and "broken.mp4" in caplog.text
    (vdir / "ok1.mp4").unlink()  # vanished after listing
    it = iter(ds)
    with caplog.at_level(logging.WARNING, logger="marlin_jax.data.pipeline"):
        take(it, 4)
    assert "ok1.mp4" in caplog.text and it.stats["skipped"] >= 2


def test_multiprocessing_workers_match_threads():
    def run(workers):
        c = small_config(num_workers=workers, num_threads=1)
        it = iter(make_dataset(c, split="train", global_batch_size=2, source=IdSource(5)))
        out = take(it, 4)
        state = it.get_state()
        it.close()
        return out, state

    (threads, _), (procs, state) = run(0), run(2)
    for a, b in zip(threads, procs, strict=True):
        np.testing.assert_array_equal(a["video"], b["video"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    assert json.loads(json.dumps(state))["issues"]["skipped"] == 0


_RESUME_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import orbax.checkpoint as ocp
    import grain
    from marlin_jax.data import default_data_config, make_dataset

    mode, root, ckpt, out = sys.argv[1:5]
    c = default_data_config()
    c.update(dict(source="ytf", root_dir=root, clip_frames=4, img_size=32, patch_size=16,
                  tubelet_size=2, mask_ratio=0.5, num_threads=2, prefetch=2,
                  num_workers=int(sys.argv[5])))
    it = iter(make_dataset(c, split="train", global_batch_size=2, seed=7))
    mngr = ocp.CheckpointManager(ckpt)
    if mode == "save":
        head = [next(it) for _ in range(3)]
        np.savez(out + ".head.npz", **{f"video{i}": b["video"] for i, b in enumerate(head)})
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    else:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
    batches = [next(it) for _ in range(3)]
    np.savez(out, **{f"{k}{i}": b[k] for i, b in enumerate(batches) for k in ("video", "mask")})
    it.close()
""")


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_from_orbax_checkpoint_in_a_fresh_process(tmp_path, workers):
    root = write_ytf_tree(tmp_path / "ytf", {f"P{i}/0": 10 + 3 * i for i in range(5)}, size=32)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}

    def run(mode, out):
        proc = subprocess.run(
            [sys.executable, "-c", _RESUME_SCRIPT, mode, str(root), str(tmp_path / "ckpt"),
             str(out), str(workers)], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return np.load(out)

    continued = run("save", tmp_path / "continued.npz")  # batches 3..5 of an unbroken run
    resumed = run("restore", tmp_path / "resumed.npz")  # fresh process, restored at step 3
    assert sorted(continued.files) == sorted(resumed.files)
    for k in continued.files:
        np.testing.assert_array_equal(continued[k], resumed[k], err_msg=k)
    head = np.load(str(tmp_path / "continued.npz") + ".head.npz")  # batches 0..2
    assert not np.array_equal(head["video0"], resumed["video0"])  # really resumed, not restarted


@pytest.mark.samples
def test_sample_videos_through_the_pipeline(samples_dir):
    c = small_config(source="videos", root_dir=str(samples_dir), mask_ratio=0.75,
                     drop_remainder=False)
    c.clip_frames, c.img_size = 16, 64  # grid (8, 4, 4) = 128 tokens
    it = iter(make_dataset(c, split="all", global_batch_size=2, shuffle=False, repeat=False))
    batches = list(it)
    assert [b["video"].shape for b in batches] == [(2, 16, 64, 64, 3)] * 2
    assert all((b["mask"].sum(1) == 32).all() for b in batches)
    assert "labels" not in batches[0]
    # cropped04 has 15 frames: padded with its last frame
    np.testing.assert_array_equal(batches[0]["video"][1, 14], batches[0]["video"][1, 15])
    assert it.stats == {"skipped": 0, "short_video": 1, "empty_parsing": 0, "no_parsing": 4}
