"""MARLIN pretraining CLI.

    python -m marlin_jax.main --config=configs/vit_base.py --workdir=/tmp/marlin_base
    python -m marlin_jax.main --config=configs/vit_base.py:demo --workdir=/tmp/demo   # CPU, minutes
    python -m marlin_jax.main --config=configs/vit_base.py --workdir=gs://bucket/run \\
        --config.data.source=tfds --config.data.tfds_data_dir=gs://bucket/tfds \\
        --config.global_batch_size=1024 --config.mesh.fsdp=8

Any config field can be overridden with ``--config.x.y=value``. Re-running with the same workdir
resumes from its newest checkpoint. Multi-host: on TPU pods and SLURM the processes find each
other automatically; elsewhere pass ``--coordinator_address=host:port --num_processes=N
--process_id=i`` to every process.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file, e.g. configs/vit_base.py or configs/vit_base.py:demo",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, TensorBoard events, "
                               "reconstruction images (resumed when it holds checkpoints)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "multi-host: host:port of process 0's coordinator")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: index of this process")
_LOCAL_DEVICES = flags.DEFINE_list("local_device_ids", None,
                                   "multi-host: devices this process uses (default: all visible)")


def _auto_cluster() -> bool:
    """Whether the environment is a cluster jax.distributed can discover by itself."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` with the explicit flags, automatically on TPU pods / SLURM /
    Open MPI, and not at all for a single process."""
    import jax

    explicit = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError("multi-host needs all of --coordinator_address, "
                                 "--num_processes and --process_id")
        local = [int(i) for i in _LOCAL_DEVICES.value] if _LOCAL_DEVICES.value else None
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value, local_device_ids=local)
    elif _auto_cluster():
        jax.distributed.initialize()
    logging.info("JAX process %d of %d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.default_backend())


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:  # keep library INFO chatter (orbax) off the console
        logging.set_verbosity(logging.WARNING)
    initialize_distributed()
    from marlin_jax.train.trainer import NonFiniteLossError, train_and_evaluate

    try:
        result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLossError as e:
        logging.error("%s", e)
        print(f"marlin-jax: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    logging.info("done: %s", result)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
