"""The MARLIN pretraining loop (:func:`train_and_evaluate`): data, mesh, sharded state, the
compiled G+D step, checkpoints, metrics, validation and reconstruction images. Every process
reads its own data shard; batches are global arrays sharded over ``data x fsdp``."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from flax import nnx, traverse_util
from jax.experimental import multihost_utils

from marlin_jax import sharding as shd
from marlin_jax.data import make_dataset, make_source
from marlin_jax.files import atomic_path
from marlin_jax.interop.checkpoints import CONFIG_FILE, write_config_file
from marlin_jax.interop.optimizer_state import AdamMoments, lightning_adam_moments, read_lightning_checkpoint
from marlin_jax.models import MarlinConfig, MarlinModel, is_stacked, stack_layers, unstack_layers
from marlin_jax.models.config import config_from_json_file
from marlin_jax.preemption import PreemptedError, SigtermFlag
from marlin_jax.train import metrics as mt
from marlin_jax.train import reconstruction, steps
from marlin_jax.train import state as st
from marlin_jax.train.checkpointing import Checkpointer, CheckpointLayoutError, OtherLayout, is_disk_full
from marlin_jax.train.program import Schedule, TrainProgram, build_program, model_config, schedule_from_config

log = logging.getLogger(__name__)

METRIC_NAMES = ("rec_loss", "adv_loss", "g_loss", "d_loss", "d_loss0", "gp", "g_lr", "d_lr",
                "g_grad_norm", "d_grad_norm")
RUN_CONFIG_FILE = "config.json"
PREVIOUS_PREFIX = "previous-"  # fresh_start moves a workdir's contents to previous-<time>/
# MarlinConfig fields that change neither the parameters nor their meaning for a restore
_NOT_IDENTITY_MODEL_FIELDS = ("downloadable", "drop_rate", "attn_drop_rate")


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN/Inf; the last good checkpoint is kept."""


class RunMismatchError(ValueError):
    """The workdir holds the checkpoints of another run."""


