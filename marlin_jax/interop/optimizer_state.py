"""AdamW moments of the original trainer's Lightning ``.ckpt`` -> params-shaped pytrees.

The original LightningModule has two ``torch.optim.AdamW``: the generator's over
``chain(encoder, decoder, enc_dec_proj).parameters()`` and the critic's over
``discriminator.parameters()``; ``optimizer_states`` holds their ``state_dict()``s, whose state
indices follow ``.parameters()`` order, i.e. each module's keys in ``state_dict`` order (the fixed
sin-cos tables hold an index but no state). The moments are mapped with the weights' layout rules.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .checkpoints import CheckpointError, _flat_arrays
from .mapping import _from_torch_layout, torch_key
from .torch_format import cast_bounded, load_torch_file

Params = dict[str, Any]
log = logging.getLogger(__name__)

#: ``.parameters()`` chains of the original trainer's optimisers, in ``optimizer_states`` order.
GENERATOR_PREFIXES = ("encoder.", "decoder.", "enc_dec_proj.")
CRITIC_PREFIXES = ("discriminator.",)


class OptimizerStateError(CheckpointError):
    """An optimiser state in a checkpoint does not fit the configured optimiser or the model."""


@dataclasses.dataclass(frozen=True)
class LightningCheckpoint:
    """The parts of a Lightning ``.ckpt`` the trainer uses (one read of the file); state_dict
    None: no Lightning checkpoint; global_step / optimizer_states None: absent."""

    path: str
    state_dict: OrderedDict[str, np.ndarray] | None
    global_step: int | None
    optimizer_states: list[Any] | None


@dataclasses.dataclass(frozen=True)
class AdamMoments:
    """One Adam(W) state on a params pytree: ``mu`` = torch's ``exp_avg``, ``nu`` =
    ``exp_avg_sq`` (float32, shaped like the params), ``count`` = torch's ``step``."""

    mu: Params
    nu: Params
    count: int


def read_lightning_checkpoint(path: str | os.PathLike) -> LightningCheckpoint:
    """Reads a Lightning ``.ckpt`` once: weights, ``global_step`` and ``optimizer_states``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    raw = load_torch_file(path, allow_opaque=True)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a Lightning checkpoint (a dict), got "
                              f"{type(raw).__name__}")
    if "state_dict" not in raw:  # not a Lightning file (e.g. a plain state_dict named .ckpt)
        return LightningCheckpoint(path, None, None, None)
    step = raw.get("global_step")
    step = int(step) if isinstance(step, (int, np.integer)) and not isinstance(step, bool) else None
    opt = raw.get("optimizer_states")
    if opt is not None and not isinstance(opt, (list, tuple)):
        raise OptimizerStateError(f"{path}: 'optimizer_states' is a {type(opt).__name__}, "
                                  f"expected a list of optimiser state_dicts")
    return LightningCheckpoint(path, _flat_arrays(raw["state_dict"], path), step,
                               None if opt is None else list(opt))


def _close(a: Any, b: float) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
    except (TypeError, ValueError):
        return False


def torch_adam_moments(opt_state: Any, names: Sequence[str],
                       state_dict: Mapping[str, np.ndarray], *, b1: float, b2: float,
                       eps: float, source: str, which: str, weight_decay: float | None = None
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """One torch Adam/AdamW ``state_dict()`` -> ``(exp_avg, exp_avg_sq, step)``, moments keyed by
    parameter name (``names``: in ``.parameters()`` order; stateless ones left out). Settings,
    shapes or steps that do not fit: OptimizerStateError; another ``weight_decay`` is only logged."""
    where = f"{source}: {which} optimiser state"
    if not isinstance(opt_state, dict) or not isinstance(opt_state.get("param_groups"), list) \
            or not isinstance(opt_state.get("state"), dict):
        raise OptimizerStateError(f"{where} is not a torch optimiser state_dict "
                                  f"(needs 'state' and 'param_groups')")
    indices: list[int] = []
    for i, group in enumerate(opt_state["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise OptimizerStateError(f"{where}: param_groups[{i}] has no 'params' list")
        betas = group.get("betas")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and _close(betas[0], b1)
                and _close(betas[1], b2)):
            raise OptimizerStateError(f"{where}: betas {betas} differ from the configured "
                                      f"({b1}, {b2}) (config.optimizer.b1 / b2)")
        if not _close(group.get("eps"), eps):
            raise OptimizerStateError(f"{where}: eps {group.get('eps')} differs from the "
                                      f"configured {eps} (config.optimizer.eps)")
        if weight_decay is not None and not _close(group.get("weight_decay"), weight_decay):
            log.warning("%s: weight_decay %s, the run uses %s (the moments are still valid)",
                        where, group.get("weight_decay"), weight_decay)
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise OptimizerStateError(f"{where}: {flag}=True is not supported (optax adamw)")
        indices.extend(int(p) for p in group["params"])
    if len(indices) != len(names):
        raise OptimizerStateError(
            f"{where} covers {len(indices)} parameters, the checkpoint's state_dict has "
            f"{len(names)} under {sorted({n.split('.', 1)[0] + '.' for n in names})} "
            f"(a different model or optimiser layout)")
    moments: dict[str, dict[str, np.ndarray]] = {"exp_avg": {}, "exp_avg_sq": {}}
    steps: dict[str, int] = {}
    problems = []
    for index, name in zip(indices, names, strict=True):
        entry = opt_state["state"].get(index)
        if entry is None:
            continue
        if not isinstance(entry, dict) or not {"step", "exp_avg", "exp_avg_sq"} <= set(entry):
            problems.append(f"{name} (index {index}): not an Adam state "
                            f"(keys {sorted(entry) if isinstance(entry, dict) else entry!r})")
            continue
        want = tuple(np.shape(state_dict[name]))
        for key, out in moments.items():
            value = entry[key]
            if not isinstance(value, np.ndarray) or value.shape != want:
                problems.append(f"{name} (index {index}): {key} shape "
                                f"{getattr(value, 'shape', type(value).__name__)}, the "
                                f"parameter is {want}")
            else:
                out[name] = cast_bounded(value, np.float32)  # views stay views
        steps[name] = int(np.asarray(entry["step"]).item())
    unknown = sorted(set(opt_state["state"]) - set(indices), key=str)
    if unknown:
        problems.append(f"state for indices {unknown[:10]} that no param_group lists")
    if problems:
        raise OptimizerStateError(f"{where} does not fit the model:\n  " + "\n  ".join(problems))
    distinct = sorted(set(steps.values()))
    if len(distinct) > 1:
        raise OptimizerStateError(f"{where}: parameters are at different Adam steps {distinct} "
                                  f"(optax keeps one count per optimiser)")
    return moments["exp_avg"], moments["exp_avg_sq"], distinct[0] if distinct else 0


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], like: Params, *,
                         source: str = "state_dict") -> Params:
    """A PyTorch-layout state_dict -> a pytree with the structure, shapes and dtypes of ``like``
    (nested dicts keyed like the nnx module tree), with the weights' name and layout rules."""
    missing, mismatched = [], []

    def visit(node: Any, path: tuple) -> Any:
        if isinstance(node, Mapping):
            return {k: visit(v, (*path, k)) for k, v in node.items()}
        key = torch_key(path)
        if key not in state_dict:
            missing.append(key)
            return node
        value = _from_torch_layout(path, np.asarray(state_dict[key]), tuple(np.shape(node)))
        if value.shape != tuple(np.shape(node)):
            mismatched.append(f"{key}: {tuple(np.shape(state_dict[key]))} -> {value.shape}, "
                              f"expected {tuple(np.shape(node))}")
            return node
        # the shape is the model's now, so this copy (of a view, e.g. the zero moments) is bounded
        out = np.asarray(value, dtype=getattr(node, "dtype", np.float32))
        return out if out.flags.c_contiguous and out.flags.writeable else np.array(out, order="C")

    out = visit(like, ())
    if missing or mismatched:
        raise OptimizerStateError(
            f"{source} does not fit the parameters: no entry for {len(missing)} "
            f"{missing[:20]}; mis-shaped {len(mismatched)} {mismatched[:20]}")
    return out


