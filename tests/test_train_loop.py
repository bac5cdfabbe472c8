"""The trainer loop in-process: what the user sees (console, TensorBoard, validation, images),
resume, NaN stop, configs, metric writers, reconstruction grids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from configs import common, vit_base, vit_large, vit_small
from marlin_jax.preemption import PreemptedError
from marlin_jax.train import metrics as mt
from marlin_jax.train import trainer
from marlin_jax.train.program import model_config
from marlin_jax.train.trainer import (
    NonFiniteLossError,
    make_schedule,
    resolve_data_config,
    train_and_evaluate,
)


def _tiny_config(**overrides):
    c = vit_small.get_config("demo")
    c.model.name = "marlin_vit_tiny"
    c.model.encoder_depth = 1
    c.model.decoder_depth = 1
    c.data.update(img_size=32, clip_frames=4, mask_ratio=0.75, synthetic_num_videos=16,
                  synthetic_num_frames=8, num_threads=1)
    c.data.source = ""
    c.global_batch_size = 4
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.num_eval_batches = 1
    c.checkpoint_every_steps = 2
    c.num_train_steps = 4
    c.update_from_flattened_dict(overrides)
    return c


ROOT = Path(__file__).resolve().parent.parent
def test_recipe_configs_have_the_original_values():
    for module, name, enc in ((vit_small, "marlin_vit_small_ytf", 384),
                              (vit_base, "marlin_vit_base_ytf", 768),
                              (vit_large, "marlin_vit_large_ytf", 1024)):
        c = module.get_config()
        assert c.model.name == name and model_config(c).encoder_embed_dim == enc
        assert (c.data.mask_strategy, c.data.mask_ratio) == ("fasking", 0.9)
        assert (c.data.clip_frames, c.data.temporal_sample_rate) == (16, 2)
        assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.eps) == (0.9, 0.95, 1e-8)
        assert c.optimizer.weight_decay == 0.0
        assert (c.lr.base, c.lr.min, c.lr.warmup_epochs, c.num_epochs) == (1.5e-4, 1e-5, 40, 2000)
        assert (c.adv_weight, c.gp_weight, c.d_steps, c.g_steps) == (0.01, 0.0, 1, 1)
    with pytest.raises(ValueError, match="unknown config variant"):
        vit_base.get_config("huge")


def test_model_overrides_are_the_marlin_config_fields():
    """`config.model.<field>` overrides come from the MarlinConfig dataclass (a new field is
    overridable without editing the configs), with its types; clip geometry comes from data."""
    import dataclasses
    import typing

    from marlin_jax.models import MarlinConfig

    hints = typing.get_type_hints(MarlinConfig)
    fields = {f.name for f in dataclasses.fields(MarlinConfig)}
    assert set(common.MODEL_FIELDS) == fields - set(common._NOT_OVERRIDABLE)
    assert all(common.MODEL_FIELDS[k] is hints[k] for k in common.MODEL_FIELDS)
    assert {"encoder_depth", "mlp_ratio", "qkv_bias", "init_values"} <= set(common.MODEL_FIELDS)
    assert "img_size" not in common.MODEL_FIELDS and "downloadable" not in common.MODEL_FIELDS
    c = vit_small.get_config()
    c.model.encoder_depth, c.model.mlp_ratio = 3, 2.0
    assert (model_config(c).encoder_depth, model_config(c).mlp_ratio) == (3, 2.0)
    with pytest.raises(TypeError):
        c.model.encoder_depth = "deep"


def test_schedule_scales_lr_with_the_global_batch():
    c = vit_base.get_config()
    c.global_batch_size = 512
    c.steps_per_epoch = 100
    s = make_schedule(c, c.data)
    assert (s.base_lr, s.min_lr) == pytest.approx((3e-4, 2e-5))
    assert (s.total_steps, s.warmup_steps) == (200_000, 4000)
    demo = common.apply_demo(vit_base.get_config())
    assert demo.data.source == ""  # unset: the trainer announces the synthetic dataset
    assert make_schedule(demo, resolve_data_config(demo)).total_steps == 1500


def test_tensorboardx_writer_writes_event_files(tmp_path):
    writer = mt.TensorboardWriter(tmp_path / "tb")
    writer.write_scalars(1, {"loss": 0.5})
    writer.write_images(1, {"img": np.zeros((8, 8, 3), np.uint8)})
    writer.write_hparams({"lr.base": 1e-4, "data.source": "synthetic"})
    writer.close()
    from tensorboardX.proto.event_pb2 import Event

    (path,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    data, values = path.read_bytes(), {}
    while data:  # TFRecord: uint64 length, uint32 crc, the Event, uint32 crc
        n = int.from_bytes(data[:8], "little")
        for v in Event.FromString(data[12:12 + n]).summary.value:
            values[v.tag] = v
        data = data[16 + n:]
    assert values["loss"].simple_value == 0.5
    assert values["img"].HasField("image") and "lr.base: 0.0001" in str(values["hparams/text_summary"])


def test_console_line_and_mfu():
    line = mt.console_line(10, 100, {"rec_loss": 0.25, "adv_loss": -0.01, "d_loss": 0.3,
                                     "gp": 0.0, "g_lr": 1e-4},
                           clips_per_s=12.5, step_time_s=0.32, mfu_value=0.41, eta_s=3700)
    for part in ("step 10/100", "rec 0.2500", "adv -0.0100", "d 0.3000", "gp 0.0000",
                 "lr 1.000e-04", "12.5 clips/s", "320 ms/step", "MFU 41.0%", "ETA 1h01m"):
        assert part in line
    assert mt.mfu(1e12, 0.01, 1e15) == pytest.approx(0.1)
    assert mt.mfu(None, 0.01, 1e15) is None


@pytest.mark.slow
def test_trainer_runs_evaluates_writes_and_resumes(tmp_path, capsys):
    workdir = tmp_path / "run"
    out = train_and_evaluate(_tiny_config(), str(workdir))
    console = capsys.readouterr().out
    assert "no dataset configured" in console
    assert "step 4/4 | rec" in console and "clips/s" in console and "ETA" in console
    assert out["step"] == 4 and np.isfinite(out["val_rec_loss"]) and np.isfinite(out["rec_loss"])
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2", "4"]
    png = workdir / "reconstructions" / "step_00000004.png"
    h, w, _ = cv2.imread(str(png)).shape  # 32 px clips enlarged to 192 px, a header row above
    assert w == 3 * 192 and 4 * 192 < h < 4 * 192 + 60
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "rec_loss" in r] == [2, 4]
    assert any("val_rec_loss" in r for r in records)

    more = train_and_evaluate(_tiny_config(num_train_steps=6), str(workdir))
    console = capsys.readouterr().out
    assert "resuming from" in console and "step 4" in console
    assert more["step"] == 6
    assert (workdir / "checkpoints" / "6").is_dir()
    again = train_and_evaluate(_tiny_config(num_train_steps=6), str(workdir))  # already at its end
    assert again["step"] == 6 and not (workdir / "checkpoints" / "7").exists()

    # the workdir is a checkpoint for extraction / conversion: its latest step's model weights
    from marlin_jax.interop import load_checkpoint, read_config_file, read_state_dict, save_torch_checkpoint

    saved = read_config_file(workdir)
    assert (saved.img_size, saved.n_frames, saved.encoder_depth) == (32, 4, 1)
    latest, step4 = read_state_dict(workdir), read_state_dict(workdir / "checkpoints" / "4")
    assert latest.keys() == step4.keys() and any(k.startswith("discriminator.") for k in latest)
    assert any(not np.array_equal(latest[k], step4[k]) for k in latest)
    np.testing.assert_array_equal(read_state_dict(workdir / "checkpoints" / "6")["encoder.norm.weight"],
                                  latest["encoder.norm.weight"])
    model = load_checkpoint(workdir, saved)
    exported = read_state_dict(save_torch_checkpoint(tmp_path / "run.full.pt", model))
    for key, value in latest.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    # warm-up: the first step has lr 0 (finite, saved), the second lr 5e29 (blows up)
    cfg = _tiny_config(**{"lr.base": 1e30, "lr.warmup_steps": 3, "checkpoint_every_steps": 1,
                          "num_train_steps": 10, "eval_every_steps": 0})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient at step (\d+)"
                                                 r".*last good checkpoint is step") as err:
        train_and_evaluate(cfg, str(tmp_path / "run"))
    bad = int(str(err.value).split("at step ")[1].split(":")[0])
    good = int(str(err.value).split("last good checkpoint is step ")[1].split()[0])
    assert good == bad - 1
    steps = sorted(int(p.name) for p in (Path(tmp_path) / "run" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert steps[-1] == good


@pytest.mark.slow
def test_sigterm_stops_one_step_after_the_step_it_reached(tmp_path, monkeypatch):
    """The flag goes into the next compiled step and is read once that step is done: a SIGTERM
    while step 1 starts goes into step 2, read after step 3 is dispatched: saved at step 3."""
    first_step = trainer._check_num_visible

    def sigterm_at_first_step(mask, program):
        first_step(mask, program)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer, "_check_num_visible", sigterm_at_first_step)
    cfg = _tiny_config(num_train_steps=10, checkpoint_every_steps=100, eval_every_steps=0)
    with pytest.raises(PreemptedError) as err:
        train_and_evaluate(cfg, str(tmp_path / "run"))
    assert err.value.step == 3
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()] == ["3"]


_STOP_ALL_REDUCE = """
import re, jax
from tests.test_train_loop import _tiny_config
from marlin_jax import sharding as shd
from marlin_jax.train import steps
from marlin_jax.train.program import build_program, schedule_from_config

