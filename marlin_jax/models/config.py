"""Model hyper-parameters and the registry of named MARLIN models.

The released models (`marlin_vit_{small,base,large}_ytf`) use the values of marlin-pytorch 0.3.4.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import yaml

RELEASE_URL = "https://github.com/ControlNet/MARLIN/releases/download/model_v1/{name}.{part}.pt"


@dataclasses.dataclass(frozen=True)
class MarlinConfig:
    """Architecture of a MARLIN model (encoder, decoder and discriminator)."""

    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 384
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    img_size: int = 224
    patch_size: int = 16
    n_frames: int = 16
    tubelet_size: int = 2
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    norm_layer: str = "LayerNorm"
    init_values: float = 0.0
    in_channels: int = 3
    layer_norm_eps: float = 1e-5
    downloadable: bool = False

    def __post_init__(self):
        if self.norm_layer != "LayerNorm":
            raise ValueError(f"only norm_layer='LayerNorm' is supported, got {self.norm_layer!r}")
        if self.img_size % self.patch_size or self.n_frames % self.tubelet_size:
            raise ValueError(f"img_size {self.img_size} / n_frames {self.n_frames} must be multiples of "
                             f"patch_size {self.patch_size} / tubelet_size {self.tubelet_size}")
        for prefix in ("encoder", "decoder"):
            dim, heads = getattr(self, f"{prefix}_embed_dim"), getattr(self, f"{prefix}_num_heads")
            if dim % heads:
                raise ValueError(f"{prefix}_embed_dim {dim} is not divisible by {heads} heads")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (t, h, w): (8, 14, 14) for a 16x224x224 clip."""
        n = self.img_size // self.patch_size
        return (self.n_frames // self.tubelet_size, n, n)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def patch_dim(self) -> int:
        """Pixels per token: C * pt * ph * pw (1536 for the released models)."""
        return self.in_channels * self.tubelet_size * self.patch_size**2

    @property
    def discriminator_hidden(self) -> int:
        return int(self.decoder_embed_dim * self.mlp_ratio)

    def replace(self, **changes: Any) -> MarlinConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name for f in dataclasses.fields(MarlinConfig)}
_REGISTRY: dict[str, MarlinConfig] = {
    "marlin_vit_small_ytf": MarlinConfig(384, 12, 6, 192, 4, 3, downloadable=True),
    "marlin_vit_base_ytf": MarlinConfig(768, 12, 12, 384, 4, 6, downloadable=True),
    "marlin_vit_large_ytf": MarlinConfig(1024, 24, 16, 512, 12, 8, downloadable=True),
    # A tiny model for tests and CPU demos (not released).
    "marlin_vit_tiny": MarlinConfig(192, 4, 3, 96, 2, 3),
}


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def get_config(name: str) -> MarlinConfig:
    """The registered configuration called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(model_names())}") from None


def register_model(name: str, config: MarlinConfig, *, overwrite: bool = False) -> MarlinConfig:
    if name in _REGISTRY and not overwrite and _REGISTRY[name] != config:
        raise ValueError(f"model {name!r} is already registered with another configuration")
    _REGISTRY[name] = config
    return config


def _read_config_file(path: str, parse: Callable[[Any], Any], errors: tuple[type[Exception], ...],
                      problem: str) -> Any:
    """The parsed model config file; ValueError naming it (and ``problem``) when unreadable or unparsable."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read model config ({e.strerror})") from e
    except errors as e:
        raise ValueError(f"{path}: {problem.format(e)}") from None


# MarlinConfig fields that the original's YAML holds at its top level under the same name
_YAML_FIELDS = ("img_size", "patch_size", "mlp_ratio", "qkv_bias", "qk_scale", "drop_rate", "attn_drop_rate",
                "norm_layer", "init_values", "tubelet_size")


def config_from_yaml(path: str | os.PathLike) -> MarlinConfig:
    """Reads an original MARLIN YAML config (`config/pretrain/marlin_vit_base.yaml` style)."""
    path = os.fspath(path)
    raw = _read_config_file(path, yaml.safe_load, (yaml.YAMLError,), "not valid YAML ({})")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    try:
        values = {f: raw[f] for f in _YAML_FIELDS}
        values["n_frames"] = raw["clip_frames"]
        for part in ("encoder", "decoder"):
            values.update({f"{part}_{k}": raw[part][k] for k in ("embed_dim", "depth", "num_heads")})
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e.args[0]!r} in MARLIN model config") from None
    return MarlinConfig(**values)


def config_from_json_file(path: str | os.PathLike) -> MarlinConfig:
    """Reads a ``marlin_config.json`` (``MarlinConfig.to_dict()``; unknown keys ignored); ValueError
    naming the file when it is unreadable, damaged (e.g. truncated) or invalid."""
    path = os.fspath(path)
    raw = _read_config_file(path, json.load, (json.JSONDecodeError, UnicodeDecodeError),
                            "damaged model config, not valid JSON ({}); restore it, or delete it to rewrite it "
                            "from the run's config")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: damaged model config, expected a JSON object, got {type(raw).__name__}")
    try:
        return MarlinConfig(**{k: v for k, v in raw.items() if k in _FIELDS})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid model config ({e})") from None


def register_model_from_yaml(name: str, path: str | os.PathLike) -> MarlinConfig:
    return register_model(name, config_from_yaml(path), overwrite=True)


def config_from_mapping(mapping: Any) -> MarlinConfig:
    """Builds a config from an ml_collections ConfigDict (or dict): either ``{"name": ...}`` plus
    overrides, or the MarlinConfig fields themselves."""
    values = dict(mapping.to_dict() if hasattr(mapping, "to_dict") else mapping)
    base = get_config(values.pop("name")) if values.get("name") else MarlinConfig()
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown model config fields: {unknown}; known: {sorted(_FIELDS)}")
    return base.replace(**values)


def register_model_from_config(name: str, mapping: Any) -> MarlinConfig:
    return register_model(name, config_from_mapping(mapping), overwrite=True)
