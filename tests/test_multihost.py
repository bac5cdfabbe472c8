"""Multi-host: the real trainer as 2 processes on 127.0.0.1 (jax.distributed with explicit flags),
4 simulated CPU devices each, one 8-device mesh (data=4 x fsdp=2, so parameters are sharded
across the processes), each process reading its own data shard."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
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
