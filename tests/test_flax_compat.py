"""``dpmjax.FlaxDPMSolverMultistepScheduler`` against the real thing: diffusers 0.39's Flax class,
run live in a subprocess (diffusers 0.40+ no longer has it; 0.39 is installed beside the test
environment with ``pip --target``, by .ci/run or on first use here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax import FlaxDPMSolverMultistepScheduler

OLD_VERSION = "0.39.0"

OLD_LOOP = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import logging; logging.disable(logging.WARNING)
    import numpy as np, jax, jax.numpy as jnp
    import diffusers
    assert diffusers.__version__ == sys.argv[2], diffusers.__version__
    from diffusers import FlaxDPMSolverMultistepScheduler
    job = json.loads(open(sys.argv[1]).read())
    results = {}
    for name, case in job.items():
        scheduler = FlaxDPMSolverMultistepScheduler(**case["config"])
        state = scheduler.set_timesteps(scheduler.create_state(), case["n"], tuple(case["shape"]))
        x = jnp.asarray(np.load(case["x"]))

        def body(i, args):
            x, state = args
            t = jnp.array(state.timesteps, dtype=jnp.int32)[i]
            out = 0.5 * jnp.tanh(x) + 0.01 * t / 1000.0
            return scheduler.step(state, out, t, x).to_tuple()

        x, state = jax.lax.fori_loop(0, case["n"], body, (x, state))
        noisy = scheduler.add_noise(state, x, jnp.ones_like(x), jnp.array([10, 500]))
        np.save(case["x"] + ".out.npy", np.asarray(x))
        np.save(case["x"] + ".noisy.npy", np.asarray(noisy))
        results[name] = [int(t) for t in np.asarray(state.timesteps)]
    print(json.dumps(results))
    """
)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CASES = {
    "sd-default-25": (dict(SD), 25),
    "sd-default-50": (dict(SD), 50),
    "order1-20": (dict(solver_order=1), 20),
    "order1-sd-trailing-12": (dict(SD, solver_order=1, timestep_spacing="trailing"), 12),
    "order3-10": (dict(solver_order=3), 10),
    "order3-no-lower-final-20": (dict(solver_order=3, lower_order_final=False), 20),
    "dpmsolver-heun-12": (dict(algorithm_type="dpmsolver", solver_type="heun"), 12),
    "v-prediction-trailing-15": (dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"), 15),
    "sample-prediction-8": (dict(prediction_type="sample"), 8),
}


@pytest.fixture(scope="module")
def old_diffusers() -> str:
    """A folder holding diffusers 0.39 (the last release with Flax), not on this process' path."""
    target = os.environ.get("DPMJAX_OLD_DIFFUSERS") or str(Path.home() / ".cache" / "dpmjax-tests" / f"diffusers-{OLD_VERSION}")
    if not (Path(target) / "diffusers" / "__init__.py").exists():
        # installed beside and moved into place in one rename: parallel test workers may race here
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix="diffusers-", dir=Path(target).parent)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", staging,
                        f"diffusers=={OLD_VERSION}"], check=True)
        try:
            os.rename(staging, target)
        except OSError:  # another worker got there first
            shutil.rmtree(staging, ignore_errors=True)
    return target


def run_old(old_diffusers, tmp_path, cases):
    job = {}
    for name, (config, n) in cases.items():
        x = np.random.default_rng(len(name)).standard_normal((2, 4, 8, 8)).astype(np.float32)
        np.save(tmp_path / f"{name}.npy", x)
        job[name] = dict(config=config, n=n, shape=x.shape, x=str(tmp_path / f"{name}.npy"))
    (tmp_path / "job.json").write_text(json.dumps(job))
    script = tmp_path / "old_loop.py"
    script.write_text(OLD_LOOP)
    env = dict(os.environ, PYTHONPATH=old_diffusers + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "job.json"), OLD_VERSION], env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_same_loop_same_numbers_as_diffusers_039(old_diffusers, tmp_path):
    timesteps = run_old(old_diffusers, tmp_path, CASES)
    for name, (config, n) in CASES.items():
        scheduler = FlaxDPMSolverMultistepScheduler(**config)
        x = jnp.asarray(np.load(tmp_path / f"{name}.npy"))
        state = scheduler.set_timesteps(scheduler.create_state(), n, x.shape)
        np.testing.assert_array_equal(np.asarray(state.timesteps), timesteps[name])

        def body(i, args):
            x, state = args
            t = jnp.array(state.timesteps, dtype=jnp.int32)[i]
            out = 0.5 * jnp.tanh(x) + 0.01 * t / 1000.0
            return scheduler.step(state, out, t, x).to_tuple()

        x, state = jax.lax.fori_loop(0, n, body, (x, state))
        if scheduler.config.solver_order == 1:  # a first-order loop carries no model-output history
            assert state.model_outputs.size == 0
        old = np.load(tmp_path / f"{name}.npy.out.npy")
        err = float(np.max(np.abs(np.asarray(x) - old)) / max(1.0, np.max(np.abs(old))))
        assert err < 1e-4, f"{name}: {err:.2e}"
        noisy = scheduler.add_noise(state, x, jnp.ones_like(x), jnp.array([10, 500]))
        np.testing.assert_allclose(np.asarray(noisy), np.load(tmp_path / f"{name}.npy.noisy.npy"), rtol=1e-5, atol=1e-5)


def test_from_pretrained_returns_scheduler_and_state(tmp_path):
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlaxPNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
         "beta_end": 0.012, "skip_prk_steps": True, "steps_offset": 1, "dtype": "float32"}))
    scheduler, state = FlaxDPMSolverMultistepScheduler.from_pretrained(tmp_path, subfolder="scheduler", dtype=jnp.bfloat16)
    assert float(state.init_noise_sigma) == 1.0
    state = scheduler.set_timesteps(state, num_inference_steps=10, shape=(1, 4, 8, 8))
    assert state.model_outputs.dtype == jnp.bfloat16
    assert scheduler.config.final_sigmas_type == "sigma_min"
    x = jnp.ones((1, 4, 8, 8))
    prev, state = scheduler.step(state, 0.1 * x, state.timesteps[0], x, return_dict=False)
    assert prev.shape == x.shape and int(state.step_index) == 1
    assert scheduler.scale_model_input(state, x, 999) is x


def test_first_order_state_has_no_history_in_the_fori_loop():
    """Order 1 keeps no model-output history (diffusers 0.39 kept a sample-sized one it never read)."""
    scheduler = FlaxDPMSolverMultistepScheduler(solver_order=1)
    shape = (2, 4, 8, 8)
    state = scheduler.set_timesteps(scheduler.create_state(), 10, shape)
    assert state.model_outputs.shape == (0,) + shape
    sample_sized = [leaf.shape for leaf in jax.tree_util.tree_leaves(state) if leaf.size and leaf.shape[-len(shape):] == shape]
    assert not sample_sized

    @jax.jit
    def run(x, state):
        def body(i, args):
            x, state = args
            t = jnp.array(state.timesteps, dtype=jnp.int32)[i]
            return scheduler.step(state=state, model_output=0.5 * jnp.tanh(x), timestep=t, sample=x).to_tuple()

        return jax.lax.fori_loop(lower=0, upper=10, body_fun=body, init_val=(x, state))

    x, final = run(jnp.ones(shape), state)
    assert final.model_outputs.shape == (0,) + shape and int(final.step_index) == 10
    assert bool(jnp.all(jnp.isfinite(x)))
