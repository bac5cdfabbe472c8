"""The MARLIN pretraining loop: data, mesh, sharded state, jitted G+D steps, checkpoints,
metrics, validation and reconstruction images. Entry point :func:`train_and_evaluate`.

Runs unchanged on one CPU, one GPU, several GPUs and multi-host pods: every process reads its own
shard of the data (``jax.process_index()``), batches are assembled into global arrays sharded
over ``data x fsdp``, parameters and optimiser states follow :data:`marlin_jax.sharding.MARLIN_RULES`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
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
from flax import nnx

from marlin_jax import sharding as shd
from marlin_jax.data import make_dataset, make_source
from marlin_jax.distributed import any_process
from marlin_jax.interop.checkpoints import CONFIG_FILE, write_config_file
from marlin_jax.interop.optimizer_state import (
    AdamMoments,
    lightning_adam_moments,
    read_lightning_checkpoint,
)
from marlin_jax.models import MarlinConfig, MarlinModel, is_stacked, stack_layers, unstack_layers
from marlin_jax.models.config import config_from_json_file
from marlin_jax.preemption import PreemptedError, SigtermFlag
from marlin_jax.train import metrics as mt
from marlin_jax.train import reconstruction, steps
from marlin_jax.train import state as st
from marlin_jax.train.checkpointing import (
    Checkpointer,
    CheckpointLayoutError,
    OtherLayout,
    is_disk_full,
)
from marlin_jax.train.program import (
    Schedule,
    TrainProgram,
    build_program,
    model_config,
    schedule_from_config,
)

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
    """The workdir holds the checkpoints of another run (model shape, clip geometry, optimiser
    layout)."""


class CheckpointDiskFullError(OSError):
    """The disk filled up while a checkpoint was written; the previous checkpoint is kept."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


# ----------------------------------------------------------------------------- configuration


def resolve_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The data config, with the synthetic dataset when none is configured (said loudly)."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    if not data.source:
        log.warning("No dataset configured (config.data.source is empty): training on the "
                    "built-in synthetic face-video dataset. For real data set e.g. "
                    "--config.data.source=ytf --config.data.root_dir=/path/to/YouTubeFaces "
                    "(or tfds / videos).")
        if jax.process_index() == 0:
            print("marlin-jax: no dataset configured -> using the built-in synthetic face "
                  "videos (set --config.data.source and --config.data.root_dir for real data)",
                  flush=True)
        data.source = "synthetic"
    return data


def make_schedule(config: ml_collections.ConfigDict, data: ml_collections.ConfigDict) -> Schedule:
    """Steps and learning rates of the run; counts the train split only when
    ``config.steps_per_epoch`` is not set."""
    size = None
    if int(config.steps_per_epoch) <= 0:
        size = len(make_source(data, data.train_split))
    return schedule_from_config(config, size)


# ----------------------------------------------------------------------------- initialisation


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
    checkpoint lacks, e.g. the critic of a VideoMAE model, stay freshly initialised).

    For an original-trainer Lightning ``.ckpt``: ``step`` = the batches it had trained,
    ``global_step // updates_per_batch`` (manual optimisation counts every optimiser step,
    ``d_steps + g_steps`` per batch), else 0; with ``adam = (b1, b2, eps)`` also its two AdamW
    states (moments + step, mapped like the weights; refused with an error naming the file when
    they do not fit the model or those hyper-parameters; a warning and fresh moments when the
    file has none). Not restorable: the original data loader's position.

    Fresh parameters in the stacked layout (``scan_layers``) are merged in the per-layer layout
    of checkpoints and returned stacked again, the AdamW moments too.
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


# ----------------------------------------------------------------------------- run identity


