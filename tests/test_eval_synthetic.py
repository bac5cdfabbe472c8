"""End to end on synthetic labelled face videos: brief masked-reconstruction pretraining of a
ViT-tiny, dataset feature extraction, linear probe and fine-tuning through the entry points.

The videos: 300 at 64 px, tight face crops (``face_scale=1.5``) with ``strong_cues`` (an open
mouth stays open, larger eyes, a broad smile), split 180 / 60 / 60 (seeded). The encoder: 150
steps of this module's own pretraining loop (75 % random masking, pixel MSE).

What is proven (asserted):
  - the linear probe (features standardised with the training statistics, see ``LinearHead``)
    and fine-tuning reach test AUROC > 0.9 on ``pale_skin``: a global appearance attribute (as
    CelebV-HQ's / CelebA's "pale skin") computed from the ground-truth LaPa parsing, mean skin
    intensity above 150 (the renderer's skin tones form clusters with a gap there);
  - a linear probe on the same encoder's TOKEN features (``extract_dataset --keep_seq``:
    ``(T, N, D)``, flattened) reads the renderer's local labels: test AUROC > 0.9 on mouth_open
    and eyes_closed, and 0.15 above the mean-pooled probe (measured with this fixture: 0.96 /
    0.94, mean-pooled 0.61 / 0.59);
  - fine-tuning with a head on every token (``head_pooling="tokens"``) started as the token
    probe (``lp_ft``): test AUROC > 0.9 on mouth_open and eyes_closed (measured 0.95 / 0.96).
  The local-label bounds hold for this seeded fixture (300 videos, seed 0); other seeds of the
  same recipe land between 0.84 and 0.96 (below).

What is NOT proven: AUROC > 0.9 on the local labels for every seed, for mean-pooled features, or
for fine-tuning with the original mean-pooled head. Measured (test AUROC mouth_open /
eyes_closed / smiling):
  - token-feature probe through ``marlin_jax.evaluate`` (this recipe, other seeds and sizes):
    seed 1: 0.89 / 0.91 / 0.56, seed 2: 0.94 / 0.92 / 0.56, 400 videos: 0.89 / 0.81 / 0.53;
    an L2-tuned scikit-learn logistic regression on the same tokens: 0.93-0.98 / 0.82-0.94;
    the probe with ``weight_decay_sweep=(0, 1e-4, 1e-3, 1e-2, 3e-2, 0.1)`` selected on val:
    seed 0: 0.95 / 0.94, seed 1: 0.87 / 0.91, seed 2: 0.93 / 0.92, 400 videos: 0.90 / 0.85
    (the sweep's val AUROCs differ by < 0.04: the features, not over-fitting, set the limit);
    other pretraining recipes (per-patch-normalised targets, 50 % or 90 % masking, 50 steps,
    lr 5e-4; two seeds, scikit-learn probe on tokens): 0.88-0.96 / 0.77-0.96, none better on
    both seeds;
    on a random (untrained) encoder 0.92-0.94 / 0.98-0.99 (eyes 1.3x, not 1.6x, taller): the
    brief pretraining weakens the eye cue; 1000 steps of pretraining give 0.81-0.87 / 0.79-0.94;
  - mean-pooled features: 0.4-0.77 / 0.43-0.86 in every variant tried (``face_scale`` 1-2.5,
    16 or 8 px patches, 4 or 8 frames, 0-1000 pretraining steps, pixel or per-patch-normalised
    targets, faces held still, 300-1000 videos); max-pooling the tokens instead: 0.82 / 0.85 on
    a random encoder, 0.41 / 0.76 after pretraining;
  - logistic regression on 8x8-pooled, time-averaged pixels: 0.99 / 0.98 / 0.64 (the smile is
    a few pixels of lip curvature, near chance for every feature tried);
  - fine-tuning with the original mean-pooled head (Adam b1 0.5) from this fixture's encoder
    (depth 4, ~2.7 s per epoch of 180 clips on 2 CPU cores): at lr 3e-4 still at the chance
    loss after 30 epochs; at lr 1e-3 it starts to fit after ~20 epochs and then learns the
    eyes (0.90-0.93 from epoch 30 to 80) but not the mouth (0.50-0.65 while the training loss
    falls to 0.15: over-fitting); with 600 videos: 0.76-0.83 / 0.89-0.94 after 35-50 epochs
    (4.3 CPU minutes). Standardising the pooled feature before the head does not help (loss
    1-2.5, chance after 30 epochs); LP-FT with the mean-pooled head starts from a 0.59 probe and
    stays near chance in 8 epochs;
  - token-head LP-FT, other seeds / sizes: seed 1: 0.84 / 0.88, seed 2: 0.93 / 0.91, 400
    videos: 0.85 / 0.87: the probe's figures, as fine-tuning at lr 1e-5 moves little (the
    probe's training loss is ~0.1 already; at higher learning rates the 12288-input head's
    Adam steps swamp it).
Closing the gap needs pretraining long enough to make the pooled features local-cue aware
(MARLIN's regime), or a fine-tuning budget beyond a CI test.
"""

