"""Resuming interrupted evaluation runs: SIGTERM / crash / kill -9, then the same call again.

An interrupted-then-resumed run must end exactly like an uninterrupted one (parameters, history,
metrics); a finished run is not retrained; a checkpoint of another run is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from marlin_jax.evaluate import EXIT_PREEMPTED, default_config, run
from marlin_jax.evaluation.datasets import ClipDataset, load_celebvhq
from marlin_jax.evaluation.probe import make_linear_head, train_linear_probe
from marlin_jax.evaluation.scores import classification_metrics
from marlin_jax.evaluation.training import (
    CheckpointMismatchError,
    FitOptions,
    Preempted,
    fit,
    make_forward,
    make_train_step,
    read_training_state,
    restore_best,
    split_model,
)

from .test_eval_datasets import make_celebvhq
from .test_eval_probe import features
from .test_eval_run import celebvhq_dataset, lp_config

ROOT = Path(__file__).resolve().parent.parent

# lr high enough for the plateau schedule to halve it, patience to stop early: the resumed
# run must carry the schedule and the early-stopping counter over.
OPTIONS = FitOptions(learning_rate=3.0, max_epochs=30, batch_size=32, patience=4,
                     plateau_patience=1)


class SimulatedCrashError(Exception):
    """Stands for a crash (or kill -9) in the middle of an epoch."""


def sigterm_at(epoch: int, lines: list[str] | None = None):
    """A log callback that sends this process SIGTERM once epoch ``epoch`` is logged."""

    def log(line: str) -> None:
        if lines is not None:
            lines.append(line)
        if line.startswith(f"epoch {epoch:4d}"):
            os.kill(os.getpid(), signal.SIGTERM)

    return log


def crash_at(epoch: int):
    """A log callback that raises while epoch ``epoch`` is running (before its checkpoint)."""

    def log(line: str) -> None:
        if line.startswith(f"epoch {epoch:4d}"):
            raise SimulatedCrashError(line)

    return log


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in rec.items() if k != "seconds"} for rec in history]


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def probe_data():
    return features(256, "multilabel", 0), features(96, "multilabel", 1)


@pytest.fixture(scope="module")
def uninterrupted(probe_data):
    train, val = probe_data
    return train_linear_probe(train, val, task="multilabel", num_outputs=3, options=OPTIONS,
                              log=lambda s: None)[1]


def probe(probe_data, tmp_path, log, **kw):
    train, val = probe_data
    return train_linear_probe(train, val, task="multilabel", num_outputs=3,
                              options=kw.pop("options", OPTIONS),
                              checkpoint_dir=tmp_path / "best", state_dir=tmp_path / "state",
                              log=log, **kw)


def test_probe_interrupted_then_resumed_equals_uninterrupted(probe_data, uninterrupted,
                                                             tmp_path):
    ref = uninterrupted
    lrs = [h["lr"] for h in ref.history]
    assert len(set(lrs)) > 1 and ref.stop_reason.startswith("no validation improvement")
    assert 6 < len(ref.history) < OPTIONS.max_epochs  # the schedule and the counter matter
    # SIGTERM during epoch 2: that epoch completes, is saved, then the loop stops
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="after epoch 2"):
        probe(probe_data, tmp_path, sigterm_at(2))
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back
    state = read_training_state(tmp_path / "state")
    assert state["loop"]["next_epoch"] == 3 and state["loop"]["stop_reason"] is None
    # a crash in the middle of a later epoch loses only that epoch
    crash_epoch = len(ref.history) - 2
    with pytest.raises(SimulatedCrashError):
        probe(probe_data, tmp_path, crash_at(crash_epoch))
    assert read_training_state(tmp_path / "state")["loop"]["next_epoch"] == crash_epoch
    lines: list[str] = []
    model, result = probe(probe_data, tmp_path, lines.append)
    assert result.resumed_at == (crash_epoch, 0) and not result.already_finished
    assert lines[0].startswith("resuming from") and lines[1].startswith(f"epoch {crash_epoch:4d}")
    assert without_seconds(result.history) == without_seconds(ref.history)
    assert (result.best_epoch, result.best_metric, result.stop_reason) == (
        ref.best_epoch, ref.best_metric, ref.stop_reason)
    assert_trees_equal(result.params, ref.params)
    # the best-parameters checkpoint holds the same best epoch
    assert_trees_equal(restore_best(tmp_path / "best", split_model(model)[1]), ref.params)


def test_throttled_saves(probe_data, uninterrupted, tmp_path):
    """save_every_s: epochs between saves are redone after a crash; SIGTERM and the last epoch
    are always saved, with the best parameters of the epochs so far."""
    rare = dict(save_every_s=1e9)
    with pytest.raises(SimulatedCrashError):
        probe(probe_data, tmp_path, crash_at(4), **rare)
    assert read_training_state(tmp_path / "state") is None  # nothing saved yet
    assert not [p for p in (tmp_path / "best").iterdir() if p.name.isdigit()]
    with pytest.raises(Preempted, match="after epoch 2"):
        probe(probe_data, tmp_path, sigterm_at(2), **rare)  # starts at epoch 0 again
    best_so_far = max(uninterrupted.history[:3], key=lambda h: h["val_auroc"])["epoch"]
    assert [int(p.name) for p in (tmp_path / "best").iterdir() if p.name.isdigit()] == [
        best_so_far]
    _, result = probe(probe_data, tmp_path, lambda s: None, **rare)
    assert without_seconds(result.history) == without_seconds(uninterrupted.history)
    assert_trees_equal(result.params, uninterrupted.params)
    state = read_training_state(tmp_path / "state")
    assert state["loop"]["next_epoch"] == len(uninterrupted.history)


def test_finished_run_is_not_retrained(probe_data, uninterrupted, tmp_path):
    probe(probe_data, tmp_path, lambda s: None)
    lines: list[str] = []
    _, again = probe(probe_data, tmp_path, lines.append)
    assert again.already_finished and again.resumed_at == (len(uninterrupted.history), 0)
    assert not [line for line in lines if line.startswith("epoch")]  # no epoch ran
    assert without_seconds(again.history) == without_seconds(uninterrupted.history)
    assert_trees_equal(again.params, uninterrupted.params)
    # a save still being written (orbax's temporary folder) is not a checkpoint yet
    for name in ("state", "best"):
        (tmp_path / name / "999.orbax-checkpoint-tmp-1").mkdir()
    assert read_training_state(tmp_path / "state")["loop"]["next_epoch"] == len(
        uninterrupted.history)
    assert_trees_equal(restore_best(tmp_path / "best", uninterrupted.params), uninterrupted.params)


def test_best_checkpoint_behind_the_state_is_repaired(probe_data, uninterrupted, tmp_path):
    """An interruption between the state and the best-parameters writes of one epoch."""
    improved, best = [], -1.0
    for h in uninterrupted.history:
        if h["val_auroc"] > best:
            improved.append(h["epoch"])
            best = h["val_auroc"]
    stop = improved[2]
    with pytest.raises(Preempted):
        probe(probe_data, tmp_path, sigterm_at(stop))
    step_dir = tmp_path / "best" / str(stop)
    assert step_dir.is_dir()
    subprocess.run(["rm", "-r", str(step_dir)], check=True)  # as if killed before this write
    _, result = probe(probe_data, tmp_path, lambda s: None)
    assert_trees_equal(result.params, uninterrupted.params)
    assert without_seconds(result.history) == without_seconds(uninterrupted.history)


def test_other_run_in_the_state_dir_is_refused(probe_data, tmp_path):
    short = FitOptions(learning_rate=3.0, max_epochs=2, batch_size=32)
    probe(probe_data, tmp_path, lambda s: None, options=short)
    other_lr = FitOptions(learning_rate=1.0, max_epochs=2, batch_size=32)
    with pytest.raises(CheckpointMismatchError, match=rf"{tmp_path / 'state'}: holds the "
                       r"checkpoint of a different run \(options.learning_rate: saved 3.0, "
                       r"now 1.0\)"):
        probe(probe_data, tmp_path, lambda s: None, options=other_lr)
    train, val = probe_data
    other_data = (features(256, "multilabel", 7), val)
    with pytest.raises(CheckpointMismatchError, match=r"run.probe.data: saved"):
        probe(other_data, tmp_path, lambda s: None, options=short)
    with pytest.raises(CheckpointMismatchError, match=r"params.head/kernel: saved "
                       r"'float32\[12, 3\]', now 'float32\[12, 1\]'"):
        train_linear_probe(train, val, task="multilabel", num_outputs=1, options=short,
                           checkpoint_dir=tmp_path / "best", state_dir=tmp_path / "state",
                           log=lambda s: None)
    # fresh_start deletes both checkpoints and trains the new run from epoch 0
    lines: list[str] = []
    _, result = probe(probe_data, tmp_path, lines.append, options=other_lr, fresh_start=True)
    assert result.resumed_at is None and lines[0].startswith("fresh start: deleting")
    assert [h["lr"] for h in result.history] == [1.0, 1.0]
    # best parameters without a training state (e.g. an older run): refused, not mixed in
    (tmp_path / "state").rename(tmp_path / "state_moved")
    with pytest.raises(FileExistsError, match=rf"{tmp_path / 'best'}: holds best-parameter"):
        probe(probe_data, tmp_path, lambda s: None, options=other_lr)


def test_a_state_dir_without_a_loop_state_is_refused(probe_data, tmp_path):
    """A checkpoint in the state dir that is not an evaluation loop state (another program's,
    an older format, or its JSON lost) is refused with an error naming it, never trained over."""
    short = FitOptions(learning_rate=3.0, max_epochs=2, batch_size=32)
    probe(probe_data, tmp_path, lambda s: None, options=short)
    (step,) = [p for p in (tmp_path / "state").iterdir() if p.name.isdigit()]
    subprocess.run(["rm", "-r", str(step / "data_iter")], check=True)
    with pytest.raises(CheckpointMismatchError, match=rf"{tmp_path / 'state'}: not a "
                       r"training-state checkpoint of format \d+ \(found None\)"):
        probe(probe_data, tmp_path, lambda s: None, options=short)
    assert (step / "state").is_dir()  # left in place


def test_evaluate_run_resumes_reports_and_refuses(tmp_path):
    """The CLI's run(): SIGTERM -> Preempted; rerun resumes to the uninterrupted result; a
    finished workdir reports metrics.json without touching the data; config changes refused."""
    root = celebvhq_dataset(tmp_path / "celebvhq")
    config = lp_config(root, tmp_path / "ref")
    config.epochs = 8
    ref = run(config, log=lambda s: None)
    config.workdir, config.checkpoint_every_s = str(tmp_path / "work"), 0.0
    with pytest.raises(Preempted):
        run(config, log=sigterm_at(4))
    assert not (tmp_path / "work" / "metrics.json").exists()
    resumed = run(config, log=lambda s: None)
    assert resumed["fit"]["resumed_at"] == [5, 0]
    assert without_seconds(resumed["fit"]["history"]) == without_seconds(ref["fit"]["history"])
    assert resumed["metrics"] == ref["metrics"]
    # finished: the saved results, without reading any data (the features are gone)
    (root / "marlin_vit_base_ytf").rename(root / "features_moved")
    lines: list[str] = []
    again = run(config, log=lines.append)
    assert "already finished" in lines[0] and again["metrics"] == json.loads(
        (tmp_path / "work" / "metrics.json").read_text())["metrics"]
    config.learning_rate = 0.5
    with pytest.raises(CheckpointMismatchError, match=rf"{tmp_path / 'work' / 'state'}: .*"
                       r"config.learning_rate: saved 0.01, now 0.5"):
        run(config, log=lambda s: None)


def finetune_config(root: Path, workdir: Path):
    c = default_config()
    c.finetune, c.allow_random_init = True, True
    c.data_path, c.workdir = str(root), str(workdir)
    c.backbone = "resume_test_tiny"
    c.backbone_config = {"name": "marlin_vit_tiny", "img_size": 32, "n_frames": 4,
                         "encoder_depth": 1}
    c.epochs, c.batch_size, c.num_threads, c.learning_rate = 3, 2, 1, 1e-3
    c.checkpoint_every_s = 0.0
    return c


@pytest.mark.slow
def test_finetune_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    root = tmp_path / "celebvhq"
    root.mkdir()
    names = tuple(f"c{i}" for i in range(10))
    make_celebvhq(root, names=names, frames=10, size=32)
    (root / "train.txt").write_text("\n".join(names[:6]))
    (root / "val.txt").write_text("\n".join(names[6:]))
    (root / "test.txt").write_text("\n".join(names[6:]))
    ref = run(finetune_config(root, tmp_path / "ref"), log=lambda s: None)
    config = finetune_config(root, tmp_path / "work")
    with pytest.raises(Preempted, match="after epoch 0"):
        run(config, log=sigterm_at(0))
    resumed = run(config, log=lambda s: None)
    assert resumed["fit"]["resumed_at"] == [1, 0] and resumed["fit"]["epochs"] == 3
    assert without_seconds(resumed["fit"]["history"]) == without_seconds(ref["fit"]["history"])
    assert resumed["metrics"] == ref["metrics"]
    state = read_training_state(tmp_path / "work" / "state")
    assert state["loop"]["best_epoch"] == ref["fit"]["best_epoch"]
    # the best parameters on disk are identical
    from flax import nnx

    from marlin_jax.evaluation.finetune import FineTuneClassifier
    from marlin_jax.models import MarlinEncoder, get_config

    model = FineTuneClassifier(MarlinEncoder(get_config("resume_test_tiny"), rngs=nnx.Rngs(0)),
                               40, rngs=nnx.Rngs(0))
    like = split_model(model)[1]
    assert_trees_equal(restore_best(tmp_path / "work" / "checkpoints", like),
                       restore_best(tmp_path / "ref" / "checkpoints", like))


# ------------------------------------------------- fit driven step by step: a toy linear model

TOY_OPTIONS = FitOptions(learning_rate=0.1, max_epochs=3, batch_size=4)
TOY_STEPS = 6  # 24 samples in batches of 4


def toy_fit(workdir: Path | None, *, hook=None, save_every_s: float = 0.0,
            trained: list | None = None):
    """``fit`` of a linear head trained batch by batch (``run_epoch`` yields after each step).
    ``hook(where)`` runs before batch ``where=(epoch, batch)`` and before validation
    (``where=(epoch, "val")``); ``trained`` collects the ``(epoch, batch)`` pairs trained."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 5)).astype(np.float32)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.float32)
    x_val = rng.normal(size=(16, 5)).astype(np.float32)
    y_val = x_val[:, 0] + 0.3 * x_val[:, 1] > 0
    graphdef, params, rest = split_model(make_linear_head(x, 1, seed=0))
    tx = TOY_OPTIONS.optimizer()
    step = jax.jit(make_train_step(graphdef, "binary", tx))
    forward = jax.jit(make_forward(graphdef))
    hook = hook or (lambda where: None)
    current = {"epoch": -1}

    def run_epoch(params, opt_state, lr, epoch, start_batch):
        current["epoch"] = epoch
        order = np.random.default_rng((TOY_OPTIONS.seed, epoch)).permutation(24)
        for b in range(start_batch, TOY_STEPS):
            hook((epoch, b))
            if trained is not None:
                trained.append((epoch, b))
            idx = order[4 * b:4 * b + 4]
            params, opt_state, loss = step(params, opt_state, rest, x[idx], y[idx], lr)
            yield params, opt_state, loss[None]

    def evaluate(params, stop):
        hook((current["epoch"], "val"))
        if stop():
            return None
        return classification_metrics(np.asarray(forward(params, rest, x_val)), y_val,
                                      "binary")

    dirs = {} if workdir is None else {"checkpoint_dir": workdir / "best",
                                       "state_dir": workdir / "state"}
    return fit(params, run_epoch=run_epoch, steps_per_epoch=TOY_STEPS, validate=evaluate,
               init_opt_state=tx.init, options=TOY_OPTIONS, save_every_s=save_every_s,
               log=lambda s: None, **dirs)


