"""Multi-host plumbing shared by the CLIs (pretraining, evaluation): the ``jax.distributed``
flags, their initialisation, and host-side agreement between processes. Imports nothing of ours.

On TPU pods, SLURM and Open MPI the processes find each other automatically; elsewhere every
process gets ``--coordinator_address=host:port --num_processes=N --process_id=i``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils


def define_flags() -> dict[str, Any]:
    """Defines the multi-host flags (call once, at a CLI module's import); returns the holders
    for :func:`initialize_from_flags`."""
    return {
        "coordinator_address": flags.DEFINE_string(
            "coordinator_address", None, "multi-host: host:port of process 0's coordinator"),
        "num_processes": flags.DEFINE_integer("num_processes", None,
                                              "multi-host: number of processes"),
        "process_id": flags.DEFINE_integer("process_id", None, "multi-host: index of this process"),
        "local_device_ids": flags.DEFINE_list(
            "local_device_ids", None, "multi-host: devices this process uses (default: all)"),
    }


def _auto_cluster() -> bool:
    """Whether the environment is a cluster jax.distributed can discover by itself."""
    env = os.environ
    return ((int(env.get("SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in env)
            or "," in env.get("TPU_WORKER_HOSTNAMES", "")
            or int(env.get("OMPI_COMM_WORLD_SIZE") or 1) > 1)


def initialize_from_flags(holders: dict[str, Any]) -> None:
    """``jax.distributed.initialize`` with the explicit flags, automatically on TPU pods / SLURM /
    Open MPI, and not at all for a single process."""
    explicit = [holders[name].value for name in ("coordinator_address", "num_processes", "process_id")]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError("multi-host needs all of --coordinator_address, "
                                 "--num_processes and --process_id")
        local = holders["local_device_ids"].value
        jax.distributed.initialize(*explicit, local_device_ids=[int(i) for i in local] if local else None)
    elif _auto_cluster():
        jax.distributed.initialize()
    logging.info("JAX process %d of %d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.default_backend())


def any_process(*values: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over all processes (one collective; every process must call it at the
    same point). A single process gets its own flags back."""
    if jax.process_count() == 1:
        return tuple(bool(v) for v in values)
    gathered = multihost_utils.process_allgather(np.asarray(values, dtype=bool))
    return tuple(bool(v) for v in np.asarray(gathered).reshape(-1, len(values)).any(axis=0))


def host_value(x: Any) -> np.ndarray:
    """A device array as numpy on this host; for an array spanning other processes' devices it
    must be replicated (e.g. a jitted step's loss or logits), and a local copy is read."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)
