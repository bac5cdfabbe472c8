"""The Hugging Face port of MARLIN's weights (``hf_src/`` of ControlNet/MARLIN), without torch.

A port folder (or hub repo) holds ``config.json`` (``model_type: "marlin"`` and the fields
:data:`HF_CONFIG_FIELDS`) and ``model.safetensors`` with marlin-pytorch's keys prefixed ``marlin.``
(encoder only when ``as_feature_extractor``, as published). Also the format dispatch for callers
that accept any checkpoint (:func:`checkpoint_config` / :func:`read_weights` / :func:`load_checkpoint`).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from marlin_jax.files import atomic_path
from marlin_jax.models import MarlinConfig, MarlinModel, get_config, model_names

from .checkpoints import CONFIG_FILE, CheckpointError, read_config_file, read_state_dict
from .mapping import model_from_state_dict, model_to_state_dict

HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
HF_PREFIX = "marlin."  # the port's `MarlinModel.marlin` holds marlin-pytorch's `Marlin`
HF_MODEL_TYPE = "marlin"
HF_ARCHITECTURE = "MarlinModel"
# The port's MarlinConfig(PretrainedConfig) fields, named as there (and as MarlinConfig's).
HF_CONFIG_FIELDS = (
    "img_size", "patch_size", "n_frames", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
    "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio", "qkv_bias", "qk_scale",
    "drop_rate", "attn_drop_rate", "norm_layer", "init_values", "tubelet_size",
)
# What the port cannot express: it builds 3-channel clips and torch's default LayerNorm eps.
_PORT_FIXED = {"in_channels": 3, "layer_norm_eps": 1e-5}


def _hf_module():
    """huggingface_hub, or an ImportError that says how to install it."""
    try:
        import huggingface_hub
    except ImportError as e:
        raise ImportError("Hugging Face checkpoints need `huggingface_hub` and `safetensors`: "
                          "pip install 'marlin-jax[hf]'") from e
    return huggingface_hub


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read Hugging Face config ({e})") from None


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """A ``.safetensors`` file, or a folder holding ``model.safetensors`` or a Hugging Face
    ``config.json`` (one with ``model_type``) and no marlin-jax checkpoint."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".safetensors"
    if not p.is_dir():
        return False
    if (p / HF_WEIGHTS).is_file():
        return True
    if (p / CONFIG_FILE).is_file() or any((p / d).is_dir() for d in ("params", "state", "checkpoints")):
        return False
    try:  # a config.json of PretrainedConfig has model_type (a trainer's run config has not)
        raw = _read_json(p / HF_CONFIG) if (p / HF_CONFIG).is_file() else None
    except CheckpointError:
        return False
    return isinstance(raw, dict) and "model_type" in raw


def registered_name(config: MarlinConfig) -> str | None:
    """The registered model whose architecture ``config`` is (``downloadable`` aside), if any."""
    plain = config.replace(downloadable=False)
    return next((n for n in model_names() if get_config(n).replace(downloadable=False) == plain), None)


def read_hf_config(path: str | os.PathLike) -> MarlinConfig | None:
    """The architecture in the ``config.json`` of a Hugging Face folder (or beside a
    ``.safetensors`` file): the registered config when it is the same; None when there is none.
    CheckpointError naming the file for another ``model_type``, missing fields or invalid values."""
    p = Path(path)
    file = (p.parent if p.is_file() else p) / HF_CONFIG
    if not file.is_file():
        return None
    raw = _read_json(file)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("model_type") != HF_MODEL_TYPE:
        raise CheckpointError(f"{file}: model_type {raw.get('model_type')!r} (architectures "
                              f"{raw.get('architectures')}) is not MARLIN's {HF_MODEL_TYPE!r}")
    missing = [f for f in HF_CONFIG_FIELDS if raw.get(f) is None and f != "qk_scale"]
    if missing:
        raise CheckpointError(f"{file}: MARLIN config.json lacks {', '.join(missing)}")
    try:
        config = MarlinConfig(**{f: raw[f] for f in HF_CONFIG_FIELDS if f in raw})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: invalid MARLIN config ({e})") from None
    name = registered_name(config)
    return get_config(name) if name else config


