"""Checkpoints: iterator-exact resume, keep-last-K, atomicity, restore onto another mesh, and the
fault tests of the real CLI (kill -9 mid-run then resume; SIGTERM saves before exiting)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marlin_jax.data import default_data_config, make_dataset
from marlin_jax.train.checkpointing import Checkpointer, CheckpointLayoutError

ROOT = Path(__file__).resolve().parent.parent

TINY_FLAGS = [
    "--config=configs/vit_small.py:demo", "--config.model.name=marlin_vit_tiny",
    "--config.model.encoder_depth=1", "--config.model.decoder_depth=1",
    "--config.data.img_size=32", "--config.data.clip_frames=4", "--config.data.mask_ratio=0.75",
    "--config.data.synthetic_num_videos=16", "--config.data.synthetic_num_frames=8",
    "--config.data.num_threads=1", "--config.global_batch_size=4", "--config.log_every_steps=1",
    "--config.eval_every_steps=0",
]


def _tiny_data():
    c = default_data_config()
    c.update(img_size=32, clip_frames=4, mask_ratio=0.75, synthetic_num_videos=8,
             synthetic_num_frames=8, num_threads=1)
    return c


def test_checkpoint_restores_state_and_exact_data_position(tmp_path):
    it = iter(make_dataset(_tiny_data(), split="train", global_batch_size=2))
    for _ in range(3):
        next(it)
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(3),
             "blocks": {0: {"b": jnp.ones(4)}}}
    with Checkpointer(tmp_path / "ck", max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(3, state, it)
        expected = next(it)
        ckpt.wait()
        fresh = iter(make_dataset(_tiny_data(), split="train", global_batch_size=2))
        restored = ckpt.restore(3, jax.eval_shape(lambda: state), fresh)
    got = next(fresh)
    np.testing.assert_array_equal(got["video"], expected["video"])
    np.testing.assert_array_equal(got["mask"], expected["mask"])
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert int(restored["step"]) == 3
    np.testing.assert_array_equal(restored["blocks"][0]["b"], np.ones(4))


def test_the_trainer_writes_the_checkpoint_layout_interop_declares(tmp_path):
    """The trainer-checkpoint layout is declared once, in interop (below the trainer): the items
    the Checkpointer writes and the TrainState groups interop reads as the model; and nothing in
    interop imports the trainer (dependencies flow downwards)."""
    import ast
    import dataclasses

    from marlin_jax.interop.checkpoints import (
        MODEL_PARAM_GROUPS,
        TRAINER_DATA_ITER_ITEM,
        TRAINER_STATE_ITEM,
    )
    from marlin_jax.train.state import TrainState

    assert set(MODEL_PARAM_GROUPS) <= {f.name for f in dataclasses.fields(TrainState)}
    it = iter(make_dataset(_tiny_data(), split="train", global_batch_size=2))
    with Checkpointer(tmp_path / "ck", async_save=False) as ckpt:
        ckpt.save(1, {"g_params": {"w": jnp.ones(2)}, "d_params": {}}, it)
    assert {p.name for p in (tmp_path / "ck" / "1").iterdir()} >= {TRAINER_STATE_ITEM,
                                                                     TRAINER_DATA_ITER_ITEM}
    for path in (ROOT / "marlin_jax" / "interop").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("marlin_jax.train") for n in names), path


def test_keeps_last_k_and_leaves_no_partial_checkpoints(tmp_path):
    state = {"w": jnp.zeros(3)}
    with Checkpointer(tmp_path / "ck", max_to_keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, jax.tree.map(lambda x, s=step: x + s, state))
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.latest_step() == 4
    names = os.listdir(tmp_path / "ck")
    assert sorted(n for n in names if n.isdigit()) == ["3", "4"]
    assert not [n for n in names if "tmp" in n]


def test_restore_of_a_missing_step_names_the_directory(tmp_path):
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(1, {"w": jnp.zeros(2)})
        ckpt.wait()
        with pytest.raises(FileNotFoundError, match=str(tmp_path / "ck")):
            ckpt.restore(7, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})


def _two_steps(directory: Path) -> dict:
    state = {"w": jnp.arange(300.0), "b": {"c": jnp.ones(3)}}
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, jax.tree.map(lambda x: x + 1, state))
        ckpt.wait()
    return state


def test_a_truncated_newest_step_is_renamed_aside_and_the_previous_one_restored(tmp_path, caplog):
    state = _two_steps(tmp_path / "ck")
    data = [p for p in (tmp_path / "ck" / "2" / "state").rglob("*") if p.parent.name == "d"]
    assert data
    for f in data:  # a copy or a crash cut the data files short
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with Checkpointer(tmp_path / "ck") as ckpt, caplog.at_level("WARNING"):
        step, restored, skipped = ckpt.restore_newest(jax.eval_shape(lambda: state))
        assert ckpt.all_steps() == [1]
        assert ckpt.save(2, state)  # the step number is free again
    assert step == 1 and [s.step for s in skipped] == [2]
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert (tmp_path / "ck" / "2.damaged" / "state").is_dir()
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1 and "skipped damaged step 2" in lines[0] and "\n" not in lines[0]


def test_no_readable_step_and_a_checkpoint_of_another_layout(tmp_path):
    state = _two_steps(tmp_path / "ck")
    for step in (1, 2):
        (tmp_path / "ck" / str(step) / "state" / "_METADATA").unlink()
    with Checkpointer(tmp_path / "ck") as ckpt:
        step, restored, skipped = ckpt.restore_newest(jax.eval_shape(lambda: state))
    assert step is None and restored is None
    assert [(s.step, s.reason) for s in skipped] == [(2, "state/_METADATA is missing"),
                                                     (1, "state/_METADATA is missing")]

    _two_steps(tmp_path / "other")
    wrong = {"w": jax.ShapeDtypeStruct((200,), jnp.float32),
             "b": {"c": jax.ShapeDtypeStruct((3,), jnp.float32)}}
    fits_not = r"other/2: the checkpoint's arrays do not fit .*\(300,\)"
    with Checkpointer(tmp_path / "other") as ckpt, pytest.raises(CheckpointLayoutError,
                                                                 match=fits_not):
        ckpt.restore_newest(wrong)
    assert sorted(os.listdir(tmp_path / "other")) == ["1", "2"]  # not damage: left in place


_OTHER_MESH = textwrap.dedent("""
    import sys, jax, numpy as np
    from marlin_jax import sharding as shd
    from marlin_jax.models import get_config
    from marlin_jax.train import state as st
    from marlin_jax.train.checkpointing import Checkpointer, CheckpointLayoutError

    cfg = get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4, encoder_depth=1,
                                                decoder_depth=1)
    tx = st.make_optimizer()
    init = lambda: st.init_train_state(cfg, tx, tx, 0)
    saved = shd.sharded_init(init, shd.make_mesh({"data": 8}))
    with Checkpointer(sys.argv[1]) as ckpt:
        ckpt.save(5, saved)
        ckpt.wait()
        mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
        target = shd.abstract_with_shardings(jax.eval_shape(init), mesh)
        restored = ckpt.restore(5, target)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        saved, restored)
    assert all(jax.tree.leaves(same))
    placed = jax.tree.map(lambda a, t: a.sharding == t.sharding, restored, target)
    assert all(jax.tree.leaves(placed))
    mu = restored.g_opt_state.inner_state[0].mu["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    print("SPEC", mu.sharding.spec, len(mu.addressable_shards))
""")


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _OTHER_MESH, str(tmp_path / "ck")], env=env,
                          cwd=ROOT, text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SPEC PartitionSpec('fsdp', 'tensor') 8" in proc.stdout.replace("P(", "PartitionSpec(")


# ------------------------------------------------------------------ the real CLI under faults


def _cli(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "marlin_jax.main", f"--workdir={workdir}", *TINY_FLAGS, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def _losses(workdir: Path) -> dict[int, tuple[float, ...]]:
    """step -> train losses from metrics.jsonl (the last record of a step wins)."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "rec_loss" in rec:
            out[rec["step"]] = (rec["rec_loss"], rec["adv_loss"], rec["d_loss"])
    return out


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): "
                                 f"{proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_losses(tmp_path):
    steps = ["--config.num_train_steps=40", "--config.checkpoint_every_steps=5"]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(_cli(ref_dir, *steps), env=_env(), cwd=ROOT, check=True, timeout=900,
                   capture_output=True)
    reference = _losses(ref_dir)
    assert sorted(reference) == list(range(1, 41))

    proc = subprocess.Popen(_cli(run_dir, *steps), env=_env(), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for(run_dir / "checkpoints" / "5", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run_dir / "checkpoints" / "40").exists(), "the run finished before the kill"
    interrupted = _losses(run_dir)

    resumed = subprocess.run(_cli(run_dir, *steps), env=_env(), cwd=ROOT, text=True,
                             capture_output=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    after = _losses(run_dir)
    assert sorted(after) == list(range(1, 41))
    for step in range(1, 41):
        np.testing.assert_allclose(after[step], reference[step], rtol=1e-6, atol=1e-7,
                                   err_msg=f"step {step}")
    assert max(interrupted) < 40


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143_not_finished(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli(run_dir, "--config.num_train_steps=2000",
                                 "--config.checkpoint_every_steps=5"),
                            env=_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    _wait_for(run_dir / "checkpoints" / "5", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]  # 128 + SIGTERM: schedulers requeue, not "done"
    assert "preempted (SIGTERM): saved step" in out
    stopped = int(out.split("preempted (SIGTERM): saved step ")[1].split()[0])
    assert 5 <= stopped < 2000
    assert f"marlin-jax: preempted at step {stopped}, saved to {run_dir / 'checkpoints'}" in out
    assert "finished at step" not in out and "Traceback" not in out
    assert (run_dir / "checkpoints" / str(stopped) / "state").is_dir()
