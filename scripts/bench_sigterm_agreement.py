"""Per-step cost of agreeing on SIGTERM across processes (:class:`marlin_jax.distributed.LaggedAny`,
a one-element all-reduce per step read one step behind) in the trainer's real compiled step.

    python scripts/bench_sigterm_agreement.py                  # 2 processes x 2 CPU devices, demo
    python scripts/bench_sigterm_agreement.py --processes 2 --devices 4 --steps 10 --rounds 6

Launches itself as ``--processes`` jax.distributed processes on 127.0.0.1; each runs the step of
``configs/vit_small.py:demo`` (or ``--config``) on one fixed batch, as the trainer's loop does
(step dispatched, NaN flag of the step before read), in interleaved blocks of ``--steps`` steps
without and with the agreement, and process 0 prints the median seconds per step of each and
the host time spent inside the agreement call (what it adds to a step at most).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.processes, args.process_id)
    from configs import vit_small
    from marlin_jax import sharding as shd
    from marlin_jax.distributed import LaggedAny
    from marlin_jax.train.program import build_program, schedule_from_config

    config = vit_small.get_config("demo")
    config.global_batch_size = max(config.global_batch_size, jax.device_count())
    config.mesh.data = -1
    mesh = shd.make_mesh(config.mesh.to_dict())
    program = build_program(config, mesh, schedule_from_config(config, 1000),
                            process_count=jax.process_count())
    state = shd.sharded_init(program.init_fn, mesh)
    compiled = program.lower_train_step().compile()
    rng = np.random.default_rng(jax.process_index())
    local = program.global_batch // jax.process_count()
    n, k = program.model_cfg.num_tokens, program.num_visible
    mask = np.zeros((local, n), bool)
    for row in mask:
        row[rng.choice(n, k, replace=False)] = True
    video_shape = program.abstract_batch["video"].shape[1:]
    batch = shd.global_batch({"video": rng.integers(0, 256, (local, *video_shape), np.uint8),
                              "mask": mask}, mesh)
    agree = LaggedAny()
    times: dict[bool, list[float]] = {False: [], True: []}
    calls: list[float] = []  # host seconds inside each agreement call
    with program.mesh_context():
        for r in range(args.rounds + 1):  # round 0 warms up
            for on in ((False, True) if r % 2 else (True, False)):
                prev = None
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    state, metrics = compiled(state, batch)
                    if prev is not None:
                        bool(jax.device_get(prev["finite"]))
                    prev = metrics
                    if on:
                        t1 = time.perf_counter()
                        agree(False)
                        calls.append(time.perf_counter() - t1)
                jax.block_until_ready(state)
                if r:
                    times[on].append((time.perf_counter() - t0) / args.steps)
    if jax.process_index() == 0:
        off, on = float(np.median(times[False])), float(np.median(times[True]))
        print(f"{jax.process_count()} processes x {jax.local_device_count()} devices, "
              f"{args.rounds} interleaved rounds of {args.steps} steps, batch "
              f"{program.global_batch}: median s/step without agreement {off:.4f}, with "
              f"{on:.4f} ({100 * (on - off) / off:+.2f} %); host time in the agreement call: "
              f"median {1e3 * float(np.median(calls)):.3f} ms, p90 "
              f"{1e3 * float(np.percentile(calls, 90)):.3f} ms; all rounds: without "
              f"{[round(t, 4) for t in times[False]]}, with {[round(t, 4) for t in times[True]]}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--process_id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.process_id is not None:
        _worker(args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
    base = [sys.executable, os.path.abspath(__file__), f"--processes={args.processes}",
            f"--steps={args.steps}", f"--rounds={args.rounds}", f"--port={port}"]
    procs = [subprocess.Popen(base + [f"--process_id={i}"], env=env)
             for i in range(args.processes)]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"workers exited with {codes}")


if __name__ == "__main__":
    main()
