"""Scanned (stacked) transformer blocks and remat policies: same numbers as the looped blocks,
exact layout converters, per-layer checkpoints/exports, sharding of the layer axis, trainer."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from marlin_jax import sharding as shd
from marlin_jax.models import (
    REMAT_POLICIES,
    MarlinModel,
    get_config,
    is_stacked,
    stack_layers,
    unstack_layers,
)
from marlin_jax.train import state as st
from marlin_jax.train import steps

TINY = get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4)
CFG = TINY.replace(encoder_depth=3, decoder_depth=2)  # 8 tokens; uneven depths catch mix-ups
K = 3  # visible tokens


def _params(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _batch(seed: int = 0, b: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, CFG.num_tokens), bool)
    for i in range(b):
        mask[i, rng.choice(CFG.num_tokens, K, replace=False)] = True
    return {"video": rng.integers(0, 256, (b, 4, 32, 32, 3), np.uint8), "mask": mask}


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_stacked_layout_paths_shapes_and_exact_round_trip():
    looped = MarlinModel(CFG, rngs=nnx.Rngs(0), with_discriminator=True)
    scanned = MarlinModel(CFG, rngs=nnx.Rngs(0), with_discriminator=True, scan_layers=True)
    per_layer, stacked = _params(looped), _params(scanned)
    assert sorted(per_layer["encoder"]["blocks"]) == [0, 1, 2]
    blocks = stacked["encoder"]["blocks"]
    assert "attn" in blocks and 0 not in blocks
    d = CFG.encoder_embed_dim
    assert blocks["attn"]["proj"]["kernel"].shape == (3, d, d)
    qkv = per_layer["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"]
    assert blocks["attn"]["qkv"]["kernel"].shape == (3, *qkv.shape)  # whatever the qkv layout
    assert stacked["decoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape[0] == 2
    assert is_stacked(stacked) and not is_stacked(per_layer)
    # the same rngs build the same weights in both layouts
    _assert_trees_equal(stack_layers(per_layer), stacked)
    _assert_trees_equal(unstack_layers(stacked), per_layer)
    _assert_trees_equal(unstack_layers(stack_layers(per_layer)), per_layer)
    # idempotent on the layout they produce; numpy stays numpy (host-side conversion)
    _assert_trees_equal(stack_layers(stacked), stacked)
    _assert_trees_equal(unstack_layers(per_layer), per_layer)
    host = jax.device_get(per_layer)
    assert isinstance(stack_layers(host)["encoder"]["blocks"]["norm1"]["scale"], np.ndarray)
    # the trainer's generator / critic groups, their optimiser states, and digit-string keys
    g, d_ = st.split_params(per_layer)
    gs, ds = st.split_params(stacked)
    _assert_trees_equal(stack_layers(g), gs)
    _assert_trees_equal(stack_layers(d_), ds)  # no blocks in the critic: unchanged
    opt = st.make_optimizer().init(g)
    _assert_trees_equal(stack_layers(opt), st.make_optimizer().init(gs))
    as_str = {**g, "encoder": {**g["encoder"], "blocks": {str(k): v for k, v in
                                                           g["encoder"]["blocks"].items()}}}
    _assert_trees_equal(stack_layers(as_str), gs)
    abstract = stack_layers(jax.eval_shape(lambda: g))
    assert abstract["encoder"]["blocks"]["mlp"]["fc2"]["kernel"].shape == gs["encoder"]["blocks"][
        "mlp"]["fc2"]["kernel"].shape
    with pytest.raises(ValueError, match="layer keys must be 0..L-1"):
        stack_layers({"blocks": {0: {"w": np.zeros(2)}, 2: {"w": np.zeros(2)}}})


def test_init_params_stacked_equals_stacked_init_params():
    key = jax.random.PRNGKey(3)
    g, d = jax.jit(lambda: st.init_params(CFG, key))()
    gs, ds = jax.jit(lambda: st.init_params(CFG, key, scan_layers=True))()
    _assert_trees_equal(stack_layers(g), gs)
    _assert_trees_equal(d, ds)


def test_scanned_forward_and_features_match_looped():
    looped = MarlinModel(CFG, rngs=nnx.Rngs(0))
    video = jnp.asarray(np.random.default_rng(0).random((2, 4, 32, 32, 3), np.float32))
    mask = jnp.asarray(_batch()["mask"])
    ref, feats = looped(video, mask), looped.extract_features(video)
    for policy in ("none", "full"):
        scanned = MarlinModel(CFG, rngs=nnx.Rngs(0), scan_layers=True, remat_policy=policy)
        np.testing.assert_allclose(scanned(video, mask), ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(scanned.extract_features(video), feats, rtol=1e-5, atol=1e-5)


def test_remat_policy_names_and_dropout_refusal():
    assert set(REMAT_POLICIES) >= {"none", "full", "dots", "dots_no_batch"}
    with pytest.raises(ValueError, match="unknown remat_policy 'everything'.*none, full, dots"):
        MarlinModel(TINY, rngs=nnx.Rngs(0), remat_policy="everything")
    with pytest.raises(ValueError, match="with dropout is not supported"):
        MarlinModel(TINY.replace(drop_rate=0.1), rngs=nnx.Rngs(0), remat_policy="dots")
    with pytest.raises(ValueError, match="unknown remat_policy"):
        st.build_model_def(TINY, remat_policy=True)


def test_scanned_dropout_draws_per_layer_masks_and_advances():
    cfg = CFG.replace(drop_rate=0.2, attn_drop_rate=0.2)
    model = MarlinModel(cfg, rngs=nnx.Rngs(0), scan_layers=True)
    keys = jax.random.key_data(model.encoder.blocks.attn.attn_drop.rngs.key[...])
    assert keys.shape[0] == 3 and len({tuple(k) for k in np.asarray(keys).tolist()}) == 3
    video = jnp.asarray(np.random.default_rng(0).random((1, 4, 32, 32, 3), np.float32))
    a, b = model.extract_features(video), model.extract_features(video)
    assert not np.allclose(a, b)  # the per-layer RNG counts advanced between the calls
    np.testing.assert_array_equal(model.encoder.blocks.attn.attn_drop.rngs.count[...], [2, 2, 2])


def _sgd() -> optax.GradientTransformation:
    """Plain SGD with the injected learning rate the step sets: params' change = -lr * grads."""
    return optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)


