"""The Hugging Face port of MARLIN's weights (ControlNet/MARLIN `hf_src/`): folders and files as the
port's `save_pretrained(..., safe_serialization=True)` writes them, a local hub cache (offline,
revisions), `convert to-hf`, and clear errors (issue 16 item 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

pytest.importorskip("safetensors")
pytest.importorskip("huggingface_hub")

import safetensors.numpy  # noqa: E402

from convert.__main__ import main as convert_main  # noqa: E402
from marlin_jax.extract import Marlin  # noqa: E402
from marlin_jax.interop import (  # noqa: E402
    CheckpointError,
    StateDictMismatchError,
    is_hf_checkpoint,
    save_hf_checkpoint,
    save_marlin_checkpoint,
)
from marlin_jax.interop.hf import HF_CONFIG_FIELDS  # noqa: E402
from marlin_jax.models import MarlinModel, get_config  # noqa: E402
from tests.oracle_utils import build_torch_marlin  # noqa: E402

TINY = "marlin_vit_tiny"
# An architecture registered under no name (a trainer's :demo-like run). 16 frames: marlin-pytorch's
# decoder ignores n_frames (its position table is always for 16).
CUSTOM = get_config(TINY).replace(encoder_embed_dim=96, encoder_num_heads=2, encoder_depth=2)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return np.random.default_rng(1).random((1, 16, 224, 224, 3), dtype=np.float32)


def _features(marlin: Marlin, clip: np.ndarray, keep_seq: bool = False) -> np.ndarray:
    return np.asarray(marlin.extract_features(clip[:, : marlin.config.n_frames], keep_seq=keep_seq))


def _torch_features(model, clip: np.ndarray, keep_seq: bool = False) -> np.ndarray:
    import torch

    with torch.no_grad():
        x = torch.from_numpy(clip).permute(0, 4, 1, 2, 3).contiguous()
        return model.extract_features(x, keep_seq=keep_seq).numpy()


def _port_config_json(config, as_feature_extractor: bool = True) -> dict:
    """config.json as transformers' `PretrainedConfig.save_pretrained` writes the port's config
    (its fields plus transformers' own entries, auto_map of `register_for_auto_class`)."""
    fields = {f: getattr(config, f) for f in HF_CONFIG_FIELDS}
    return {"_name_or_path": "marlin_vit_tiny_ytf", "architectures": ["MarlinModel"],
            "as_feature_extractor": as_feature_extractor,
            "auto_map": {"AutoConfig": "config.MarlinConfig", "AutoModel": "marlin.MarlinModel"},
            **fields, "model_type": "marlin", "torch_dtype": "float32", "transformers_version": "4.50.0"}


def _write_port_folder(folder: Path, torch_model, config) -> Path:
    """The folder the port's `MarlinModel.save_pretrained(..., safe_serialization=True)` writes:
    `model.marlin` is marlin-pytorch's `Marlin`, so its keys gain a `marlin.` prefix."""
    import safetensors.torch

    folder.mkdir(parents=True)
    tensors = {f"marlin.{k}": v.contiguous() for k, v in torch_model.state_dict().items()}
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(
        _port_config_json(config, torch_model.as_feature_extractor), indent=2))
    return folder


# ----------------------------------------------------------------------------- reading the port
@pytest.mark.oracle
@pytest.mark.slow
def test_port_folder_and_file_give_marlin_pytorch_features(marlin_pytorch, tmp_path, clip):
    """A port folder (encoder only, as published) loads by folder or by its model.safetensors,
    named by its registered architecture, with marlin-pytorch's features; `convert to-flax`
    takes it without --model."""
    config = get_config(TINY)
    reference = build_torch_marlin(marlin_pytorch, config, full=False)
    folder = _write_port_folder(tmp_path / "marlin_vit_tiny_hf", reference, config)
    want, want_seq = _torch_features(reference, clip), _torch_features(reference, clip, keep_seq=True)

    assert is_hf_checkpoint(folder) and is_hf_checkpoint(folder / "model.safetensors")
    for path in (folder, folder / "model.safetensors"):
        marlin = Marlin.from_file(None, path)
        # named by a registered model of that architecture (other tests in the same process may
        # register aliases of ViT-tiny, so the name is checked by what it stands for)
        assert get_config(marlin.name) == config and marlin.config == config
        np.testing.assert_allclose(_features(marlin, clip), want, atol=1e-4)
    np.testing.assert_allclose(_features(Marlin.from_file(TINY, folder), clip, keep_seq=True),
                               want_seq, atol=1e-4)

    out = tmp_path / "flax"
    assert convert_main(["to-flax", "--input", str(folder), "--output", str(out)]) == 0
    np.testing.assert_allclose(_features(Marlin.from_file(None, out), clip), want, atol=1e-4)