@pytest.fixture(scope="module")
def toy_ref():
    return toy_fit(None)


def when(target, action):
    """A toy_fit hook running ``action()`` at ``target``."""
    return lambda where: action() if where == target else None


def assert_same_run(result, ref) -> None:
    assert without_seconds(result.history) == without_seconds(ref.history)
    assert (result.best_epoch, result.best_metric, result.stop_reason) == (
        ref.best_epoch, ref.best_metric, ref.stop_reason)
    assert_trees_equal(result.params, ref.params)


def sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def test_fit_sigterm_mid_epoch_saves_after_the_step_and_resumes_bitwise(toy_ref, tmp_path):
    ref = toy_ref
    assert len(ref.history) == 3 and len({h["train_loss"] for h in ref.history}) == 3
    with pytest.raises(Preempted, match=r"stopped in epoch 1 after 3 of 6 batches, saved in "
                       rf"{tmp_path / 'state'}") as info:
        toy_fit(tmp_path, hook=when((1, 2), sigterm))  # during batch 2: it still trains
    assert (info.value.epoch, info.value.batch) == (1, 3)
    loop = read_training_state(tmp_path / "state")["loop"]
    assert (loop["next_epoch"], loop["next_batch"], len(loop["history"])) == (1, 3, 1)
    trained: list = []
    result = toy_fit(tmp_path, trained=trained)
    assert result.resumed_at == (1, 3) and trained[:2] == [(1, 3), (1, 4)]
    assert len(trained) == 3 + TOY_STEPS  # the rest of epoch 1, then epoch 2
    assert_same_run(result, ref)


