"""Linear probe and the shared training loop (loss, schedule, early stopping, checkpoints)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from marlin_jax.evaluation.datasets import FeatureSet
from marlin_jax.evaluation.probe import predict_logits, train_linear_probe
from marlin_jax.evaluation.scores import classification_metrics
from marlin_jax.evaluation.training import (
    FitOptions,
    Plateau,
    classification_loss,
    plateau_step,
    restore_best,
    split_model,
)


def features(n, task, seed, dim=12, outputs=3):
    """Linearly separable-ish features with labels of ``task``."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(size=(dim, outputs))
    x = rng.normal(size=(n, dim)).astype(np.float32)
    z = x @ w + 0.3 * rng.normal(size=(n, outputs))
    y = {"multilabel": z > 0, "binary": z[:, 0] > 0, "multiclass": z.argmax(1)}[task]
    return FeatureSet(x, y, tuple(str(i) for i in range(n)), {})


def test_losses_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    y = rng.random((6, 4)) < 0.5
    ours = classification_loss(jnp.asarray(logits), jnp.asarray(y), "multilabel")
    ref = torch.nn.BCEWithLogitsLoss()(torch.from_numpy(logits).flatten(),
                                      torch.from_numpy(y).float().flatten())
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    yc = rng.integers(0, 4, 6)
    ours = classification_loss(jnp.asarray(logits), jnp.asarray(yc), "multiclass")
    ref = torch.nn.CrossEntropyLoss()(torch.from_numpy(logits), torch.from_numpy(yc))
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    ours = classification_loss(jnp.asarray(logits[:, :1]), jnp.asarray(y[:, 0]), "binary")
    ref = torch.nn.BCEWithLogitsLoss()(torch.from_numpy(logits[:, 0]),
                                      torch.from_numpy(y[:, 0]).float())
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)


def test_plateau_schedule_matches_torch():
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1e-4)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=7, min_lr=1e-8)
    rng = np.random.default_rng(0)
    losses = np.concatenate([np.linspace(1, 0.5, 10), 0.5 + 0.01 * rng.random(60)])
    state = Plateau(lr=1e-4)
    for loss in losses:
        sched.step(float(loss))
        state = plateau_step(state, float(loss), factor=0.5, patience=7, min_lr=1e-8)
        assert state.lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    assert state.lr < 1e-4  # it did decay


@pytest.mark.parametrize("task", ["multilabel", "binary", "multiclass"])
def test_linear_probe_learns_and_checkpoints_best(tmp_path, task):
    train, val, test = (features(n, task, s) for n, s in [(400, 0), (150, 1), (150, 2)])
    outputs = 1 if task == "binary" else 3
    options = FitOptions(learning_rate=1e-2, max_epochs=25, batch_size=32, patience=8)
    logs = []
    ckpt = tmp_path / "ckpt" if task == "multilabel" else None  # orbax saves cost seconds
    model, result = train_linear_probe(train, val, task=task, num_outputs=outputs,
                                       options=options, checkpoint_dir=ckpt, log=logs.append)
    assert result.best_metric == max(h["val_auroc"] for h in result.history)
    assert result.best_metric > 0.95
    test_metrics = classification_metrics(predict_logits(model, test.x), test.labels, task)
    assert test_metrics["auroc"] > 0.95 and test_metrics["acc"] > 0.8
    assert any(line.startswith("stopped:") for line in logs)
    if ckpt is None:
        return
    # the checkpoint on disk holds the best-epoch parameters the model returned
    _, params, _ = split_model(model)
    restored = restore_best(tmp_path / "ckpt", params)
    np.testing.assert_array_equal(np.asarray(restored["head"]["kernel"]),
                                  np.asarray(params["head"]["kernel"]))