class CheckpointDiskFullError(OSError):
    """The disk filled up while a checkpoint was written; the previous checkpoint is kept."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def resolve_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The data config, with the synthetic dataset when none is configured (said loudly)."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    if not data.source:
        _say("marlin-jax: no dataset configured (config.data.source is empty) -> using the built-in "
             "synthetic face videos (for real data set e.g. --config.data.source=ytf "
             "--config.data.root_dir=/path/to/YouTubeFaces, or tfds / videos)", level=logging.WARNING)
        data.source = "synthetic"
    return data


def make_schedule(config: ml_collections.ConfigDict, data: ml_collections.ConfigDict) -> Schedule:
    """Steps and learning rates of the run (counts the train split unless steps_per_epoch > 0)."""
    size = len(make_source(data, data.train_split)) if int(config.steps_per_epoch) <= 0 else None
    return schedule_from_config(config, size)


class InitFrom(NamedTuple):
    """What ``config.init_from`` provides: parameters over the fresh ones, the batch step, and
    the AdamW moments of a Lightning ``.ckpt`` (None: fresh moments)."""

    g_params: st.Params
    d_params: st.Params
    step: int
    g_adam: AdamMoments | None = None
    d_adam: AdamMoments | None = None


def load_init_params(path: str, model_cfg: MarlinConfig, g_params: st.Params,
                     d_params: st.Params, updates_per_batch: int = 2, *,
                     adam: tuple[float, float, float] | None = None,
                     weight_decay: float | None = None) -> InitFrom:
    """Parameters from a VideoMAE / MARLIN / Lightning checkpoint over the fresh ones (parts the
    checkpoint lacks, e.g. a VideoMAE model's critic, stay fresh), in the fresh ones' layout.

    For an original-trainer Lightning ``.ckpt``: ``step`` = ``global_step // updates_per_batch``
    (it counts every optimiser step), else 0; with ``adam = (b1, b2, eps)`` also its two AdamW
    states (an error naming the file when they do not fit; fresh moments and a warning when the
    file has none). The original data loader's position is not restorable.
    """
    from marlin_jax.interop import read_state_dict, state_dict_to_model

    stacked = is_stacked((g_params, d_params))
    if stacked:
        g_params, d_params = unstack_layers(g_params), unstack_layers(d_params)
    ckpt = read_lightning_checkpoint(path) if path.endswith(".ckpt") else None
    state_dict = ckpt.state_dict if ckpt is not None else None
    if state_dict is None:  # not a Lightning file: every other format
        state_dict = read_state_dict(path, model_cfg)
    has_decoder = any(k.startswith("decoder.") for k in state_dict)
    has_critic = any(k.startswith("discriminator.") for k in state_dict)
    model = MarlinModel(model_cfg, rngs=nnx.Rngs(0), with_decoder=has_decoder,
                        with_discriminator=has_critic)
    state_dict_to_model(model, state_dict, strict=False, source=path)
    loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    g_loaded, d_loaded = st.split_params(loaded)
    g_params = {**g_params, **g_loaded}
    d_params = {**d_params, **d_loaded}
    step = 0
    g_adam = d_adam = None
    if ckpt is not None:
        if ckpt.global_step is not None:
            step = ckpt.global_step // max(1, updates_per_batch)
        if adam is not None:
            b1, b2, eps = adam
            g_adam, d_adam = lightning_adam_moments(ckpt, g_params, d_params, b1=b1, b2=b2,
                                                    eps=eps, weight_decay=weight_decay)
            if not ckpt.optimizer_states:
                log.warning("init_from %s: the checkpoint has no optimizer_states; AdamW "
                            "moments start from zero", path)
    log.info("init_from %s: loaded %s (step %d; AdamW moments: generator %s, critic %s)", path,
             ", ".join(sorted(set(g_loaded) | set(d_loaded))), step,
             "fresh" if g_adam is None else f"step {g_adam.count}",
             "fresh" if d_adam is None else f"step {d_adam.count}")
    if stacked:
        g_params, d_params = stack_layers(g_params), stack_layers(d_params)
        g_adam, d_adam = (None if a is None else dataclasses.replace(
            a, mu=stack_layers(a.mu), nu=stack_layers(a.nu)) for a in (g_adam, d_adam))
    return InitFrom(g_params, d_params, step, g_adam, d_adam)


def run_identity(model_cfg: MarlinConfig, config: Mapping[str, Any]) -> dict[str, Any]:
    """What a restore depends on, as flat ``{field: value}``: the model's shape and clip geometry
    (``model.*``) and the optimiser-state layout (``optimizer.grad_clip > 0`` adds a stage). Not
    ``scan_layers``: the other block layout is converted on restore (:func:`other_block_layout`)."""
    ident: dict[str, Any] = {f"model.{k}": v for k, v in model_cfg.to_dict().items()
                             if k not in _NOT_IDENTITY_MODEL_FIELDS}
    grad_clip = (config.get("optimizer") or {}).get("grad_clip")
    if grad_clip is not None:
        ident["optimizer.grad_clip > 0"] = float(grad_clip) > 0
    return ident


def saved_identity(workdir: str) -> dict[str, Any]:
    """The identity of the run that wrote ``workdir`` (from its ``marlin_config.json`` and
    ``config.json``; fields of an absent file are absent). Errors name a damaged file."""
    model_path = os.path.join(workdir, CONFIG_FILE)
    run_path = os.path.join(workdir, RUN_CONFIG_FILE)
    config: dict[str, Any] = {}
    if os.path.isfile(run_path):
        try:
            with open(run_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise RunMismatchError(f"{run_path}: damaged run config, not readable JSON ({e}); "
                                   "restore it, or delete it to resume without checking the "
                                   "optimiser layout") from None
        if not isinstance(config, dict):
            raise RunMismatchError(f"{run_path}: damaged run config, expected a JSON object")
    if os.path.isfile(model_path):
        try:
            return run_identity(config_from_json_file(model_path), config)
        except ValueError as e:
            raise RunMismatchError(str(e)) from None
    try:  # a workdir of a version without marlin_config.json: its config.json, if it tells
        return run_identity(model_config(ml_collections.ConfigDict(config)), config)
    except (AttributeError, KeyError, TypeError, ValueError):
        return {k: v for k, v in run_identity(MarlinConfig(), config).items()
                if not k.startswith("model.")}


def check_run_identity(workdir: str, current: Mapping[str, Any], this_run: str = "") -> None:
    """Refuses (RunMismatchError naming the workdir and every differing field, old vs new) to
    train in a workdir whose checkpoints belong to another run (``this_run``: for the message)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir) or not any(n.isdigit() for n in os.listdir(ckpt_dir)):
        return
    saved = saved_identity(workdir)
    diffs = [f"{k}: saved {saved[k]!r}, now {current[k]!r}"
             for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]
    if diffs:
        which = f" ({this_run})" if this_run else ""
        raise RunMismatchError(
            f"{workdir}: holds the checkpoints of a different run, which does not fit this run's "
            f"train state{which}: {'; '.join(diffs)}; nothing was written. Use another --workdir, "
            "or pass --config.fresh_start=True once to move its contents aside (to "
            f"{workdir}/{PREVIOUS_PREFIX}<time>/) and start over.")


