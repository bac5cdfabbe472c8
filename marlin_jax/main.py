"""MARLIN pretraining CLI.

    python -m marlin_jax.main --config=configs/vit_base.py --workdir=/tmp/marlin_base
    python -m marlin_jax.main --config=configs/vit_base.py:demo --workdir=/tmp/demo   # CPU, minutes
    python -m marlin_jax.main --config=configs/vit_base.py --workdir=gs://bucket/run \\
        --config.data.source=tfds --config.data.tfds_data_dir=gs://bucket/tfds \\
        --config.global_batch_size=1024 --config.mesh.fsdp=8

Any config field can be overridden with ``--config.x.y=value``. Re-running with the same workdir
resumes from its newest checkpoint (a damaged newest step is renamed to ``<step>.damaged`` and the
one before it is used); a workdir holding another run is refused (``--config.fresh_start=True``
moves its contents aside to ``<workdir>/previous-<time>/`` and starts over).

Exit status: 0 finished; 2 the workdir holds another run (or its metadata is damaged); 3 NaN/Inf
loss; 4 disk full while checkpointing (the previous step is kept); 143 preempted by SIGTERM after
saving a checkpoint (rerun to resume). Multi-host: on TPU pods and SLURM the processes find each
other automatically; elsewhere pass ``--coordinator_address=host:port --num_processes=N
--process_id=i`` to every process.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from marlin_jax.distributed import define_flags, initialize_from_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file, e.g. configs/vit_base.py or configs/vit_base.py:demo",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, TensorBoard events, "
                               "reconstruction images (resumed when it holds checkpoints)")
_DISTRIBUTED = define_flags()

EXIT_MISMATCH = 2  # the workdir holds another run, or its metadata is damaged; nothing written
EXIT_NON_FINITE = 3  # NaN/Inf loss; the last good checkpoint is kept
EXIT_DISK_FULL = 4  # no space left while checkpointing; the previous checkpoint is kept


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:  # keep library INFO chatter (orbax) off the console
        logging.set_verbosity(logging.WARNING)
    initialize_from_flags(_DISTRIBUTED)
    from marlin_jax.preemption import EXIT_PREEMPTED, PreemptedError
    from marlin_jax.train.trainer import (
        CheckpointDiskFullError,
        NonFiniteLossError,
        RunMismatchError,
        train_and_evaluate,
    )

    statuses = {RunMismatchError: EXIT_MISMATCH, NonFiniteLossError: EXIT_NON_FINITE,
                CheckpointDiskFullError: EXIT_DISK_FULL}
    try:
        result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except PreemptedError as e:
        logging.warning("%s", e)
        print(f"marlin-jax: {e}", flush=True)
        sys.exit(EXIT_PREEMPTED)
    except tuple(statuses) as e:
        logging.error("%s", e)
        print(f"marlin-jax: {e}", file=sys.stderr, flush=True)
        sys.exit(next(status for cls, status in statuses.items() if isinstance(e, cls)))
    logging.info("done: %s", result)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
