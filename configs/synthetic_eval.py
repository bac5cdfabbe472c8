"""Linear probe (``:lp``) or fine-tuning (``:ft``) on synthetic labelled face videos.

The videos and their labels (mouth_open, eyes_closed, smiling) come from
``marlin_jax.data.synthetic``; a seeded 60/20/20 split of ``labels.csv`` gives train/val/test:

    python -c "from marlin_jax.data.synthetic import write_video_dataset as w; \\
        w('data/synthetic_eval', 300, num_frames=16, size=64, with_parsing=False, \\
          face_scale=1.5, strong_cues=True)"
    python scripts/extract_dataset.py --video_dir=data/synthetic_eval/videos \\
        --output_dir=data/synthetic_eval/features --model=marlin_vit_tiny_synthetic \\
        --checkpoint=<marlin-jax checkpoint dir of a ViT-tiny at 64 px, 8 frames>
    python -m marlin_jax.evaluate --config=configs/synthetic_eval.py:lp
    python -m marlin_jax.evaluate --config=configs/synthetic_eval.py:ft --config.marlin_ckpt=...

The recipe runs end to end, but what it measures depends on the features: with a ViT-tiny
pretrained for a CPU-sized budget (a few hundred steps) the mean-pooled features leave the
renderer's local labels near chance (test AUROC about 0.4-0.75, probe and fine-tuning alike),
while the token features (``scripts/extract_dataset.py --keep_seq``, probed on every token) reach
about 0.8-0.96 on mouth_open and eyes_closed; a global appearance label is learnt either way
(AUROC > 0.9). Fine-tuning reads the local labels likewise with a head on every token started
as the token probe (``--config.head_pooling=tokens --config.lp_ft.enabled=True
--config.learning_rate=1e-5``). tests/test_eval_synthetic.py asserts this and lists the
measurements.
"""

from marlin_jax.evaluate import default_config

ROOT = "data/synthetic_eval"


def get_config(arg: str | None = "lp"):
    mode = arg or "lp"
    if mode not in ("lp", "ft"):
        raise ValueError(f"configs/synthetic_eval.py:<lp|ft>, got {arg!r}")
    config = default_config()
    config.model_name = f"synthetic_{mode}"
    config.backbone = "marlin_vit_tiny_synthetic"
    config.backbone_config = {"name": "marlin_vit_tiny", "img_size": 64, "n_frames": 8}
    config.dataset = "labels"
    config.task = "multilabel"
    config.labels.file = f"{ROOT}/labels.csv"
    config.labels.video_root = f"{ROOT}/videos"
    config.labels.split_fractions = (0.6, 0.2, 0.2)
    config.labels.class_names = ("mouth_open", "eyes_closed", "smiling")
    config.feature_dir = f"{ROOT}/features"
    config.finetune = mode == "ft"
    config.learning_rate = 1e-2 if mode == "lp" else 1e-3
    config.standardize_features = mode == "lp"
    config.batch_size = 16
    config.epochs = 200
    config.patience = 20
    return config