@pytest.mark.parametrize("policy", ["none", "full", "dots"])
def test_train_step_scanned_equals_looped(policy):
    """One full train step (critic update with gradient penalty, then generator update) gives
    the same losses and gradients (SGD at lr 1: the parameter change is the gradient)."""
    lr = lambda s: jnp.float32(1.0)  # noqa: E731
    config = steps.StepConfig(num_visible=K, gp_weight=1.0, adv_weight=0.5)
    batch = _batch(1)
    out = {}
    for scan in (False, True):
        model = st.build_model_def(CFG, remat_policy=policy, scan_layers=scan)
        task = steps.Task(model, _sgd(), _sgd(), lr, lr, config)
        state = jax.jit(lambda task=task, scan=scan: st.init_train_state(
            CFG, task.g_tx, task.d_tx, 0, scan_layers=scan))()
        new, metrics = jax.jit(lambda s, b, task=task: steps.train_step(task, s, b))(state, batch)
        grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                             (state.g_params, state.d_params), (new.g_params, new.d_params))
        out[scan] = (jax.device_get(metrics), unstack_layers(grads), unstack_layers(
            jax.device_get((new.g_params, new.d_params))))
        assert is_stacked(new.g_params) == scan
    (m0, g0, p0), (m1, g1, p1) = out[False], out[True]
    for name in m0:
        np.testing.assert_allclose(m1[name], m0[name], rtol=1e-5, err_msg=name)
    assert float(m0["rec_loss"]) > 0 and float(m0["gp"]) > 0
    assert jax.tree.structure(g1) == jax.tree.structure(g0)
    for (path, a), b in zip(jax.tree.leaves_with_path(g0), jax.tree.leaves(g1), strict=True):
        scale = max(float(np.abs(a).max()), 1e-3)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
    for (path, a), b in zip(jax.tree.leaves_with_path(p0), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


class _FakeMesh:
    """Enough of a Mesh for the rule functions (axis sizes only)."""

    def __init__(self, **shape):
        self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}