pattern = re.compile(r"^\\s*\\S+ = (.*?) all-reduce(?:-start)?\\(", re.M)
for axes, n in (({"data": 1}, 1), ({"data": 2, "fsdp": 2}, 4)):
    c = _tiny_config()
    c.mesh.update(axes)
    mesh = shd.make_mesh(c.mesh.to_dict(), jax.devices()[:n])
    p = build_program(c, mesh, schedule_from_config(c, 16))
    plain = steps.jit_train_step(p.task, p.state_shardings, p.batch_shardings, shd.replicated(mesh))
    with p.mesh_context():
        without = plain.lower(p.abstract_state, p.abstract_batch).compile().as_text()
    with_stop = p.lower_train_step().compile().as_text()
    print("RESULT", n, sorted(pattern.findall(with_stop)) == sorted(pattern.findall(without) + ["pred[]"])
          if n > 1 else pattern.findall(with_stop))
"""


@pytest.mark.slow
def test_the_sigterm_flags_cost_one_all_reduce_of_one_bool():
    """Compiled HLO: the stop flags add one ``pred[]`` all-reduce to the step on 4 devices (and
    no collective on one)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _STOP_ALL_REDUCE], env=env, cwd=ROOT, text=True,
                          capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert results == ["RESULT 1 []", "RESULT 4 True"], proc.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.samples
def test_demo_loss_falls_on_the_sample_face_videos(samples_dir, tmp_path, capsys):
    """The `:demo` recipe on the real clips of ../shared/samples (plain video files)."""
    c = vit_base.get_config("demo")
    c.data.source = "videos"
    c.data.root_dir = str(samples_dir)
    c.data.mask_strategy = "random"  # no parsing maps beside the videos
    c.global_batch_size = 4
    c.num_train_steps = 60
    c.log_every_steps = 5
    c.checkpoint_every_steps = 1000
    out = train_and_evaluate(c, str(tmp_path / "run"))
    # the folder has no split files (every video is "train"): validation is switched off loudly
    assert "no validation split 'val'" in capsys.readouterr().out
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    rec = [r["rec_loss"] for r in records if "rec_loss" in r]
    assert out["step"] == 60 and len(rec) == 12
    assert np.mean(rec[-2:]) < 0.7 * rec[0], rec