def run_identity(model_cfg: MarlinConfig, config: Mapping[str, Any]) -> dict[str, Any]:
    """What a restore depends on, as flat ``{field: value}``: the model's shape and clip geometry
    (``model.*``, from the resolved MarlinConfig) and the optimiser-state layout
    (``optimizer.grad_clip > 0`` adds a clipping stage). Not the block layout: a checkpoint
    written with the other ``scan_layers`` is converted on restore (:func:`other_block_layout`)."""
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
            model_cfg = config_from_json_file(model_path)
        except ValueError as e:
            raise RunMismatchError(str(e)) from None
        return run_identity(model_cfg, config)
    model_cfg = _model_config_of(config)  # a workdir of a version without marlin_config.json
    if model_cfg is not None:
        return run_identity(model_cfg, config)
    return {k: v for k, v in run_identity(MarlinConfig(), config).items()
            if not k.startswith("model.")}


def _model_config_of(config: Mapping[str, Any]) -> MarlinConfig | None:
    """The MarlinConfig a saved run config (``config.json``) resolves to; None when it cannot
    tell (no model or data section, a model name not registered here)."""
    if not isinstance(config.get("model"), dict) or not isinstance(config.get("data"), dict):
        return None
    try:
        return model_config(ml_collections.ConfigDict(config))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _has_checkpoints(workdir: str) -> bool:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))


def check_run_identity(workdir: str, current: Mapping[str, Any], this_run: str = "") -> None:
    """Refuses (RunMismatchError naming the workdir and every differing field, old vs new) to
    train in a workdir whose checkpoints belong to another run. Reads only. ``this_run``: a short
    description of the current run for the message."""
    if not _has_checkpoints(workdir):
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
    """``config.fresh_start``: moves everything in ``workdir`` (but earlier ``previous-*``
    folders) into a new ``workdir/previous-<YYYYmmdd-HHMMSS>/``; returns it (None: nothing to
    move). Nothing is deleted; the moved folder stays a readable checkpoint."""
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
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _device_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    return shd.global_batch({"video": local["video"], "mask": local["mask"]}, mesh)


# ----------------------------------------------------------------------------- the run, in phases
# train_and_evaluate = setup -> restore or init -> loop -> finish; each phase is one function
# (the loop one class) that the next receives its results from.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (resuming from ``workdir`` when it holds checkpoints) and returns the last logged
    train metrics plus ``val_*`` metrics and ``step``. Raises :class:`PreemptedError` after
    saving on SIGTERM, :class:`RunMismatchError`, :class:`NonFiniteLossError`,
    :class:`CheckpointDiskFullError`."""
    run = _setup(config, workdir)
    ckpt, state, latest = _restore_or_init(run)
    try:
        loop = _Loop(run, ckpt, state, latest)
    except BaseException:
        ckpt.close()
        raise
    loop.train()
    return _finish(run, loop)


@dataclasses.dataclass
class _Run:
    """What the phases share: the resolved config, the mesh and compiled program, the data."""

    config: ml_collections.ConfigDict
    workdir: str
    primary: bool
    say: _Say
    data_cfg: ml_collections.ConfigDict
    sched: Schedule
    program: TrainProgram
    train_iter: Any
    eval_every: int


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Run:
    """Phase 1: mesh, schedule, program, the workdir (moved aside or checked to hold this run),
    the training data and whether validation can run. Writes nothing but ``fresh_start``'s move."""
    workdir = os.path.abspath(workdir)
    primary = jax.process_index() == 0
    say = _Say(primary)
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
            say("fresh_start: moved the previous contents of %s to %s; starting over", workdir,
                moved)
    check_run_identity(workdir, run_identity(model_cfg, resolved.to_dict()),
                       f"model {config.model.name}")
    os.makedirs(workdir, exist_ok=True)
    say("model %s (%s compute, %s attention, data %s), mesh %s, %d devices / %d processes, "
        "batch %d, %d steps (%d/epoch), warm-up %d, lr %.3g -> %.3g, %d of %d tokens visible",
        config.model.name, jnp.dtype(program.dtype).name, program.attention_impl or "xla",
        data_cfg.source, dict(mesh.shape), jax.device_count(), jax.process_count(),
        program.global_batch, sched.total_steps, sched.steps_per_epoch, sched.warmup_steps,
        sched.base_lr, sched.min_lr, program.num_visible, model_cfg.num_tokens)
    say("parameters: generator %.1fM, critic %.1fM",
        st.count_params(program.abstract_state.g_params) / 1e6,
        st.count_params(program.abstract_state.d_params) / 1e6)
    train_ds = make_dataset(data_cfg, split=data_cfg.train_split,
                            global_batch_size=program.global_batch,
                            process_index=jax.process_index(),
                            process_count=jax.process_count(), seed=config.seed)
    eval_every = int(config.eval_every_steps)
    if eval_every > 0:
        try:
            make_source(data_cfg, data_cfg.val_split)
        except (OSError, ValueError) as e:
            log.warning("validation disabled: %s", e)
            say("WARNING: no validation split %r (%s): validation and reconstruction images "
                "are off; set --config.data.val_split or --config.eval_every_steps=0",
                data_cfg.val_split, e)
            eval_every = 0
    return _Run(config, workdir, primary, say, data_cfg, sched, program, iter(train_ds),
                eval_every)