def move_aside(workdir: str) -> str | None:
    """``config.fresh_start``: moves everything in ``workdir`` but earlier ``previous-*`` folders
    into a new ``workdir/previous-<YYYYmmdd-HHMMSS>/`` and returns it (None: nothing to move)."""
    if not os.path.isdir(workdir):
        return None
    entries = [n for n in os.listdir(workdir) if not n.startswith(PREVIOUS_PREFIX)]
    if not entries:
        return None
    base = os.path.join(workdir, PREVIOUS_PREFIX + time.strftime("%Y%m%d-%H%M%S"))
    dest, n = base, 1
    while os.path.exists(dest):
        dest, n = f"{base}-{n}", n + 1
    os.makedirs(dest)
    for name in entries:
        os.rename(os.path.join(workdir, name), os.path.join(dest, name))
    return dest


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _device_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    return shd.global_batch({"video": local["video"], "mask": local["mask"]}, mesh)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (resuming from ``workdir``'s checkpoints) and returns the last logged train and
    ``val_*`` metrics and ``step``. Raises :class:`PreemptedError` (saved) after a SIGTERM,
    :class:`RunMismatchError`, :class:`NonFiniteLossError`, :class:`CheckpointDiskFullError`."""
    run = _setup(config, workdir)
    ckpt = Checkpointer(os.path.join(run.workdir, "checkpoints"),
                        max_to_keep=config.keep_checkpoints, async_save=config.async_checkpointing)
    try:
        loop = _Loop(run, ckpt, *_restore_or_init(run, ckpt))
    except BaseException:
        ckpt.close()
        raise
    loop.train()
    if loop.preempted_at is not None:
        raise PreemptedError(loop.preempted_at, loop.ckpt.directory)
    summary = {**loop.last, **loop.val, "step": float(loop.step)}
    print(f"marlin-jax: process {jax.process_index()} finished at step {loop.step}: "
          + " ".join(f"{k}={v:.6g}" for k, v in sorted(summary.items()) if k != "step"),
          flush=True)
    return summary


@dataclasses.dataclass
class _Run:
    """What the phases share: the resolved config, the mesh and compiled program, the data."""

    config: ml_collections.ConfigDict
    workdir: str
    primary: bool
    data_cfg: ml_collections.ConfigDict
    sched: Schedule
    program: TrainProgram
    train_iter: Any
    eval_every: int


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Run:
    """Phase 1: mesh, schedule, program, the workdir (moved aside or checked to hold this run),
    the data, whether validation can run. Writes nothing but ``fresh_start``'s move."""
    workdir = os.path.abspath(workdir)
    primary = jax.process_index() == 0
    data_cfg = resolve_data_config(config)
    mesh = shd.make_mesh(config.mesh.to_dict())
    sched = make_schedule(config, data_cfg)
    resolved = ml_collections.ConfigDict({**config.to_dict(), "data": data_cfg.to_dict()})
    program = build_program(resolved, mesh, sched, process_count=jax.process_count())
    model_cfg = program.model_cfg
    if config.get("fresh_start", False):
        moved = move_aside(workdir) if primary else None
        _sync("marlin_fresh_start")
        if moved:
            _say("fresh_start: moved the previous contents of %s to %s; starting over", workdir,
                 moved)
    check_run_identity(workdir, run_identity(model_cfg, resolved.to_dict()),
                       f"model {config.model.name}")
    os.makedirs(workdir, exist_ok=True)
    _say("model %s (%s compute, %s attention, data %s), mesh %s, %d devices / %d processes, "
         "batch %d, %d steps (%d/epoch), warm-up %d, lr %.3g -> %.3g, %d of %d tokens visible",
         config.model.name, jnp.dtype(program.dtype).name, program.attention_impl or "xla",
         data_cfg.source, dict(mesh.shape), jax.device_count(), jax.process_count(),
         program.global_batch, sched.total_steps, sched.steps_per_epoch, sched.warmup_steps,
         sched.base_lr, sched.min_lr, program.num_visible, model_cfg.num_tokens)
    _say("parameters: generator %.1fM, critic %.1fM",
         *(sum(x.size for x in jax.tree.leaves(p)) / 1e6 for p in
           (program.abstract_state.g_params, program.abstract_state.d_params)))
    train_ds = make_dataset(data_cfg, split=data_cfg.train_split,
                            global_batch_size=program.global_batch,
                            process_index=jax.process_index(),
                            process_count=jax.process_count(), seed=config.seed)
    eval_every = int(config.eval_every_steps)
    if eval_every > 0:
        try:
            make_source(data_cfg, data_cfg.val_split)
        except (OSError, ValueError) as e:
            _say("WARNING: no validation split %r (%s): validation and reconstruction images "
                 "are off; set --config.data.val_split or --config.eval_every_steps=0",
                 data_cfg.val_split, e, level=logging.WARNING)
            eval_every = 0
    return _Run(config, workdir, primary, data_cfg, sched, program, iter(train_ds),
                eval_every)


def _restore_or_init(run: _Run, ckpt: Checkpointer) -> tuple[st.TrainState, int | None]:
    """Phase 2: the newest readable checkpoint (either block layout), else a fresh state (with
    ``config.init_from``); then the run's metadata. Returns the state and its step (None: fresh)."""
    config, program = run.config, run.program
    try:
        latest, state, skipped = ckpt.restore_newest(
            program.abstract_state, run.train_iter, rename=run.primary,
            other_layouts=[other_block_layout(program)])
    except CheckpointLayoutError as e:
        raise RunMismatchError(
            f"{e} (this run: model {config.model.name}). It was written for another model, "
            "or before the per-head (D, 3, H, hd) qkv kernel (read such a workdir as weights "
            "with init_from=<workdir> in a new workdir); nothing was written. Use another "
            "--workdir, or pass --config.fresh_start=True once to move its contents aside "
            f"(to {run.workdir}/{PREVIOUS_PREFIX}<time>/) and start over.") from e
    _sync("marlin_restore")  # (each skipped step was logged as one warning line)
    if skipped and latest is None:
        raise RunMismatchError(
            f"{ckpt.directory}: no readable checkpoint (damaged steps "
            f"{', '.join(str(x.step) for x in skipped)} renamed aside to <step>.damaged); "
            "rerun the same command to start from step 0 (or config.init_from).")
    if latest is not None:
        _say("resuming from %s step %d", ckpt.directory, latest)
    else:
        state = shd.sharded_init(program.init_fn, program.mesh)
        if config.init_from:
            state = _apply_init_from(config, program, state)
    if run.primary:  # only now that the workdir's checkpoints are known to fit this run
        with open(os.path.join(run.workdir, RUN_CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))
        write_config_file(run.workdir, program.model_cfg)  # the workdir reads as a Marlin checkpoint
        start = int(jax.device_get(state.step))  # rows of later steps are rerun: keep each once
        dropped = mt.drop_rows_after(os.path.join(run.workdir, "metrics.jsonl"), start)
        if dropped:
            log.info("metrics.jsonl: dropped %d rows after step %d (rerun)", dropped, start)
    return state, latest


def other_block_layout(program: TrainProgram) -> OtherLayout:
    """The run's train state in the other ``scan_layers`` layout (same sharding rules) and the
    jitted conversion back, on the sharded arrays (the layer axis is never sharded)."""
    stacked = is_stacked(program.abstract_state)
    to_other, back = (unstack_layers, stack_layers) if stacked else (stack_layers, unstack_layers)
    plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), program.abstract_state)
    other = shd.abstract_with_shardings(jax.eval_shape(to_other, plain), program.mesh)
    return OtherLayout(other, jax.jit(back, out_shardings=program.state_shardings))