def read_hf_state_dict(path: str | os.PathLike) -> OrderedDict[str, np.ndarray]:
    """``model.safetensors`` (a folder's, or the file) -> flat marlin-pytorch-named state_dict
    (the ``marlin.`` prefix removed). bfloat16 tensors (which numpy lacks) come as ml_dtypes
    arrays. Raises CheckpointError naming the file for keys outside the port's ``marlin.*``."""
    _hf_module()
    import safetensors
    import safetensors.numpy

    path = Path(path)
    file = path if path.is_file() else path / HF_WEIGHTS
    if not file.is_file():
        present = ", ".join(sorted(q.name for q in path.iterdir())) or "nothing"
        raise CheckpointError(f"{path}: a Hugging Face checkpoint folder without {HF_WEIGHTS} "
                              f"(it holds: {present}); save with safe_serialization=True")
    try:
        try:
            tensors = safetensors.numpy.load_file(file)
        except TypeError:  # bfloat16: numpy has no such dtype; jax's arrays carry ml_dtypes'
            import safetensors.flax

            tensors = {k: np.asarray(v) for k, v in safetensors.flax.load_file(file).items()}
    except (OSError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    foreign = sorted(k for k in tensors if not k.startswith(HF_PREFIX))
    if foreign:
        raise CheckpointError(f"{file}: keys outside the MARLIN port's '{HF_PREFIX}*' "
                              f"({len(foreign)}): {', '.join(foreign[:20])}")
    return OrderedDict((k[len(HF_PREFIX):], tensors[k]) for k in sorted(tensors))


def save_hf_checkpoint(directory: str | os.PathLike, model: MarlinModel, *, encoder_only: bool = True,
                       overwrite: bool = False) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` that the port's ``from_pretrained`` loads:
    the encoder (``as_feature_extractor``, as published), with ``encoder_only=False`` the decoder
    too; never the discriminator (the port has none)."""
    _hf_module()
    import safetensors.numpy

    directory = Path(directory)
    weights = directory / HF_WEIGHTS
    if weights.exists() and not overwrite:
        raise CheckpointError(f"{directory}: already holds {HF_WEIGHTS} (pass overwrite=True)")
    keep = ("encoder.",) if encoder_only else ("encoder.", "decoder.", "enc_dec_proj.")
    state_dict = {HF_PREFIX + k: np.ascontiguousarray(v) for k, v in model_to_state_dict(model).items()
                  if k.startswith(keep)}
    # config.json as the port's save_pretrained writes it
    fixed = {k: getattr(model.config, k) for k, v in _PORT_FIXED.items() if getattr(model.config, k) != v}
    if fixed:
        raise ValueError(f"the Hugging Face port cannot express {fixed} (it fixes {_PORT_FIXED})")
    config = {"architectures": [HF_ARCHITECTURE], "model_type": HF_MODEL_TYPE,
              **{f: getattr(model.config, f) for f in HF_CONFIG_FIELDS},
              "as_feature_extractor": encoder_only or model.decoder is None, "torch_dtype": "float32"}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(weights) as tmp:  # metadata format "pt": transformers refuses files without it
        safetensors.numpy.save_file(state_dict, tmp, metadata={"format": "pt"})
    (directory / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


# ------------------------------------------------------------------ any checkpoint
def checkpoint_config(path: str | os.PathLike) -> tuple[MarlinConfig, str] | None:
    """The architecture a checkpoint carries and the file it comes from: a Hugging Face
    folder's ``config.json``, or a marlin-jax checkpoint's ``marlin_config.json`` (a trainer
    workdir, or a step folder in it); None for files that name none (``.pt``, ``.ckpt``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file or directory")
    if is_hf_checkpoint(p):
        config = read_hf_config(p)
        return None if config is None else (config, str((p.parent if p.is_file() else p) / HF_CONFIG))
    if p.is_dir():
        config = read_config_file(p)
        return None if config is None else (config, f"{CONFIG_FILE} of {p}")
    return None


def resolve_checkpoint_config(model_name: str | None, path: str | os.PathLike,
                              default: str | None = None) -> tuple[MarlinConfig, str]:
    """``(config, name)`` to load ``path`` with: the registered ``model_name``, else the
    checkpoint's own architecture (:func:`checkpoint_config`), else the registered ``default``.
    ValueError when ``model_name`` disagrees with the checkpoint's, or nothing names one."""
    saved = checkpoint_config(path)
    if model_name is None:
        if saved is not None:
            config, source = saved
            return config, registered_name(config) or source
        if default is None:
            raise ValueError(f"{path}: the checkpoint names no architecture; pass a registered model "
                             f"name ({', '.join(model_names())})")
        return get_config(default), default
    config = get_config(model_name)
    if saved is not None and saved[0].replace(downloadable=False) != config.replace(downloadable=False):
        raise ValueError(f"{path}: checkpoint was saved for another architecture than {model_name!r} "
                         f"(its {saved[1]}: {saved[0]}); leave the model name out (None / no "
                         "--model) to use the checkpoint's own")
    return config, model_name


def read_weights(path: str | os.PathLike, config: MarlinConfig | None = None) -> OrderedDict[str, np.ndarray]:
    """Any supported checkpoint -> flat PyTorch-layout state_dict: a Hugging Face folder or
    ``.safetensors`` file here, every other format through :func:`.checkpoints.read_state_dict`."""
    if is_hf_checkpoint(path):
        return read_hf_state_dict(path)
    try:
        return read_state_dict(path, config)
    except CheckpointError as e:  # an empty or foreign folder: say what neither format found
        if Path(path).is_dir() and str(e).startswith(f"{Path(path)}: not a marlin-jax checkpoint"):
            raise CheckpointError(f"{e}, nor a Hugging Face checkpoint folder (no {HF_WEIGHTS})") from None
        raise


def weights_source(path: str | os.PathLike) -> str:
    """The file named in errors about ``path``'s weights (a Hugging Face folder's
    ``model.safetensors``, else ``path``)."""
    p = Path(path)
    return str(p / HF_WEIGHTS) if p.is_dir() and is_hf_checkpoint(p) else os.fspath(path)


def load_checkpoint(path: str | os.PathLike, config: MarlinConfig, **model_kwargs) -> MarlinModel:
    """Builds the model any checkpoint holds (encoder-only or full, +/- discriminator) and loads it."""
    state_dict = read_weights(path, config)
    return model_from_state_dict(config, state_dict, source=weights_source(path), **model_kwargs)


def download_hf_checkpoint(repo_id: str, *, revision: str | None = None,
                           cache_dir: str | os.PathLike | None = None) -> Path:
    """``config.json`` + ``model.safetensors`` of a hub repo through ``huggingface_hub`` (its
    cache, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, tokens); returns the snapshot folder. Raises
    ConnectionError saying what is missing when the files are neither cached nor downloadable."""
    hub = _hf_module()
    from huggingface_hub import errors

    paths = []
    for filename in (HF_CONFIG, HF_WEIGHTS):
        try:
            paths.append(Path(hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)))
        except errors.LocalEntryNotFoundError as e:
            where = f"{repo_id}@{revision or 'main'}"
            raise ConnectionError(
                f"{where}/{filename}: not in the Hugging Face cache "
                f"({cache_dir or hub.constants.HF_HUB_CACHE}) and cannot be downloaded "
                f"({'HF_HUB_OFFLINE is set' if hub.constants.HF_HUB_OFFLINE else e}); download it "
                "where the hub is reachable, or load a local folder with Marlin.from_file") from e
        except (errors.EntryNotFoundError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
            raise CheckpointError(f"{repo_id}@{revision or 'main'}/{filename}: {e}") from e
    return paths[1].parent
