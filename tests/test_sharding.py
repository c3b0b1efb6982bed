"""Trajectories on a device mesh (8 virtual CPU devices) and across processes (jax.distributed on
loopback, 2 processes x 4 devices), against one device. Each configuration runs in its own
process (the device count is fixed when jax starts): tests/sharding_check.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
SCRIPT = str(Path(__file__).with_name("sharding_check.py"))


def launch(out: Path, devices: int, processes: int = 1):
    out.mkdir()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    if processes == 1:
        jobs = [subprocess.Popen([sys.executable, SCRIPT, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        jobs = [subprocess.Popen([sys.executable, SCRIPT, str(out), str(p), str(processes), str(port)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in range(processes)]
    return jobs


def finish(jobs, out: Path):
    outputs = [job.communicate(timeout=900) for job in jobs]
    for job, (_, err) in zip(jobs, outputs):
        assert job.returncode == 0, err[-3000:]
    return json.loads(outputs[0][0].strip().splitlines()[-1]), dict(np.load(out / "result.npz"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    # one at a time: each configuration uses every core
    return {name: finish(launch(root / name, devices, processes), root / name)
            for name, devices, processes in (("one", 1, 1), ("mesh8", 8, 1), ("two_by_four", 4, 2))}


def test_trajectories_and_the_state_stay_sharded_over_the_batch(runs):
    for name in ("mesh8", "two_by_four"):
        report, _ = runs[name]
        assert report["devices"] == 8
        assert report["processes"] == (2 if name == "two_by_four" else 1)
        assert report["local_shards"] == (4 if name == "two_by_four" else 8) and report["shard_rows"] == 4
        for key in ("noise", "back", "stepped", "analytic"):
            assert report[key] == "P('data',)", (name, key, report[key])
        assert report["path"] == "P(None, 'data')" and report["history"] == "P(None, 'data')"


def test_eight_devices_and_two_processes_of_four_give_the_same_bits(runs):
    _, eight = runs["mesh8"]
    _, two = runs["two_by_four"]
    for key in eight:
        np.testing.assert_array_equal(eight[key], two[key], err_msg=key)


def test_eight_devices_give_the_bits_of_one_device_run_shard_by_shard(runs):
    """The data-parallel program is the single-device program on each shard: 8 devices x 4 rows
    equal one device running the same 4-row pieces one after another, bit for bit."""
    _, one = runs["one"]
    _, eight = runs["mesh8"]
    for key in ("noise", "path", "back", "stepped", "analytic"):
        np.testing.assert_array_equal(eight[key], one[f"{key}_by_shard"], err_msg=key)


def test_an_elementwise_model_gives_the_same_bits_on_one_device_and_eight(runs):
    _, one = runs["one"]
    _, eight = runs["mesh8"]
    np.testing.assert_array_equal(one["analytic"], eight["analytic"])


def test_one_device_on_the_whole_batch_agrees_to_matmul_rounding(runs):
    """Not bitwise for a network: XLA's CPU matmul rounds 32 rows (64 with guidance) differently
    from 4 (8), ~1e-6 per layer — the model alone, one call, differs by 1.4e-6. Measured: noise
    5e-6 relative, 2.4e-5 after sampling back (10 steps, guidance 3)."""
    _, one = runs["one"]
    _, eight = runs["mesh8"]
    for key in ("noise", "path", "back", "stepped"):
        relative = np.max(np.abs(one[key] - eight[key])) / max(1.0, np.max(np.abs(one[key])))
        assert relative < 1e-4, (key, relative)