def test_stacked_params_and_optimizer_states_get_a_leading_none():
    mesh = _FakeMesh(fsdp=4, tensor=3)  # divides the tiny widths (192, 96, 768) and 3 heads
    spec = shd.spec_for("encoder/blocks/attn/qkv/kernel", (3, 192, 3, 3, 64), mesh)
    assert spec == P(None, "fsdp", None, "tensor")
    assert shd.spec_for("encoder/blocks/mlp/fc2/kernel", (3, 768, 192), mesh) == P(None, "tensor", "fsdp")
    assert shd.spec_for("encoder/blocks/norm1/scale", (3, 192), mesh) == P()
    assert shd.spec_for("encoder/blocks/mlp/fc2/kernel", (3, 768, 192), mesh, stacked=None) == P(
        "tensor", "fsdp")  # without the stacked pattern the layer axis would take the rule
    assert shd.spec_for("x/blocks/12/mlp/fc2/kernel", (768, 192), mesh) == P("tensor", "fsdp")

    # every stacked leaf of a train state (params and AdamW moments) = None + its per-layer spec
    tx = st.make_optimizer()
    looped = jax.eval_shape(lambda: st.init_train_state(CFG, tx, tx, 0))
    scanned = jax.eval_shape(lambda: st.init_train_state(CFG, tx, tx, 0, scan_layers=True))
    per_layer = {shd.path_str(p): shd.spec_for(shd.path_str(p), x.shape, mesh)
                 for p, x in jax.tree.leaves_with_path(looped)}
    checked = 0
    for p, x in jax.tree.leaves_with_path(scanned):
        path = shd.path_str(p)
        spec = shd.spec_for(path, x.shape, mesh)
        if re.search(shd.STACKED_LAYERS, path):
            layer0 = per_layer[re.sub(r"(^|/)blocks/", r"\g<1>blocks/0/", path)]
            assert spec == (P(None, *layer0) if len(layer0) else P()), path
            checked += 1
        else:
            assert spec == per_layer[path], path
    blocks = [scanned.g_params[part]["blocks"] for part in ("encoder", "decoder")]
    assert checked == 3 * len(jax.tree.leaves(blocks))  # the parameters, AdamW mu and nu


def _trainer_state(scan: bool) -> st.TrainState:
    tx = st.make_optimizer()
    return jax.jit(lambda: st.init_train_state(CFG, tx, tx, 0, scan_layers=scan))()


def test_scanned_trainer_state_reads_and_exports_per_layer(tmp_path):
    """A trainer workdir written with scan_layers reads back as per-layer weights and exports
    the same `.pt` as the looped state with the same values."""
    from marlin_jax.interop import load_checkpoint, read_state_dict, save_torch_checkpoint, write_config_file
    from marlin_jax.train.checkpointing import Checkpointer

    read = {}
    for scan in (False, True):
        workdir = tmp_path / ("scanned" if scan else "looped")
        with Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
            ckpt.save(1, _trainer_state(scan))
        write_config_file(workdir, CFG)
        state_dict = read_state_dict(workdir)
        pt = save_torch_checkpoint(tmp_path / f"{workdir.name}.full.pt", load_checkpoint(workdir, CFG))
        read[scan] = state_dict, read_state_dict(pt)
    (sd0, pt0), (sd1, pt1) = read[False], read[True]
    assert "encoder.blocks.2.attn.proj.weight" in sd1 and any(k.startswith("discriminator.") for k in sd1)
    assert sd0.keys() == sd1.keys() and pt0.keys() == pt1.keys()
    for key in sd0:
        np.testing.assert_array_equal(sd1[key], sd0[key], err_msg=key)
    for key in pt0:
        np.testing.assert_array_equal(pt1[key], pt0[key], err_msg=key)


