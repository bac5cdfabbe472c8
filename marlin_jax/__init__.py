"""marlin-jax: MARLIN (masked autoencoder for facial video representation learning) in JAX/Flax.

``from marlin_jax import Marlin`` as in marlin-pytorch. The public names load lazily, on first
use, so that ``import marlin_jax`` stays fast (it imports neither JAX nor Flax).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    "Marlin": "marlin_jax.extract",
    "MarlinModel": "marlin_jax.models",
    "MarlinConfig": "marlin_jax.models",
    "get_config": "marlin_jax.models",
    "model_names": "marlin_jax.models",
    "register_model": "marlin_jax.models",
    "make_dataset": "marlin_jax.data",
    "make_mesh": "marlin_jax.sharding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'marlin_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
