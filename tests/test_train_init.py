"""`config.init_from`: start pretraining from a VideoMAE checkpoint or continue the original
trainer's PyTorch Lightning `.ckpt` (parameters, step and both AdamW states)."""

from __future__ import annotations

import copy
import itertools
import logging
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from marlin_jax.interop import model_to_state_dict, state_dict_to_model
from marlin_jax.interop.optimizer_state import OptimizerStateError
from marlin_jax.interop.torch_format import save_torch_file
from marlin_jax.models import MarlinModel, get_config
from marlin_jax.train import state as st
from marlin_jax.train.trainer import load_init_params
from tests.oracle_utils import build_torch_discriminator, build_torch_marlin

pytestmark = pytest.mark.slow  # builds and initialises models (~30 s CPU)

CFG = get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4, encoder_depth=1,
                                            decoder_depth=1)
# AdamW of the continued run. eps is near sqrt(v) of the small test gradients so that where
# eps enters the update matters; weight decay is on so that its coupling to lr matters.
LR, BETAS, EPS, WD, GRAD_SCALE = 1e-3, (0.9, 0.95), 1e-4, 0.05, 1e-4

_TO_VIDEOMAE = (
    (r"^encoder\.patch_embedding\.projection\.", "encoder.patch_embed.proj."),
    (r"\.mlp\.layers\.0\.linear\.", ".mlp.fc1."),
    (r"\.mlp\.layers\.1\.linear\.", ".mlp.fc2."),
    (r"^enc_dec_proj\.", "encoder_to_decoder."),
    (r"^decoder\.mask_token$", "mask_token"),
)


@pytest.fixture(scope="module")
def source():
    """A trained-looking source model (seed 7) and fresh init params (seed 0)."""
    model = MarlinModel(CFG, rngs=nnx.Rngs(7), with_decoder=True, with_discriminator=True)
    fresh_g, fresh_d = jax.jit(lambda: st.init_params(CFG, jax.random.PRNGKey(0)))()
    return model, jax.device_get(fresh_g), jax.device_get(fresh_d)


def _pure(model):
    return st.split_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_init_from_videomae_loads_the_autoencoder_and_keeps_a_fresh_critic(source, tmp_path):
    model, fresh_g, fresh_d = source
    sd = {}
    for key, value in model_to_state_dict(model).items():
        if key.startswith("discriminator.") or "pos_embedding" in key:
            continue  # VideoMAE has no critic and keeps its sin-cos tables out
        for pattern, repl in _TO_VIDEOMAE:
            key = re.sub(pattern, repl, key)
        sd[key] = value
    path = tmp_path / "videomae_pretrain.pth"
    save_torch_file(path, {"model": sd})

    init = load_init_params(str(path), CFG, fresh_g, fresh_d, adam=BETAS + (EPS,))
    want_g, _ = _pure(model)
    _assert_tree_equal(init.g_params, want_g)
    _assert_tree_equal(init.d_params, fresh_d)
    assert init.step == 0
    assert init.g_adam is None and init.d_adam is None  # not a .ckpt: fresh moments


def test_resume_from_a_lightning_ckpt_loads_both_models_and_the_step(source, tmp_path):
    model, fresh_g, fresh_d = source
    path = tmp_path / "marlin_vit_tiny-epoch=3.ckpt"
    save_torch_file(path, {"epoch": 3, "global_step": 20,
                           "state_dict": model_to_state_dict(model)})
    init = load_init_params(str(path), CFG, fresh_g, fresh_d, updates_per_batch=2)
    want_g, want_d = _pure(model)
    _assert_tree_equal(init.g_params, want_g)
    _assert_tree_equal(init.d_params, want_d)
    assert init.step == 10  # Lightning counted 2 optimiser steps per batch


def test_a_plain_state_dict_named_ckpt_loads_without_step_or_moments(source, tmp_path):
    model, fresh_g, fresh_d = source
    path = tmp_path / "plain.ckpt"
    save_torch_file(path, model_to_state_dict(model))
    init = load_init_params(str(path), CFG, fresh_g, fresh_d, adam=BETAS + (EPS,))
    want_g, want_d = _pure(model)
    _assert_tree_equal((init.g_params, init.d_params), (want_g, want_d))
    assert init.step == 0 and init.g_adam is None and init.d_adam is None


