"""dpmjax's Flax drop-in class against diffusers 0.39's ``FlaxDPMSolverMultistepScheduler`` (which
MaxDiffusion still ships), in the same ``jax.lax.fori_loop`` call pattern, with an identity model so
that the scheduler is all that is timed.

    python -m benchmarks.flax_loop [--quick] [--out benchmarks/results/<device>-flax_loop.json]

diffusers 0.40+ has no Flax classes, so 0.39 is imported from a folder of its own (``pip install
--no-deps --target DIR diffusers==0.39.0``; ``$DPMJAX_OLD_DIFFUSERS``, else
``~/.cache/dpmjax-tests/diffusers-0.39.0``, as tests/test_flax_compat.py does) in a subprocess, which
times both classes, alternating, on the same inputs. Reported: microseconds per step, the median of
several repeats (the best beside it), and diffusers' median over dpmjax's (above 1: dpmjax faster).
Without diffusers 0.39 the comparison is skipped with a message. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OLD_VERSION = "0.39.0"
SHAPES = [(1, 4, 64, 64), (16, 4, 64, 64)]
ORDERS = (1, 2, 3)


def device_label() -> str:
    """``python -m benchmarks``' name for this machine's results (``cpu``, ``gpu-nvidia_h200``, ...)."""
    import jax

    device = jax.devices()[0]
    kind = device.device_kind.replace(" ", "_").lower()
    return device.platform if kind == device.platform else f"{device.platform}-{kind}"


def old_diffusers_folder():
    """The folder holding diffusers 0.39, or None."""
    target = os.environ.get("DPMJAX_OLD_DIFFUSERS") or str(Path.home() / ".cache" / "dpmjax-tests" / f"diffusers-{OLD_VERSION}")
    return target if (Path(target) / "diffusers" / "__init__.py").exists() else None


def _loop(scheduler, steps, return_state=False):
    """The Flax Stable Diffusion loop (diffusers' and MaxDiffusion's pipelines), identity model.
    The pipelines keep only the latents (XLA then drops whatever of the state the loop does not
    read); ``return_state`` returns the final state as well, so that all of it is computed."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def run(x, state):
        def body(i, args):
            x, state = args
            t = jnp.array(state.timesteps, dtype=jnp.int32)[i]
            model_output = x  # identity model: the scheduler is what is timed
            return scheduler.step(state=state, model_output=model_output, timestep=t, sample=x).to_tuple()

        x, state = jax.lax.fori_loop(lower=0, upper=steps, body_fun=body, init_val=(x, state))
        return (x, state) if return_state else x

    return run


def worker(shapes, orders, steps, repeats, seconds, variants=("latents",)):
    """Runs in the subprocess (diffusers 0.39 on its path): one JSON row per variant, shape and order.
    Each repeat calls the jitted loop as often as takes about ``seconds``, both classes alternating."""
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import diffusers

    assert diffusers.__version__ == OLD_VERSION, diffusers.__version__
    from diffusers import FlaxDPMSolverMultistepScheduler as Old

    from dpmjax import FlaxDPMSolverMultistepScheduler as Ours

    rows = []
    for variant, shape, order in itertools.product(variants, shapes, orders):
        x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
        timed = {}
        for name, cls in (("dpmjax", Ours), ("diffusers_0_39", Old)):
            scheduler = cls(solver_order=order)
            state = scheduler.set_timesteps(scheduler.create_state(), steps, shape)
            run = _loop(scheduler, steps, return_state=variant == "state")
            jax.block_until_ready(run(x, state))  # compile
            timed[name] = (run, state, [])
        run, state, _ = timed["dpmjax"]
        start = time.perf_counter()
        jax.block_until_ready(run(x, state))
        calls = max(1, round(seconds / (time.perf_counter() - start)))  # repeats of about `seconds` each
        for _ in range(repeats):  # alternate, so that both see the same machine load
            for name, (run, state, times) in timed.items():
                start = time.perf_counter()
                for _ in range(calls):
                    out = run(x, state)
                jax.block_until_ready(out)
                times.append(1e6 * (time.perf_counter() - start) / (calls * steps))
        row = dict(returns=variant, shape=list(shape), order=order, steps=steps, calls_per_repeat=calls)
        for name, (_, _, times) in timed.items():
            row[name] = dict(median=statistics.median(times), best=min(times))
        row["ratio"] = row["diffusers_0_39"]["median"] / row["dpmjax"]["median"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


VARIANTS = {"latents": "the loop's latents returned (the pipelines: XLA drops what of the state the loop does not read)",
            "state": "latents and the final scheduler state returned (all of the state is computed)"}


def compare(quick=False, out=None, folder=None):
    """Runs the worker in a subprocess with diffusers 0.39 on its path; prints the table, writes
    ``out`` (JSON) if given and returns the rows (None when diffusers 0.39 is not there)."""
    folder = folder or old_diffusers_folder()
    steps, repeats, seconds = (50, 7, 0.003) if quick else (50, 21, 0.02)
    print(f"\nFlax fori_loop, identity model, {steps} steps: dpmjax.FlaxDPMSolverMultistepScheduler vs diffusers "
          f"{OLD_VERSION}'s FlaxDPMSolverMultistepScheduler; us per step, median / best of {repeats} alternating repeats "
          f"(of about {1000 * seconds:.0f} ms each)")
    if folder is None:
        print(f"skipped: diffusers {OLD_VERSION} not found (set DPMJAX_OLD_DIFFUSERS to a folder made with "
              f"pip install --no-deps --target DIR diffusers=={OLD_VERSION})")
        return None
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([folder, root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    job = json.dumps(dict(shapes=SHAPES, orders=list(ORDERS), steps=steps, repeats=repeats, seconds=seconds, variants=list(VARIANTS)))
    done = subprocess.run([sys.executable, "-m", "benchmarks.flax_loop", "--worker", job], env=env, cwd=root,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"failed: {done.stderr[-2000:]}")
        return None
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for variant, meaning in VARIANTS.items():
        print(f"\n{variant}: {meaning}")
        print("| shape | order | dpmjax | diffusers 0.39 | diffusers / dpmjax (medians) |")
        print("|---|---|---|---|---|")
        for r in (r for r in rows if r["returns"] == variant):
            print(f"| {'x'.join(map(str, r['shape']))} | {r['order']} | {r['dpmjax']['median']:.1f} / {r['dpmjax']['best']:.1f} | "
                  f"{r['diffusers_0_39']['median']:.1f} / {r['diffusers_0_39']['best']:.1f} | {r['ratio']:.2f}x |")
    if out:
        import jax

        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
                           cpu_count=os.cpu_count(), diffusers=OLD_VERSION, steps=steps, repeats=repeats,
                           seconds_per_repeat=seconds, variants=VARIANTS, rows=rows), f, indent=1)
        print(f"wrote {out}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flax_loop", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about a minute)")
    parser.add_argument("--out", help="JSON file (default: benchmarks/results/<device>[-quick]-flax_loop.json, "
                                      "beside python -m benchmarks' <device>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        worker(shapes=[tuple(s) for s in job["shapes"]], orders=job["orders"], steps=job["steps"], repeats=job["repeats"],
               seconds=job["seconds"], variants=job["variants"])
        return 0
    out = args.out or str(Path(__file__).parent / "results" / f"{device_label()}{'-quick' if args.quick else ''}-flax_loop.json")
    compare(quick=args.quick, out=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
