"""Multi-host: the real trainer as 2 processes on 127.0.0.1 (jax.distributed with explicit flags),
4 simulated CPU devices each, one 8-device mesh (data=4 x fsdp=2, so parameters are sharded
across the processes), each process reading its own data shard."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FLAGS = [
    "--config=configs/vit_small.py:demo", "--config.model.name=marlin_vit_tiny",
    "--config.model.encoder_depth=1", "--config.model.decoder_depth=1",
    "--config.data.img_size=32", "--config.data.clip_frames=4", "--config.data.mask_ratio=0.75",
    "--config.data.synthetic_num_videos=16", "--config.data.synthetic_num_frames=8",
    "--config.data.num_threads=1", "--config.global_batch_size=8",
    "--config.mesh.data=4", "--config.mesh.fsdp=2", "--config.num_train_steps=3",
    "--config.log_every_steps=1", "--config.eval_every_steps=3", "--config.num_eval_batches=1",
    "--config.checkpoint_every_steps=3",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_model_and_write_one_checkpoint(tmp_path):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "marlin_jax.main", f"--workdir={tmp_path / 'run'}", *FLAGS,
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}"],
            env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=900)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"

    summaries = []
    for i, out in enumerate(outs):
        m = re.search(rf"marlin-jax: process {i} finished at step 3: (.*)", out)
        assert m, out[-3000:]
        summaries.append(dict(kv.split("=") for kv in m.group(1).split()))
    assert summaries[0] == summaries[1]  # the same global losses on both processes
    assert {"rec_loss", "d_loss", "val_rec_loss"} <= set(summaries[0])
    assert "8 devices / 2 processes" in outs[0]

    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["3"]
    assert sorted(os.listdir(ckpts / "3" / "data_iter")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    assert (ckpts / "3" / "state").is_dir()
    assert (tmp_path / "run" / "reconstructions" / "step_00000003.png").is_file()


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_on_sigterm_to_one_between_log_steps(tmp_path):
    """SIGTERM to process 1 only, with no log step before the end: both processes learn of it
    from the train step's all-reduce of the flags one step later, save the same step and
    exit 143; the rerun resumes there in the other block layout (scan_layers: the
    fsdp-sharded state converted across processes) and finishes on both."""
    workdir = tmp_path / "run"
    flags = [*FLAGS, "--config.num_train_steps=40", "--config.log_every_steps=1000",
             "--config.eval_every_steps=0", "--config.checkpoint_every_steps=5"]
    cmd = [sys.executable, "-m", "marlin_jax.main", f"--workdir={workdir}", *flags]
    procs = _launch(cmd, 2, 4)
    t0 = time.time()
    while not (workdir / "checkpoints" / "5").is_dir():  # both processes are in the loop
        assert all(p.poll() is None for p in procs), _finish(procs)
        assert time.time() - t0 < 600, "no checkpoint 5"
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)
    outs = _finish(procs)
    assert [code for code, _ in outs] == [143, 143], [out[-2000:] for _, out in outs]
    saved = [re.search(r"preempted at step (\d+), saved to", out) for _, out in outs]
    assert all(saved), [out[-2000:] for _, out in outs]
    step = int(saved[0].group(1))
    assert int(saved[1].group(1)) == step and 5 < step < 40
    ckpt = workdir / "checkpoints" / str(step)
    assert sorted(os.listdir(ckpt / "data_iter")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

    end = step + 2  # (a short rerun: these are 2 processes on a small CI machine)
    outs = _finish(_launch(cmd + ["--config.scan_layers=True", f"--config.num_train_steps={end}"],
                           2, 4))
    for i, (code, out) in enumerate(outs):
        assert code == 0, f"process {i}:\n{out[-3000:]}"
    assert f"resuming from {workdir / 'checkpoints'} step {step}" in outs[0][1]
    summaries = [re.search(rf"process {i} finished at step {end}: (.*)", out).group(1)
                 for i, (_, out) in enumerate(outs)]
    assert summaries[0] == summaries[1]


def _labelled_videos(root: Path, n: int = 48) -> Path:
    """n random 8-frame 32 px videos with a binary label (a 1 % darker top half: metrics short
    of 1.0, so that runs compare) and a CSV with a 2:1:1 train/val/test split column."""
    import numpy as np

    from marlin_jax.video_io import write_video

    rng = np.random.default_rng(0)
    labels = [(i // 4) % 2 for i in range(n)]  # both classes in every split
    for i, label in enumerate(labels):
        v = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
        v[:, :16] = v[:, :16] * (1.0 - 0.01 * label)  # a faint cue: label 1's top half darker
        write_video(root / f"v{i:02d}.mp4", v)
    splits = ["train", "train", "val", "test"]
    rows = ["path,label,split"] + [f"v{i:02d}.mp4,{y},{splits[i % 4]}"
                                   for i, y in enumerate(labels)]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


EVAL_CONFIG = """
import ml_collections
from marlin_jax.evaluate import default_config