def _apply_init_from(config: ml_collections.ConfigDict, program: TrainProgram,
                     state: st.TrainState) -> st.TrainState:
    """``config.init_from`` over a fresh state: parameters, step and (Lightning) AdamW states."""
    opt, shardings = config.optimizer, program.state_shardings
    g, d = jax.device_get((state.g_params, state.d_params))
    init = load_init_params(
        config.init_from, program.model_cfg, g, d, config.d_steps + config.g_steps,
        adam=(opt.b1, opt.b2, opt.eps) if config.init_optimizer_from_checkpoint else None,
        weight_decay=opt.weight_decay)
    g, d = jax.device_put((init.g_params, init.d_params), (shardings.g_params, shardings.d_params))
    state = state.replace(g_params=g, d_params=d)
    if init.step and config.init_step_from_checkpoint:
        state = state.replace(step=jax.device_put(jnp.int32(init.step),
                                                  shd.replicated(program.mesh)))
    if init.g_adam is None and init.d_adam is None:
        return state
    g_opt, d_opt = (o if a is None else st.with_adam_moments(o, a.mu, a.nu, a.count) for o, a in
                    zip(jax.device_get((state.g_opt_state, state.d_opt_state)),
                        (init.g_adam, init.d_adam), strict=True))
    g_opt, d_opt = jax.device_put((g_opt, d_opt), (shardings.g_opt_state, shardings.d_opt_state))
    return state.replace(g_opt_state=g_opt, d_opt_state=d_opt)


