"""One-step parity of the G+D train step with a PyTorch reference built from marlin-pytorch's
modules and the original trainer's loss definitions (ControlNet/MARLIN model/marlin.py).

Both sides take one SGD step with learning rate 1 for each optimiser, so the parameter change
IS the gradient: this checks the losses and every gradient of the real ``train_step`` (critic
update first, then the generator update against the updated critic), to 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from marlin_jax.models import MarlinModel, get_config
from marlin_jax.train import state as st
from marlin_jax.train import steps

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

CFG = get_config("marlin_vit_tiny").replace(img_size=32, n_frames=4)
ADV_WEIGHT, GP_WEIGHT = 0.1, 10.0


def _torch_reference(mp, torch):
    from marlin_pytorch.model.decoder import MarlinDecoder
    from marlin_pytorch.model.encoder import MarlinEncoder
    from marlin_pytorch.model.modules import MLP

    c = CFG
    common = dict(img_size=c.img_size, patch_size=c.patch_size, n_frames=c.n_frames,
                  mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, qk_scale=None, drop_rate=0.0,
                  attn_drop_rate=0.0, norm_layer="LayerNorm", init_values=0.0,
                  tubelet_size=c.tubelet_size)

    class Reference(torch.nn.Module):
        """The original Lightning module's networks (same attribute names)."""

        def __init__(self):
            super().__init__()
            self.encoder = MarlinEncoder(embed_dim=c.encoder_embed_dim, depth=c.encoder_depth,
                                         num_heads=c.encoder_num_heads, **common)
            self.decoder = MarlinDecoder(embed_dim=c.decoder_embed_dim, depth=c.decoder_depth,
                                         num_heads=c.decoder_num_heads, **common)
            self.enc_dec_proj = torch.nn.Linear(c.encoder_embed_dim, c.decoder_embed_dim,
                                                bias=False)
            self.discriminator = MLP([c.patch_dim, c.discriminator_hidden, 1],
                                     build_activation=torch.nn.LeakyReLU)

        def forward(self, x, mask):
            return self.decoder(self.enc_dec_proj(self.encoder(x, mask)), mask)

    return Reference()


def _original_step(ref, torch, x, mask, alpha):
    """The original `training_step` with d_steps = g_steps = 1 and SGD(lr=1) optimisers."""
    pt, p = CFG.tubelet_size, CFG.patch_size

    def step():
        pred = ref(x, mask)
        y = x.unfold(2, pt, pt).unfold(3, p, p).unfold(4, p, p)  # b c nt nh nw pt ph pw
        b = y.shape[0]
        y = y.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(b, -1, y.shape[1] * pt * p * p)
        return pred, y[~mask].view(b, -1, y.shape[-1])

    disc = ref.discriminator
    g_named = [(n, q) for n, q in ref.named_parameters()
               if q.requires_grad and not n.startswith("discriminator.")]  # not sin-cos tables
    g_params = [q for _, q in g_named]
    # --- discriminator step (d_step + gradient_penalty_fn of the original)
    pred, y = step()
    d_loss0 = disc(pred).mean() - disc(y).mean()
    fake = pred.detach()
    interp = (alpha * y + (1 - alpha) * fake).detach().requires_grad_(True)
    out = disc(interp)
    grads = torch.autograd.grad(out, interp, torch.ones_like(out), create_graph=True)[0]
    gp = ((grads.reshape(-1, grads.shape[-1]).norm(2, dim=1) - 1) ** 2).mean()
    d_loss = d_loss0 + GP_WEIGHT * gp
    d_grads = torch.autograd.grad(d_loss, list(disc.parameters()))
    with torch.no_grad():
        for q, g in zip(disc.parameters(), d_grads, strict=True):
            q -= g
    # --- generator step
    pred, y = step()
    rec = torch.nn.functional.mse_loss(pred, y)
    adv = ADV_WEIGHT * -disc(pred).mean()
    g_grads = torch.autograd.grad(rec + adv, g_params)
    names = [n for n, _ in g_named]
    losses = {"d_loss": d_loss, "d_loss0": d_loss0, "gp": gp, "rec_loss": rec, "adv_loss": adv}
    return ({k: float(v.detach()) for k, v in losses.items()},
            dict(zip(names, [g.numpy() for g in g_grads], strict=True)),
            {f"discriminator.{n}": g.numpy()
             for (n, _), g in zip(disc.named_parameters(), d_grads, strict=True)})


def _sgd_task(num_visible: int) -> steps.Task:
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)
    one = lambda s: jnp.float32(1.0)  # noqa: E731
    return steps.Task(st.build_model_def(CFG), sgd, sgd, one, one,
                      steps.StepConfig(num_visible=num_visible, adv_weight=ADV_WEIGHT,
                                       gp_weight=GP_WEIGHT))


def test_one_step_matches_original_losses_and_gradients(marlin_pytorch):
    import torch
    from flax import nnx

    from marlin_jax.interop import model_to_state_dict, state_dict_to_model

    torch.manual_seed(0)
    ref = _torch_reference(marlin_pytorch, torch).float()
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}

    model = MarlinModel(CFG, rngs=nnx.Rngs(1), with_decoder=True, with_discriminator=True)
    state_dict_to_model(model, sd, strict=True, source="torch reference")
    g_params, d_params = st.split_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    rng = np.random.default_rng(0)
    b, n, k = 3, CFG.num_tokens, 3
    video = rng.integers(0, 256, (b, CFG.n_frames, CFG.img_size, CFG.img_size, 3), np.uint8)
    mask = np.zeros((b, n), bool)
    for i in range(b):
        mask[i, rng.choice(n, k, replace=False)] = True

    task = _sgd_task(k)
    state = st.TrainState(step=jnp.int32(0), g_params=g_params, d_params=d_params,
                          g_opt_state=task.g_tx.init(g_params),
                          d_opt_state=task.d_tx.init(d_params), rng=jax.random.PRNGKey(3))
    alpha = float(steps.gp_alpha(state.rng, state.step, 0))
    before = model_to_state_dict(model)
    new_state, metrics = jax.jit(lambda s, bt: steps.train_step(task, s, bt))(
        state, {"video": video, "mask": mask})

    x = torch.from_numpy(video.astype(np.float32) / 255.0).permute(0, 4, 1, 2, 3).contiguous()
    want, g_want, d_want = _original_step(ref, torch, x, torch.from_numpy(mask), alpha)

    got = {name: float(metrics[name]) for name in want}
    np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want],
                               rtol=1e-4, atol=1e-6, err_msg=str((got, want)))
    assert float(metrics["g_loss"]) == pytest.approx(want["rec_loss"] + want["adv_loss"], 1e-5)

    nnx.update(model, {**new_state.g_params, **new_state.d_params})
    after = model_to_state_dict(model)
    for name, grad in {**g_want, **d_want}.items():
        ours = before[name] - after[name]  # SGD with lr 1: the step's gradient
        scale = max(1e-3, float(np.abs(grad).max()))
        np.testing.assert_allclose(ours, grad, rtol=1e-4, atol=1e-4 * scale, err_msg=name)
    assert set(g_want) | set(d_want) <= set(before)