def test_standardised_head_is_linear_in_the_features():
    from marlin_jax.evaluation.probe import make_linear_head

    rng = np.random.default_rng(0)
    x = (5.0 + 0.1 * rng.normal(size=(50, 6))).astype(np.float32)
    head = make_linear_head(x, 2, standardize=True)
    w, b = np.asarray(head.head.kernel[...]), np.asarray(head.head.bias[...])
    z = (x - x.mean(0)) / x.std(0)
    np.testing.assert_allclose(np.asarray(head(jnp.asarray(x))), z @ w + b, rtol=1e-4, atol=1e-4)
    plain = make_linear_head(x, 2)
    np.testing.assert_allclose(np.asarray(plain(jnp.asarray(x))),
                               x @ np.asarray(plain.head.kernel[...]) + np.asarray(
                                   plain.head.bias[...]), rtol=1e-4, atol=1e-5)


def test_early_stopping_and_learning_rate_stop():
    train, val = features(64, "binary", 0), features(64, "binary", 1)
    # lr already at the stop threshold: stops before any epoch -> no best -> clear error
    with pytest.raises(RuntimeError, match="no epoch produced"):
        train_linear_probe(train, val, task="binary", num_outputs=1,
                           options=FitOptions(learning_rate=1e-6), log=lambda s: None)
    # a validation set with a single class has no AUROC: never a silent 0
    one_class = FeatureSet(val.x, np.ones(64, bool), val.keys, {})
    with pytest.raises(RuntimeError, match="finite validation auroc"):
        train_linear_probe(train, one_class, task="binary", num_outputs=1,
                           options=FitOptions(max_epochs=3), log=lambda s: None)
    _, result = train_linear_probe(train, val, task="binary", num_outputs=1,
                                   options=FitOptions(learning_rate=0.0, stop_lr=-1.0, max_epochs=50,
                                                      patience=3), log=lambda s: None)
    assert result.stop_reason.startswith("no validation improvement for 3")
    assert len(result.history) == result.best_epoch + 4


def test_weight_decay_objective_is_l2_logistic_regression():
    """With ``weight_decay`` the probe minimises scikit-learn's L2 logistic regression objective
    (``C = 1 / (weight_decay * N)``): full-batch Adam, decayed to 0, lands on its solution."""
    import jax
    from sklearn.linear_model import LogisticRegression

    from marlin_jax.evaluation.probe import make_linear_head
    from marlin_jax.evaluation.training import make_train_step

    data = features(96, "binary", 0, dim=8)
    x, y = data.x, data.labels
    wd, steps = 0.05, 3000
    head = make_linear_head(x, 1, standardize=True)
    graphdef, params, rest = split_model(head)
    tx = FitOptions().optimizer()
    step = make_train_step(graphdef, "binary", tx, weight_decay=wd)
    xs, ys = jnp.asarray(x), jnp.asarray(y, jnp.float32)

    @jax.jit
    def train(params):
        def body(carry, t):
            p, o = carry
            p, o, loss = step(p, o, rest, xs, ys, 0.05 * (1.0 - t / steps))
            return (p, o), loss
        return jax.lax.scan(body, (params, tx.init(params)), jnp.arange(steps))[0][0]

    params = train(params)
    z = (x - x.mean(0)) / x.std(0)
    ref = LogisticRegression(C=1.0 / (wd * len(x)), tol=1e-10, max_iter=10_000).fit(z, y)
    np.testing.assert_allclose(np.asarray(params["head"]["kernel"])[:, 0], ref.coef_[0],
                               atol=2e-3)
    np.testing.assert_allclose(np.asarray(params["head"]["bias"]), ref.intercept_, atol=2e-3)
    # and the penalty is what changed the solution: unregularised weights are much larger
    free = LogisticRegression(C=1e6, tol=1e-10, max_iter=10_000).fit(z, y)
    assert np.linalg.norm(free.coef_) > 2 * np.linalg.norm(ref.coef_)


def test_l2_penalty_skips_biases():
    from marlin_jax.evaluation.training import l2_penalty

    params = {"head": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full((2,), 100.0)},
              "norm": {"scale": jnp.ones(3)}}
    assert float(l2_penalty(params)) == pytest.approx(0.5 * 6 * 4.0)
