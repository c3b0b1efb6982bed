"""Run in a fresh process with ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (and, for
several processes, ``jax.distributed`` arguments): dpmjax trajectories on a data-parallel mesh
against the same computation on one device. Writes ``OUT/result-P.npz`` per process and prints a
JSON report (process 0).

    python tests/sharding_check.py OUT [PROCESS_ID NUM_PROCESSES PORT]
"""

from __future__ import annotations

import json
import sys

import jax

if len(sys.argv) > 2:  # many processes on loopback, CPU collectives
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[4]}", num_processes=int(sys.argv[3]),
                               process_id=int(sys.argv[2]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import dpmjax  # noqa: E402
from dpmjax.models import analytic  # noqa: E402
from dpmjax.models import digits  # noqa: E402

ROWS, N = 32, 10


def trajectories(mesh, x, y, z) -> tuple:
    """Everything the check compares, for rows ``x`` (labels ``y``, mixture data ``z``) on ``mesh``."""
    model = digits.load()

    def guided(x, t, labels):  # global arrays travel as cond: a jitted function may not close over them
        return dpmjax.classifier_free_guidance(model.conditional, labels, jnp.full_like(labels, digits.NULL_LABEL), 3.0)(x, t)

    scheduler = dpmjax.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    inverted = dpmjax.invert(guided, x, scheduler, N, cond=y, return_samples=True)
    back = dpmjax.sample(guided, inverted.sample, scheduler, N, cond=y)
    # an element-wise model (the exact denoiser of a Gaussian mixture): no matmul whose rounding
    # depends on the rows per device, so every device count must give the same bits
    analytic_noise = dpmjax.invert(analytic.timestep_model(analytic.GaussianMixture(), scheduler.config), z, scheduler, 25).sample

    # the scheduler state itself on the mesh: the model-output history split along the batch
    state = scheduler.set_timesteps(scheduler.create_state(), N, x.shape)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree_util.tree_map(lambda _: replicated, state).replace(
        model_outputs=NamedSharding(mesh, PartitionSpec(None, "data")))
    state = jax.tree_util.tree_map(  # every process holds the (host-computed) state; each places its part
        lambda a, s: jax.make_array_from_callback(a.shape, s, lambda index: np.asarray(a)[index]), state, shardings)

    @jax.jit
    def loop(state, x, labels):
        def body(carry, t):
            x, state = carry
            x, state = scheduler.step(state, guided(x, t, labels), t, x, return_dict=False)
            return (x, state), None
        (x, state), _ = jax.lax.scan(body, (x, state), state.timesteps)
        return x, state

    stepped, final_state = loop(state, inverted.sample, y)
    return {"noise": inverted.sample, "path": inverted.samples, "back": back.sample, "stepped": stepped,
            "analytic": analytic_noise}, final_state


def main(out: str) -> dict:
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    images, labels = (np.asarray(a[:ROWS]) for a in digits.heldout())
    mixture = np.asarray(analytic.GaussianMixture().sample(jax.random.PRNGKey(0), (ROWS, 16)))
    per_process = ROWS // jax.process_count()
    mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    x, y, z = (jax.make_array_from_process_local_data(rows, a[mine], a.shape) for a in (images, labels, mixture))
    results, final_state = trajectories(mesh, x, y, z)

    report = {name: str(a.sharding.spec) for name, a in results.items()}
    report["history"] = str(final_state.model_outputs.sharding.spec)
    report["devices"] = jax.device_count()
    report["processes"] = jax.process_count()
    report["local_shards"] = len(inverted_shards := results["noise"].addressable_shards)
    report["shard_rows"] = inverted_shards[0].data.shape[0]
    gathered = {name: np.asarray(multihost_utils.process_allgather(a, tiled=True)) for name, a in results.items()}
    if jax.device_count() == 1:  # the 8-device split, run piece by piece on this one device
        pieces = [trajectories(mesh, images[i:i + ROWS // 8], labels[i:i + ROWS // 8], mixture[i:i + ROWS // 8])[0]
                  for i in range(0, ROWS, ROWS // 8)]
        for name in results:
            gathered[f"{name}_by_shard"] = np.concatenate([np.asarray(p[name]) for p in pieces], axis=1 if name == "path" else 0)
    if jax.process_index() == 0:
        np.savez(f"{out}/result.npz", **gathered)
    return report


if __name__ == "__main__":
    report = main(sys.argv[1])
    if jax.process_index() == 0:
        print(json.dumps(report))
