"""The package's top level: `from marlin_jax import Marlin`, loaded lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_top_level_exports_load_lazily():
    """`import marlin_jax` imports neither JAX nor Flax; the public names resolve on first use
    to the objects their modules define."""
    code = ("import sys, marlin_jax; assert 'jax' not in sys.modules and 'flax' not in sys.modules; "
            "from marlin_jax import Marlin, MarlinModel, get_config; import marlin_jax.extract as e; "
            "import marlin_jax.models as m; assert Marlin is e.Marlin and MarlinModel is m.MarlinModel; "
            "assert get_config('marlin_vit_base_ytf').encoder_embed_dim == 768; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_unknown_names_raise_attribute_error():
    import marlin_jax

    with pytest.raises(AttributeError, match="no attribute 'Marlinn'"):
        marlin_jax.Marlinn  # noqa: B018
    assert set(marlin_jax.__all__) <= set(dir(marlin_jax))
    with pytest.raises(ImportError):
        exec("from marlin_jax import nothing_here")