@pytest.mark.oracle
def test_full_port_folder_with_its_own_architecture(marlin_pytorch, tmp_path, clip):
    """as_feature_extractor false (decoder saved too) and an unregistered architecture: the
    config.json decides; naming a registered model that differs is an error saying so."""
    reference = build_torch_marlin(marlin_pytorch, CUSTOM, full=True)
    folder = _write_port_folder(tmp_path / "custom_hf", reference, CUSTOM)
    marlin = Marlin.from_file(None, folder)
    assert marlin.config == CUSTOM and marlin.name == str(folder / "config.json")
    assert marlin.model.decoder is not None
    np.testing.assert_allclose(_features(marlin, clip), _torch_features(reference, clip), atol=1e-4)
    with pytest.raises(ValueError, match=f"another architecture than '{TINY}'.*config.json.*leave the model name out"):
        Marlin.from_file(TINY, folder)


def test_bfloat16_weights_are_read_without_numpy_support(tmp_path, clip):
    """numpy has no bfloat16: such files still load (through ml_dtypes), close to float32."""
    import ml_dtypes

    model = MarlinModel(get_config(TINY), rngs=nnx.Rngs(2), with_decoder=False)
    folder = save_hf_checkpoint(tmp_path / "f32", model)
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    (bf16 / "config.json").write_text((folder / "config.json").read_text())
    # safetensors.numpy cannot write bfloat16 either: the header is written by hand.
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key, value in tensors.items():
        blob = value.astype(ml_dtypes.bfloat16).tobytes()
        header[key] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    (bf16 / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    got = _features(Marlin.from_file(None, bf16), clip)
    want = _features(Marlin.from_file(None, folder), clip)
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- writing the port
@pytest.mark.oracle
def test_to_hf_writes_what_the_port_loads(marlin_pytorch, tmp_path, clip):
    """`convert to-hf` of a marlin-jax checkpoint: config.json with the port's fields (names and
    values), model.safetensors with exactly the port's keys (`marlin.` + marlin-pytorch's), loaded
    strictly into marlin-pytorch's Marlin built from that config.json (what the port's
    `MarlinModel(config).marlin` is) with the same features; `--with_decoder` gives the full
    model."""
    import safetensors.torch

    model = MarlinModel(get_config(TINY), rngs=nnx.Rngs(3), with_decoder=True, with_discriminator=True)
    ckpt = save_marlin_checkpoint(tmp_path / "jax", model)
    ours = _features(Marlin(model), clip)
    for flag, as_feature_extractor in (([], True), (["--with_decoder"], False)):
        out = tmp_path / f"hf{len(flag)}"
        assert convert_main(["to-hf", "--input", str(ckpt), "--output", str(out), *flag]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model_type"] == "marlin" and cfg["architectures"] == ["MarlinModel"]
        assert cfg["as_feature_extractor"] is as_feature_extractor
        assert {f: cfg[f] for f in HF_CONFIG_FIELDS} == {f: getattr(get_config(TINY), f) for f in HF_CONFIG_FIELDS}
        port = marlin_pytorch.Marlin(**{f: cfg[f] for f in HF_CONFIG_FIELDS},
                                     as_feature_extractor=cfg["as_feature_extractor"]).eval()
        tensors = safetensors.torch.load_file(out / "model.safetensors")
        assert set(tensors) == {f"marlin.{k}" for k in port.state_dict()}
        port.load_state_dict({k.removeprefix("marlin."): v for k, v in tensors.items()}, strict=True)
        np.testing.assert_allclose(_torch_features(port, clip), ours, atol=1e-4)
        with safetensors.safe_open(out / "model.safetensors", "np") as f:
            assert f.metadata() == {"format": "pt"}  # transformers refuses files without it
    assert convert_main(["to-hf", "--input", str(ckpt), "--output", str(tmp_path / "hf0")]) == 2  # exists
    assert convert_main(["to-hf", "--input", str(ckpt), "--output", str(tmp_path / "hf0"), "--overwrite"]) == 0


def test_round_trips_and_a_workdirs_own_architecture(tmp_path, clip):
    """marlin-jax checkpoint of an unregistered architecture -> to-hf -> to-torch / to-flax, no
    --model anywhere (the marlin_config.json, then the config.json, decide); bit-exact weights."""
    model = MarlinModel(CUSTOM, rngs=nnx.Rngs(4), with_decoder=False)
    ckpt = save_marlin_checkpoint(tmp_path / "run", model)
    hf = tmp_path / "hf"
    assert convert_main(["to-hf", "--input", str(ckpt), "--output", str(hf)]) == 0
    assert convert_main(["to-flax", "--input", str(hf), "--output", str(tmp_path / "back")]) == 0
    want = _features(Marlin(model), clip)
    for path in (hf, tmp_path / "back"):
        np.testing.assert_array_equal(_features(Marlin.from_file(None, path), clip), want)
    pt = tmp_path / "x.encoder.pt"
    assert convert_main(["to-torch", "--input", str(hf), "--output", str(pt), "--encoder_only"]) == 0
    # A .pt names no architecture: --model is needed, and a wrong one lists the mismatches.
    assert convert_main(["to-hf", "--input", str(pt), "--output", str(tmp_path / "hf2")]) == 2
    assert convert_main(["to-hf", "--input", str(pt), "--output", str(tmp_path / "hf2"), "--model", TINY]) == 2
    assert not (tmp_path / "hf2" / "model.safetensors").exists()


def test_reading_needs_no_torch(tmp_path):
    """safetensors.numpy + huggingface_hub only: torch is never imported."""
    folder = save_hf_checkpoint(tmp_path / "hf", MarlinModel(get_config(TINY), rngs=nnx.Rngs(0),
                                                             with_decoder=False))
    code = ("import sys; from marlin_jax.extract import Marlin; "
            f"m = Marlin.from_file(None, {str(folder)!r}); assert m.name == {TINY!r}; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-2000:]


# ----------------------------------------------------------------------------- the hub cache
def _hub_cache(root: Path, repo: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """huggingface_hub's cache layout: models--org--name/{snapshots/<commit>/, refs/<ref>}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    for commit, source in snapshots.items():
        snap = repo_dir / "snapshots" / commit
        snap.mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (snap / name).write_bytes((source / name).read_bytes())
    (repo_dir / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (repo_dir / "refs" / ref).write_text(commit)
    return root


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Two revisions of `org/marlin` in a local hub cache: main (ViT-tiny) and tag v2 (CUSTOM);
    HF_HUB_OFFLINE and HF_HUB_CACHE set (environment and huggingface_hub's constants, which it
    read at import)."""
    from huggingface_hub import constants

    models = {"a" * 40: MarlinModel(get_config(TINY), rngs=nnx.Rngs(5), with_decoder=False),
              "b" * 40: MarlinModel(CUSTOM, rngs=nnx.Rngs(6), with_decoder=False)}
    sources = {c: save_hf_checkpoint(tmp_path / c[:1], m) for c, m in models.items()}
    cache = _hub_cache(tmp_path / "hub", "org/marlin", sources, {"main": "a" * 40, "v2": "b" * 40})
    for name, value in (("HF_HUB_OFFLINE", True), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(name, "1" if value is True else value)
        monkeypatch.setattr(constants, name, value)
    return cache, models


def test_from_pretrained_reads_the_offline_hub_cache_and_revisions(offline_hub, clip):
    cache, models = offline_hub
    main, v2 = (Marlin(m) for m in models.values())
    marlin = Marlin.from_pretrained("org/marlin")  # HF_HUB_CACHE, ref main
    assert get_config(marlin.name) == get_config(TINY)  # another test may register a ViT-tiny alias
    np.testing.assert_array_equal(_features(marlin, clip), _features(main, clip))
    for revision in ("v2", "b" * 40):
        marlin = Marlin.from_pretrained("org/marlin", revision=revision, cache_dir=cache)
        assert marlin.config == CUSTOM
        np.testing.assert_array_equal(_features(marlin, clip), _features(v2, clip))
    with pytest.raises(ValueError, match="another architecture than 'marlin_vit_tiny'"):
        Marlin.from_pretrained("org/marlin", TINY, revision="v2")
    for repo, revision in (("org/absent", None), ("org/marlin", "c" * 40), ("org/marlin", "v3")):
        with pytest.raises(ConnectionError, match=f"{repo}@{revision or 'main'}/config.json: not in the "
                                                  "Hugging Face cache.*HF_HUB_OFFLINE is set"):
            Marlin.from_pretrained(repo, revision=revision)


# ----------------------------------------------------------------------------- errors
def test_bad_folders_and_files_are_clear_errors(tmp_path):
    model = MarlinModel(get_config(TINY), rngs=nnx.Rngs(0), with_decoder=False)
    good = save_hf_checkpoint(tmp_path / "good", model)
    config = json.loads((good / "config.json").read_text())
    tensors = safetensors.numpy.load_file(good / "model.safetensors")

    def folder(name, cfg=config, weights=tensors):
        d = tmp_path / name
        d.mkdir()
        if cfg is not None:
            (d / "config.json").write_text(json.dumps(cfg))
        if weights is not None:
            safetensors.numpy.save_file(weights, d / "model.safetensors")
        return d

    no_weights = folder("no_weights", weights=None)
    with pytest.raises(CheckpointError, match="no_weights: a Hugging Face checkpoint folder without "
                                              "model.safetensors \\(it holds: config.json\\)"):
        Marlin.from_file(None, no_weights)
    other = folder("videomae", cfg={**config, "model_type": "videomae", "architectures": ["VideoMAEModel"]})
    with pytest.raises(CheckpointError, match="videomae/config.json: model_type 'videomae'.*not MARLIN's"):
        Marlin.from_file(None, other)
    partial = folder("partial", cfg={k: v for k, v in config.items() if k != "encoder_depth"})
    with pytest.raises(CheckpointError, match="partial/config.json: MARLIN config.json lacks encoder_depth"):
        Marlin.from_file(None, partial)
    bad_value = folder("bad_value", cfg={**config, "encoder_num_heads": 5})
    with pytest.raises(CheckpointError, match="bad_value/config.json: invalid MARLIN config.*divisible"):
        Marlin.from_file(None, bad_value)
    damaged = folder("damaged", cfg=None)
    (damaged / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged/config.json: cannot read"):
        Marlin.from_file(None, damaged)

    missing = folder("missing", weights={k: v for k, v in tensors.items() if "blocks.3.mlp" not in k})
    with pytest.raises(StateDictMismatchError, match="(?s)missing/model.safetensors does not fit.*missing keys "
                                                     "\\(4\\): encoder.blocks.3.mlp"):
        Marlin.from_file(None, missing)
    foreign = folder("foreign", weights={**tensors, "classifier.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match="foreign/model.safetensors: keys outside the MARLIN port's "
                                              "'marlin.\\*' \\(1\\): classifier.weight"):
        Marlin.from_file(None, foreign)
    garbage = folder("garbage", weights=None)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="garbage/model.safetensors: not a readable safetensors file"):
        Marlin.from_file(None, garbage)
    with pytest.raises(ValueError, match="cannot express.*in_channels"):
        save_hf_checkpoint(tmp_path / "x", MarlinModel(get_config(TINY).replace(in_channels=1),
                                                       rngs=nnx.Rngs(0), with_decoder=False))
    with pytest.raises(CheckpointError, match="good: already holds model.safetensors"):
        save_hf_checkpoint(good, model)
    empty = folder("empty", cfg=None, weights=None)
    with pytest.raises(CheckpointError, match="empty: not a marlin-jax checkpoint.*nor a Hugging Face "
                                              "checkpoint folder \\(no model.safetensors\\)"):
        Marlin.from_file(TINY, empty)
    with pytest.raises(CheckpointError, match="absent: no such checkpoint file or directory"):
        Marlin.from_file(None, tmp_path / "absent")