def test_fit_sigterm_during_validation_saves_the_trained_epoch(toy_ref, tmp_path):
    ref = toy_ref
    with pytest.raises(Preempted, match="stopped in epoch 0 before its validation"):
        toy_fit(tmp_path, hook=when((0, "val"), sigterm), trained=[])
    loop = read_training_state(tmp_path / "state")["loop"]
    assert (loop["next_epoch"], loop["next_batch"], loop["history"]) == (0, TOY_STEPS, [])
    trained: list = []
    result = toy_fit(tmp_path, trained=trained)
    assert result.resumed_at == (0, TOY_STEPS) and trained[0] == (1, 0)  # epoch 0: validated
    assert_same_run(result, ref)


def test_fit_timed_saves_inside_epochs(toy_ref, tmp_path):
    """save_every_s > 0 saves between steps too: a crash loses only the steps since."""
    ref = toy_ref

    def crash() -> None:
        raise SimulatedCrashError

    with pytest.raises(SimulatedCrashError):
        toy_fit(tmp_path, hook=when((2, 4), crash), save_every_s=1e-9)
    loop = read_training_state(tmp_path / "state")["loop"]
    assert (loop["next_epoch"], loop["next_batch"]) == (2, 4)
    trained: list = []
    result = toy_fit(tmp_path, save_every_s=1e-9, trained=trained)
    assert trained == [(2, 4), (2, 5)]
    assert_same_run(result, ref)
    # 0: saves at epoch ends only (a crash mid-epoch restarts the epoch)
    with pytest.raises(SimulatedCrashError):
        toy_fit(tmp_path / "zero", hook=when((2, 4), crash), save_every_s=0.0)
    loop = read_training_state(tmp_path / "zero" / "state")["loop"]
    assert (loop["next_epoch"], loop["next_batch"]) == (2, 0)