def _restore_or_init(run: _Run) -> tuple[Checkpointer, st.TrainState, int | None]:
    """Phase 2: the newest readable checkpoint (in either block layout: converted on the
    devices), else a fresh state (over which ``config.init_from`` is loaded); then the run's
    metadata. Returns the open checkpointer, the state and the restored step (None: fresh)."""
    config, program = run.config, run.program
    ckpt = Checkpointer(os.path.join(run.workdir, "checkpoints"),
                        max_to_keep=config.keep_checkpoints, async_save=config.async_checkpointing)
    try:
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
            run.say("resuming from %s step %d", ckpt.directory, latest)
        else:
            state = shd.sharded_init(program.init_fn, program.mesh)
            if config.init_from:
                state = _apply_init_from(config, program, state)
    except BaseException:
        ckpt.close()
        raise
    if run.primary:  # only now that the workdir's checkpoints are known to fit this run
        _write_run_metadata(run.workdir, config, program.model_cfg)
        start = int(jax.device_get(state.step))  # rows of later steps are rerun: keep each once
        dropped = mt.drop_rows_after(os.path.join(run.workdir, "metrics.jsonl"), start)
        if dropped:
            log.info("metrics.jsonl: dropped %d rows after step %d (rerun from it)", dropped,
                     start)
    return ckpt, state, latest


def other_block_layout(program: TrainProgram) -> OtherLayout:
    """The run's train state with its blocks in the other layout (per-layer if the run stacks
    them with ``scan_layers``, else stacked), sharded by the same rules, and the jitted
    conversion back to the run's layout (params and both AdamW states: the moments follow the
    params' structure). Runs on the sharded arrays: nothing is gathered to a host; the layer
    axis is never sharded, so each device stacks / slices its own shards."""
    stacked = is_stacked(program.abstract_state)
    to_other, back = (unstack_layers, stack_layers) if stacked else (stack_layers, unstack_layers)
    plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), program.abstract_state)
    other = shd.abstract_with_shardings(jax.eval_shape(to_other, plain), program.mesh)
    return OtherLayout(other, jax.jit(back, out_shardings=program.state_shardings))


def _apply_init_from(config: ml_collections.ConfigDict, program: TrainProgram,
                     state: st.TrainState) -> st.TrainState:
    """``config.init_from`` over a fresh state: parameters, the step and (Lightning ``.ckpt``)
    both AdamW states, placed with the state's shardings."""
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
    g_opt, d_opt = jax.device_get((state.g_opt_state, state.d_opt_state))
    if init.g_adam is not None:
        g_opt = st.with_adam_moments(g_opt, init.g_adam.mu, init.g_adam.nu, init.g_adam.count)
    if init.d_adam is not None:
        d_opt = st.with_adam_moments(d_opt, init.d_adam.mu, init.d_adam.nu, init.d_adam.count)
    g_opt, d_opt = jax.device_put((g_opt, d_opt), (shardings.g_opt_state, shardings.d_opt_state))
    return state.replace(g_opt_state=g_opt, d_opt_state=d_opt)


