"""The feature-analysis fork's command spellings, the ranked tables and new plots, progress bars
(issue 16 items 4 and 5)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
from flax import nnx

import marlin_jax.analysis.__main__ as analysis_cli
from marlin_jax.analysis import plots
from tests.test_analysis_report import DIM, PLANTED, _write_groups, _write_pairs

# ----------------------------------------------------------------------------- statistics CLI


def test_stats_cli_fork_spelling_ranked_tables_and_importance(tmp_path, capsys):
    """`--meta_path` (Excel) without --group_column reads the fork's "outcome" column; the
    report gains ranked CSVs, an Excel workbook (a sheet per level) and an importance chart."""
    from openpyxl import load_workbook

    meta = _write_groups(tmp_path)
    meta.to_excel(tmp_path / "meta.xlsx", index=False)
    out = tmp_path / "out"
    assert analysis_cli.main([
        "--features_dir", str(tmp_path / "feats"), "--meta_path", str(tmp_path / "meta.xlsx"),
        "--output_dir", str(out), "--embeddings", "pca", "--mmd_permutations", "50",
        "--top_k", "5",
    ]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "analysis" in err and "level" in err  # the tqdm bar over the levels
    summary = json.loads((out / "summary.json").read_text())
    assert summary["groups"] == ["good", "poor"] and summary["ranked_workbook"]
    wb = load_workbook(out / "ranked_features.xlsx", read_only=True)
    assert wb.sheetnames == ["clip", "video"]
    for level in ("clip", "video"):
        entry = summary["levels"][level]
        with (out / f"ranked_{level}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == DIM
        assert [int(r["rank"]) for r in rows] == list(range(1, DIM + 1))
        assert [int(r["feature"]) for r in rows[:5]] == entry["top_features"]
        assert {"p_value", "q_value_bh", "cohens_d", "mmd_linear_share"} <= set(rows[0])
        q = [float(r["q_value_bh"]) for r in rows]
        assert q == sorted(q)
        share = np.array([float(r["mmd_linear_share"]) for r in rows])
        assert share.sum() == pytest.approx(1.0)
        assert {int(r["feature"]) for r in rows[:3]} == set(PLANTED)
        assert share[:3].sum() > 0.5  # the planted shifts dominate the mean difference
        sheet = list(wb[level].iter_rows(values_only=True))
        assert sheet[0] == tuple(rows[0])  # same header
        assert [int(v) for v in sheet[1][:2]] == [1, int(rows[0]["feature"])]
        assert sheet[1][2] == pytest.approx(float(rows[0]["p_value"]))
        assert entry["top_table"][0]["mmd_linear_share"] == pytest.approx(share[0])
        png = out / entry["figures"]["feature importance"]
        assert png.name == f"{level}_feature_importance.png" and png.stat().st_size > 5_000
    report = (out / "report.md").read_text()
    assert "ranked_video.csv" in report and "ranked_features.xlsx" in report
    assert "MMD share" in report and "| rank | feature |" in report


def test_stats_cli_default_group_column_missing(tmp_path, capsys):
    meta = _write_groups(tmp_path, n_videos=3).rename(columns={"outcome": "arm"})
    meta.to_csv(tmp_path / "meta.csv", index=False)
    with pytest.raises(SystemExit):
        analysis_cli.main(["--features_dir", str(tmp_path / "feats"), "--meta_path",
                           str(tmp_path / "meta.csv"), "--output_dir", str(tmp_path / "o")])
    assert "no column 'outcome'" in capsys.readouterr().err


def test_paired_level_ranked_table_and_no_progress(tmp_path, capsys):
    """Paired level: d_z in the ranked table, no MMD share (no MMD there); --no_progress."""
    _write_pairs(tmp_path, n_subjects=6, clips=2, seed=5, name="s")
    out = tmp_path / "out"
    assert analysis_cli.main([
        "--pre_dir", str(tmp_path / "pre"), "--post_dir", str(tmp_path / "post"),
        "--output_dir", str(out), "--levels", "paired", "--embeddings", "--no_progress",
    ]) == 0  # fmt: skip
    assert "analysis" not in capsys.readouterr().err
    table = pd.read_csv(out / "ranked_paired.csv")
    assert "cohens_dz" in table and "mmd_linear_share" not in table
    assert set(table["feature"][:3]) == set(PLANTED)
    assert pd.read_excel(out / "ranked_features.xlsx", sheet_name="paired").shape == table.shape


# ----------------------------------------------------------------------------- plots


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures the plot functions save, in order (their PNGs are still written)."""
    figs = []
    real = plots.save_figure

    def save(fig, path, dpi=300):
        figs.append(fig)
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", save)
    return figs


