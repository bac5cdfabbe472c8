"""The evaluation entry point: configs, CelebV-HQ / label-file runs, skips, restore, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from marlin_jax.evaluate import default_config, load_splits, run, split_by_fractions
from marlin_jax.evaluation.datasets import DatasetError, load_label_file

from .test_eval_datasets import make_celebvhq

ROOT = Path(__file__).resolve().parent.parent


def write_informative_features(root: Path, info_task: str = "appearance", dim: int = 64,
                               windows: int = 3, seed: int = 0) -> Path:
    """Feature files whose window mean is a noisy linear image of the labels."""
    info = json.loads((root / "celebvhq_info.json").read_text())
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(40, dim))
    out = root / "marlin_vit_base_ytf"
    out.mkdir(exist_ok=True)
    for name, clip in info["clips"].items():
        y = np.asarray(clip["attributes"][info_task], np.float32)
        centre = (2 * y - 1) @ proj / 4
        np.save(out / f"{name}.npy",
                (centre + 0.3 * rng.normal(size=(windows, dim))).astype(np.float32))
    return out


def celebvhq_dataset(root: Path) -> Path:
    names = [f"clip{i:03d}" for i in range(90)]
    root.mkdir(parents=True, exist_ok=True)
    make_celebvhq(root, names=tuple(names), videos=False)
    (root / "train.txt").write_text("\n".join(names[:50]))
    (root / "val.txt").write_text("\n".join(names[50:70]))
    (root / "test.txt").write_text("\n".join(names[70:]))
    write_informative_features(root)
    return root


def lp_config(root: Path, workdir: Path):
    c = default_config()
    c.data_path = str(root)
    c.workdir = str(workdir)
    c.learning_rate = 1e-2
    c.epochs = 20
    c.patience = 10
    c.batch_size = 16
    return c


def test_celebvhq_linear_probe_run_and_restore(tmp_path, capsys):
    root = celebvhq_dataset(tmp_path / "celebvhq")
    config = lp_config(root, tmp_path / "work")
    results = run(config)
    assert results["metrics"]["test"]["auroc"] > 0.85
    assert results["metrics"]["test"]["n"] == 20 and results["task"] == "multilabel"
    saved = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert saved["metrics"]["test"]["auroc"] == pytest.approx(results["metrics"]["test"]["auroc"])
    assert saved["config"]["task"] == "appearance" and saved["fit"]["best_epoch"] >= 0
    out = capsys.readouterr().out
    assert "split" in out and "auroc" in out and "test" in out
    # evaluate-only from the best checkpoint gives the same numbers
    config.skip_train = True
    again = run(config, log=lambda s: None)
    assert again["metrics"]["test"] == pytest.approx(results["metrics"]["test"])
    # the standardised probe: trained, checkpointed and restored the same way
    config.skip_train, config.standardize_features = False, True
    config.workdir = str(tmp_path / "work_std")
    std = run(config, log=lambda s: None)
    assert std["metrics"]["test"]["auroc"] > 0.85
    config.skip_train = True
    again = run(config, log=lambda s: None)
    assert again["metrics"]["test"] == pytest.approx(std["metrics"]["test"])


def test_weight_decay_sweep_selects_on_validation(tmp_path):
    """A probe per weight decay, each in its own run directory; the best validation AUROC is
    the one evaluated; reruns report, and a grown sweep reuses the finished runs."""
    root = celebvhq_dataset(tmp_path / "celebvhq")
    config = lp_config(root, tmp_path / "work")
    config.standardize_features = True
    config.weight_decay_sweep = (0.0, 0.3, 30.0)
    logs = []
    results = run(config, log=logs.append)
    sweep = results["fit"]["sweep"]
    assert [s["weight_decay"] for s in sweep] == [0.0, 0.3, 30.0]
    val = [s["val_auroc"] for s in sweep]
    chosen = results["fit"]["weight_decay"]
    assert chosen == sweep[int(np.argmax(val))]["weight_decay"]
    assert results["metrics"]["val"]["auroc"] == pytest.approx(max(val))
    assert any(line.startswith("weight decay sweep (val auroc): 0: ") for line in logs)
    for wd in ("0", "0.3", "30"):
        assert (tmp_path / "work" / f"wd_{wd}" / "checkpoints").is_dir()
    # the selected run alone, restored from its directory, gives the reported test metrics
    alone = lp_config(root, tmp_path / "work" / f"wd_{chosen:g}")
    alone.standardize_features, alone.skip_train = True, True
    restored = run(alone, log=lambda s: None)
    assert restored["metrics"]["test"] == pytest.approx(results["metrics"]["test"])
    # a finished sweep is reported, not retrained; one more value trains only that one
    assert run(config, log=lambda s: None)["metrics"] == results["metrics"]
    config.weight_decay_sweep = (0.0, 0.3, 30.0, 3.0)
    logs = []
    grown = run(config, log=logs.append)
    assert sum("already finished" in line for line in logs) == 3
    assert len(grown["fit"]["sweep"]) == 4
    config.weight_decay_sweep = (0.3, 0.3)
    with pytest.raises(ValueError, match="distinct values"):
        run(config, log=lambda s: None)
    config.weight_decay_sweep, config.finetune = (0.3,), True
    with pytest.raises(ValueError, match="weight_decay_sweep is for linear probes"):
        run(config, log=lambda s: None)


def test_data_ratio_and_skips(tmp_path):
    root = celebvhq_dataset(tmp_path / "celebvhq")
    config = lp_config(root, tmp_path / "work")
    config.data_ratio = 0.5
    splits = load_splits(config)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (25, 10, 20)
    # an empty feature file: an error naming it, or a counted skip with on_error="skip"
    np.save(root / "marlin_vit_base_ytf" / "clip003.npy", np.zeros((0, 64), np.float32))
    config.epochs = 3
    with pytest.raises(DatasetError, match="clip003.npy: empty feature file"):
        run(config, log=lambda s: None)
    config.on_error = "skip"
    logs = []
    results = run(config, log=logs.append)
    assert list(results["skipped"]["train"]) == ["clip003"]
    assert any("train features: skipped 1 sample(s)" in line for line in logs)


def test_label_file_splits(tmp_path):
    rows = ["path,label,split"] + [f"v{i}.mp4,{i % 2},{['train', 'val', 'test'][i % 3]}"
                                   for i in range(30)]
    (tmp_path / "l.csv").write_text("\n".join(rows))
    c = default_config()
    c.dataset, c.task = "labels", ""
    c.labels.file = str(tmp_path / "l.csv")
    splits = load_splits(c)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [10, 10, 10]
    assert splits["train"].task == "binary"
    parts = split_by_fractions(load_label_file(tmp_path / "l.csv"), (0.6, 0.2, 0.2), seed=0)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    assert not set(parts["train"].keys) & set(parts["test"].keys)
    with pytest.raises(ValueError, match="summing to 1"):
        split_by_fractions(splits["train"], (0.5, 0.2, 0.2), 0)
    c.dataset = "nope"
    with pytest.raises(ValueError, match="dataset must be"):
        load_splits(c)


@pytest.mark.slow
def test_finetune_missing_video_and_smoke_run(tmp_path):
    """Fine-tuning refuses listed-but-missing videos (or skips and counts them), then trains a
    tiny randomly initialised encoder end to end for an epoch."""
    root = tmp_path / "celebvhq"
    root.mkdir()
    names = tuple(f"c{i}" for i in range(8))
    make_celebvhq(root, names=names, frames=12, size=32)
    (root / "train.txt").write_text("\n".join(names[:4]))
    (root / "val.txt").write_text("\n".join(names[4:6]))
    (root / "test.txt").write_text("\n".join(names[6:]))
    (root / "cropped" / "c1.mp4").unlink()
    c = default_config()
    c.finetune = True
    c.data_path, c.workdir = str(root), str(tmp_path / "work")
    c.backbone = "eval_test_tiny"
    c.backbone_config = {"name": "marlin_vit_tiny", "img_size": 32, "n_frames": 4,
                         "encoder_depth": 1}
    c.epochs, c.batch_size, c.num_threads = 1, 2, 2
    with pytest.raises(DatasetError, match=r"missing: .*cropped/c1.mp4"):
        run(c, log=lambda s: None)
    c.on_error = "skip"
    with pytest.raises(ValueError, match="marlin_ckpt"):
        run(c, log=lambda s: None)
    c.allow_random_init = True
    results = run(c, log=lambda s: None)
    assert list(results["skipped"]["train"]) == ["c1"]
    assert results["metrics"]["test"]["n"] == 2 and results["fit"]["epochs"] == 1
    assert os.path.isdir(tmp_path / "work" / "checkpoints")
    c.skip_train, c.allow_random_init = True, False  # every weight comes from the checkpoint
    again = run(c, log=lambda s: None)
    assert again["metrics"]["test"] == pytest.approx(results["metrics"]["test"])


@pytest.mark.slow
def test_cli_runs_a_shipped_config(tmp_path):
    root = celebvhq_dataset(tmp_path / "celebvhq")
    cmd = [sys.executable, "-m", "marlin_jax.evaluate",
           f"--config={ROOT / 'configs' / 'celebvhq_appearance_lp.py'}",
           f"--config.data_path={root}", f"--config.workdir={tmp_path / 'work'}",
           "--config.epochs=3", "--config.batch_size=8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "auroc" in proc.stdout
    metrics = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert metrics["model_name"] == "celebvhq_marlin_appearance_lp"
