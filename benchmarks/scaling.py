"""Throughput of a sharded inversion against the number of devices and processes.

    python -m benchmarks.scaling [--rows 4096] [--steps 25] [--out benchmarks/results/scaling.json]

Each configuration runs in fresh processes (the device count is fixed when jax starts): 1, 2, 4
and 8 devices in one process (on a CPU: virtual devices, ``--xla_force_host_platform_device_count``,
sharing the same cores), and 2 processes x 4 devices under ``jax.distributed`` on loopback. The
work is ``dpmjax.invert`` of held-out digits with the shipped model (unguided, DPM-Solver++ order
2), the batch split over a ``data`` mesh axis. Reported: rows per second (best of 3 after a warm-up
call), and the compiled program's memory per device (XLA's memory analysis: arguments, outputs and
temporaries of one device's program). Then ``dpmjax invert-batch`` end to end (start-up, one
compile per device, reading and writing included) on 1 and 8 devices and 2 processes x 4.
"""

from __future__ import annotations

import argparse
import json
import math
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
    from dpmjax.trajectories.inversion import mirrored_state
    from dpmjax.trajectories.scan import ScanOptions, scan_steps_jit

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
    compiled = scan_steps_jit.lower(inverse, model, ScanOptions(label="invert"), state=mirror, x=x, cond=None, keys=None,
                                    noises=None).compile()
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


def job(devices: int, processes: int, chunks: int, chunk_rows: int, steps: int) -> dict:
    """``dpmjax invert-batch`` end to end (start-up, one compile per device, reading, writing) on a
    store of ``chunks`` x ``chunk_rows`` held-out digits, in fresh processes."""
    import tempfile

    import numpy as np

    from dpmjax.models import digits

    images = digits.heldout()[0]
    with tempfile.TemporaryDirectory() as root:
        store = os.path.join(root, "input")
        os.mkdir(store)
        for i in range(chunks):
            np.save(os.path.join(store, f"part-{i:04d}.npy"), np.resize(np.roll(images, i, axis=0), (chunk_rows,) + images.shape[1:]))
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        command = [sys.executable, "-m", "dpmjax", "invert-batch", store, os.path.join(root, "output"), "--steps", str(steps)]
        if processes > 1:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            command += ["--distributed", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(processes)]
        start = time.perf_counter()
        jobs = [subprocess.Popen(command + (["--process-id", str(p)] if processes > 1 else []), env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in range(processes)]
        outputs = [j.communicate() for j in jobs]
        seconds = time.perf_counter() - start
        for j, (_, err) in zip(jobs, outputs):
            if j.returncode:
                raise RuntimeError(err[-3000:])
        written = len(os.listdir(os.path.join(root, "output", "chunks")))
        with open(os.path.join(root, "output", "events.jsonl")) as f:
            records = [e for e in map(json.loads, f) if e["event"] == "recorded"]
    # steady state: from the moment every device has recorded its first chunk (start-up and the
    # compiles are behind us) to the last record, the chunks recorded in between
    warm = max(min(e["time"] for e in records if e["device"] == d) for d in {e["device"] for e in records})
    later = [e["time"] for e in records if e["time"] > warm]
    steady = len(later) * chunk_rows / (max(later) - warm) if later else float("nan")
    return {"devices": devices * processes, "processes": processes, "chunks": chunks, "chunk_rows": chunk_rows, "steps": steps,
            "written": written, "seconds": seconds, "rows_per_second": chunks * chunk_rows / seconds,
            "steady_rows_per_second": steady}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--job-chunks", type=int, default=64)
    parser.add_argument("--job-rows", type=int, default=256)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs=3, type=int, metavar=("PROCESS", "PROCESSES", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.rows, args.steps, *args.worker)
        return 0
    results = []
    print("| devices | processes | rows/s | vs 1 device | memory per device (MiB) |\n|---|---|---|---|---|")
    for devices, processes in ((1, 1), (2, 1), (4, 1), (8, 1), (4, 2)):
        result = launch(devices, processes, args.rows, args.steps)
        results.append(result)
        memory = "n/a" if result["bytes_per_device"] is None else f"{result['bytes_per_device'] / 2**20:.1f}"
        print(f"| {result['devices']} | {result['processes']} | {result['rows_per_second']:.0f} | "
              f"{result['rows_per_second'] / results[0]['rows_per_second']:.2f}x | {memory} |", flush=True)
    jobs = []
    print(f"\nthe batch job, end to end: {args.job_chunks} chunks x {args.job_rows} rows\n"
          f"| devices | processes | seconds | rows/s | steady rows/s | vs 1 device (steady) |\n|---|---|---|---|---|---|")
    for devices, processes in ((1, 1), (8, 1), (4, 2)):
        result = job(devices, processes, args.job_chunks, args.job_rows, args.steps)
        assert result["written"] == args.job_chunks, result
        jobs.append(result)
        steady, ratio = result["steady_rows_per_second"], result["steady_rows_per_second"] / jobs[0]["steady_rows_per_second"]
        print(f"| {result['devices']} | {processes} | {result['seconds']:.1f} | {result['rows_per_second']:.0f} | "
              + (f"{steady:.0f} | {ratio:.2f}x |" if math.isfinite(ratio) else "n/a (too few chunks) | n/a |"), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "results": results, "job": jobs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