def test_init_from_a_pt_into_stacked_params(tmp_path):
    """`init_from` a per-layer `.pt` into a scan_layers run: the loaded weights, stacked."""
    from marlin_jax.interop import save_torch_checkpoint
    from marlin_jax.train.trainer import load_init_params

    source = MarlinModel(CFG, rngs=nnx.Rngs(7), with_discriminator=True)
    pt = save_torch_checkpoint(tmp_path / "src.full.pt", source)
    fresh = _trainer_state(True)
    init = load_init_params(str(pt), CFG, *jax.device_get((fresh.g_params, fresh.d_params)))
    want_g, want_d = st.split_params(stack_layers(_params(source)))
    _assert_trees_equal(init.g_params, jax.device_get(want_g))
    _assert_trees_equal(init.d_params, jax.device_get(want_d))


def test_init_from_a_lightning_ckpt_stacks_its_adam_moments(monkeypatch):
    """The AdamW moments a Lightning `.ckpt` provides (per layer) are stacked like the params and
    fit the stacked optimiser state (the file reading is faked: see test_train_init for it)."""
    from marlin_jax.interop import model_to_state_dict
    from marlin_jax.interop.optimizer_state import AdamMoments, LightningCheckpoint
    from marlin_jax.train import trainer

    source = MarlinModel(CFG, rngs=nnx.Rngs(7), with_discriminator=True)
    ckpt = LightningCheckpoint("fake.ckpt", model_to_state_dict(source), 8, [{}, {}])
    monkeypatch.setattr(trainer, "read_lightning_checkpoint", lambda path: ckpt)

    def moments(ckpt, g_like, d_like, **kw):
        assert not is_stacked(g_like)  # the mapping sees the per-layer layout
        return (AdamMoments(jax.tree.map(np.ones_like, g_like), jax.tree.map(np.zeros_like, g_like), 3),
                AdamMoments(jax.tree.map(np.ones_like, d_like), jax.tree.map(np.zeros_like, d_like), 3))

    monkeypatch.setattr(trainer, "lightning_adam_moments", moments)
    fresh = _trainer_state(True)
    init = trainer.load_init_params("fake.ckpt", CFG, *jax.device_get((fresh.g_params, fresh.d_params)),
                                    adam=(0.9, 0.95, 1e-8))
    assert init.step == 4 and is_stacked(init.g_params) and is_stacked(init.g_adam.mu)
    _assert_trees_equal(init.g_params, jax.device_get(st.split_params(stack_layers(_params(source)))[0]))
    opt = st.with_adam_moments(fresh.g_opt_state, init.g_adam.mu, init.g_adam.nu, init.g_adam.count)
    assert jax.tree.structure(opt) == jax.tree.structure(fresh.g_opt_state)


def _trainer_config(**overrides):
    """The trainer tests' tiny run, scanned: 2 encoder blocks, two steps per epoch, no validation."""
    from tests.test_train_loop import _tiny_config

    return _tiny_config(**{"model.encoder_depth": 2, "data.synthetic_num_videos": 8,
                           "steps_per_epoch": 2, "num_epochs": 1, "num_train_steps": -1,
                           "log_every_steps": 1, "eval_every_steps": 0, "scan_layers": True,
                           **overrides})


@pytest.mark.slow
def test_scanned_trainer_run_resumes_and_its_workdir_is_a_checkpoint(tmp_path, capsys):
    from marlin_jax.interop import read_state_dict
    from marlin_jax.train.trainer import train_and_evaluate

    workdir = tmp_path / "run"
    out = train_and_evaluate(_trainer_config(), str(workdir))
    assert out["step"] == 2 and np.isfinite(out["rec_loss"])
    more = train_and_evaluate(_trainer_config(num_epochs=2), str(workdir))
    console = capsys.readouterr().out
    assert "resuming from" in console and more["step"] == 4
    state_dict = read_state_dict(workdir)  # the stacked state read as per-layer weights
    assert {k for k in state_dict if k.startswith("encoder.blocks.")} >= {
        "encoder.blocks.0.norm1.weight", "encoder.blocks.1.norm1.weight"}
    assert not any(re.match(r"encoder\.blocks\.[a-z]", k) for k in state_dict)


def _program(scan: bool, **overrides):
    from marlin_jax.train.program import build_program
    from marlin_jax.train.trainer import make_schedule, resolve_data_config

    c = _trainer_config(scan_layers=scan, **overrides)
    mesh = shd.make_mesh(c.mesh.to_dict())
    return build_program(c, mesh, make_schedule(c, resolve_data_config(c)))


