"""Downstream evaluation: ``python -m marlin_jax.evaluate --config=configs/celebvhq_appearance_lp.py``.

A linear probe (``finetune=False``) on features from ``scripts/extract_dataset.py``, or
fine-tuning (``finetune=True``) of the ``marlin_ckpt`` encoder plus a linear head on raw clips, on
CelebV-HQ (``dataset="celebvhq"``) or CSV / JSON label files (``dataset="labels"``). The best
validation epoch is evaluated on test and written to ``<workdir>/metrics.json``.
Resuming, SIGTERM (exit 143) and multi-host runs: ``--help`` and README, "Evaluation and analysis".
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from marlin_jax.data.pipeline import default_data_config
from marlin_jax.evaluation.datasets import (
    SPLITS,
    ClipDataset,
    DatasetError,
    FeatureSet,
    LabelSet,
    load_celebvhq,
    load_features,
    load_label_file,
)
from marlin_jax.evaluation.finetune import FineTuneClassifier, make_predictor, train_finetune
from marlin_jax.evaluation.probe import make_linear_head, predict_logits, train_linear_probe
from marlin_jax.evaluation.scores import classification_metrics, format_table, per_label_auroc, save_metrics
from marlin_jax.evaluation.training import (
    CheckpointMismatchError,
    FitOptions,
    FitResult,
    Preempted,
    array_digest,
    check_identity,
    read_training_state,
    restore_best,
    set_model_params,
    split_model,
)
from marlin_jax.models import MarlinEncoder, get_config, register_model_from_config
from marlin_jax.sharding import make_mesh

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the status of a process ended by SIGTERM

# Config fields that do not define the run (locations and runtime knobs): they may change when
# a run is resumed. The data is identified by content instead (probe / finetune add a digest).
NOT_IDENTITY = ("model_name", "workdir", "skip_train", "fresh_start", "checkpoint_every_s",
                "num_threads", "mesh", "on_error", "allow_random_init", "data_path",
                "feature_dir", "marlin_ckpt", "labels.file", "labels.train", "labels.val",
                "labels.test", "labels.video_root")


def default_config() -> ml_collections.ConfigDict:
    """Every field of an evaluation config, with the original CelebV-HQ defaults (the fit's from
    :class:`FitOptions`, clip sampling from pretraining's data config)."""
    fit, data = FitOptions(), default_data_config()
    c = ml_collections.ConfigDict()
    c.model_name = "celebvhq_marlin_appearance_lp"  # names the workdir: ckpt/<model_name>
    c.backbone = "marlin_vit_base_ytf"  # registered model name (architecture of marlin_ckpt)
    c.backbone_config = ml_collections.ConfigDict()  # optional: registers `backbone` from this
    c.dataset = "celebvhq"  # "celebvhq" or "labels"
    c.task = "appearance"  # celebvhq: appearance / action; labels: binary / multiclass / multilabel
    c.finetune = False  # False: linear probe on features; True: fine-tune encoder + head
    c.temporal_reduction = "mean"  # lp: mean / max / min over the windows of a video
    c.standardize_features = False  # lp: z-score features with train statistics (not original)
    c.learning_rate = fit.learning_rate
    c.weight_decay = fit.weight_decay  # L2 penalty on the head's (and, ft, encoder's) weights (not original)
    c.weight_decay_sweep = ()  # lp: train one probe per value, keep the best on val (not orig.)
    c.batch_size = fit.batch_size
    c.epochs = fit.max_epochs  # max epochs; stops earlier when the lr decays to 1e-6 or by `patience`
    c.patience = 0  # >0: stop after this many epochs without a validation improvement
    c.monitor = fit.monitor  # validation metric selecting the checkpoint
    c.data_ratio = 1.0  # few-shot: first fraction of train and val lists (0.01, 0.1, 0.5, 1)
    c.seed = fit.seed
    c.data_path = ""  # CelebV-HQ root (celebvhq_info.json, {train,val,test}.txt, cropped/)
    c.feature_dir = ""  # lp: default <data_path>/<backbone>, as scripts/extract_dataset.py
    c.marlin_ckpt = ""  # ft: encoder checkpoint (.pt / .ckpt / marlin-jax checkpoint dir)
    c.allow_random_init = False  # ft without a checkpoint (tests only)
    c.on_error = "error"  # missing/empty inputs: "error", or "skip" and count them
    c.head_pooling = "mean"  # ft: the head reads "mean" (original) or all "tokens" (flattened)
    c.lp_ft = ml_collections.ConfigDict({  # ft: LP-FT, the head starts as a linear probe on
        "enabled": False,                  # the initial encoder's (standardised) features
        "learning_rate": 1e-2, "epochs": 200, "patience": 20, "weight_decay": 0.0})
    c.clip_frames = 0  # ft: 0 = the backbone's n_frames (16)
    c.temporal_sample_rate = data.temporal_sample_rate  # ft
    c.num_threads = 8  # ft: video decoding threads
    c.mesh = ml_collections.ConfigDict({"data": -1})  # ft: data / fsdp / tensor axis sizes
    c.workdir = ""  # default ckpt/<model_name>
    c.skip_train = False  # evaluate the checkpoint in <workdir>/checkpoints only
    c.fresh_start = False  # delete <workdir>'s checkpoints and start over (else: resume)
    c.checkpoint_every_s = 300.0  # seconds between training-state saves (0: every epoch end)
    c.labels = ml_collections.ConfigDict({
        "file": "",  # one label file with a `split` column (or use split_fractions)
        "train": "", "val": "", "test": "",  # or one label file per split
        "split_fractions": (),  # e.g. (0.6, 0.2, 0.2): seeded random split of `file`
        "class_names": (),  # allowed class / label names (others are errors)
        "video_root": "",  # where relative video paths start (default: the label file's folder)
    })
    return c


def split_by_fractions(labelset: LabelSet, fractions: tuple[float, float, float],
                       seed: int) -> dict[str, LabelSet]:
    """A seeded random train/val/test partition (for label files without a split column)."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, "
                         f"got {tuple(fractions)}")
    order = np.random.default_rng(seed).permutation(len(labelset))
    n_train, n_val = (int(round(f * len(order))) for f in fractions[:2])
    parts = np.split(order, [n_train, n_train + n_val])
    out = {}
    for name, idx in zip(SPLITS, parts, strict=True):
        if len(idx) == 0:
            raise DatasetError(f"{labelset.source}: split {name!r} is empty with fractions "
                               f"{tuple(fractions)} of {len(labelset)} samples")
        out[name] = labelset.subset(np.sort(idx))
    return out


def load_splits(config: ml_collections.ConfigDict) -> dict[str, LabelSet]:
    """train / val / test LabelSets of the configured dataset; ``data_ratio`` applies to train
    and val (as the original), never to test."""
    ratio = float(config.data_ratio)
    if config.dataset == "celebvhq":
        return {s: load_celebvhq(config.data_path, s, config.task,
                                 ratio if s != "test" else 1.0) for s in SPLITS}
    if config.dataset != "labels":
        raise ValueError(f"dataset must be 'celebvhq' or 'labels', got {config.dataset!r}")
    lc = config.labels
    kw = dict(task=config.task or None, class_names=list(lc.class_names) or None,
              video_root=lc.video_root or None)
    if lc.train and lc.val and lc.test:
        splits = {s: load_label_file(lc[s], **kw) for s in SPLITS}
    elif lc.file and lc.split_fractions:
        splits = split_by_fractions(load_label_file(lc.file, **kw), tuple(lc.split_fractions),
                                    int(config.seed))
    elif lc.file:
        splits = {s: load_label_file(lc.file, split=s, **kw) for s in SPLITS}
    else:
        raise ValueError("labels: set labels.train/val/test, or labels.file (with a 'split' "
                         "column, or labels.split_fractions)")
    heads = {(ls.task, ls.class_names) for ls in splits.values()}
    if len(heads) > 1:
        raise DatasetError(f"splits disagree on the task / classes: {sorted(heads)}; "
                           "set config.task and labels.class_names")
    return {s: (ls.take_ratio(ratio) if s != "test" and ratio < 1.0 else ls)
            for s, ls in splits.items()}


def config_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields that define a run (all but :data:`NOT_IDENTITY`), JSON-normal."""
    d = json.loads(config.to_json_best_effort())
    for name in NOT_IDENTITY:
        parent, _, leaf = name.rpartition(".")
        (d.get(parent, {}) if parent else d).pop(leaf, None)
    return d


def _fit_info(result: FitResult) -> dict[str, Any]:
    return {"best_epoch": result.best_epoch, "stop_reason": result.stop_reason,
            "epochs": len(result.history),
            "resumed_at": None if result.resumed_at is None else list(result.resumed_at),
            "history": result.history}


def fit_options(config: ml_collections.ConfigDict) -> FitOptions:
    return FitOptions(
        learning_rate=float(config.learning_rate),
        weight_decay=float(config.weight_decay),
        max_epochs=int(config.epochs),
        batch_size=int(config.batch_size),
        monitor=config.monitor,
        patience=int(config.patience) if config.patience else None,
        seed=int(config.seed),
    )


def _skip(skipped: dict[str, dict[str, str]], split: str, what: str, samples: dict[str, str],
          log: Callable[[str], None]) -> None:
    """Records (in ``skipped[split]``) and logs the samples of a split skipped for ``what``."""
    if samples:
        skipped.setdefault(split, {}).update(samples)
        log(f"{split} {what}: skipped {len(samples)} sample(s), e.g. {next(iter(samples.values()))}")


def training_runs(config: ml_collections.ConfigDict,
                  workdir: str) -> list[tuple[ml_collections.ConfigDict, str]]:
    """``(config, run directory)`` of each model the config trains: itself in ``workdir``, or one
    probe per ``weight_decay_sweep`` value in ``<workdir>/wd_<value>`` (independent identities)."""
    sweep = [float(v) for v in config.weight_decay_sweep]
    if not sweep:
        return [(config, workdir)]
    if config.finetune:
        raise ValueError("weight_decay_sweep is for linear probes; fine-tuning takes one weight_decay")
    if len(set(sweep)) != len(sweep) or min(sweep) < 0:
        raise ValueError(f"weight_decay_sweep must hold distinct values >= 0, got {sweep}")
    runs = []
    for wd in sweep:
        member = ml_collections.ConfigDict(config.to_dict())
        member.weight_decay, member.weight_decay_sweep = wd, ()
        runs.append((member, os.path.join(workdir, f"wd_{wd:g}")))
    return runs


def run_linear_probe(config, splits, workdir, log) -> dict:
    """Linear probe(s) on extracted features (the best of a ``weight_decay_sweep`` on val)."""
    if jax.process_count() > 1:
        raise ValueError("a linear probe runs in one process (an epoch takes milliseconds); "
                         "run it without --num_processes / outside the multi-host job")
    feature_dir = config.feature_dir or os.path.join(config.data_path, config.backbone)
    feats: dict[str, FeatureSet] = {
        s: load_features(feature_dir, ls, config.temporal_reduction, config.on_error)
        for s, ls in splits.items()
    }
    skipped: dict[str, dict[str, str]] = {}
    for s, fs in feats.items():
        _skip(skipped, s, "features", fs.skipped, log)
    train = splits["train"]
    candidates = []  # (val metric, weight decay, model, fit info)
    for member, run_dir in training_runs(config, workdir):
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        if config.skip_train:
            model = make_linear_head(feats["train"].x, train.num_outputs,
                                     standardize=config.standardize_features)
            set_model_params(model, restore_best(ckpt_dir, split_model(model)[1]))
            fit_info: dict[str, Any] = {"restored_from": ckpt_dir}
        else:
            model, result = train_linear_probe(
                feats["train"], feats["val"], task=train.task, num_outputs=train.num_outputs,
                options=fit_options(member), standardize=config.standardize_features,
                checkpoint_dir=ckpt_dir, state_dir=os.path.join(run_dir, "state"),
                fresh_start=bool(config.fresh_start),
                run_id={"config": config_identity(member)},
                save_every_s=float(config.checkpoint_every_s), log=log)
            fit_info = _fit_info(result)
        val = classification_metrics(predict_logits(model, feats["val"].x), feats["val"].labels,
                                     train.task)[config.monitor]
        candidates.append((float(val), float(member.weight_decay), model, fit_info))
    best = np.argmax(np.nan_to_num([c[0] for c in candidates], nan=-np.inf))  # the first of ties
    _, weight_decay, model, fit_info = candidates[best]
    if len(candidates) > 1:
        fit_info = {**fit_info, "weight_decay": weight_decay, "sweep": [
            {"weight_decay": wd, f"val_{config.monitor}": v} for v, wd, _, _ in candidates]}
        log("weight decay sweep (val " + config.monitor + "): " + ", ".join(
            f"{wd:g}: {v:.4f}" for v, wd, _, _ in candidates) + f"; selected {weight_decay:g}")
    outputs = {s: (predict_logits(model, feats[s].x), feats[s].labels) for s in ("val", "test")}
    return {**_metrics(outputs, train), "fit": fit_info, "skipped": skipped}


def _metrics(outputs: dict[str, tuple[np.ndarray, np.ndarray]], train: LabelSet) -> dict:
    """Averaged metrics per split, plus per-label AUROC for multilabel tasks."""
    out = {"metrics": {s: classification_metrics(lg, y, train.task)
                       for s, (lg, y) in outputs.items()}}
    if train.task == "multilabel":
        out["per_label_auroc"] = {s: per_label_auroc(lg, y, train.class_names)
                                  for s, (lg, y) in outputs.items()}
    return out


def run_finetune(config, splits, workdir, log) -> dict:
    """Fine-tuning on raw clips; returns the results dict."""
    skipped: dict[str, dict[str, str]] = {}
    for s in SPLITS:
        splits[s], missing = splits[s].check_videos(config.on_error)
        _skip(skipped, s, "videos", missing, log)
    if config.marlin_ckpt:
        from marlin_jax.extract import Marlin
        from marlin_jax.interop.hf import checkpoint_config

        # a checkpoint that carries its architecture loads as saved, unless backbone_config is set
        own = not len(config.backbone_config) and checkpoint_config(config.marlin_ckpt) is not None
        encoder = Marlin.from_file(None if own else config.backbone,
                                   config.marlin_ckpt).model.encoder
    elif config.allow_random_init or config.skip_train:  # skip_train restores every weight
        if not config.skip_train:
            log("WARNING: no marlin_ckpt: fine-tuning a randomly initialised encoder")
        encoder = MarlinEncoder(get_config(config.backbone), rngs=nnx.Rngs(config.seed))
    else:
        raise ValueError("fine-tuning needs config.marlin_ckpt (a .pt / .ckpt / marlin-jax "
                         "checkpoint); set allow_random_init=True to train from scratch")
    bc = encoder.config
    clip_frames = int(config.clip_frames or bc.n_frames)
    if clip_frames != bc.n_frames:
        raise ValueError(f"clip_frames {clip_frames} != backbone n_frames {bc.n_frames}")
    clips = {}
    for s, ls in splits.items():
        clips[s], unreadable = ClipDataset(ls, clip_frames, int(config.temporal_sample_rate),
                                           bc.img_size).validate(config.on_error)
        _skip(skipped, s, "unreadable videos", unreadable, log)
    train = splits["train"]
    mesh = make_mesh(dict(config.mesh))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if config.skip_train:
        model = FineTuneClassifier(encoder, train.num_outputs, rngs=nnx.Rngs(0),
                                   pooling=config.head_pooling)
        set_model_params(model, restore_best(ckpt_dir, split_model(model)[1]))
        predict = make_predictor(model, train.task, mesh=mesh,
                                 batch_size=int(config.batch_size),
                                 num_threads=int(config.num_threads))
        fit_info = {"restored_from": ckpt_dir}
    else:
        lp = config.lp_ft  # LP-FT: the probe stage's options (None: the head starts random)
        lp_ft = dataclasses.replace(
            fit_options(config), learning_rate=float(lp.learning_rate), max_epochs=int(lp.epochs),
            patience=int(lp.patience) if lp.patience else None, weight_decay=float(lp.weight_decay),
        ) if lp.enabled else None
        _, result, predict = train_finetune(
            encoder, clips["train"], clips["val"], task=train.task,
            num_outputs=train.num_outputs, options=fit_options(config), mesh=mesh,
            checkpoint_dir=ckpt_dir, state_dir=os.path.join(workdir, "state"),
            fresh_start=bool(config.fresh_start), run_id={"config": config_identity(config)},
            save_every_s=float(config.checkpoint_every_s),
            num_threads=int(config.num_threads), pooling=config.head_pooling,
            lp_ft=lp_ft, log=log)
        fit_info = _fit_info(result)
    outputs = {s: predict(clips[s]) for s in ("val", "test")}
    return {**_metrics(outputs, train), "fit": fit_info, "skipped": skipped}


def _finished_digest(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """Identifies the config's training states (run identities + where they stopped) once all
    have finished; None before."""
    states = []
    for member, run_dir in training_runs(config, workdir):
        state_dir = os.path.join(run_dir, "state")
        state = read_training_state(state_dir)
        if state is None or state["loop"]["stop_reason"] is None:
            return None
        saved_config = state["identity"].get("run", {}).get("config")
        check_identity(os.path.abspath(state_dir), {"config": saved_config},
                       {"config": config_identity(member)})
        loop = state["loop"]
        states.append([state["identity"], loop["next_epoch"], loop["best_epoch"], loop["stop_reason"]])
    return array_digest(json.dumps(states, sort_keys=True))


def _saved_results(config: ml_collections.ConfigDict, workdir: str,
                   log: Callable[[str], None]) -> dict | None:
    """``<workdir>/metrics.json`` when it belongs to this config's finished state(s), else None."""
    digest = _finished_digest(config, workdir)
    path = os.path.join(workdir, "metrics.json")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None  # not evaluated yet: fit restores the best, no training
    if digest is None or results.get("fit", {}).get("state_digest") != digest:
        return None
    log(f"{workdir}: this run already finished ({results['fit']['stop_reason']}); reporting "
        f"the saved results of {path} (fresh_start=True retrains)")
    return results


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> dict:
    """Runs one evaluation as configured (resuming an interrupted one in the same workdir);
    returns (and writes) the results. Raises Preempted when stopped by SIGTERM."""
    if len(config.backbone_config):
        register_model_from_config(config.backbone, config.backbone_config)
    workdir = config.workdir or os.path.join("ckpt", config.model_name)
    os.makedirs(workdir, exist_ok=True)
    primary = jax.process_index() == 0
    if primary and config.fresh_start and os.path.exists(os.path.join(workdir, "metrics.json")):
        os.remove(os.path.join(workdir, "metrics.json"))
    if not config.skip_train and not config.fresh_start:
        saved = _saved_results(config, workdir, log)
        if saved is not None:
            log(format_table(saved["metrics"]))
            return saved
    t0 = time.time()
    splits = load_splits(config)
    log(" ".join(f"{s}: {len(ls)}" for s, ls in splits.items()) +
        f" samples ({splits['train'].task}, {splits['train'].num_outputs} outputs)")
    runner = run_finetune if config.finetune else run_linear_probe
    results = runner(config, splits, workdir, log)
    digest = None if config.skip_train else _finished_digest(config, workdir)
    if digest is not None:
        results["fit"]["state_digest"] = digest
    results.update(model_name=config.model_name, task=splits["train"].task,
                   class_names=list(splits["train"].class_names),
                   seconds=time.time() - t0, config=config.to_dict())
    log(format_table(results["metrics"]))
    if primary:
        save_metrics(os.path.join(workdir, "metrics.json"), results)
    return results


def main(argv: list[str]) -> None:
    del argv
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:  # keep library INFO chatter (orbax) off the console
        logging.set_verbosity(logging.WARNING)
    initialize_from_flags(_DISTRIBUTED)
    try:
        results = run(_CONFIG.value, log=print if jax.process_index() == 0 else lambda line: None)
    except (Preempted, CheckpointMismatchError) as e:
        print(f"marlin-jax evaluate: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED if isinstance(e, Preempted) else 2)
    aurocs = [m.get("auroc") for m in results["metrics"].values()]  # None: NaN in metrics.json
    if not all(a is not None and np.isfinite(a) for a in aurocs):
        print("note: AUROC undefined on a split with a single class", file=sys.stderr)


if __name__ == "__main__":
    from absl import app
    from ml_collections import config_flags

    from marlin_jax.distributed import define_flags, initialize_from_flags

    _DISTRIBUTED = define_flags()
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "evaluation config file; training state is saved in <workdir>/state "
        "every checkpoint_every_s seconds (mid-epoch for fine-tuning) and one step after "
        "SIGTERM (exit 143); a rerun in the same workdir resumes at the saved batch "
        "(--config.fresh_start=True starts over)", lock_config=True)
    app.run(main)