def test_fit_best_params_travel_with_a_mid_epoch_state(toy_ref, tmp_path):
    """Epoch 0's best parameters, unsaved (throttled), go into the mid-epoch SIGTERM state; a
    kill before they reach the best checkpoint loses nothing."""
    with pytest.raises(Preempted, match="stopped in epoch 1 after 2 of 6"):
        toy_fit(tmp_path, hook=when((1, 1), sigterm), save_every_s=1e9)
    assert read_training_state(tmp_path / "state")["best_in_state"]
    best_dir = tmp_path / "best" / str(toy_ref.history[0]["epoch"])
    assert best_dir.is_dir()
    subprocess.run(["rm", "-r", str(best_dir)], check=True)  # as if killed before this write
    result = toy_fit(tmp_path, save_every_s=1e9)
    assert_same_run(result, toy_ref)
    like = jax.tree.map(np.zeros_like, toy_ref.params)
    assert_trees_equal(restore_best(tmp_path / "best", like), toy_ref.params)


# ----------------------------------------------------------------- fine-tuning: mid-epoch saves

FT_OPTIONS = FitOptions(learning_rate=1e-3, max_epochs=2, batch_size=2)
FT_STEPS = 4  # 8 training clips in batches of 2


@pytest.fixture(scope="module")
def ft_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("celebvhq_ft")
    names = tuple(f"c{i}" for i in range(12))
    make_celebvhq(root, names=names, frames=10, size=32)
    (root / "train.txt").write_text("\n".join(names[:8]))
    (root / "val.txt").write_text("\n".join(names[8:]))
    return root