def test_init_from_a_checkpoint_of_another_model_names_the_file(source, tmp_path):
    model, fresh_g, fresh_d = source
    other = get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4)  # deeper
    path = tmp_path / "other.pt"
    save_torch_file(path, model_to_state_dict(model))
    deeper_g, deeper_d = jax.jit(lambda: st.init_params(other, jax.random.PRNGKey(0)))()
    with pytest.raises(ValueError, match="other.pt"):
        load_init_params(str(path), other, deeper_g, deeper_d)


# ----------------------------------------------------------------------------- AdamW moments


@pytest.fixture(scope="module")
def lightning_run(marlin_pytorch, tmp_path_factory):
    """The original trainer's networks and AdamW pair after 2 updates with fixed random grads,
    saved as a Lightning .ckpt; plus the grads, moments and parameters of a 3rd torch update."""
    import torch
    from marlin_pytorch.model.decoder import MarlinDecoder

    # marlin_pytorch.Marlin sizes its decoder for 16 frames: take the encoder and projection
    # from it and build the decoder for the clip, as the original trainer does.
    marlin = build_torch_marlin(marlin_pytorch, CFG, full=True, seed=3)
    c = CFG
    decoder = MarlinDecoder(
        img_size=c.img_size, patch_size=c.patch_size, n_frames=c.n_frames,
        embed_dim=c.decoder_embed_dim, depth=c.decoder_depth, num_heads=c.decoder_num_heads,
        mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, qk_scale=None, drop_rate=0.0,
        attn_drop_rate=0.0, norm_layer="LayerNorm", init_values=0.0, tubelet_size=c.tubelet_size)

    class Original(torch.nn.Module):  # registration order differs from the optimiser chain
        def __init__(self):
            super().__init__()
            self.encoder = marlin.encoder
            self.enc_dec_proj = marlin.enc_dec_proj
            self.decoder = decoder
            self.discriminator = build_torch_discriminator(CFG, seed=4)

    net = Original()
    g_opt = torch.optim.AdamW(itertools.chain(net.encoder.parameters(), net.decoder.parameters(),
                                              net.enc_dec_proj.parameters()),
                              lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    d_opt = torch.optim.AdamW(net.discriminator.parameters(), lr=LR, betas=BETAS, eps=EPS,
                              weight_decay=WD)
    named = dict(net.named_parameters())
    rng = np.random.default_rng(0)
    grads = [{n: (GRAD_SCALE * rng.standard_normal(p.shape)).astype(np.float32)
              for n, p in named.items() if p.requires_grad} for _ in range(3)]

    def update(g):
        for n, p in named.items():
            p.grad = torch.from_numpy(g[n]) if n in g else None
        g_opt.step()
        d_opt.step()

    update(grads[0])
    update(grads[1])
    ckpt = {"epoch": 0, "global_step": 4, "pytorch-lightning_version": "1.7.7",
            "state_dict": net.state_dict(), "lr_schedulers": [],
            "optimizer_states": [g_opt.state_dict(), d_opt.state_dict()]}
    path = tmp_path_factory.mktemp("lightning") / "marlin_vit_tiny-epoch=0-step=4.ckpt"
    torch.save(ckpt, path)
    ckpt = copy.deepcopy(ckpt)  # the tensors as saved, for variants of the file
    weights = {k: v.numpy().copy() for k, v in ckpt["state_dict"].items()}
    owner = {p: opt for opt in (g_opt, d_opt) for p in opt.param_groups[0]["params"]}
    moments = {key: {n: owner[p].state[p][key].numpy().copy()
                     for n, p in named.items() if p.requires_grad}
               for key in ("exp_avg", "exp_avg_sq")}
    update(grads[2])
    after = {n: p.detach().numpy().copy() for n, p in named.items()}
    return {"path": path, "ckpt": ckpt, "weights": weights, "grads": grads[2],
            "moments": moments, "after": after}


def _as_params(model, overrides, weights):
    """A PyTorch-layout dict -> (generator, critic) pytrees through the WEIGHTS' loader (not
    the code under test; loaded into ``model``); entries it lacks (frozen tables) come from
    ``weights``."""
    state_dict_to_model(model, {**weights, **overrides}, source="test")
    return jax.tree.map(np.array, _pure(model))  # copies: the model is reused


def _adam_state(opt_state):
    (adam,) = [x for x in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(x, optax.ScaleByAdamState)]
    return adam


@pytest.mark.oracle
def test_lightning_adamw_state_continues_like_torch(lightning_run, source):
    _, fresh_g, fresh_d = source
    run = lightning_run
    init = load_init_params(str(run["path"]), CFG, fresh_g, fresh_d, updates_per_batch=2,
                            adam=BETAS + (EPS,), weight_decay=WD)
    assert init.step == 2
    model = MarlinModel(CFG, rngs=nnx.Rngs(0), with_decoder=True, with_discriminator=True)
    weights, grads, mu, nu, after = (
        _as_params(model, sd, run["weights"])
        for sd in ({}, run["grads"], run["moments"]["exp_avg"], run["moments"]["exp_avg_sq"],
                   run["after"]))
    tx = st.make_optimizer(b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
    step = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
    for i, (params, adam) in enumerate(((init.g_params, init.g_adam),
                                        (init.d_params, init.d_adam))):
        _assert_tree_equal(params, weights[i])
        assert adam.count == 2
        opt = st.with_adam_moments(tx.init(params), adam.mu, adam.nu, adam.count)
        state = _adam_state(opt)
        assert int(state.count) == 2
        _assert_tree_equal(state.mu, mu[i])
        _assert_tree_equal(state.nu, nu[i])

        new = step(grads[i], st.set_learning_rate(opt, LR), params)
        for (path, got), want, old in zip(jax.tree.leaves_with_path(new),
                                          jax.tree.leaves(after[i]), jax.tree.leaves(params),
                                          strict=True):
            name = jax.tree_util.keystr(path)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)
            # the update itself (~lr), so that eps / bias correction / decay are resolved; up
            # to float32 rounding of the parameters (a few ulp)
            slack = 1e-3 * np.abs(want - old) + 4 * np.spacing(np.abs(old))
            assert np.all(np.abs((got - old) - (want - old)) <= slack), name


@pytest.mark.oracle
def test_lightning_adamw_state_is_refused_when_the_config_differs(lightning_run, source):
    _, fresh_g, fresh_d = source
    path = str(lightning_run["path"])
    with pytest.raises(OptimizerStateError, match=r"(?s)step=4\.ckpt: generator .*betas"):
        load_init_params(path, CFG, fresh_g, fresh_d, adam=(0.9, 0.999, EPS))
    with pytest.raises(OptimizerStateError, match=r"(?s)step=4\.ckpt: generator .*eps"):
        load_init_params(path, CFG, fresh_g, fresh_d, adam=BETAS + (1e-8,))
    init = load_init_params(path, CFG, fresh_g, fresh_d, adam=None)  # switched off
    assert init.g_adam is None and init.d_adam is None and init.step == 2


def _variant(run, tmp_path, name, edit):
    import torch

    ckpt = copy.deepcopy(run["ckpt"])
    edit(ckpt)
    path = tmp_path / name
    torch.save(ckpt, path)
    return str(path)


@pytest.mark.oracle
def test_lightning_adamw_state_that_does_not_fit_the_model_is_refused(lightning_run, source,
                                                                      tmp_path):
    import torch

    _, fresh_g, fresh_d = source
    run = lightning_run

    def drop_a_param(ckpt):
        ckpt["optimizer_states"][1]["param_groups"][0]["params"].pop()

    def reshape_a_moment(ckpt):
        state = ckpt["optimizer_states"][0]["state"][0]
        state["exp_avg"] = torch.zeros(3, 5)

    def uneven_steps(ckpt):
        ckpt["optimizer_states"][1]["state"][0]["step"] = torch.tensor(7.0)

    for name, edit, match in (("count.ckpt", drop_a_param, "(?s)count.ckpt: discriminator .*covers 3"),
                              ("shape.ckpt", reshape_a_moment,
                               r"(?s)shape.ckpt: generator .*exp_avg shape \(3, 5\)"),
                              ("steps.ckpt", uneven_steps,
                               r"(?s)steps.ckpt: discriminator .*different Adam steps \[2, 7\]")):
        path = _variant(run, tmp_path, name, edit)
        with pytest.raises(OptimizerStateError, match=match):
            load_init_params(path, CFG, fresh_g, fresh_d, adam=BETAS + (EPS,))


@pytest.mark.oracle
def test_lightning_ckpt_without_optimizer_states_warns_and_keeps_fresh_moments(
        lightning_run, source, tmp_path, caplog):
    _, fresh_g, fresh_d = source
    path = _variant(lightning_run, tmp_path, "weights_only.ckpt",
                    lambda ckpt: ckpt.pop("optimizer_states"))
    with caplog.at_level(logging.WARNING, logger="marlin_jax.train.trainer"):
        init = load_init_params(path, CFG, fresh_g, fresh_d, adam=BETAS + (EPS,))
    assert init.g_adam is None and init.d_adam is None and init.step == 2
    assert any("weights_only.ckpt" in r.getMessage() and "no optimizer_states" in r.getMessage()
               for r in caplog.records)


def test_with_adam_moments_replaces_the_one_adam_state_of_a_clipped_adamw():
    params = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    tx = st.make_optimizer(b1=0.9, b2=0.95, grad_clip=1.0)  # chain(clip, adamw)
    mu = {"w": np.full((2, 3), 0.5), "b": np.arange(3.0)}
    nu = {"w": np.full((2, 3), 0.25), "b": np.arange(3.0) ** 2}
    opt = st.with_adam_moments(tx.init(params), mu, nu, 7)
    adam = _adam_state(opt)
    assert int(adam.count) == 7 and adam.mu["w"].dtype == np.float32
    _assert_tree_equal(adam.nu, nu)
    assert jax.tree.structure(opt) == jax.tree.structure(tx.init(params))
    with pytest.raises(ValueError, match="structure"):
        st.with_adam_moments(opt, {"w": mu["w"]}, nu, 7)


@pytest.mark.oracle
def test_trainer_continues_a_lightning_ckpt_with_its_adam_state(lightning_run, tmp_path):
    from configs import vit_small
    from marlin_jax.train.checkpointing import Checkpointer
    from marlin_jax.train.program import model_config
    from marlin_jax.train.trainer import train_and_evaluate

    c = vit_small.get_config("demo")
    c.model.update(name="marlin_vit_tiny", encoder_depth=1, decoder_depth=1)
    c.data.update(source="synthetic", img_size=CFG.img_size, clip_frames=CFG.n_frames,
                  patch_size=CFG.patch_size, tubelet_size=CFG.tubelet_size, mask_ratio=0.75,
                  synthetic_num_videos=8, synthetic_num_frames=8, num_threads=1)
    c.optimizer.update(b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
    c.update(global_batch_size=2, num_train_steps=3, eval_every_steps=0, log_every_steps=1,
             checkpoint_every_steps=100, async_checkpointing=False,
             init_from=str(lightning_run["path"]))
    train_and_evaluate(c, str(tmp_path))  # the .ckpt is at batch 2: one more step

    tx = st.make_optimizer(b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
    abstract = jax.eval_shape(lambda: st.init_train_state(model_config(c), tx, tx, 0))
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [3]
        state = ckpt.restore(3, abstract)
    model = MarlinModel(CFG, rngs=nnx.Rngs(0), with_decoder=True, with_discriminator=True)
    nu0 = _as_params(model, lightning_run["moments"]["exp_avg_sq"], lightning_run["weights"])
    for opt, loaded in ((state.g_opt_state, nu0[0]), (state.d_opt_state, nu0[1])):
        adam = _adam_state(opt)
        assert int(adam.count) == 3  # torch's 2 updates + this run's 1
        # nu' = b2 nu + (1 - b2) g^2 >= b2 nu: the loaded second moments were carried on
        for got, old in zip(jax.tree.leaves(adam.nu), jax.tree.leaves(loaded), strict=True):
            assert np.all(np.asarray(got) >= BETAS[1] * old * (1 - 1e-6))
        assert sum(float(np.sum(x)) for x in jax.tree.leaves(loaded)) > 0
