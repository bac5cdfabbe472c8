"""Feature files, group assignment, plots, the report and the statistics CLI
(``python -m marlin_jax.analysis``, also run as ``python -m marlin_jax.analysis.stats``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import marlin_jax.analysis.__main__ as analysis_cli
from marlin_jax.analysis.groups import (
    groups_from_dirs,
    groups_from_metadata,
    load_feature_dir,
    load_feature_file,
    read_metadata,
    video_id,
)

DIM = 48
PLANTED = [5, 11, 30]


def _write_pairs(root, n_subjects: int, clips: int, seed: int, name: str) -> np.random.Generator:
    """``root/pre`` and ``root/post`` hold the same subjects' ``(clips, DIM)`` features, the
    post ones shifted by 1 on PLANTED; returns the generator for more draws."""
    rng = np.random.default_rng(seed)
    for g in ("pre", "post"):
        (root / g).mkdir()
    for i in range(n_subjects):
        subject = rng.normal(0, 2.0, size=DIM)
        for g in ("pre", "post"):
            x = subject + 0.2 * rng.normal(size=(clips, DIM))
            if g == "post":
                x[:, PLANTED] += 1.0
            np.save(root / g / f"{name}{i}.npy", x)
    return rng


def _write_groups(root, n_videos=12, seed=0, shift=3.0):
    """Two groups of per-video feature files; group "poor" is shifted in PLANTED dims.

    Videos have 1-4 clips; clips of one video share a per-video offset (as real clips do)."""
    rng = np.random.default_rng(seed)
    rows = []
    (root / "feats").mkdir(parents=True)
    for i in range(2 * n_videos):
        group = "good" if i < n_videos else "poor"
        offset = rng.normal(size=DIM)
        x = offset + 0.3 * rng.normal(size=(int(rng.integers(1, 5)), DIM))
        if group == "poor":
            x[:, PLANTED] += shift
        name = f"subj{i:02d}"
        arr = x[0] if i == 0 else x  # one reduced (D,) file: read as one clip
        np.save(root / "feats" / f"{name}.npy", arr.astype(np.float32))
        rows.append({"Video": f"{name}.mp4", "outcome": group, "age": 40 + i})
    return pd.DataFrame(rows)


def test_video_id():
    assert video_id("a/b/clip.01.mp4") == "clip.01"
    assert video_id("x.npy") == "x"
    assert video_id(" subject_3 ") == "subject_3"


def test_load_feature_files_and_errors(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((3, 4), np.float32))
    np.save(tmp_path / "b.npy", np.ones(4, np.float32))
    feats = load_feature_dir(tmp_path)
    assert feats["a"].shape == (3, 4) and feats["b"].shape == (1, 4)

    np.save(tmp_path / "bad.npy", np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"bad\.npy.*shape \(2, 3, 4\)"):
        load_feature_file(tmp_path / "bad.npy")
    np.save(tmp_path / "bad.npy", np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match=r"bad\.npy.*NaN"):
        load_feature_file(tmp_path / "bad.npy")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=r"bad\.npy.*not a readable"):
        load_feature_file(tmp_path / "bad.npy")
    (tmp_path / "bad.npy").unlink()

    np.save(tmp_path / "c.npy", np.ones((2, 5)))
    with pytest.raises(ValueError, match="disagree on the feature size"):
        load_feature_dir(tmp_path)
    (tmp_path / "c.npy").unlink()
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "sub" / "a.npy", np.ones((2, 4)))
    with pytest.raises(ValueError, match="same video id 'a'"):
        load_feature_dir(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_feature_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .npy"):
        load_feature_dir(tmp_path / "empty")


@pytest.mark.parametrize("ext", [".csv", ".xlsx"])
def test_groups_from_metadata_csv_and_excel(tmp_path, ext):
    meta = _write_groups(tmp_path)
    meta.loc[len(meta)] = {"Video": "no_such_video.mp4", "outcome": "good", "age": 1}
    path = tmp_path / f"meta{ext}"
    meta.to_csv(path, index=False) if ext == ".csv" else meta.to_excel(path, index=False)
    feats = load_feature_dir(tmp_path / "feats")
    np.save(tmp_path / "feats" / "extra.npy", np.zeros(DIM))  # a file without a row
    feats["extra"] = np.zeros((1, DIM))
    groups = groups_from_metadata(feats, read_metadata(path), "outcome", meta_name=str(path))
    assert groups.names == ("good", "poor")
    assert len(groups.features["good"]) == 12 and len(groups.features["poor"]) == 12
    assert groups.samples("good", "video").shape == (12, DIM)
    n_clips = sum(x.shape[0] for x in groups.features["good"].values())
    assert groups.samples("good", "clip").shape == (n_clips, DIM)
    assert groups.paired()[0].shape == (0, DIM)  # no id in both groups
    notes = " ".join(groups.notes)
    assert "no_such_video" in notes and "extra" in notes


def test_groups_from_metadata_errors(tmp_path):
    feats = {"a": np.zeros((1, 3)), "b": np.ones((1, 3)), "c": np.ones((1, 3))}
    meta = pd.DataFrame({"file": ["a", "b", "c"], "arm": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="has 3 values.*--groups"):
        groups_from_metadata(feats, meta, "arm")
    g = groups_from_metadata(feats, meta, "arm", groups=["1", "3"])  # Excel floats read as ints
    assert list(g.features["1"]) == ["a"] and list(g.features["3"]) == ["c"]
    with pytest.raises(ValueError, match="no column 'group'"):
        groups_from_metadata(feats, meta, "group")
    with pytest.raises(ValueError, match="--id_column"):
        groups_from_metadata(feats, meta.rename(columns={"file": "x"}), "arm", groups=["1", "2"])
    with pytest.raises(ValueError, match=r"not in column 'arm'"):
        groups_from_metadata(feats, meta, "arm", groups=["1", "9"])
    with pytest.raises(ValueError, match="has no videos"):
        groups_from_metadata({"a": feats["a"]}, meta, "arm", groups=["1", "2"])
    bad = tmp_path / "meta.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match=r"meta\.json.*unsupported"):
        read_metadata(bad)


def test_groups_from_dirs_notes_shared_ids(tmp_path):
    for g in ("pre", "post"):
        (tmp_path / g).mkdir()
        for i in range(3):
            np.save(tmp_path / g / f"s{i}.npy", np.random.default_rng(i).normal(size=(2, 4)))
    groups = groups_from_dirs({"pre": tmp_path / "pre", "post": tmp_path / "post"})
    assert groups.names == ("pre", "post")
    assert "paired" in groups.notes[0]


def test_stats_cli_metadata_end_to_end(tmp_path, capsys):
    meta = _write_groups(tmp_path)
    meta.to_csv(tmp_path / "meta.csv", index=False)
    out = tmp_path / "out"
    rc = analysis_cli.main([
        "--features_dir", str(tmp_path / "feats"), "--meta", str(tmp_path / "meta.csv"),
        "--group_column", "outcome", "--output_dir", str(out), "--top_k", "10",
        "--embeddings", "pca", "--mmd_permutations", "200",
    ])  # fmt: skip
    assert rc == 0 and "report.md" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["groups"] == ["good", "poor"]
    for level in ("clip", "video"):
        entry = summary["levels"][level]
        assert set(PLANTED) <= set(entry["top_features"][:3])
        assert entry["significant_fdr_bh"] >= len(PLANTED)
        assert entry["mmd"]["p_value"] < 0.05
        for fig in entry["figures"].values():
            assert (out / fig).stat().st_size > 10_000
        table = pd.read_csv(out / entry["csv"])
        assert len(table) == DIM and table["significant_fdr"].sum() == entry["significant_fdr_bh"]
    assert summary["levels"]["video"]["n_a"] == 12
    report = (out / "report.md").read_text()
    assert "overstate significance" in report and "## Video level" in report
    assert "plots/video_embeddings.png" in report


def test_clip_level_overstates_significance_with_correlated_clips(tmp_path):
    """No group effect but strong per-video offsets shared by many clips: the clip-level test
    finds 'effects', the video-level test (the honest one) mostly does not."""
    rng = np.random.default_rng(7)
    for g in ("pre", "post"):
        (tmp_path / g).mkdir()
        for i in range(8):
            x = rng.normal(size=DIM) + 0.1 * rng.normal(size=(20, DIM))
            np.save(tmp_path / g / f"{g}{i}.npy", x)
    groups = groups_from_dirs({"pre": tmp_path / "pre", "post": tmp_path / "post"})
    from marlin_jax.analysis.stats import compare_groups

    clip = compare_groups(groups.samples("pre", "clip"), groups.samples("post", "clip"), mmd_permutations=0)
    video = compare_groups(
        groups.samples("pre", "video"), groups.samples("post", "video"), mmd_permutations=0
    )
    assert clip.significant_fdr.sum() > 5 * max(1, video.significant_fdr.sum())


def test_stats_cli_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        analysis_cli.main(["--output_dir", str(tmp_path)])
    assert "--features_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        analysis_cli.main(["--group_dir", "pre", "--output_dir", str(tmp_path)])
    assert "NAME=DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_stats_cli_pre_post_dirs_all_embeddings(tmp_path):
    """Pre/post folders with UMAP and t-SNE (slow: umap-learn compiles with numba)."""
    _write_groups(tmp_path)
    feats = sorted((tmp_path / "feats").glob("*.npy"))
    for g, files in (("pre", feats[:12]), ("post", feats[12:])):
        (tmp_path / g).mkdir()
        for f in files:
            f.rename(tmp_path / g / f.name)
    out = tmp_path / "out"
    analysis_cli.main([
        "--pre_dir", str(tmp_path / "pre"), "--post_dir", str(tmp_path / "post"),
        "--output_dir", str(out), "--mmd_permutations", "100",
    ])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["groups"] == ["pre", "post"]
    assert summary["levels"]["video"]["notes"] == []  # PCA, UMAP and t-SNE all ran
    assert (out / "plots" / "video_embeddings.png").exists()


def _extract(videos, checkpoint, model, out_dir):
    from marlin_jax import extract

    assert extract.main([*map(str, videos), "--model", model, "--checkpoint", str(checkpoint),
                         "--output_dir", str(out_dir)]) == 0
    return out_dir


def _small_encoder_checkpoint(path, name, **changes):
    from flax import nnx

    from marlin_jax.interop import save_torch_checkpoint
    from marlin_jax.models import MarlinModel, get_config, register_model

    register_model(name, get_config("marlin_vit_tiny").replace(**changes), overwrite=True)
    model = MarlinModel(get_config(name), rngs=nnx.Rngs(0), with_decoder=False,
                        with_discriminator=False)
    return save_torch_checkpoint(path, model, encoder_only=True)


@pytest.mark.slow
def test_stats_cli_on_features_extracted_from_synthetic_videos(tmp_path):
    """Synthetic videos -> `python -m marlin_jax.extract` -> the statistics CLI."""
    from marlin_jax.data.synthetic import write_video_dataset

    root = write_video_dataset(tmp_path / "synth", 4, num_frames=72, size=112, with_parsing=False)
    ckpt = _small_encoder_checkpoint(tmp_path / "small.pt", "analysis_stats_vit_tiny_112",
                                     img_size=112)
    feats = _extract(sorted((root / "videos").glob("*.mp4")), ckpt, "analysis_stats_vit_tiny_112",
                     tmp_path / "feats")
    labels = pd.read_csv(root / "labels.csv")
    labels["arm"] = ["treated" if i % 2 else "control" for i in range(len(labels))]
    labels.to_csv(tmp_path / "meta.csv", index=False)
    out = tmp_path / "report"
    assert analysis_cli.main([
        "--features_dir", str(feats), "--meta", str(tmp_path / "meta.csv"), "--id_column", "path",
        "--group_column", "arm", "--output_dir", str(out), "--embeddings", "pca",
        "--mmd_permutations", "50",
    ]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"control": {"videos": 2, "clips": 4},
                                 "treated": {"videos": 2, "clips": 4}}
    assert summary["feature_dim"] == 192
    assert summary["levels"]["clip"]["n_a"] == 4 and summary["levels"]["video"]["n_a"] == 2
    assert len(pd.read_csv(out / "features_video.csv")) == 192


@pytest.mark.samples
@pytest.mark.slow
def test_stats_cli_on_sample_video_features(samples_dir, tmp_path):
    """Features of the real face crops (random ViT-tiny): cropped01 (4 windows) vs cropped04
    (1 window). The video level has one video per group and is skipped with a note."""
    ckpt = _small_encoder_checkpoint(tmp_path / "tiny.pt", "analysis_stats_vit_tiny")
    for g, name in (("pre", "cropped01"), ("post", "cropped04")):
        _extract([samples_dir / f"{name}.mp4"], ckpt, "analysis_stats_vit_tiny", tmp_path / g)
    out = tmp_path / "report"
    assert analysis_cli.main([
        "--pre_dir", str(tmp_path / "pre"), "--post_dir", str(tmp_path / "post"),
        "--output_dir", str(out), "--mmd_permutations", "50",
    ]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["pre"] == {"videos": 1, "clips": 4}
    assert "clip" in summary["levels"] and "video" not in summary["levels"]
    assert any("video level skipped" in n for n in summary["notes"])
    assert (out / "plots" / "clip_top_features.png").exists()


def test_stats_cli_paired_level(tmp_path):
    """Pre/post folders holding the same subjects: the paired level pairs them by id."""
    rng = _write_pairs(tmp_path, n_subjects=10, clips=3, seed=3, name="subject")
    np.save(tmp_path / "post" / "unpaired.npy", rng.normal(size=(2, DIM)))
    out = tmp_path / "out"
    assert analysis_cli.main([
        "--pre_dir", str(tmp_path / "pre"), "--post_dir", str(tmp_path / "post"),
        "--output_dir", str(out), "--levels", "video", "paired", "--embeddings", "pca",
        "--mmd_permutations", "50", "--top_k", "5",
    ]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    paired = summary["levels"]["paired"]
    assert paired["test"] == "wilcoxon_signed_rank" and paired["n_a"] == paired["n_b"] == 10
    assert set(PLANTED) <= set(paired["top_features"][:3])
    assert paired["significant_fdr_bh"] >= 3 > summary["levels"]["video"]["significant_fdr_bh"]
    table = pd.read_csv(out / "features_paired.csv")
    assert {"wilcoxon_signed_rank", "cohens_dz"} <= set(table.columns)
    assert "Wilcoxon signed-rank" in (out / "report.md").read_text()

    # no shared ids: the paired level is skipped with a note
    (tmp_path / "other").mkdir()
    for i in range(3):
        np.save(tmp_path / "other" / f"x{i}.npy", rng.normal(size=(2, DIM)))
    analysis_cli.main([
        "--group_dir", f"a={tmp_path / 'pre'}", "--group_dir", f"b={tmp_path / 'other'}",
        "--output_dir", str(tmp_path / "out2"), "--levels", "paired", "--no_plots",
    ])  # fmt: skip
    notes = json.loads((tmp_path / "out2" / "summary.json").read_text())["notes"]
    assert any("paired level skipped: 0 video id(s)" in n for n in notes)


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_entry_points_give_the_same_report(tmp_path):
    """`python -m marlin_jax.analysis` and the older `python -m marlin_jax.analysis.stats`."""
    _write_groups(tmp_path, n_videos=5)
    feats = sorted((tmp_path / "feats").glob("*.npy"))
    for g, files in (("pre", feats[:5]), ("post", feats[5:])):
        (tmp_path / g).mkdir()
        for f in files:
            f.rename(tmp_path / g / f.name)
    summaries = []
    for module in ("marlin_jax.analysis", "marlin_jax.analysis.stats"):
        out = tmp_path / module
        res = _run("-m", module, "--pre_dir", str(tmp_path / "pre"), "--post_dir",
                   str(tmp_path / "post"), "--output_dir", str(out), "--no_plots",
                   "--mmd_permutations", "20")
        assert res.returncode == 0, res.stderr
        assert "report.md" in res.stdout and "RuntimeWarning" not in res.stderr
        summaries.append(json.loads((out / "summary.json").read_text()))
    assert summaries[0] == summaries[1] and summaries[0]["groups"] == ["pre", "post"]


def test_analysis_modules_import_alone_without_a_cycle():
    """Each module imports by itself in a fresh interpreter; stats loads neither the report nor
    the CLI (imports flow __main__ -> report -> stats), and no statistics module loads JAX."""
    code = (
        "import importlib, sys; m = sys.argv[1]; importlib.import_module(m); "
        "print(' '.join(sorted(k for k in sys.modules if k.startswith('marlin_jax.analysis.')))); "
        "assert 'jax' not in sys.modules, m"
    )
    loaded = {}
    for module in ("stats", "groups", "report", "__main__"):
        res = _run("-c", code, f"marlin_jax.analysis.{module}")
        assert res.returncode == 0, res.stderr
        loaded[module] = set(res.stdout.split())
    assert loaded["stats"] == {"marlin_jax.analysis.stats"}
    # not even a lazy (function-level) import of another analysis module in stats
    import marlin_jax.analysis.stats as stats_mod

    tree = ast.parse(Path(stats_mod.__file__).read_text(encoding="utf-8"))
    assert not [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and (n.level or (n.module or "").startswith("marlin_jax"))]
    assert "marlin_jax.analysis.__main__" not in loaded["report"]
    assert {"marlin_jax.analysis.report", "marlin_jax.analysis.stats"} <= loaded["__main__"]


def test_ranked_table_and_mmd_linear_share():
    """The ranked table orders every feature as the top list does; the MMD share is the
    linear-kernel MMD² split over standardised features."""
    from marlin_jax.analysis.report import mmd_linear_share, ranked_table
    from marlin_jax.analysis.stats import compare_groups

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(30, DIM)), rng.normal(size=(25, DIM))
    b[:, PLANTED] += 2.0
    share = mmd_linear_share(a, b)
    both = np.concatenate([a, b])
    delta = (a.mean(0) - b.mean(0)) / both.std(0)
    np.testing.assert_allclose(share * (delta**2).sum(), delta**2)  # shares of ||delta||²
    assert set(np.argsort(share)[-3:]) == set(PLANTED)
    np.testing.assert_array_equal(mmd_linear_share(a, a), np.zeros(DIM))

    res = compare_groups(a, b, names=("x", "y"), top_k=7, mmd_permutations=0)
    table = ranked_table(res, share)
    np.testing.assert_array_equal(table["feature"][:7], res.top)
    assert sorted(table["feature"].tolist()) == list(range(DIM))
    np.testing.assert_array_equal(table["rank"], np.arange(1, DIM + 1))
    np.testing.assert_array_equal(table["cohens_d"], res.d[table["feature"]])
    np.testing.assert_array_equal(table["mmd_linear_share"], share[table["feature"]])
    assert np.all(np.diff(table["q_value_bh"]) >= 0)
    assert "mmd_linear_share" not in ranked_table(res)
