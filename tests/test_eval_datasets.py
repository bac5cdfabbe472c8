"""Label files, feature files and clip sampling of the evaluation datasets."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from marlin_jax.evaluation.datasets import (
    ClipDataset,
    DatasetError,
    LabelSet,
    load_celebvhq,
    load_features,
    load_label_file,
    read_split_file,
    reduce_windows,
)
from marlin_jax.video_io import write_video


def make_celebvhq(root, names=("a", "b", "c", "d"), videos=True, frames=6, size=16):
    """A tiny CelebV-HQ layout: info json, split files, cropped videos."""
    rng = np.random.default_rng(0)
    clips = {
        n: {"attributes": {"appearance": rng.integers(0, 2, 40).tolist(),
                           "action": rng.integers(0, 2, 35).tolist()}}
        for n in names
    }
    meta = {"appearance_mapping": [f"app{j}" for j in range(40)]}
    (root / "celebvhq_info.json").write_text(json.dumps({"meta_info": meta, "clips": clips}))
    (root / "train.txt").write_text("\n".join(names[:3]) + "\n\n")
    (root / "val.txt").write_text(names[3] + "\n")
    (root / "test.txt").write_text(names[3] + "\n")
    if videos:
        for n in names:
            write_video(root / "cropped" / f"{n}.mp4",
                        rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8))
    return clips


def test_celebvhq_labels_splits_and_ratio(tmp_path):
    clips = make_celebvhq(tmp_path)
    ls = load_celebvhq(tmp_path, "train", "appearance")
    assert ls.task == "multilabel" and ls.keys == ("a", "b", "c") and ls.num_outputs == 40
    assert ls.labels.dtype == bool and ls.labels.shape == (3, 40)
    np.testing.assert_array_equal(ls.labels[1], np.asarray(clips["b"]["attributes"]["appearance"]))
    assert ls.class_names[0] == "app0"
    assert ls.video_paths[0].endswith("cropped/a.mp4")
    act = load_celebvhq(tmp_path, "train", "action")
    assert act.labels.shape == (3, 35) and act.class_names[0] == "action_0"
    assert load_celebvhq(tmp_path, "train", "action", data_ratio=0.67).keys == ("a", "b")
    with pytest.raises(DatasetError, match="leaves none"):
        load_celebvhq(tmp_path, "train", "action", data_ratio=0.1)


def test_celebvhq_unknown_names_and_bad_labels(tmp_path):
    make_celebvhq(tmp_path)
    (tmp_path / "val.txt").write_text("a\nnot_a_clip\n")
    with pytest.raises(DatasetError, match=r"val.txt: 1 name\(s\) not in .*not_a_clip"):
        load_celebvhq(tmp_path, "val", "appearance")
    info = json.loads((tmp_path / "celebvhq_info.json").read_text())
    info["clips"]["a"]["attributes"]["appearance"] = [1, 0]
    (tmp_path / "celebvhq_info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="clip 'a' attributes/appearance must be 40"):
        load_celebvhq(tmp_path, "train", "appearance")
    with pytest.raises(DatasetError, match="split file not found"):
        load_celebvhq(tmp_path / "nowhere", "train", "appearance")
    (tmp_path / "test.txt").write_text("a\na\n")
    with pytest.raises(DatasetError, match="duplicate"):
        read_split_file(tmp_path / "test.txt")


def test_celebvhq_values_outside_the_label_set_and_bad_mappings_are_named(tmp_path):
    make_celebvhq(tmp_path)
    info = json.loads((tmp_path / "celebvhq_info.json").read_text())
    info["clips"]["b"]["attributes"]["appearance"][3] = 2  # a typo: not a binary label
    info["clips"]["c"]["attributes"]["appearance"][0] = "1"
    (tmp_path / "celebvhq_info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"celebvhq_info.json: attributes/appearance values "
                                           r"outside \{0, 1\}.* 2 clip\(s\): clip 'b': \[3\]=2; "
                                           r"clip 'c': \[0\]='1'"):
        load_celebvhq(tmp_path, "train", "appearance")
    assert load_celebvhq(tmp_path, "train", "action").num_outputs == 35  # other task intact
    info["clips"]["a"]["attributes"]["appearance"] = "1" * 40
    (tmp_path / "celebvhq_info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"clip 'a' attributes/appearance must be 40 values .*"
                                           r"got a str"):
        load_celebvhq(tmp_path, "train", "appearance")
    make_celebvhq(tmp_path, videos=False)  # valid labels again
    info = json.loads((tmp_path / "celebvhq_info.json").read_text())
    info["meta_info"]["appearance_mapping"] = [f"app{j}" for j in range(39)]  # one name short
    (tmp_path / "celebvhq_info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"meta_info/appearance_mapping must list the 40 "
                                           r"appearance label names, got 39 entries"):
        load_celebvhq(tmp_path, "train", "appearance")


def test_missing_video_is_an_error_or_a_counted_skip(tmp_path):
    make_celebvhq(tmp_path)
    (tmp_path / "cropped" / "b.mp4").unlink()
    ls = load_celebvhq(tmp_path, "train", "appearance")
    with pytest.raises(DatasetError, match=r"1 listed video\(s\) missing.*cropped/b.mp4"):
        ls.check_videos("error")
    kept, skipped = ls.check_videos("skip")
    assert kept.keys == ("a", "c") and list(skipped) == ["b"]
    np.testing.assert_array_equal(kept.labels, ls.labels[[0, 2]])


def test_csv_binary_multiclass_multilabel(tmp_path):
    (tmp_path / "bin.csv").write_text("path,label\nv/x.mp4,1\nv/y.mp4,0\nv/z.mp4,true\n")
    b = load_label_file(tmp_path / "bin.csv")
    assert b.task == "binary" and b.labels.tolist() == [True, False, True]
    assert b.keys == ("v/x", "v/y", "v/z") and b.num_outputs == 1
    assert b.video_paths[0] == str(tmp_path / "v" / "x.mp4")

    (tmp_path / "mc.csv").write_text("video,label,split\nx.mp4,happy,train\ny.mp4,sad,val\n"
                                     "z.mp4,angry,train\n")
    mc = load_label_file(tmp_path / "mc.csv")
    assert mc.task == "multiclass" and mc.class_names == ("angry", "happy", "sad")
    assert mc.labels.tolist() == [1, 2, 0]
    tr = load_label_file(tmp_path / "mc.csv", split="train", class_names=["sad", "happy", "angry"])
    assert tr.keys == ("x", "z") and tr.labels.tolist() == [1, 2]
    with pytest.raises(DatasetError, match=r"unknown class name\(s\).*angry"):
        load_label_file(tmp_path / "mc.csv", class_names=["happy", "sad"])
    with pytest.raises(DatasetError, match="no rows with split 'test'"):
        load_label_file(tmp_path / "mc.csv", split="test")

    (tmp_path / "ml.csv").write_text("path,mouth_open,eyes_closed,smiling\na.mp4,1,0,0\n"
                                     "b.mp4,0,1,1\n")
    ml = load_label_file(tmp_path / "ml.csv")
    assert ml.task == "multilabel" and ml.class_names == ("mouth_open", "eyes_closed", "smiling")
    assert ml.labels.tolist() == [[True, False, False], [False, True, True]]
    with pytest.raises(DatasetError, match=r"unknown label column\(s\).*smiling"):
        load_label_file(tmp_path / "ml.csv", class_names=["mouth_open", "eyes_closed"])
    with pytest.raises(DatasetError, match=r"label column\(s\) missing.*frowning"):
        load_label_file(tmp_path / "ml.csv", class_names=["mouth_open", "eyes_closed",
                                                          "smiling", "frowning"])
    reordered = load_label_file(tmp_path / "ml.csv",
                                class_names=["smiling", "mouth_open", "eyes_closed"])
    assert reordered.class_names == ("smiling", "mouth_open", "eyes_closed")
    assert reordered.labels.tolist() == [[False, True, False], [True, False, True]]
    (tmp_path / "bad.csv").write_text("path,a,b\nx.mp4,1,maybe\n")
    with pytest.raises(DatasetError, match="bad.csv: label columns must hold 0/1"):
        load_label_file(tmp_path / "bad.csv")


def test_json_records_mapping_and_label_names(tmp_path):
    recs = [{"path": "x.mp4", "labels": ["smiling"]},
            {"path": "y.mp4", "labels": ["smiling", "mouth_open"]}]
    (tmp_path / "names.json").write_text(json.dumps(recs))
    ls = load_label_file(tmp_path / "names.json", class_names=["mouth_open", "smiling"])
    assert ls.task == "multilabel" and ls.labels.tolist() == [[False, True], [True, True]]
    with pytest.raises(DatasetError, match=r"unknown label name\(s\).*smiling"):
        load_label_file(tmp_path / "names.json", class_names=["mouth_open"])
    (tmp_path / "map.json").write_text(json.dumps({"x.mp4": 0, "y.mp4": 1}))
    assert load_label_file(tmp_path / "map.json").task == "binary"
    (tmp_path / "vec.json").write_text(json.dumps({"x.mp4": [0, 1, 1], "y.mp4": [1, 0, 0]}))
    vec = load_label_file(tmp_path / "vec.json")
    assert vec.labels.shape == (2, 3) and vec.class_names == ("label_0", "label_1", "label_2")
    (tmp_path / "dup.json").write_text(json.dumps([{"path": "x.mp4", "label": 0},
                                                   {"path": "./x.mp4", "label": 1}]))
    with pytest.raises(DatasetError, match="duplicate samples"):
        load_label_file(tmp_path / "dup.json")
    with pytest.raises(DatasetError, match="label file not found"):
        load_label_file(tmp_path / "nope.csv")


def _labelset(keys, task="binary"):
    return LabelSet(tuple(keys), np.arange(len(keys)) % 2 == 0, task, ("y",),
                    tuple(f"/v/{k}.mp4" for k in keys), source="test")


def test_feature_reduction_and_bad_feature_files(tmp_path):
    rng = np.random.default_rng(0)
    feats = {k: rng.normal(size=(t, 8)).astype(np.float32) for k, t in [("a", 3), ("b", 1)]}
    for k, v in feats.items():
        np.save(tmp_path / f"{k}.npy", v)
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), np.float32))
    (tmp_path / "failed.error.json").write_text(json.dumps({"error": "boom"}))
    for red, fn in [("mean", np.mean), ("max", np.max), ("min", np.min)]:
        fs = load_features(tmp_path, _labelset(["a", "b"]), red)
        np.testing.assert_allclose(fs.x, np.stack([fn(feats[k], axis=0) for k in "ab"]),
                                   rtol=1e-6)
        assert fs.skipped == {}
    with pytest.raises(DatasetError, match=r"empty.npy: empty feature file"):
        load_features(tmp_path, _labelset(["a", "empty"]))
    with pytest.raises(DatasetError, match=r"failed.npy: extraction failed"):
        load_features(tmp_path, _labelset(["a", "failed"]))
    with pytest.raises(DatasetError, match=r"gone.npy: feature file not found"):
        load_features(tmp_path, _labelset(["gone"]))
    fs = load_features(tmp_path, _labelset(["a", "empty", "b", "gone", "failed"]),
                       on_error="skip")
    assert fs.keys == ("a", "b") and sorted(fs.skipped) == ["empty", "failed", "gone"]
    assert fs.labels.tolist() == [True, True]  # labels follow the kept samples
    np.save(tmp_path / "wide.npy", np.ones((2, 9), np.float32))
    with pytest.raises(DatasetError, match=r"wide.npy: features of shape \(9,\) per window, expected \(8,\)"):
        load_features(tmp_path, _labelset(["a", "wide"]))
    np.save(tmp_path / "rank4.npy", np.ones((2, 3, 4, 8), np.float32))
    with pytest.raises(DatasetError, match=r"rank4.npy: expected \(T, D\) window or \(T, N, D\) token"):
        load_features(tmp_path, _labelset(["rank4"]))
    np.save(tmp_path / "nan.npy", np.full((2, 8), np.nan, np.float32))
    with pytest.raises(DatasetError, match="nan.npy: features must be finite"):
        load_features(tmp_path, _labelset(["nan"]))
    with pytest.raises(DatasetError, match="no usable feature file"):
        load_features(tmp_path, _labelset(["empty"]), on_error="skip")
    with pytest.raises(ValueError, match="reduction"):
        reduce_windows(feats["a"], "median")


def test_token_features_are_reduced_over_windows_and_flattened(tmp_path):
    rng = np.random.default_rng(1)
    tokens = {k: rng.normal(size=(t, 5, 4)).astype(np.float32) for k, t in [("a", 3), ("b", 2)]}
    for k, v in tokens.items():
        np.save(tmp_path / f"{k}.npy", v)
    fs = load_features(tmp_path, _labelset(["a", "b"]), "max")
    assert fs.x.shape == (2, 20)
    np.testing.assert_allclose(fs.x, np.stack([tokens[k].max(0).reshape(-1) for k in "ab"]))
    np.save(tmp_path / "c.npy", np.ones((2, 6, 4), np.float32))  # another token count
    with pytest.raises(DatasetError, match=r"c.npy: features of shape \(6, 4\) per window, expected \(5, 4\)"):
        load_features(tmp_path, _labelset(["a", "c"]))


@pytest.mark.parametrize("frames,size", [(3, 24), (6, 12), (20, 16)])
def test_finetune_clips_are_the_pretraining_clips(tmp_path, frames, size):
    """Fine-tuning reads a clip as the pretraining pipeline does (one sampling rule, one
    resize): the same video and RNG give the same uint8 clip, for a video shorter than a clip,
    one shorter than clip * rate (stride drops), a long one; downscaled, upscaled, as is."""
    from marlin_jax.data.pipeline import LoadClip
    from marlin_jax.data.videos import VideoFileSource

    make_celebvhq(tmp_path, videos=False)
    video = np.random.default_rng(frames).integers(0, 255, (frames, size, size, 3), np.uint8)
    write_video(tmp_path / "cropped" / "a.mp4", video)
    clips = ClipDataset(load_celebvhq(tmp_path, "train", "appearance").subset([0]),
                        clip_frames=4, sample_rate=2, size=16)
    load = LoadClip(VideoFileSource(str(tmp_path / "cropped")), clip_frames=4,
                    temporal_sample_rate=2, img_size=16, patch_size=8, tubelet_size=2,
                    mask_strategy="random", mask_ratio=0.5)
    for seed in range(6):
        ours = clips.clip(0, np.random.default_rng(seed))
        pretraining = load(0, np.random.default_rng(seed))["video"]
        assert ours.dtype == pretraining.dtype == np.uint8 and ours.shape == (4, 16, 16, 3)
        np.testing.assert_array_equal(ours, pretraining)
    if frames == 3:  # padded by repeating the last frame
        np.testing.assert_array_equal(ours[2], ours[3])


def test_clip_dataset_batches(tmp_path):
    make_celebvhq(tmp_path, frames=10, size=24)
    ls = load_celebvhq(tmp_path, "train", "appearance")
    ds = ClipDataset(ls, clip_frames=4, sample_rate=2, size=16)
    batches = list(ds.batches(2, shuffle=True, seed=3))
    assert [b[0].shape for b in batches] == [(2, 4, 16, 16, 3), (1, 4, 16, 16, 3)]
    assert batches[0][0].dtype == np.uint8 and batches[0][1].shape == (2, 40)
    again = list(ds.batches(2, shuffle=True, seed=3))
    for (x1, y1), (x2, y2) in zip(batches, again, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert len(list(ds.batches(2, shuffle=False, seed=0, drop_last=True))) == 1


def test_clip_dataset_batches_resume_without_decoding_skipped(tmp_path, monkeypatch):
    """start_batch=k yields exactly batches k.. of the whole pass and decodes only their clips."""
    names = tuple("abcdefg")
    make_celebvhq(tmp_path, names=names, frames=10, size=16)
    (tmp_path / "train.txt").write_text("\n".join(names))
    ds = ClipDataset(load_celebvhq(tmp_path, "train", "appearance"), 4, 2, 16)
    whole = list(ds.batches(2, shuffle=True, seed=5, drop_last=True, num_threads=1))
    chunks = ds.batch_indices(2, shuffle=True, seed=5, drop_last=True)
    assert len(whole) == len(chunks) == 3
    decoded: list[int] = []
    clip = ds.clip
    monkeypatch.setattr(ds, "clip", lambda i, rng: decoded.append(i) or clip(i, rng))
    rest = list(ds.batches(2, shuffle=True, seed=5, drop_last=True, start_batch=2,
                           num_threads=1))
    assert sorted(decoded) == sorted(chunks[2].tolist())  # batches 0 and 1 never decoded
    assert len(rest) == 1
    np.testing.assert_array_equal(rest[0][0], whole[2][0])
    np.testing.assert_array_equal(rest[0][1], whole[2][1])
    assert list(ds.batches(2, shuffle=True, seed=5, drop_last=True, start_batch=3)) == []
    with pytest.raises(ValueError, match=r"start_batch 4 outside \[0, 3\]"):
        next(ds.batches(2, shuffle=True, seed=5, drop_last=True, start_batch=4))


def test_closing_batches_early_stops_decoding(tmp_path, monkeypatch):
    """A pass abandoned after one batch (preemption) does not decode the rest of the pass:
    close() returns at once, and at most the batches already in flight still finish."""
    names = tuple("abcdefghij")
    make_celebvhq(tmp_path, names=names, frames=10, size=16)
    (tmp_path / "train.txt").write_text("\n".join(names))
    ds = ClipDataset(load_celebvhq(tmp_path, "train", "appearance"), 4, 2, 16)
    decoded = []
    clip = ds.clip

    def slow_clip(i, rng):  # 10 clips: 1 s for the whole pass
        time.sleep(0.1)
        decoded.append(i)
        return clip(i, rng)

    monkeypatch.setattr(ds, "clip", slow_clip)
    batches = ds.batches(2, shuffle=False, seed=0, num_threads=1, prefetch=1)
    next(batches)
    start = time.monotonic()
    batches.close()
    assert time.monotonic() - start < 0.5
    time.sleep(1.5)  # long enough for the whole pass, had it continued
    assert 2 <= len(decoded) <= 6  # the first batch, the prefetched one, one in flight


def test_unreadable_video_fails_before_training_or_is_skipped(tmp_path):
    make_celebvhq(tmp_path, frames=10, size=16)
    (tmp_path / "cropped" / "b.mp4").write_bytes(b"garbage")
    ds = ClipDataset(load_celebvhq(tmp_path, "train", "appearance"), 4, 2, 16)
    with pytest.raises(DatasetError, match=r"train.txt: .*cropped/b.mp4: not a readable video"):
        ds.validate("error")
    kept, bad = ds.validate("skip")
    assert kept.labelset.keys == ("a", "c") and list(bad) == ["b"]
    assert [kept.num_frames(i) for i in range(2)] == [10, 10]  # counts carried over
    np.testing.assert_array_equal(kept.labelset.labels, ds.labelset.labels[[0, 2]])


def test_csv_row_problems_are_errors_naming_the_file_and_line(tmp_path):
    cases = {
        # a trailing comma on a row (was: AttributeError 'list' object has no attribute 'strip')
        "path,label\nx.mp4,1,\ny.mp4,0\n": r"rows must have the header's 2 cells.*line 2: 3 cells",
        "path,label,\nx.mp4,1,\n": r"line 1: empty column name in the header.*trailing comma",
        # a row without its split cell (was: dropped silently)
        "path,label,split\nx.mp4,1,train\ny.mp4,0\n": r"line 3: 2 cells",
        "path,label,split\nx.mp4,1,train\ny.mp4,0,\n": r"empty cell\(s\): line 3: split",
        "path,label,split\nx.mp4,,train\n": r"empty cell\(s\): line 2: label",
        "path,label,split\nx.mp4,1,train\ny.mp4,0,tset\n": r"split values must be one of.*"
                                                          r"line 3: 'tset'",
        "path,label,label\nx.mp4,1,0\n": r"line 1: repeated header column\(s\) \['label'\]",
        "": r"empty CSV file",
    }
    for i, (text, message) in enumerate(cases.items()):
        (tmp_path / f"c{i}.csv").write_text(text)
        with pytest.raises(DatasetError, match=rf"c{i}\.csv: .*{message}"):
            load_label_file(tmp_path / f"c{i}.csv", split="train")
    (tmp_path / "ok.csv").write_text("path,label,split\n\nx.mp4,1,train\n\ny.mp4,0,test\n")
    assert load_label_file(tmp_path / "ok.csv", split="train").keys == ("x",)  # blank lines
    (tmp_path / "bin.csv").write_text("path,label\nx.mp4,1\ny.mp4,maybe\n")
    with pytest.raises(DatasetError, match=r"bin\.csv: binary labels.*line 3: 'maybe'"):
        load_label_file(tmp_path / "bin.csv", task="binary")


def test_a_mistyped_label_in_every_split_does_not_make_an_extra_class(tmp_path, caplog):
    def write(name, labels):
        rows = ["path,label,split"] + [f"v{i}.mp4,{y},{('train', 'val', 'test')[i % 3]}"
                                       for i, y in enumerate(labels)]
        (tmp_path / name).write_text("\n".join(rows) + "\n")
        return tmp_path / name

    # binary 0/1 with an `l` typed for `1` once in every split: was a silent 3-class task
    typo = write("typo.csv", ["0", "1", "0", "1", "l", "l", "l", "0", "1"])
    for split in ("train", "val", "test"):
        with pytest.raises(DatasetError, match=r"typo\.csv: labels mix class indices \['0', '1'\] "
                                               r"and class names \['l'\].*'l': 3 row\(s\) "
                                               r"\(line 6; line 7; line 8\)"):
            load_label_file(typo, split=split)
    gap = write("gap.csv", ["0", "1", "2", "11", "0", "1"])
    with pytest.raises(DatasetError, match=r"gap\.csv: class indices 3, 4, .* have no rows.*"
                                           r"'11': 1 row\(s\) \(line 5\)"):
        load_label_file(gap)
    case = write("case.csv", ["happy", "sad", "Happy", "sad"])
    with pytest.raises(DatasetError, match=r"case\.csv: class names differ only in case.*"
                                           r"'Happy': 1 row\(s\) \(line 4\)"):
        load_label_file(case)
    with pytest.raises(DatasetError, match=r"case\.csv: unknown class name\(s\).*'Happy' "
                                           r"\(1 row\(s\): line 4\)"):
        load_label_file(case, class_names=["happy", "sad"])

    # the classes come from the whole file (every split gets the same head) and are logged
    names = write("names.csv", ["happy", "sad", "angry", "happy", "sad", "sad"])
    with caplog.at_level("INFO", logger="marlin_jax.evaluation.datasets"):
        val = load_label_file(names, split="val")  # rows 1 and 4: only "sad"
    assert val.class_names == ("angry", "happy", "sad") and val.labels.tolist() == [2, 2]
    assert "3 classes inferred from the labels: 'angry' (1 rows), 'happy' (2 rows), " \
           "'sad' (3 rows)" in caplog.text
    assert {r.levelname for r in caplog.records} == {"WARNING"}  # shown by the evaluate CLI too
    ints = write("ints.csv", ["0", "2", "1", "01"])
    assert load_label_file(ints).labels.tolist() == [0, 2, 1, 1]
