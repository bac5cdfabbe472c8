"""Checkpoint interop: .pt/.ckpt/VideoMAE -> Flax -> .pt, strictness, native checkpoints, downloads."""

from __future__ import annotations

import argparse
import functools
import http.server
import threading
from collections import OrderedDict

import numpy as np
import pytest

from marlin_jax.extract import Marlin
from marlin_jax.interop import (
    CheckpointError,
    StateDictMismatchError,
    model_from_state_dict,
    read_state_dict,
    save_marlin_checkpoint,
    save_torch_checkpoint,
)
from marlin_jax.models import get_config
from tests.oracle_utils import build_torch_discriminator, build_torch_marlin, to_numpy_state_dict

pytestmark = pytest.mark.oracle
SMALL = "marlin_vit_small_ytf"


@pytest.fixture(scope="module")
def torch_small(marlin_pytorch):
    config = get_config(SMALL)
    return build_torch_marlin(marlin_pytorch, config, full=True), build_torch_discriminator(config)


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(1)
    return rng.random((1, 16, 224, 224, 3), dtype=np.float32)


def _torch_features(model, clip, keep_seq=False):
    import torch

    with torch.no_grad():
        x = torch.from_numpy(clip).permute(0, 4, 1, 2, 3).contiguous()
        return model.extract_features(x, keep_seq=keep_seq).numpy()


def test_pt_round_trip_is_bit_exact(torch_small, tmp_path):
    import torch

    model_t, disc_t = torch_small
    original = OrderedDict(model_t.state_dict())
    original.update({f"discriminator.{k}": v for k, v in disc_t.state_dict().items()})
    torch.save(original, tmp_path / "in.full.pt")
    model = model_from_state_dict(get_config(SMALL), read_state_dict(tmp_path / "in.full.pt"))
    save_torch_checkpoint(tmp_path / "out.full.pt", model)
    back = torch.load(tmp_path / "out.full.pt", weights_only=True)
    assert set(back) == set(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert torch.equal(back[key], value), f"{key} changed in the round trip"


def test_flax_export_loads_in_marlin_pytorch(marlin_pytorch, tmp_path, clip):
    from flax import nnx

    from marlin_jax.models import MarlinModel

    config = get_config(SMALL)
    model = MarlinModel(config, rngs=nnx.Rngs(3), with_decoder=True, with_discriminator=True)
    ours = Marlin(model).extract_features(clip, keep_seq=False)
    for encoder_only, suffix in ((True, "encoder"), (False, "full")):
        path = tmp_path / f"exported.{suffix}.pt"
        save_torch_checkpoint(path, model, encoder_only=encoder_only, with_discriminator=False)
        reference = marlin_pytorch.Marlin.from_file(SMALL, str(path))
        assert reference.as_feature_extractor is encoder_only
        np.testing.assert_allclose(_torch_features(reference, clip), np.asarray(ours), atol=1e-4)


def test_encoder_only_and_lightning_ckpt(torch_small, tmp_path, clip):
    import torch

    model_t, disc_t = torch_small
    expected = _torch_features(model_t, clip)
    encoder_sd = OrderedDict((k, v) for k, v in model_t.state_dict().items() if k.startswith("encoder."))
    torch.save(encoder_sd, tmp_path / "m.encoder.pt")
    encoder_only = Marlin.from_file(SMALL, tmp_path / "m.encoder.pt")
    assert encoder_only.model.decoder is None
    np.testing.assert_allclose(encoder_only.extract_features(clip, keep_seq=False), expected, atol=1e-4)

    full_sd = OrderedDict(model_t.state_dict())
    full_sd.update({f"discriminator.{k}": v for k, v in disc_t.state_dict().items()})
    ckpt = {"epoch": 3, "global_step": 99, "pytorch-lightning_version": "1.7.7", "state_dict": full_sd,
            "hyper_parameters": {"args": argparse.Namespace(lr=1.5e-4, name="marlin")},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}]}
    torch.save(ckpt, tmp_path / "last.ckpt")
    from_ckpt = Marlin.from_file(SMALL, tmp_path / "last.ckpt")
    assert from_ckpt.model.discriminator is not None
    np.testing.assert_allclose(from_ckpt.extract_features(clip, keep_seq=False), expected, atol=1e-4)


def _videomae_names(state_dict):
    out = OrderedDict()
    for key, value in state_dict.items():
        if key.endswith("pos_embedding.emb"):
            continue  # VideoMAE keeps its sin-cos tables out of the state_dict
        key = key.replace("encoder.patch_embedding.projection.", "encoder.patch_embed.proj.")
        key = key.replace(".mlp.layers.0.linear.", ".mlp.fc1.").replace(".mlp.layers.1.linear.", ".mlp.fc2.")
        key = key.replace("enc_dec_proj.", "encoder_to_decoder.").replace("decoder.mask_token", "mask_token")
        out[key] = value
    return out


def test_videomae_checkpoint(torch_small, tmp_path, clip):
    import torch

    model_t, _ = torch_small
    torch.save({"model": _videomae_names(model_t.state_dict()), "epoch": 799}, tmp_path / "videomae.pth")
    marlin = Marlin.from_file(SMALL, tmp_path / "videomae.pth")
    assert marlin.model.decoder is not None
    np.testing.assert_allclose(marlin.extract_features(clip, keep_seq=False), _torch_features(model_t, clip),
                               atol=1e-4)


def test_strict_mapping_lists_every_problem(torch_small):
    model_t, _ = torch_small
    sd = to_numpy_state_dict(("", model_t))
    del sd["encoder.norm.weight"]
    sd["encoder.extra.weight"] = np.zeros(3, np.float32)
    sd["decoder.head.bias"] = np.zeros(7, np.float32)
    with pytest.raises(StateDictMismatchError) as info:
        model_from_state_dict(get_config(SMALL), sd, source="bad.pt")
    message = str(info.value)
    for fragment in ("bad.pt", "missing keys (1): encoder.norm.weight", "unexpected keys (1): encoder.extra.weight",
                     "decoder.head.bias: checkpoint (7,)"):
        assert fragment in message


