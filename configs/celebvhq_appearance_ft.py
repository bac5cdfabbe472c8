"""CelebV-HQ appearance (40 binary labels): fine-tuning (encoder + linear head).

The original run `config/celebv_hq/appearance/celebvhq_marlin_appearance_ft.yaml` of MARLIN:
    python -m marlin_jax.evaluate --config=configs/celebvhq_appearance_ft.py \\
        --config.data_path=/data/CelebV-HQ --config.marlin_ckpt=marlin_vit_base_ytf.encoder.pt
Few-shot: --config.data_ratio=0.1 (first 10% of the train and val lists).
"""

from marlin_jax.evaluate import default_config


def get_config(arg: str | None = None):
    del arg
    config = default_config()  # the original recipe; only the run differs
    config.model_name = "celebvhq_marlin_appearance_ft"
    config.task = "appearance"
    config.finetune = True
    return config
