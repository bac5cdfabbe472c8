"""The trainer under faults, through the real CLI where the user meets them (issue 14, "Nothing
lost, nothing silent"): another run's workdir, a damaged newest checkpoint, a bad video in a long
run, a full disk, a damaged marlin_config.json, duplicate metric rows after a resume."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from marlin_jax.models import MarlinConfig
from marlin_jax.models.config import config_from_json_file
from marlin_jax.train import metrics as mt
from marlin_jax.train.checkpointing import Checkpointer, is_disk_full
from marlin_jax.train.program import model_config
from marlin_jax.train.trainer import (
    CheckpointDiskFullError,
    RunMismatchError,
    check_run_identity,
    move_aside,
    run_identity,
    saved_identity,
    train_and_evaluate,
)
from tests.test_checkpoint import ROOT, _cli, _env, _losses
from tests.test_train_loop import _tiny_config


def _run(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(workdir, *extra), env=_env(), cwd=ROOT, text=True,
                          capture_output=True, timeout=900)


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _steps(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


# ------------------------------------------------------------------ 1. another run's workdir


@pytest.mark.slow
def test_another_runs_workdir_is_refused_untouched_and_fresh_start_moves_it_aside(tmp_path):
    run = tmp_path / "run"
    first = _run(run, "--config.num_train_steps=2", "--config.checkpoint_every_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {name: (run / name).read_bytes() for name in ("config.json", "marlin_config.json",
                                                           "metrics.jsonl")}

    # another model depth and clip size (the 48 px one would restore: pos tables are not saved)
    other = ("--config.model.encoder_depth=2", "--config.data.img_size=48",
             "--config.num_train_steps=2", "--config.checkpoint_every_steps=2")
    refused = _run(run, *other)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    message = [line for line in refused.stderr.splitlines() if line.startswith("marlin-jax:")]
    assert len(message) == 1, refused.stderr[-3000:]
    for part in (str(run), "different run", "model.encoder_depth: saved 1, now 2",
                 "model.img_size: saved 32, now 48", "fresh_start=True"):
        assert part in message[0], (part, message[0])
    for name, content in before.items():
        assert (run / name).read_bytes() == content, f"{name} was rewritten"
    assert _steps(run) == ["2"]

    # a workdir without metadata (as older versions left it): refused by the restore, and still
    # nothing written (no marlin_config.json claiming the other model for these weights)
    for name in ("config.json", "marlin_config.json"):
        (run / name).unlink()
    refused = _run(run, *other)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-3000:]
    message = [line for line in refused.stderr.splitlines() if line.startswith("marlin-jax:")]
    assert len(message) == 1 and "do not fit this run's train state" in message[0], message
    assert "nothing was written" in message[0] and "fresh_start=True" in message[0]
    assert not (run / "config.json").exists() and not (run / "marlin_config.json").exists()
    for name in ("config.json", "marlin_config.json"):
        (run / name).write_bytes(before[name])

    started_over = _run(run, *other, "--config.fresh_start=True")
    assert started_over.returncode == 0, started_over.stderr[-3000:]
    assert "fresh_start: moved the previous contents" in started_over.stdout
    (previous,) = run.glob("previous-*")
    assert (previous / "checkpoints" / "2" / "state").is_dir()  # nothing deleted
    assert (previous / "marlin_config.json").read_bytes() == before["marlin_config.json"]
    assert json.loads((run / "marlin_config.json").read_text())["img_size"] == 48
    assert "resuming from" not in started_over.stdout and _steps(run) == ["2"]


def test_identity_lists_what_a_restore_depends_on():
    c = _tiny_config()
    cfg = MarlinConfig(192, 1, 3, 96, 1, 3, img_size=32, n_frames=4)
    ident = run_identity(cfg, c.to_dict())
    assert ident["model.img_size"] == 32 and ident["model.n_frames"] == 4
    assert ident["optimizer.grad_clip > 0"] is False
    assert "model.drop_rate" not in ident and "model.downloadable" not in ident
    c.scan_layers = True  # the block layout is converted on restore: not part of the identity
    assert run_identity(cfg, c.to_dict()) == ident
    c.optimizer.grad_clip = 1.0
    assert run_identity(cfg, c.to_dict())["optimizer.grad_clip > 0"] is True


def test_identity_of_a_workdir_without_marlin_config_json_comes_from_its_config_json(tmp_path):
    # written by a version before marlin_config.json: a 48 px run would restore its 32 px weights
    # silently (position tables are not saved) and relabel them
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    saved = _tiny_config()
    (tmp_path / "config.json").write_text(saved.to_json_best_effort(indent=2))
    assert saved_identity(str(tmp_path))["model.img_size"] == 32
    now = _tiny_config()
    now.data.img_size = 48
    current = run_identity(model_config(now), now.to_dict())
    with pytest.raises(RunMismatchError, match="model.img_size: saved 32, now 48"):
        check_run_identity(str(tmp_path), current)
    check_run_identity(str(tmp_path), run_identity(model_config(saved), saved.to_dict()))
    # a config.json that does not tell the model: the fields it does tell are still checked
    (tmp_path / "config.json").write_text(json.dumps({"scan_layers": True,
                                                      "optimizer": {"grad_clip": 1.0}}))
    assert "model.img_size" not in saved_identity(str(tmp_path))
    with pytest.raises(RunMismatchError, match=r"optimizer.grad_clip > 0: saved True, now False"):
        check_run_identity(str(tmp_path), current)


def test_move_aside_keeps_everything(tmp_path):
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    (tmp_path / "config.json").write_text("{}")
    dest = Path(move_aside(str(tmp_path)))
    assert dest.parent == tmp_path and dest.name.startswith("previous-")
    assert (dest / "checkpoints" / "2").is_dir() and (dest / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]
    assert move_aside(str(tmp_path)) is None  # nothing left to move


# ------------------------------------------------------------------ 2. damaged newest checkpoint


@pytest.mark.slow
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path):
    run = tmp_path / "run"
    steps = ("--config.num_train_steps=4", "--config.checkpoint_every_steps=2")
    first = _run(run, *steps)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = _losses(run)
    (run / "checkpoints" / "4" / "state" / "_METADATA").unlink()  # as a crash or bad copy leaves

    resumed = _run(run, *steps)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    skips = [x for x in (resumed.stdout + resumed.stderr).splitlines()
             if "skipped damaged step 4" in x]
    assert len(skips) == 1, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "(state/_METADATA is missing); renamed it to" in skips[0]
    assert "step 2" in resumed.stdout.split("resuming from")[1].splitlines()[0]
    assert _steps(run) == ["2", "4", "4.damaged"]  # the damaged one kept aside, a new step 4
    # 5c: every step once in metrics.jsonl, and the rerun steps reproduce the lost ones
    train_steps = [r["step"] for r in _rows(run) if "rec_loss" in r]
    assert train_steps == [1, 2, 3, 4]
    after = _losses(run)
    for step in (3, 4):
        np.testing.assert_allclose(after[step], reference[step], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ 3. one bad video


def _video_folder(root: Path, n_good: int = 7) -> Path:
    from marlin_jax.video_io import write_video

    rng = np.random.default_rng(0)
    for i in range(n_good):
        write_video(root / f"clip{i}.mp4", rng.integers(0, 255, (12, 32, 32, 3), np.uint8))
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    return root


@pytest.mark.slow
def test_one_bad_video_counts_once_against_the_budget_across_epochs_and_resume(tmp_path):
    videos = _video_folder(tmp_path / "videos")
    run = tmp_path / "run"
    data = ("--config.data.source=videos", f"--config.data.root_dir={videos}",
            "--config.data.mask_strategy=random", "--config.data.error_budget=1",
            "--config.checkpoint_every_steps=4")
    # 8 videos, batch 4: 2 steps per epoch, so 8 steps visit broken.mp4 in each of 4 epochs
    first = _run(run, *data, "--config.num_train_steps=8")
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-3000:]
    assert out.count("data: bad record") == 1, out[-3000:]  # found once, then skipped unread
    assert out.count("moov atom not found") <= 1  # (what this OpenCV says on each open)
    assert "bad record 1 of the error budget 1 skipped" in out and "broken.mp4" in out
    bad = json.loads((run / "bad_records.json").read_text())
    assert len(bad) == 1 and "broken.mp4" in next(iter(bad.values()))

    resumed = _run(run, *data, "--config.num_train_steps=12")
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming from" in resumed.stdout
    assert "broken.mp4" not in out  # known from the checkpoint: neither opened nor counted
    assert (run / "checkpoints" / "12").is_dir()


# ------------------------------------------------------------------ 5. small ones


def test_broken_marlin_config_json_is_named(tmp_path):
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    broken = tmp_path / "marlin_config.json"
    broken.write_text('{"encoder_embed_dim": 192, "encoder_de')  # cut short
    with pytest.raises(ValueError, match=rf"{broken}: damaged model config, not valid JSON"):
        config_from_json_file(broken)
    ident = run_identity(MarlinConfig(), _tiny_config().to_dict())
    with pytest.raises(RunMismatchError, match=rf"{broken}: damaged model config"):
        check_run_identity(str(tmp_path), ident)
    broken.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        config_from_json_file(broken)


def test_disk_full_is_recognised_through_wrappers():
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError as e:
            raise RuntimeError("orbax: async save failed") from e
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    group = RuntimeError("several writes failed")
    group.exceptions = (ValueError("x"), full)  # as an ExceptionGroup (Python >= 3.11) holds them
    assert is_disk_full(group)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_keeps_the_previous_step(tmp_path, monkeypatch, capsys):
    real_save = Checkpointer.save

    def save(self, step, *args, **kwargs):
        if step >= 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", save)
    run = tmp_path / "run"
    cfg = _tiny_config(num_train_steps=6, eval_every_steps=0)
    with pytest.raises(CheckpointDiskFullError) as err:
        train_and_evaluate(cfg, str(run))
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and "\n" not in message
    for part in ("disk full", "checkpoint step 4", str(run / "checkpoints"), "kept step 2"):
        assert part in message, (part, message)
    assert _steps(run) == ["2"]
    assert "finished at step" not in capsys.readouterr().out


def test_metrics_rows_after_the_restored_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "rec_loss": 0.1 * s} for s in (1, 2, 3, 4)] + [{"step": 2, "val": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "rec')
    assert mt.drop_rows_after(path, 2) == 3  # steps 3, 4 and the half-written line
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 2]
    assert mt.drop_rows_after(path, 2) == 0
    assert mt.drop_rows_after(tmp_path / "absent.jsonl", 0) == 0