class _Loop:
    """Phase 3: the step loop, from the restored (or fresh) state to the last step or a stop.

    Per step: one compiled step (dispatched; the host does not wait on it), the NaN/Inf check of
    the step before, the SIGTERM flag (agreed across processes every
    ``preemption_check_every_steps``: :meth:`agree_on_sigterm`); on log / validation /
    checkpoint steps also those.
    Every process stops and saves at the same step."""

    def __init__(self, run: _Run, ckpt: Checkpointer, state: st.TrainState,
                 latest: int | None):
        self.run, self.ckpt, self.state = run, ckpt, state
        program = run.program
        self.step = int(jax.device_get(state.step))
        self.last_good = latest  # newest step known saved (the NaN message names it)
        self.last: dict[str, float] = {}  # last logged train metrics
        self.val: dict[str, float] = {}  # last validation metrics
        self.preempted_at: int | None = None
        self.acc: Any = None  # metrics merged since the last log line
        self.prev: tuple[int, dict[str, jax.Array]] | None = None  # NaN check one step behind
        self.interval_t, self.interval_steps = 0.0, 0  # start of the logged interval
        t0 = time.perf_counter()
        self.compiled = program.lower_train_step().compile()
        self.flops = program.model_flops_per_step() / program.mesh.size
        self.peak = mt.peak_flops_per_device(override=run.config.peak_flops_per_device)
        run.say("compiled the train step in %.1fs; %.1f model GFLOP per device per step",
                time.perf_counter() - t0, self.flops / 1e9)
        self.writer = mt.create_writer(os.path.join(run.workdir, "tensorboard"),
                                       active=run.primary)
        if run.primary and self.step == 0:
            self.writer.write_hparams(_flatten(run.config.to_dict()))
        self.collection = mt.average_collection(METRIC_NAMES)
        self.validate = _Validator(run, self.writer)

    def train(self) -> None:
        """Steps until the last one or a stop; closes the checkpointer and writer."""
        run, ckpt, config = self.run, self.ckpt, self.run.config
        total = run.sched.total_steps
        failed = False
        self.interval_t = time.perf_counter()  # step timing starts after the compile
        with (SigtermFlag("SIGTERM received: saving a checkpoint before exiting") as sigterm,
              run.program.mesh_context()):
            check_every = max(1, int(config.get("preemption_check_every_steps", 5)))
            try:
                while self.step < total:
                    self.train_one(next(run.train_iter))
                    at_end = self.step >= total
                    if self.step % config.log_every_steps == 0 or at_end:
                        self.log_interval()
                    if run.eval_every > 0 and (self.step % run.eval_every == 0 or at_end):
                        self.val = self.validate(self.state, self.step)
                        if self.interval_steps == 0:  # keep validation out of the step timing
                            self.interval_t = time.perf_counter()
                    preempted = self.agree_on_sigterm(sigterm.requested, check_every, at_end)
                    if self.step % config.checkpoint_every_steps == 0 or at_end or preempted:
                        self.checkpoint()
                    if preempted:
                        with _disk_full_guard(ckpt, self.step):
                            ckpt.wait()
                        run.say("preempted (SIGTERM): saved step %d to %s; exiting", self.step,
                                ckpt.directory)
                        self.preempted_at = self.step
                        break
                with _disk_full_guard(ckpt, self.step):
                    ckpt.wait()
            except BaseException:
                failed = True
                raise
            finally:
                self.close(failed)

    def agree_on_sigterm(self, requested: bool, every: int, at_end: bool) -> bool:
        """Whether any process received SIGTERM: at once for one process; with several, every
        ``every`` steps, agreed by one all-gather issued after this step and its metrics are
        done, so that it never runs beside the step's own collectives (on CPU, collectives of
        two computations in flight at once can pair up differently across processes and hang)."""
        if jax.process_count() == 1:
            return bool(requested)
        if self.step % every and not at_end:
            return False
        jax.block_until_ready((self.prev[1], self.acc))
        return any_process(requested)[0]

    def train_one(self, local: dict[str, np.ndarray]) -> None:
        """One step on the process-local batch ``local``; checks the step before for NaN/Inf."""
        if self.prev is None:  # the first step of this run: the data's masks
            _check_num_visible(local["mask"], self.run.program)
        self.state, metrics = self.compiled(self.state, _device_batch(local, self.run.program.mesh))
        self.step += 1
        self.interval_steps += 1
        if self.prev is not None:  # one step behind: the host never waits on the current step
            _check_finite(*self.prev, self.ckpt, self.last_good)
        self.prev = (self.step, metrics)
        single = self.collection.single_from_model_output(**{n: metrics[n] for n in METRIC_NAMES})
        self.acc = single if self.acc is None else self.acc.merge(single)

    def log_interval(self) -> None:
        """The console line, TensorBoard and metrics.jsonl row of the steps since the last."""
        run, step = self.run, self.step
        _check_finite(*self.prev, self.ckpt, self.last_good)
        self.last = {k: float(v) for k, v in jax.device_get(self.acc.compute()).items()}
        step_time = (time.perf_counter() - self.interval_t) / max(self.interval_steps, 1)
        clips_per_s = run.program.global_batch / step_time
        run.say("%s", mt.console_line(
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
            if self.ckpt.save(self.step, self.state, self.run.train_iter, force=True):
                self.last_good = self.step
            _write_bad_records(self.run.workdir, self.run.train_iter, self.run.primary)

    def close(self, failed: bool) -> None:
        """Closes the checkpointer (waiting for its writes) and the metric writer. After an
        error (``failed``) a close error is only logged: the first error is the one to report."""
        try:
            self.ckpt.close()
        except Exception as e:  # noqa: BLE001
            if not failed:
                if is_disk_full(e):
                    raise _disk_full_error(self.ckpt, self.step) from None
                raise
            log.debug("checkpoint close after an error: %s", e)
        finally:
            self.writer.flush()
            self.writer.close()


def _check_num_visible(mask: np.ndarray, program: TrainProgram) -> None:
    counts = np.asarray(mask).sum(axis=1)
    if not np.all(counts == program.num_visible):
        raise ValueError(f"data masks have {sorted(set(counts.tolist()))} visible tokens, the "
                         f"step expects {program.num_visible} "
                         f"(int({program.model_cfg.num_tokens} * (1 - mask_ratio)))")


class _Validator:
    """Validation at a step: every metric the eval step returns, averaged over
    ``config.num_eval_batches`` batches (logged as ``val_<name>``), and a reconstruction image of
    the first clip."""

    def __init__(self, run: _Run, writer: Any):
        self.run, self.writer = run, writer
        program = run.program
        repl = shd.replicated(program.mesh)

        @jax.jit  # outputs replicated below
        def recon_sample(s, b):  # sample 0, replicated so that the primary can draw it
            one = {"video": b["video"][:1], "mask": b["mask"][:1]}
            out = one["video"][0], one["mask"][0], steps.reconstruct(program.task, s, one)[0]
            return jax.lax.with_sharding_constraint(out, repl)

        self.recon_sample = recon_sample

    def __call__(self, state: st.TrainState, step: int) -> dict[str, float]:
        run, program, cfg = self.run, self.run.program, self.run.program.model_cfg
        val_ds = make_dataset(run.data_cfg, split=run.data_cfg.val_split,
                              global_batch_size=program.global_batch,
                              process_index=jax.process_index(),
                              process_count=jax.process_count(), seed=run.config.seed,
                              shuffle=False, repeat=True)
        it = iter(val_ds)
        n = max(1, run.config.num_eval_batches)
        acc = first = None
        for _ in range(n):
            b = _device_batch(next(it), program.mesh)
            first = b if first is None else first
            m = program.eval_step(state, b)
            acc = m if acc is None else jax.tree.map(jnp.add, acc, m)
        val = {f"val_{k}": float(v) / n for k, v in jax.device_get(acc).items()}
        video, mask, pred = jax.device_get(self.recon_sample(state, first))
        if run.primary:
            image = reconstruction.reconstruction_grid(
                video, mask, pred, patch_size=cfg.patch_size, tubelet_size=cfg.tubelet_size)
            path = reconstruction.save_png(
                image, os.path.join(run.workdir, "reconstructions", f"step_{step:08d}.png"))
            self.writer.write_images(step, {"reconstruction": image})
            self.writer.write_scalars(step, val)
            _append_jsonl(os.path.join(run.workdir, "metrics.jsonl"), {"step": step, **val})
            run.say("step %d validation: %s (image %s)", step,
                    " ".join(f"{k} {v:.4f}" for k, v in val.items()), path)
        return val


def _finish(run: _Run, loop: _Loop) -> dict[str, float]:
    """Phase 4: raises PreemptedError after a SIGTERM stop, else prints and returns the summary:
    the last logged train metrics, the last validation metrics and ``step``."""
    if loop.preempted_at is not None:
        raise PreemptedError(loop.preempted_at, loop.ckpt.directory)
    summary = {**loop.last, **loop.val, "step": float(loop.step)}
    print(f"marlin-jax: process {jax.process_index()} finished at step {loop.step}: "
          + " ".join(f"{k}={v:.6g}" for k, v in sorted(summary.items()) if k != "step"),
          flush=True)
    return summary


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


def _write_run_metadata(workdir: str, config: ml_collections.ConfigDict,
                        model_cfg: MarlinConfig) -> None:
    """``config.json`` (the run's config) and ``marlin_config.json`` (the model, which makes the
    workdir a checkpoint for ``Marlin.from_file`` / convert). Written after the restore, so that a
    refused or failed start leaves another run's metadata as it was."""
    with open(os.path.join(workdir, RUN_CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    write_config_file(workdir, model_cfg)


def _write_bad_records(workdir: str, data_iter: Any, primary: bool) -> None:
    """``<workdir>/bad_records.json``: the unreadable records the data pipeline skips (also in
    each checkpoint's iterator state), for the user to fix or remove."""
    bad = getattr(data_iter, "bad_records", None)
    if not primary or not bad:
        return
    path = os.path.join(workdir, "bad_records.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({str(k): v for k, v in sorted(bad.items())}, f, indent=1)
    os.replace(tmp, path)


def _append_jsonl(path: str, record: dict[str, float]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class _Say:
    """Progress messages: logged, and printed on the primary process (the console view)."""

    def __init__(self, primary: bool):
        self.primary = primary

    def __call__(self, msg: str, *args: Any) -> None:
        log.info(msg, *args)
        if self.primary:
            print(msg % args if args else msg, flush=True)


def _check_finite(step: int, metrics: dict[str, jax.Array], ckpt: Checkpointer,
                  last_good: int | None) -> None:
    if bool(jax.device_get(metrics["finite"])):
        return
    values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
    ckpt.wait()
    where = (f"the last good checkpoint is step {last_good} in {ckpt.directory}"
             if last_good is not None else "no checkpoint was written")
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {step}: "
        + ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
        + f"; stopping without saving ({where}). Lower config.lr.base or set "
          "config.optimizer.grad_clip, then rerun to resume from it.")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out