def ft_data(root: Path) -> tuple[ClipDataset, ClipDataset]:
    return tuple(ClipDataset(load_celebvhq(root, split, "appearance"), 4, 2, 32)
                 for split in ("train", "val"))


def finetune(root: Path, workdir: Path | None, train: ClipDataset | None = None,
             val: ClipDataset | None = None, **kw):
    """A fresh tiny ViT fine-tuned on ``root``'s clips (same initialisation every call)."""
    from flax import nnx

    from marlin_jax.evaluation.finetune import train_finetune
    from marlin_jax.models import MarlinEncoder, get_config

    cfg = get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4, encoder_depth=1)
    default_train, default_val = ft_data(root)
    dirs = {} if workdir is None else {"checkpoint_dir": workdir / "best",
                                       "state_dir": workdir / "state"}
    return train_finetune(MarlinEncoder(cfg, rngs=nnx.Rngs(0)), train or default_train,
                          val or default_val, task="multilabel", num_outputs=40,
                          options=FT_OPTIONS, num_threads=1, log=lambda s: None,
                          **dirs, **kw)[1]


@pytest.fixture(scope="module")
def ft_uninterrupted(ft_root):
    return finetune(ft_root, None)


def count_decodes(dataset: ClipDataset) -> list[int]:
    """Records the sample index of every clip ``dataset`` decodes from now on."""
    decoded: list[int] = []
    clip = dataset.clip
    dataset.clip = lambda i, rng: decoded.append(i) or clip(i, rng)
    return decoded


