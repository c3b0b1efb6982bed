"""Throughput of a sharded inversion against the number of devices and processes.

    python -m benchmarks.scaling [--rows 4096] [--steps 25] [--out benchmarks/results/scaling.json]

Each configuration runs in fresh processes (the device count is fixed when jax starts): 1, 2, 4
and 8 devices in one process (on a CPU: virtual devices, ``--xla_force_host_platform_device_count``,
sharing the same cores), and 2 processes x 4 devices under ``jax.distributed`` on loopback. The
work is ``dpmjax.invert`` of held-out digits with the shipped model (unguided, DPM-Solver++ order
2), the batch split over a ``data`` mesh axis. Reported: rows per second (best of 3 after a warm-up
call), and the compiled program's memory per device (XLA's memory analysis: arguments, outputs and
temporaries of one device's program).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def worker(rows: int, steps: int, process_id: int, processes: int, port: int) -> None:
    import jax

    if processes > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=processes, process_id=process_id)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import dpmjax
    from dpmjax.models import digits
    from dpmjax.trajectory import _scan_steps_jit, mirrored_state

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    images = digits.heldout()[0]
    local = rows // jax.process_count()
    data = np.resize(images, (rows,) + images.shape[1:])[jax.process_index() * local:][:local]
    x = jax.make_array_from_process_local_data(sharding, data, (rows,) + images.shape[1:])
    model = digits.unguided_model()
    scheduler = dpmjax.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")

    def run():
        return dpmjax.invert(model, x, scheduler, steps).sample.block_until_ready()

    run()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    forward = scheduler.set_timesteps(scheduler.create_state(), steps, x.shape)
    inverse, mirror = mirrored_state(scheduler, forward, x.shape)
    compiled = _scan_steps_jit.lower(inverse, model, False, False, False, 1, False, "invert", mirror, x, None, None, None).compile()
    memory = compiled.memory_analysis()
    per_device = None if memory is None else int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes)
    if jax.process_index() == 0:
        print(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(), "rows": rows, "steps": steps,
                          "seconds": min(times), "rows_per_second": rows / min(times), "bytes_per_device": per_device,
                          "backend": jax.default_backend()}))


def launch(devices: int, processes: int, rows: int, steps: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jobs = [subprocess.Popen([sys.executable, "-m", "benchmarks.scaling", "--worker", str(p), str(processes), str(port),
                              "--rows", str(rows), "--steps", str(steps)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for p in range(processes)]
    outputs = [job.communicate() for job in jobs]
    for job, (_, err) in zip(jobs, outputs):
        if job.returncode:
            raise RuntimeError(err[-3000:])
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs=3, type=int, metavar=("PROCESS", "PROCESSES", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.rows, args.steps, *args.worker)
        return 0
    results = []
    print(f"| devices | processes | rows/s | vs 1 device | memory per device (MiB) |\n|---|---|---|---|---|")
    for devices, processes in ((1, 1), (2, 1), (4, 1), (8, 1), (4, 2)):
        result = launch(devices, processes, args.rows, args.steps)
        results.append(result)
        memory = "n/a" if result["bytes_per_device"] is None else f"{result['bytes_per_device'] / 2**20:.1f}"
        print(f"| {result['devices']} | {result['processes']} | {result['rows_per_second']:.0f} | "
              f"{result['rows_per_second'] / results[0]['rows_per_second']:.2f}x | {memory} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