class _Loop:
    """Phase 3: the step loop. Per step: the compiled step (dispatched, fed this process's SIGTERM
    flag) and the NaN/Inf check of the step before, which also reads whether any process had a
    SIGTERM (the step's all-reduce): all stop at the same step. Log / validation / checkpoint."""

    def __init__(self, run: _Run, ckpt: Checkpointer, state: st.TrainState,
                 latest: int | None):
        self.run, self.ckpt, self.state = run, ckpt, state
        program = run.program
        self.step = int(jax.device_get(state.step))
        self.last_good = latest  # newest step known saved (the NaN message names it)
        self.last: dict[str, float] = {}  # last logged train metrics
        self.val: dict[str, float] = {}  # last validation metrics
        self.preempted_at: int | None = None
        # clu averages of the train metrics since the last log line (merged on the devices)
        self.averages = clu_metrics.Collection.create(
            **{n: clu_metrics.Average.from_output(n) for n in METRIC_NAMES})
        self.acc: clu_metrics.Collection | None = None
        self.prev: tuple[int, dict[str, jax.Array]] | None = None  # NaN check one step behind
        self.interval_t, self.interval_steps = 0.0, 0  # start of the logged interval
        t0 = time.perf_counter()
        self.compiled = program.lower_train_step().compile()
        self.stop_flags = {flag: program.stop_flags(flag) for flag in (False, True)}
        self.flops = program.model_flops_per_step() / program.mesh.size
        self.peak = mt.peak_flops_per_device(override=run.config.peak_flops_per_device)
        _say("compiled the train step in %.1fs; %.1f model GFLOP per device per step",
             time.perf_counter() - t0, self.flops / 1e9)
        self.writer = mt.TensorboardWriter(os.path.join(run.workdir, "tensorboard")) if run.primary else None
        if run.primary and self.step == 0:
            self.writer.write_hparams(traverse_util.flatten_dict(run.config.to_dict(), sep="."))
        self.first_clip = jax.jit(functools.partial(_first_clip, program.task),
                                  out_shardings=shd.replicated(program.mesh))

    def train(self) -> None:
        """Steps until the last one or a stop; closes the checkpointer and writer."""
        run, ckpt, config = self.run, self.ckpt, self.run.config
        total = run.sched.total_steps
        preempted = False
        self.interval_t = time.perf_counter()  # step timing starts after the compile
        with (SigtermFlag("SIGTERM received: saving a checkpoint before exiting") as sigterm,
              run.program.mesh_context()):
            try:
                while self.step < total:
                    preempted = self.train_one(next(run.train_iter), sigterm.requested)
                    at_end = self.step >= total
                    if self.step % config.log_every_steps == 0 or at_end:
                        self.log_interval()
                    if run.eval_every > 0 and (self.step % run.eval_every == 0 or at_end):
                        self.val = self.validate()
                        if self.interval_steps == 0:  # keep validation out of the step timing
                            self.interval_t = time.perf_counter()
                    if self.step % config.checkpoint_every_steps == 0 or at_end or preempted:
                        self.checkpoint()
                    if preempted:
                        self.preempted_at = self.step
                        break
                with _disk_full_guard(ckpt, self.step):
                    ckpt.wait()
                if preempted:
                    _say("preempted (SIGTERM): saved step %d to %s; exiting", self.step, ckpt.directory)
            except BaseException:
                self.close(failed=True)
                raise
            self.close(failed=False)

    def train_one(self, local: dict[str, np.ndarray], sigterm: bool) -> bool:
        """One step on the process-local batch ``local``, fed this process's SIGTERM flag; checks
        the step before (done by now: the host stays one step ahead) for NaN/Inf and returns
        whether any process had a SIGTERM by then (the same answer on every process)."""
        if self.prev is None:  # the first step of this run: the data's masks
            _check_num_visible(local["mask"], self.run.program)
        batch = _device_batch(local, self.run.program.mesh)
        self.state, metrics = self.compiled(self.state, batch, self.stop_flags[sigterm])
        self.step += 1
        self.interval_steps += 1
        stop = self.prev is not None and _check_finite(*self.prev, self.ckpt, self.last_good)
        self.prev = (self.step, metrics)
        single = self.averages.single_from_model_output(**{n: metrics[n] for n in METRIC_NAMES})
        self.acc = single if self.acc is None else self.acc.merge(single)
        return stop

    def log_interval(self) -> None:
        """The console line, TensorBoard and metrics.jsonl row of the steps since the last."""
        run, step = self.run, self.step
        _check_finite(*self.prev, self.ckpt, self.last_good)
        self.last = {k: float(v) for k, v in jax.device_get(self.acc.compute()).items()}
        step_time = (time.perf_counter() - self.interval_t) / max(self.interval_steps, 1)
        clips_per_s = run.program.global_batch / step_time
        _say("%s", mt.console_line(
            step, run.sched.total_steps, self.last, clips_per_s=clips_per_s,
            step_time_s=step_time, mfu_value=mt.mfu(self.flops, step_time, self.peak),
            eta_s=step_time * (run.sched.total_steps - step)))
        if run.primary:
            perf = {"clips_per_s": clips_per_s, "step_time_s": step_time}
            self.writer.write_scalars(step, {**self.last, **perf})
            _append_jsonl(os.path.join(run.workdir, "metrics.jsonl"),
                          {"step": step, **self.last, **perf})
        self.acc, self.interval_steps, self.interval_t = None, 0, time.perf_counter()

    def checkpoint(self) -> None:
        """Starts saving this step (after checking it is finite) and the bad-record list."""
        _check_finite(*self.prev, self.ckpt, self.last_good)
        with _disk_full_guard(self.ckpt, self.step):
            if self.ckpt.save(self.step, self.state, self.run.train_iter):
                self.last_good = self.step
            bad = getattr(self.run.train_iter, "bad_records", None)  # records the pipeline skips
            if self.run.primary and bad:
                path = os.path.join(self.run.workdir, "bad_records.json")
                with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
                    json.dump({str(k): v for k, v in sorted(bad.items())}, f, indent=1)

    def validate(self) -> dict[str, float]:
        """Every metric the eval step returns, averaged over ``config.num_eval_batches`` batches
        (logged as ``val_<name>``), and a reconstruction image of the first clip."""
        run, program, cfg = self.run, self.run.program, self.run.program.model_cfg
        state, step = self.state, self.step
        it = iter(make_dataset(run.data_cfg, split=run.data_cfg.val_split,
                               global_batch_size=program.global_batch,
                               process_index=jax.process_index(),
                               process_count=jax.process_count(), seed=run.config.seed,
                               shuffle=False, repeat=True))
        n = max(1, run.config.num_eval_batches)
        acc = first = None
        for _ in range(n):
            b = _device_batch(next(it), program.mesh)
            first = b if first is None else first
            m = program.eval_step(state, b)
            acc = m if acc is None else jax.tree.map(jnp.add, acc, m)
        val = {f"val_{k}": float(v) / n for k, v in jax.device_get(acc).items()}
        video, mask, pred = jax.device_get(self.first_clip(state, first))
        if run.primary:
            image = reconstruction.reconstruction_grid(
                video, mask, pred, patch_size=cfg.patch_size, tubelet_size=cfg.tubelet_size)
            path = reconstruction.save_png(
                image, os.path.join(run.workdir, "reconstructions", f"step_{step:08d}.png"))
            self.writer.write_images(step, {"reconstruction": image})
            self.writer.write_scalars(step, val)
            _append_jsonl(os.path.join(run.workdir, "metrics.jsonl"), {"step": step, **val})
            _say("step %d validation: %s (image %s)", step,
                 " ".join(f"{k} {v:.4f}" for k, v in val.items()), path)
        return val

    def close(self, failed: bool) -> None:
        """Closes the checkpointer (waiting for its writes) and the writer; after an error
        (``failed``) a close error is only logged: the first error is the one to report."""
        try:
            self.ckpt.close()
        except Exception as e:  # noqa: BLE001
            if not failed:
                if is_disk_full(e):
                    raise _disk_full_error(self.ckpt, self.step) from None
                raise
            log.debug("checkpoint close after an error: %s", e)
        finally:
            if self.writer is not None:
                self.writer.close()