def on_batch(dataset: ClipDataset, seed: int, index: int, action) -> None:
    """Runs ``action()`` as ``dataset.batches(seed=seed)`` hands out its ``index``-th batch
    (counted from the batch it started at)."""
    batches = dataset.batches

    def wrapped(*args, **kw):
        for i, batch in enumerate(batches(*args, **kw)):
            if kw["seed"] == seed and i == index:
                action()
            yield batch

    dataset.batches = wrapped


@pytest.mark.slow
def test_finetune_sigterm_mid_epoch_saves_within_a_step_and_resumes_bitwise(
        ft_root, ft_uninterrupted, tmp_path):
    """SIGTERM while batch 1 of epoch 1 is handed out: that step finishes, the position (epoch
    1, batch 2) is saved, Preempted; the rerun decodes only the batches after it and ends
    bitwise equal to the uninterrupted run."""
    train, val = ft_data(ft_root)
    on_batch(train, FT_OPTIONS.seed + 1, 1, sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="stopped in epoch 1 after 2 of 4 batches") as info:
        finetune(ft_root, tmp_path, train, val)
    assert (info.value.epoch, info.value.batch) == (1, 2)
    assert signal.getsignal(signal.SIGTERM) is handler
    loop = read_training_state(tmp_path / "state")["loop"]
    assert (loop["next_epoch"], loop["next_batch"], len(loop["history"])) == (1, 2, 1)
    assert loop["loss_sum"] > 0
    train, val = ft_data(ft_root)
    decoded = count_decodes(train)
    result = finetune(ft_root, tmp_path, train, val)
    assert result.resumed_at == (1, 2)
    chunks = train.batch_indices(2, shuffle=True, seed=FT_OPTIONS.seed + 1, drop_last=True)
    assert sorted(decoded) == sorted(np.concatenate(chunks[2:]).tolist())  # 0, 1: skipped
    assert_same_run(result, ft_uninterrupted)