from __future__ import annotations

import csv
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from marlin_jax.evaluate import default_config, run
from marlin_jax.interop import save_marlin_checkpoint
from marlin_jax.models import MarlinModel, get_config, patchify, split_by_mask
from tests.script_utils import load_script

ROOT = Path(__file__).resolve().parent.parent
SIZE, FRAMES, NUM_VIDEOS = 64, 8, 300
BACKBONE = "eval_synthetic_vit_tiny"
SKIN = 1  # LaPa class of facial skin
PALE = 150.0  # mean skin intensity threshold, in a gap between the renderer's tone clusters


def pretrain(config, videos: np.ndarray, steps: int, batch: int = 8, seed: int = 0):
    """Masked reconstruction (75% random masking, pixel MSE on the masked tubelets), AdamW.

    videos: uint8 (V, T, H, W, 3) clips of ``config.n_frames`` frames."""
    model = MarlinModel(config, rngs=nnx.Rngs(seed), with_decoder=True, with_discriminator=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1.5e-3, 20, steps, 1e-5),
                     b1=0.9, b2=0.95, weight_decay=0.05)
    opt_state = tx.init(params)
    n = config.num_tokens
    k = n // 4

    @jax.jit
    def step(params, opt_state, x, key):
        mask = jnp.argsort(jax.random.uniform(key, (x.shape[0], n)), axis=1) < k

        def loss_fn(p):
            video = x.astype(jnp.float32) / 255.0
            pred = nnx.merge(graphdef, p, rest)(video, mask, k)
            _, masked = split_by_mask(mask, k)
            target = patchify(video, config.patch_size, config.tubelet_size)
            return jnp.mean((pred - jnp.take_along_axis(target, masked[..., None], 1)) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for i in range(steps):
        x = jnp.asarray(videos[rng.integers(0, len(videos), batch)])
        params, opt_state, loss = step(params, opt_state, x, jax.random.key(i))
        losses.append(float(loss))
    nnx.update(model, params)
    return model, losses


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Videos + 4-label csv, a briefly pretrained ViT-tiny checkpoint, extracted features."""
    from marlin_jax.data.synthetic import write_video_dataset
    from marlin_jax.extract import Marlin
    from marlin_jax.models import register_model
    from marlin_jax.video_io import read_frames

    root = tmp_path_factory.mktemp("synthetic_eval")
    write_video_dataset(root, NUM_VIDEOS, num_frames=16, size=SIZE, seed=0, with_parsing=True,
                        face_scale=1.5, strong_cues=True)
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    skin = []
    for row in rows:
        name = Path(row["path"]).stem
        frames = read_frames(root / "videos" / row["path"])
        parsing = np.load(root / "parsing" / f"{name}.npy")
        skin.append(frames[parsing[: len(frames)] == SKIN].mean())
    with open(root / "pale_skin.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for row, s in zip(rows, skin, strict=True):
            w.writerow([row["path"], int(s > PALE)])

    config = register_model(BACKBONE, get_config("marlin_vit_tiny").replace(
        img_size=SIZE, n_frames=FRAMES), overwrite=True)
    clips = np.stack([read_frames(p)[: FRAMES * 2 : 2]
                      for p in sorted((root / "videos").glob("*.mp4"))])
    model, losses = pretrain(config, clips, steps=150)
    ckpt = save_marlin_checkpoint(root / "pretrained", model, overwrite=True)

    marlin = Marlin.from_file(BACKBONE, ckpt)
    ext = load_script("extract_dataset")
    for folder, keep_seq in (("features", False), ("token_features", True)):
        summary = ext.extract_dataset(
            lambda c, keep_seq=keep_seq: marlin.extract_features(c, keep_seq=keep_seq),
            ext.list_videos(root / "videos"), root / folder, clip_frames=FRAMES, size=SIZE,
            sample_rate=2, stride=FRAMES, batch_size=16, progress=False)
        assert len(summary["written"]) == NUM_VIDEOS and not summary["failed"]
    return {"root": root, "ckpt": ckpt, "losses": losses}


def synthetic_config(data, workdir: Path, finetune: bool, task: str,
                     features: str = "features"):
    """The renderer's three labels (``task="multilabel"``) or pale_skin (``"binary"``); the
    probe reads mean-pooled ``features`` or the ``token_features`` ``(T, N, D)``."""
    c = default_config()
    c.model_name = f"synthetic_{task}_{'ft' if finetune else 'lp'}"
    c.backbone = BACKBONE
    c.dataset, c.task = "labels", task
    c.labels.file = str(data["root"] / ("labels.csv" if task == "multilabel" else
                                        "pale_skin.csv"))
    c.labels.video_root = str(data["root"] / "videos")
    c.labels.split_fractions = (0.6, 0.2, 0.2)
    c.feature_dir = str(data["root"] / features)
    c.workdir = str(workdir)
    c.finetune = finetune
    c.batch_size = 16
    c.num_threads = 2
    if finetune:
        c.marlin_ckpt = str(data["ckpt"])
        c.learning_rate, c.epochs, c.patience = 1e-3, 8, 4
    else:
        c.learning_rate, c.epochs, c.patience = 1e-2, 300, 40
        c.standardize_features = True
    return c


@pytest.mark.slow
def test_pretraining_reduces_reconstruction_loss(synthetic):
    losses = synthetic["losses"]
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])


@pytest.mark.slow
def test_linear_probe_on_pretrained_features(synthetic, tmp_path):
    results = run(synthetic_config(synthetic, tmp_path / "pale", False, "binary"),
                  log=lambda s: None)
    print("linear probe, pale_skin:", results["metrics"])
    assert results["metrics"]["test"]["n"] == 60
    assert results["metrics"]["test"]["auroc"] > 0.9
    # the renderer's local face labels: evaluated and recorded per label (see module docstring)
    face = run(synthetic_config(synthetic, tmp_path / "face", False, "multilabel"),
               log=lambda s: None)
    print("linear probe, face labels:", face["per_label_auroc"]["test"])
    assert set(face["per_label_auroc"]["test"]) == {"mouth_open", "eyes_closed", "smiling"}
    assert all(np.isfinite(v) for v in face["per_label_auroc"]["test"].values())
    # the same encoder's token features (keep_seq) carry the local cues that mean-pooling loses
    tokens = run(synthetic_config(synthetic, tmp_path / "tokens", False, "multilabel",
                                  "token_features"), log=lambda s: None)
    print("token linear probe, face labels:", tokens["per_label_auroc"]["test"])
    for label in ("mouth_open", "eyes_closed"):
        auroc, pooled = (r["per_label_auroc"]["test"][label] for r in (tokens, face))
        assert auroc > 0.9 and auroc > pooled + 0.15, (label, auroc, pooled)


@pytest.mark.slow
def test_finetune_from_pretrained_checkpoint(synthetic, tmp_path):
    results = run(synthetic_config(synthetic, tmp_path / "pale", True, "binary"),
                  log=lambda s: None)
    print("fine-tuning, pale_skin:", results["metrics"])
    assert results["metrics"]["test"]["auroc"] > 0.9
    # the local labels: a head on every token, started as the token probe (LP-FT)
    config = synthetic_config(synthetic, tmp_path / "face", True, "multilabel")
    config.head_pooling, config.lp_ft.enabled = "tokens", True
    config.lp_ft.epochs, config.lp_ft.patience = 300, 40  # as the token probe above
    config.learning_rate, config.epochs = 1e-5, 6  # 12288 head inputs: Adam steps stay small
    logs = []
    face = run(config, log=logs.append)
    print("fine-tuning (tokens, LP-FT), face labels:", face["per_label_auroc"]["test"])
    assert any(line.startswith("LP-FT: head initialised") for line in logs)
    for label in ("mouth_open", "eyes_closed"):
        assert face["per_label_auroc"]["test"][label] > 0.9, label