@pytest.mark.parametrize("saved_scan", [False, True], ids=["looped_saved", "scanned_saved"])
def test_a_checkpoint_restores_into_the_other_block_layout(tmp_path, saved_scan):
    """A train state saved per-layer restores into a scanned run as exactly the stacked state
    (params, AdamW mu and nu alike), with the run's shardings, and the reverse; a state of another
    model is still refused."""
    from marlin_jax.train.checkpointing import Checkpointer, CheckpointLayoutError
    from marlin_jax.train.trainer import other_block_layout

    saved_program, run_program = _program(saved_scan), _program(not saved_scan)
    state = shd.sharded_init(saved_program.init_fn, saved_program.mesh)
    moments = jax.tree.map(  # not the fresh zeros
        lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3, state.g_opt_state)
    state = state.replace(g_opt_state=moments)
    with Checkpointer(tmp_path / "ck", async_save=False) as ckpt:
        ckpt.save(2, state)
        step, restored, skipped = ckpt.restore_newest(
            run_program.abstract_state, other_layouts=[other_block_layout(run_program)])
    assert step == 2 and not skipped and is_stacked(restored) == (not saved_scan)
    convert = unstack_layers if saved_scan else stack_layers
    _assert_trees_equal(restored, jax.device_get(convert(jax.device_get(state))))
    placed = jax.tree.map(lambda a, t: a.sharding == t.sharding, restored,
                          run_program.abstract_state)
    assert all(jax.tree.leaves(placed))

    deeper = _program(not saved_scan, **{"model.encoder_depth": 3})  # not a layout of it
    with (Checkpointer(tmp_path / "ck", async_save=False) as ckpt,
          pytest.raises(CheckpointLayoutError, match="do not fit this run.s train state")):
        ckpt.restore_newest(deeper.abstract_state, other_layouts=[other_block_layout(deeper)])


@pytest.mark.slow
@pytest.mark.parametrize("saved_scan", [False, True], ids=["looped_to_scanned",
                                                           "scanned_to_looped"])
def test_a_run_resumes_in_the_other_block_layout_like_in_its_own(tmp_path, saved_scan):
    """2 steps in one layout, checkpoint; resumed in the same layout and in the other one: the
    next steps' losses agree (rtol 1e-5), so parameters, AdamW moments, step and data position
    all carried over; the metadata then names the new layout."""
    import json
    import shutil

    from marlin_jax.train.trainer import train_and_evaluate

    first = tmp_path / "first"
    train_and_evaluate(_trainer_config(scan_layers=saved_scan), str(first))
    other = tmp_path / "other"
    shutil.copytree(first, other)
    train_and_evaluate(_trainer_config(num_epochs=2, scan_layers=saved_scan), str(first))
    out = train_and_evaluate(_trainer_config(num_epochs=2, scan_layers=not saved_scan), str(other))
    assert out["step"] == 4

    def rows(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines) if "rec_loss" in r}

    want, got = rows(first), rows(other)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for name in ("rec_loss", "adv_loss", "d_loss", "g_grad_norm", "d_grad_norm"):
            np.testing.assert_allclose(got[step][name], want[step][name], rtol=1e-5,
                                       err_msg=f"step {step} {name}")
    saved = json.loads((other / "config.json").read_text())
    assert saved["scan_layers"] is (not saved_scan)


@pytest.mark.parametrize("scan", [False, True], ids=["looped", "scanned"])
def test_remat_policy_puts_the_blocks_under_checkpoint(scan):
    video = jnp.zeros((1, 4, 32, 32, 3), jnp.float32)

    def primitives(policy: str) -> str:
        model = MarlinModel(CFG, rngs=nnx.Rngs(0), scan_layers=scan, remat_policy=policy)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: nnx.merge(graphdef, p, rest).extract_features(video).sum()  # noqa: E731
        return str(jax.make_jaxpr(loss)(params))

    remat = re.compile(r"= (checkpoint|remat2?)\[")  # jax.checkpoint's primitive
    assert not remat.search(primitives("none"))
    for policy in ("full", "dots_no_batch"):
        assert remat.search(primitives(policy)), policy
    assert bool(re.search(r"= scan\[", primitives("none"))) == scan