@pytest.mark.slow
def test_finetune_sigterm_during_validation_resumes_at_validation(ft_root, ft_uninterrupted,
                                                                  tmp_path):
    train, val = ft_data(ft_root)
    on_batch(val, 12345, 0, sigterm)  # the first validation pass (the eval seed)
    with pytest.raises(Preempted, match="stopped in epoch 0 before its validation"):
        finetune(ft_root, tmp_path, train, val)
    loop = read_training_state(tmp_path / "state")["loop"]
    assert (loop["next_epoch"], loop["next_batch"], loop["history"]) == (0, FT_STEPS, [])
    train, val = ft_data(ft_root)
    decoded = count_decodes(train)
    result = finetune(ft_root, tmp_path, train, val)
    assert result.resumed_at == (0, FT_STEPS)
    assert len(decoded) == FT_STEPS * 2  # epoch 1 only: epoch 0 is not retrained
    assert_same_run(result, ft_uninterrupted)


@pytest.mark.slow
def test_finetune_timed_saves_mid_epoch_survive_a_crash(ft_root, ft_uninterrupted, tmp_path):
    """save_every_s > 0 also saves between steps: a crash (as SIGKILL) loses at most the steps
    since; the resumed run is still bitwise the uninterrupted one."""

    def crash() -> None:
        raise SimulatedCrashError("mid-epoch")

    train, val = ft_data(ft_root)
    on_batch(train, FT_OPTIONS.seed + 1, 3, crash)  # handing out batch 3 of epoch 1
    with pytest.raises(SimulatedCrashError):
        finetune(ft_root, tmp_path, train, val, save_every_s=1e-9)
    loop = read_training_state(tmp_path / "state")["loop"]
    assert (loop["next_epoch"], loop["next_batch"]) == (1, 3)
    result = finetune(ft_root, tmp_path, save_every_s=1e-9)
    assert result.resumed_at == (1, 3)
    assert_same_run(result, ft_uninterrupted)


def _saved_epochs(state_dir: Path) -> int:
    """Completed epochs in the newest state checkpoint of a running process (0: none yet)."""
    try:
        state = read_training_state(state_dir)
    except Exception:  # noqa: BLE001  (the step being read was just replaced by a newer one)
        return 0
    return 0 if state is None else state["loop"]["next_epoch"]


def _wait_for_epoch(proc: subprocess.Popen, state_dir: Path, at_least: int,
                    timeout: float = 240.0) -> int:
    """Waits until epoch ``at_least`` is saved; returns the last saved epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = _saved_epochs(state_dir)
        if done > at_least:
            return done - 1
        if proc.poll() is not None:
            raise AssertionError(f"finished before epoch {at_least}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no checkpoint of epoch {at_least} within {timeout}s")


@pytest.mark.slow
def test_cli_killed_then_resumed(tmp_path):
    """kill -9 a CLI run mid-training, SIGTERM the resumed one (exit 143, no metrics), then
    finish: the result equals an uninterrupted run's."""
    root = celebvhq_dataset(tmp_path / "celebvhq")
    work = tmp_path / "work"
    config = lp_config(root, tmp_path / "ref")
    config.epochs, config.patience = 30, 0
    ref = run(config, log=lambda s: None)
    cmd = [sys.executable, "-m", "marlin_jax.evaluate",
           f"--config={ROOT / 'configs' / 'celebvhq_appearance_lp.py'}",
           f"--config.data_path={root}", f"--config.workdir={work}",
           "--config.learning_rate=0.01", "--config.epochs=30", "--config.batch_size=16",
           "--config.checkpoint_every_s=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}

    def start():
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    proc = start()
    killed_after = _wait_for_epoch(proc, work / "state", 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert killed_after < 29 and not (work / "metrics.json").exists()
    proc = start()
    _wait_for_epoch(proc, work / "state", killed_after + 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "SIGTERM: stopped after epoch" in err and "resuming from" in out
    assert not (work / "metrics.json").exists()
    proc = start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    saved = json.loads((work / "metrics.json").read_text())
    assert saved["fit"]["resumed_at"][0] > killed_after
    assert without_seconds(saved["fit"]["history"]) == without_seconds(ref["fit"]["history"])
    assert saved["metrics"]["test"] == pytest.approx(ref["metrics"]["test"], rel=0, abs=0)
    # a finished workdir reports; another config in it is refused (status 2, naming it)
    proc = start()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "already finished" in out, err[-2000:]
    cmd.append("--config.learning_rate=0.02")
    proc = start()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and f"{work / 'state'}: holds the checkpoint of a different" in err