def get_config():
    c = default_config()
    c.model_name = "multihost_ft"
    c.dataset, c.task, c.finetune = "labels", "binary", True
    c.labels.file = "{labels}"
    c.backbone = "mh_eval_tiny"
    c.backbone_config = {{"name": "marlin_vit_tiny", "img_size": 32, "n_frames": 4,
                          "encoder_depth": 1}}
    c.allow_random_init = True
    c.learning_rate, c.batch_size, c.epochs = 1e-3, 8, 3
    c.mesh = ml_collections.ConfigDict({{"data": 4, "fsdp": 2}})
    c.num_threads, c.checkpoint_every_s = 1, 0.0
    return c
"""


def _evaluate_cmd(labels: Path, workdir: Path) -> list[str]:
    config = labels.parent / "eval_config.py"
    config.write_text(EVAL_CONFIG.format(labels=labels))
    return [sys.executable, "-m", "marlin_jax.evaluate", f"--config={config}",
            f"--config.workdir={workdir}"]


def _launch(cmd: list[str], processes: int, devices: int) -> list[subprocess.Popen]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "PYTHONUNBUFFERED": "1", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    extra = [[]] if processes == 1 else [
        [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
         f"--process_id={i}"] for port in [_free_port()] for i in range(processes)]
    return [subprocess.Popen(cmd + e, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT) for e in extra]


def _finish(procs: list[subprocess.Popen], first_out: str = "") -> list[tuple[int, str]]:
    outs = []
    try:
        for i, p in enumerate(procs):
            out, _ = p.communicate(timeout=600)
            outs.append((p.returncode, (first_out if i == 0 else "") + out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


@pytest.mark.slow
def test_two_processes_fine_tune_and_agree_on_sigterm(tmp_path):
    """Evaluation fine-tuning as 2 processes x 4 CPU devices (one data=4 x fsdp=2 mesh): equal
    to the same mesh in one process; SIGTERM to ONE process stops both at the same step (exit
    143), and the rerun resumes to the uninterrupted result. Only process 0 writes metrics."""
    import json

    labels = _labelled_videos(tmp_path)
    (reference,) = _finish(_launch(_evaluate_cmd(labels, tmp_path / "one"), 1, 8))
    assert reference[0] == 0, reference[1][-3000:]
    want = json.loads((tmp_path / "one" / "metrics.json").read_text())

    outs = _finish(_launch(_evaluate_cmd(labels, tmp_path / "two"), 2, 4))
    for i, (code, out) in enumerate(outs):
        assert code == 0, f"process {i}:\n{out[-3000:]}"
    assert "test" in outs[0][1] and "auroc" in outs[0][1] and "auroc" not in outs[1][1]
    got = json.loads((tmp_path / "two" / "metrics.json").read_text())
    print("one process:", want["metrics"], "two processes:", got["metrics"])
    for split in ("val", "test"):
        assert got["metrics"][split] == pytest.approx(want["metrics"][split], abs=1e-4)
    assert [h["train_loss"] for h in got["fit"]["history"]] == pytest.approx(
        [h["train_loss"] for h in want["fit"]["history"]], rel=1e-4)
    # evaluating the saved best checkpoint (skip_train) in 2 processes gives the same metrics
    outs = _finish(_launch(_evaluate_cmd(labels, tmp_path / "two") + [
        "--config.skip_train=True", "--config.allow_random_init=False"], 2, 4))
    for i, (code, out) in enumerate(outs):
        assert code == 0, f"process {i}:\n{out[-3000:]}"
    restored = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for split in ("val", "test"):
        assert restored["metrics"][split] == pytest.approx(got["metrics"][split], abs=1e-4)

    # SIGTERM to process 1 only, once process 0 has finished epoch 0
    procs = _launch(_evaluate_cmd(labels, tmp_path / "term"), 2, 4)
    seen = ""
    for line in procs[0].stdout:
        seen += line
        if line.startswith("epoch    0"):
            procs[1].send_signal(signal.SIGTERM)
            break
    outs = _finish(procs, seen)
    assert [code for code, _ in outs] == [143, 143], [out[-2000:] for _, out in outs]
    assert "SIGTERM: stopped" in outs[0][1] and "SIGTERM: stopped" in outs[1][1]
    assert not (tmp_path / "term" / "metrics.json").exists()
    outs = _finish(_launch(_evaluate_cmd(labels, tmp_path / "term"), 2, 4))
    for i, (code, out) in enumerate(outs):
        assert code == 0, f"process {i}:\n{out[-3000:]}"
    assert "resuming from" in outs[0][1]
    resumed = json.loads((tmp_path / "term" / "metrics.json").read_text())
    for split in ("val", "test"):
        assert resumed["metrics"][split] == pytest.approx(want["metrics"][split], abs=1e-4)
    assert [h["train_loss"] for h in resumed["fit"]["history"]] == pytest.approx(
        [h["train_loss"] for h in want["fit"]["history"]], rel=1e-4)