def test_paired_difference_heatmap_is_titled_d_z(tmp_path, saved_figures):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 40)), rng.normal(size=(6, 40))
    d, q = rng.normal(size=40), rng.uniform(size=40)
    for paired in (False, True):
        plots.plot_feature_differences(a, b, ("pre", "post"), d, q, 0.05, [0, 1, 2],
                                       tmp_path / f"{paired}.png", paired=paired)
    titles = [fig.axes[0].get_title() for fig in saved_figures]
    assert titles[0].startswith("Cohen's d (pre - post)")
    assert titles[1].startswith("Cohen's d_z (pre - post)")
    assert saved_figures[1].axes[2].get_ylabel() == "d_z"  # its colour bar


def test_pca_axes_show_explained_variance(tmp_path, saved_figures):
    rng = np.random.default_rng(1)
    # one dominant direction: PC1 explains most of the variance
    t = rng.normal(size=(40, 1))
    x = t @ rng.normal(size=(1, 8)) + 0.05 * rng.normal(size=(40, 8))
    y, ratio = plots.embed_2d(x, "pca")
    z = (x - x.mean(0)) / x.std(0)
    sv = np.linalg.svd(z, compute_uv=False) ** 2
    np.testing.assert_allclose(ratio, sv[:2] / sv.sum(), rtol=1e-6)  # on standardised features
    assert y.shape == (40, 2) and ratio[0] > 0.8
    path, notes = plots.plot_embeddings(x[:20], x[20:], ("a", "b"), tmp_path / "e.png",
                                        methods=("pca",))
    assert path.exists() and notes == []
    ax = saved_figures[0].axes[0]
    assert ax.get_xlabel() == f"PC1 ({100 * ratio[0]:.1f}% of variance)"
    assert ax.get_ylabel().startswith("PC2 (") and "% of variance" in ax.get_ylabel()


def test_feature_importance_chart(tmp_path, saved_figures):
    d = np.array([0.1, -1.5, 0.9, 2.0, np.inf])
    q = np.array([0.9, 0.01, 0.2, 0.001, 0.04])
    path = plots.plot_feature_importance([3, 1, 4, 2], d, q, tmp_path / "imp.png",
                                         names=("good", "poor"))
    assert path.stat().st_size > 3_000
    ax = saved_figures[0].axes[0]
    top_down = sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])
    assert [t.get_text() for t in top_down] == ["feature 3", "feature 1", "feature 4",
                                                "feature 2"]  # in rank order, best at the top
    bars = sorted(ax.patches, key=lambda p: -p.get_y())
    assert [b.get_width() for b in bars] == pytest.approx([2.0, 1.5, 5.0, 0.9])  # |d|, inf -> 5
    assert [b.get_hatch() for b in bars] == [None, None, None, "//"]  # q >= 0.05 hatched
    with pytest.raises(ValueError, match="no features"):
        plots.plot_feature_importance([], d, q, tmp_path / "x.png")


# ----------------------------------------------------------------------------- heat-map CLIs
WIDE_MODEL = "analysis_cli_wide_768"  # 768 features (the fork's default indices exist)


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """A one-block, 768-wide encoder on 4-frame 32 px clips (token grid (2, 2, 2))."""
    from marlin_jax.interop import save_torch_checkpoint
    from marlin_jax.models import MarlinModel, get_config, register_model

    cfg = get_config("marlin_vit_tiny").replace(
        encoder_embed_dim=768, encoder_depth=1, encoder_num_heads=12, img_size=32, n_frames=4
    )
    register_model(WIDE_MODEL, cfg, overwrite=True)
    model = MarlinModel(cfg, rngs=nnx.Rngs(0), with_decoder=False, with_discriminator=False)
    return save_torch_checkpoint(tmp_path_factory.mktemp("wide") / "wide.pt", model,
                                 encoder_only=True)


@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory):
    """Two 32x32 videos of 12 frames (sample rate 2: one window each)."""
    from marlin_jax.video_io import write_video

    root = tmp_path_factory.mktemp("vids")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = root / f"clip{i}.mp4"
        write_video(path, rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8), fps=25)
        paths.append(path)
    return paths


def test_visualize_fork_spelling_defaults(wide_checkpoint, tiny_videos, tmp_path, capsys):
    """`--checkpoint_path --video_path --model_name` with no features: the fork's five default
    features, the comparison video on by default at 30 fps, and progress bars."""
    from marlin_jax.analysis import visualize
    from marlin_jax.video_io import count_frames, video_info

    out = tmp_path / "vis"
    assert visualize.main([
        "--checkpoint_path", str(wide_checkpoint), "--model_name", WIDE_MODEL,
        "--video_path", str(tiny_videos[0]), "--output_dir", str(out), "--dpi", "30",
    ]) == 0  # fmt: skip
    assert "relevance" in capsys.readouterr().err  # the tqdm bar of the relevance pass
    stem = tiny_videos[0].stem
    rel = np.load(out / f"{stem}_relevance.npz")
    assert rel["features"].tolist() == list(visualize.DEFAULT_FEATURES) == [397, 231, 490, 482,
                                                                               456]
    for f in visualize.DEFAULT_FEATURES:
        assert (out / f"{stem}_feature{f}.png").exists()
        mp4 = out / f"{stem}_feature{f}.mp4"
        assert count_frames(mp4) == 4 and video_info(mp4)["fps"] == pytest.approx(30.0)

    skip = tmp_path / "skip"
    assert visualize.main([
        "--checkpoint", str(wide_checkpoint), "--model", WIDE_MODEL, "--video", str(tiny_videos[0]),
        "--features", "3", "--output_dir", str(skip), "--dpi", "30", "--skip_comparison_video",
        "--no_progress",
    ]) == 0  # fmt: skip
    assert "relevance" not in capsys.readouterr().err
    assert sorted(p.name for p in skip.iterdir()) == [f"{stem}_feature3.png",
                                                      f"{stem}_relevance.npz"]


