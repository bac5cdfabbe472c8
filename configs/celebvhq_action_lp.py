"""CelebV-HQ action (35 binary labels): linear probe on window features.

The original run `config/celebv_hq/action/celebvhq_marlin_action_lp.yaml` of MARLIN:
    python -m marlin_jax.evaluate --config=configs/celebvhq_action_lp.py \\
        --config.data_path=/data/CelebV-HQ
Extract the features first: python scripts/extract_dataset.py --data_dir=/data/CelebV-HQ \\
        --checkpoint=marlin_vit_base_ytf.encoder.pt (writes <data_path>/marlin_vit_base_ytf/*.npy).
"""

from marlin_jax.evaluate import default_config


def get_config(arg: str | None = None):
    del arg
    config = default_config()  # the original recipe; only the run differs
    config.model_name = "celebvhq_marlin_action_lp"
    config.task = "action"
    return config