def _check_num_visible(mask: np.ndarray, program: TrainProgram) -> None:
    counts = np.asarray(mask).sum(axis=1)
    if not np.all(counts == program.num_visible):
        raise ValueError(f"data masks have {sorted(set(counts.tolist()))} visible tokens, the "
                         f"step expects {program.num_visible} "
                         f"(int({program.model_cfg.num_tokens} * (1 - mask_ratio)))")


def _first_clip(task: steps.Task, state: st.TrainState, batch: steps.Batch) -> tuple[jax.Array, ...]:
    """Clip 0 of ``batch``: its video, mask and predicted masked patches (for the image)."""
    one = {"video": batch["video"][:1], "mask": batch["mask"][:1]}
    return one["video"][0], one["mask"][0], steps.reconstruct(task, state, one)[0]


def _disk_full_error(ckpt: Checkpointer, step: int) -> CheckpointDiskFullError:
    """The one-line error of a full disk at checkpoint ``step`` (names the step kept)."""
    try:  # earlier saves still in flight finish (or fail) first
        ckpt.wait()
    except Exception as e:  # noqa: BLE001
        log.debug("checkpoint wait after a full disk: %s", e)
    try:
        done = [int(n) for n in os.listdir(ckpt.directory) if n.isdigit() and int(n) != step]
    except OSError:
        done = []
    kept = (f"kept step {max(done)} (the newest complete checkpoint)" if done
            else "no complete checkpoint is kept")
    return CheckpointDiskFullError(
        f"disk full (No space left on device) while writing checkpoint step {step} to "
        f"{ckpt.directory}; {kept}. Free space (or lower config.keep_checkpoints), then rerun "
        "the same command to resume.")