def test_compare_fork_spelling_defaults(wide_checkpoint, tiny_videos, tmp_path, capsys):
    from marlin_jax.analysis import compare

    out = tmp_path / "cmp"
    assert compare.main([
        "--checkpoint_path", str(wide_checkpoint), "--model_name", WIDE_MODEL,
        "--pre_video", str(tiny_videos[0]), "--post_video", str(tiny_videos[1]),
        "--output_dir", str(out), "--dpi", "30",
    ]) == 0  # fmt: skip
    assert "features" in capsys.readouterr().err  # the tqdm bar over the features
    assert np.load(out / "compare_relevance.npz")["features"].tolist() == [397, 231, 490, 482,
                                                                           456]
    assert all((out / f"compare_feature{f}.png").exists() for f in (397, 231, 490, 482, 456))


def test_default_features_need_a_768_wide_model(tiny_videos, tmp_path, capsys):
    """A narrower model: the usage error names the model's width and how to pick features."""
    from marlin_jax.analysis import compare, visualize
    from marlin_jax.interop import save_torch_checkpoint
    from marlin_jax.models import MarlinModel, get_config, register_model

    cfg = get_config("marlin_vit_tiny").replace(encoder_depth=1, img_size=32, n_frames=4)
    register_model("analysis_cli_narrow", cfg, overwrite=True)
    ckpt = save_torch_checkpoint(tmp_path / "narrow.pt", MarlinModel(
        cfg, rngs=nnx.Rngs(0), with_decoder=False, with_discriminator=False), encoder_only=True)
    common = ["--checkpoint_path", str(ckpt), "--model_name", "analysis_cli_narrow",
              "--output_dir", str(tmp_path / "o")]
    for main, videos in ((visualize.main, ["--video_path", str(tiny_videos[0])]),
                         (compare.main, ["--pre_video", str(tiny_videos[0]),
                                         "--post_video", str(tiny_videos[1])])):
        with pytest.raises(SystemExit):
            main(common + videos)
        err = capsys.readouterr().err
        assert "397 231 490 482 456" in err and "192 wide (0..191)" in err
        assert "--features" in err


def test_heatmap_clis_use_the_checkpoints_own_architecture(tiny_videos, tmp_path):
    """Issue 16 item 3: without --model, a marlin-jax checkpoint (its marlin_config.json, as a
    trainer workdir carries) or a Hugging Face folder (its config.json) of an architecture
    registered under no name is loaded as saved; a --model that disagrees is a usage error."""
    from marlin_jax.analysis import compare, visualize
    from marlin_jax.interop import save_hf_checkpoint, save_marlin_checkpoint
    from marlin_jax.models import MarlinModel, get_config

    cfg = get_config("marlin_vit_tiny").replace(encoder_embed_dim=48, encoder_depth=1, encoder_num_heads=2,
                                                img_size=32, n_frames=4)
    model = MarlinModel(cfg, rngs=nnx.Rngs(0), with_decoder=False, with_discriminator=False)
    workdir = save_marlin_checkpoint(tmp_path / "run", model)
    out = tmp_path / "vis"
    assert visualize.main(["--checkpoint", str(workdir), "--video", str(tiny_videos[0]), "--features", "47",
                           "--output_dir", str(out), "--dpi", "30", "--skip_comparison_video",
                           "--no_progress"]) == 0
    assert np.load(out / f"{tiny_videos[0].stem}_relevance.npz")["values"].shape[-1] == 1
    with pytest.raises(SystemExit):  # a model name that disagrees with the checkpoint's own
        visualize.main(["--checkpoint", str(workdir), "--model", "marlin_vit_tiny",
                        "--video", str(tiny_videos[0]), "--features", "1"])
    pytest.importorskip("safetensors")
    hf = save_hf_checkpoint(tmp_path / "hf", model)
    assert compare.main(["--checkpoint", str(hf), "--pre", str(tiny_videos[0]), "--post",
                         str(tiny_videos[1]), "--features", "47", "--output_dir", str(tmp_path / "cmp"),
                         "--dpi", "30", "--no_progress"]) == 0
    assert (tmp_path / "cmp" / "compare_feature47.png").exists()