def lightning_adam_moments(ckpt: LightningCheckpoint, g_like: Params, d_like: Params, *,
                           b1: float, b2: float, eps: float, weight_decay: float | None = None
                           ) -> tuple[AdamMoments | None, AdamMoments | None]:
    """The (generator, critic) AdamW moments of an original-trainer ``.ckpt`` on pytrees shaped
    like ``g_like`` / ``d_like``; None for a part the file lacks (or both: no optimiser states).
    Raises OptimizerStateError (naming the file) when a state does not fit."""
    states = ckpt.optimizer_states
    if not states or ckpt.state_dict is None:
        return None, None
    if len(states) != 2:
        raise OptimizerStateError(f"{ckpt.path}: {len(states)} optimiser states, expected 2 "
                                  f"(the original trainer's generator and discriminator AdamW)")
    out: list[AdamMoments | None] = []
    for opt_state, prefixes, like, which in ((states[0], GENERATOR_PREFIXES, g_like, "generator"),
                                             (states[1], CRITIC_PREFIXES, d_like, "discriminator")):
        # chain(*(module.parameters() ...)): per prefix, its keys in (registration) order
        names = [k for prefix in prefixes for k in ckpt.state_dict if k.startswith(prefix)]
        if not names:
            out.append(None)
            continue
        mu_sd, nu_sd, count = torch_adam_moments(opt_state, names, ckpt.state_dict, b1=b1,
                                                 b2=b2, eps=eps, source=ckpt.path, which=which,
                                                 weight_decay=weight_decay)
        if count == 0:  # saved before the first update: torch would start from zeros too
            # zero-strided views, materialised only at the model's shapes (state_dict_to_params):
            # never an allocation sized by the checkpoint's own (possibly expanded) tensors
            zeros = {k: np.broadcast_to(np.float32(0), np.shape(v))
                     for k, v in ckpt.state_dict.items()}
            mu_sd = nu_sd = zeros
        source = f"{ckpt.path}: {which} optimiser state"
        out.append(AdamMoments(state_dict_to_params(mu_sd, like, source=source),
                               state_dict_to_params(nu_sd, like, source=source), count))
    return out[0], out[1]
