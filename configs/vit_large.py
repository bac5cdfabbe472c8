"""MARLIN ViT-Large pretraining (the original recipe); `vit_large.py:demo` runs in minutes on a CPU."""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_base_config("marlin_vit_large_ytf")
    if common.parse_arg(arg) == "demo":
        common.apply_demo(config)
    return config