@contextlib.contextmanager
def _disk_full_guard(ckpt: Checkpointer, step: int) -> Iterator[None]:
    """Turns an ENOSPC anywhere in an exception (orbax wraps them) into one clear error."""
    try:
        yield
    except CheckpointDiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        error = _disk_full_error(ckpt, step)
        log.error("%s", error)
        raise error from None


def _append_jsonl(path: str, record: dict[str, float]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _say(msg: str, *args: Any, level: int = logging.INFO) -> None:
    """A progress message: logged, and printed on the primary process (the console view)."""
    log.log(level, msg, *args)
    if jax.process_index() == 0:
        print(msg % args if args else msg, flush=True)


def _check_finite(step: int, metrics: dict[str, jax.Array], ckpt: Checkpointer,
                  last_good: int | None) -> bool:
    """Raises NonFiniteLossError when step's metrics are not finite; else returns its ``stop``."""
    finite, stop = jax.device_get((metrics["finite"], metrics["stop"]))
    if finite:
        return bool(stop)
    values = {k: float(v) for k, v in jax.device_get(metrics).items() if k not in ("finite", "stop")}
    ckpt.wait()
    where = (f"the last good checkpoint is step {last_good} in {ckpt.directory}"
             if last_good is not None else "no checkpoint was written")
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {step}: "
        + ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
        + f"; stopping without saving ({where}). Lower config.lr.base or set "
          "config.optimizer.grad_clip, then rerun to resume from it.")