def test_wrong_model_size_is_a_clear_error(torch_small, tmp_path):
    import torch

    torch.save(torch_small[0].state_dict(), tmp_path / "small.full.pt")
    with pytest.raises(StateDictMismatchError, match="small.full.pt does not fit the model"):
        Marlin.from_file("marlin_vit_base_ytf", tmp_path / "small.full.pt")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Marlin.from_file(SMALL, tmp_path / "nope.pt")
    (tmp_path / "weights.h5").write_bytes(b"xx")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        Marlin.from_file(SMALL, tmp_path / "weights.h5")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="not a marlin-jax checkpoint"):
        Marlin.from_file(SMALL, tmp_path / "empty_dir")


def test_native_checkpoint_round_trip(tmp_path, clip):
    from flax import nnx

    from marlin_jax.models import MarlinModel

    config = get_config("marlin_vit_tiny")
    model = MarlinModel(config, rngs=nnx.Rngs(5), with_discriminator=True)
    save_marlin_checkpoint(tmp_path / "ckpt", model)
    restored = Marlin.from_file("marlin_vit_tiny", tmp_path / "ckpt")
    assert restored.model.discriminator is not None
    np.testing.assert_array_equal(restored.extract_features(clip, keep_seq=True),
                                  Marlin(model).extract_features(clip, keep_seq=True))
    with pytest.raises(ValueError, match="another architecture"):
        Marlin.from_file(SMALL, tmp_path / "ckpt")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_from_online_downloads_caches_and_reports_offline(torch_small, tmp_path, clip):
    import torch

    served = tmp_path / "served"
    served.mkdir()
    encoder_sd = OrderedDict((k, v) for k, v in torch_small[0].state_dict().items() if k.startswith("encoder."))
    torch.save(encoder_sd, served / "weights.pt")
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/weights.pt"
    cache = tmp_path / "cache"
    try:
        marlin = Marlin.from_online(SMALL, cache_dir=cache, url=url)
    finally:
        server.shutdown()
        server.server_close()
    cached = cache / f"{SMALL}.encoder.pt"
    assert cached.read_bytes() == (served / "weights.pt").read_bytes()
    assert not list(cache.glob("*.part")) and not list(cache.glob(".part-*"))
    np.testing.assert_allclose(marlin.extract_features(clip, keep_seq=False),
                               _torch_features(torch_small[0], clip), atol=1e-4)
    # The server is gone: the cached file is used without any network access.
    Marlin.from_online(SMALL, cache_dir=cache, url=url)
    Marlin.clean_cache(cache, verbose=False)
    assert not cache.exists()
    with pytest.raises(ConnectionError, match="offline"):
        Marlin.from_online(SMALL, cache_dir=cache, url=url)
    assert not list(cache.glob("*"))


def _flat_qkv(tree):
    """A nested variable tree with every per-head qkv kernel ``(D, 3, H, hd)`` flattened to the
    ``(D, 3D)`` layout marlin-jax wrote before."""
    if isinstance(tree, dict):
        return {str(k): (np.asarray(v).reshape(v.shape[0], -1) if k == "kernel" and np.ndim(v) == 4
                         else _flat_qkv(v)) for k, v in tree.items()}
    return np.asarray(tree)


def test_checkpoints_with_the_old_flat_qkv_kernel_still_load(tmp_path):
    """params dirs and trainer workdirs written with the (D, 3D) qkv kernel load into the
    per-head (D, 3, H, hd) layout (through the PyTorch-layout state_dict)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from marlin_jax.interop import load_checkpoint, model_to_state_dict
    from marlin_jax.interop.checkpoints import write_config_file
    from marlin_jax.models import MarlinModel

    config = get_config("marlin_vit_tiny")
    model = MarlinModel(config, rngs=nnx.Rngs(3), with_discriminator=True)
    want = model_to_state_dict(model)
    qkv = model.encoder.blocks[0].attn.qkv.kernel
    d, h = config.encoder_embed_dim, config.encoder_num_heads
    assert qkv.shape == (d, 3, h, d // h)
    np.testing.assert_array_equal(want["encoder.blocks.0.attn.qkv.weight"],
                                  np.asarray(qkv[...]).reshape(d, 3 * d).T)

    # a params dir
    tree = _flat_qkv(nnx.to_pure_dict(nnx.state(model, nnx.Variable)))
    assert tree["encoder"]["blocks"]["0"]["attn"]["qkv"]["kernel"].shape == (d, 3 * d)
    with ocp.StandardCheckpointer() as checkpointer:  # asynchronous: wait for the commit
        checkpointer.save(tmp_path / "old" / "params", tree)
        checkpointer.wait_until_finished()
    write_config_file(tmp_path / "old", config)
    # a trainer workdir: checkpoints/<step>/state with generator and critic parameters
    params = _flat_qkv(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state = {"g_params": {k: v for k, v in params.items() if k != "discriminator"},
             "d_params": {"discriminator": params["discriminator"]}, "step": np.int32(7)}
    ocp.PyTreeCheckpointer().save(tmp_path / "work" / "checkpoints" / "7" / "state", state)
    write_config_file(tmp_path / "work", config)

    for source in (tmp_path / "old", tmp_path / "work"):
        loaded = load_checkpoint(source, config)
        assert loaded.encoder.blocks[0].attn.qkv.kernel.shape == (d, 3, h, d // h)
        got = model_to_state_dict(loaded)
        assert list(got) == list(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{source}: {key}")
