"""The resumable batch inversion job: kills, restarts, corrupt chunks, idempotent reruns."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dpmjax.apps import batch
from dpmjax.apps.batch import files, output_store
from dpmjax.models import digits

STEPS = 5


def make_store(folder: Path, chunks: int, rows: int = 4) -> list:
    images = digits.heldout()[0]
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(chunks):
        name = f"part-{i:05d}.npy"
        np.save(folder / name, images[(i * rows) % (len(images) - rows):][:rows])
        names.append(name)
    return names


def outputs(folder: Path) -> dict:
    return {p.name: np.load(p) for p in sorted((folder / "chunks").glob("*.npy"))}


def events(folder: Path) -> list:
    return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    names = make_store(root / "input", 60)
    summary = batch.run(root / "input", root / "reference", num_inference_steps=STEPS, progress=False)
    assert sorted(summary.recorded) == names and not summary.failed
    return root, names


def test_a_rerun_is_idempotent_and_the_output_store_is_plain_npy(store):
    root, names = store
    before = {p.name: p.stat().st_mtime_ns for p in (root / "reference" / "chunks").glob("*.npy")}
    summary = batch.run(root / "input", root / "reference", num_inference_steps=STEPS, progress=False)
    assert summary.recorded == [] and sorted(summary.skipped) == names
    assert before == {p.name: p.stat().st_mtime_ns for p in (root / "reference" / "chunks").glob("*.npy")}
    manifest = json.loads((root / "reference" / "manifest.json").read_text())
    assert manifest["shards"] == names and manifest["missing"] == [] and manifest["row_shape"] == [1, 8, 8]
    noise = np.load(root / "reference" / "chunks" / names[0])
    assert noise.shape == (4, 1, 8, 8) and noise.dtype == np.float32 and np.all(np.isfinite(noise))


def test_a_chunk_written_but_not_logged_is_logged_on_restart(store, tmp_path):
    """The kill can land between writing a chunk's output (the record) and logging it, even in the
    middle of the log line: the restart logs it as found and keeps the log one JSON per line."""
    import shutil

    root, names = store
    out = tmp_path / "out"
    shutil.copytree(root / "reference", out)
    lines = (out / "events.jsonl").read_text().splitlines()
    unlogged = names[7]
    kept = [line for line in lines if not (json.loads(line)["chunk"] == unlogged and json.loads(line)["event"] == "recorded")]
    (out / "events.jsonl").write_text("\n".join(kept) + '\n{"chunk": "part-00')  # cut short
    summary = batch.run(root / "input", out, num_inference_steps=STEPS, progress=False)
    assert summary.recorded == [] and sorted(summary.skipped) == names
    text = (out / "events.jsonl").read_text()
    assert text.splitlines()[len(kept)] == '{"chunk": "part-00'
    found = [json.loads(line) for line in text.splitlines()[len(kept) + 1:]]
    assert [(e["chunk"], e["event"], e["found"], e["rows"]) for e in found] == [(unlogged, "recorded", True, 4)]


@pytest.mark.slow
def test_killed_five_times_the_job_ends_equal_to_an_uninterrupted_run(store, tmp_path):
    """SIGKILL at random points (after a random number of further chunks were recorded, polled
    every few ms, so anywhere inside a chunk), 5 times over 60 chunks; then run to the end."""
    root, names = store
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    command = [sys.executable, "-m", "dpmjax", "invert-batch", str(root / "input"), str(out), "--steps", str(STEPS)]
    kills = 0
    while kills < 5:
        recorded = sum(e["event"] == "recorded" for e in events(out)) if (out / "events.jsonl").exists() else 0
        target = recorded + int(rng.integers(1, 8))
        job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while job.poll() is None:
            if (out / "events.jsonl").exists() and sum(e["event"] == "recorded" for e in events(out)) >= target:
                os.kill(job.pid, signal.SIGKILL)
                job.wait()
                kills += 1
                break
            time.sleep(0.003)
        assert job.returncode == -signal.SIGKILL, "the job finished before it could be killed 5 times"
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    expected, got = outputs(root / "reference"), outputs(out)
    assert sorted(got) == names
    for name in names:
        np.testing.assert_array_equal(got[name], expected[name])
    history = {}
    for event in events(out):
        if event["event"] == "started":
            assert "recorded" not in history.get(event["chunk"], []), f"{event['chunk']} computed again after it was recorded"
        history.setdefault(event["chunk"], []).append(event["event"])
    assert all(h.count("recorded") == 1 for h in history.values())
    assert len({e["pid"] for e in events(out)}) == 6
    assert not list((out / "chunks").glob(".*")), "no temporary files left behind once the job finished"


def test_corrupt_chunks_are_reported_by_name_and_the_rest_is_done(store, tmp_path, capsys):
    root, names = store
    bad = tmp_path / "input"
    bad.mkdir()
    for name in names[:12]:  # the wrong shape comes first: the others must still be judged by the majority
        (bad / name).write_bytes((root / "input" / name).read_bytes())
    x = np.load(bad / names[3]); x[1, 0, 2, 2] = np.nan; np.save(bad / names[3], x)
    np.save(bad / names[0], np.zeros((4, 1, 8, 9), np.float32))
    data = (bad / names[11]).read_bytes(); (bad / names[11]).write_bytes(data[: len(data) // 2])

    code = batch.main([str(bad), str(tmp_path / "out"), "--steps", str(STEPS)])
    printed = capsys.readouterr().out
    assert code == 1
    assert f"FAILED {names[3]}: 1 non-finite input values" in printed
    assert f"FAILED {names[0]}: shape (4, 1, 8, 9)" in printed
    assert f"FAILED {names[11]}: unreadable" in printed
    got = outputs(tmp_path / "out")
    assert sorted(got) == sorted(set(names[:12]) - {names[0], names[3], names[11]})
    for name in got:
        np.testing.assert_array_equal(got[name], outputs(root / "reference")[name])
    report = json.loads((tmp_path / "out" / "failed" / "part-00000.json").read_text())
    assert report["chunk"] == names[0] and "shape" in report["reason"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["missing"] == [names[0], names[3], names[11]]

    # fixed data: a rerun computes exactly the quarantined chunk and clears its report
    (bad / names[3]).write_bytes((root / "input" / names[3]).read_bytes())
    summary = batch.run(bad, tmp_path / "out", num_inference_steps=STEPS, progress=False)
    assert summary.recorded == [names[3]] and set(summary.failed) == {names[0], names[11]}
    assert not (tmp_path / "out" / "failed" / "part-00003.json").exists()


def test_the_progress_line_counts_failed_chunks_and_shows_one_rate(tmp_path, capsys):
    """Two good shards and three bad ones: the line ends at 5/5 with 3 failed, as the summary says,
    and every update shows one rate (rows/s, from the job start)."""
    make_store(tmp_path / "input", 2)
    for name in ("x-bad.npy", "y-bad.npy", "z-bad.npy"):  # sorted after the good ones: they come last
        (tmp_path / "input" / name).write_text("not an array")
    summary = batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=STEPS, progress=True)
    assert len(summary.recorded) == 2 and len(summary.failed) == 3
    # redrawn in place on a terminal ("\r"), a line per chunk when stderr is a file (as here)
    updates = [u.strip() for u in re.split(r"[\r\n]", capsys.readouterr().err) if u.strip()]
    assert updates[-1].startswith("invert-batch [" + "#" * 30 + "] "), updates
    assert "5/5 chunks, 8 rows" in updates[-1] and updates[-1].endswith(", 3 failed"), updates
    assert all(u.count("/s") <= 1 and "chunks/s" not in u for u in updates), updates
    assert updates[-1].count("rows/s") == 1, updates


def test_steps_and_cluster_option_errors_are_one_line(tmp_path, capsys):
    for args, message in ((["--steps", "0"], "--steps must be >= 1 (got 0)"),
                          (["--num-processes", "2"], "--num-processes needs --distributed")):
        assert batch.main([str(tmp_path / "input"), str(tmp_path / "out"), *args]) == 2
        err = capsys.readouterr().err
        assert err == f"dpmjax invert-batch: error: {message}\n", err
    assert not (tmp_path / "out").exists()


def test_bad_job_arguments_name_the_parameter(tmp_path):
    make_store(tmp_path / "input", 1)
    with pytest.raises(ValueError, match="model must be 'module:function'"):
        batch.run(tmp_path / "input", tmp_path / "out", model="dpmjax.models.digits")
    with pytest.raises(ValueError, match="cannot be imported"):
        batch.run(tmp_path / "input", tmp_path / "out", model="dpmjax.models.digits:nothing")
    with pytest.raises(ValueError, match="num_inference_steps"):
        batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no manifest.json, no .npy files and is no zarr array"):
        batch.run(tmp_path / "empty", tmp_path / "out")  # a folder without shards


def test_trajectories_are_saved_beside_the_noise(tmp_path):
    make_store(tmp_path / "input", 2)
    summary = batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=STEPS, save_trajectory=True,
                            progress=False)
    assert len(summary.recorded) == 2
    for name in summary.recorded:
        path = np.load(tmp_path / "out" / "trajectories" / name)
        noise = np.load(tmp_path / "out" / "chunks" / name)
        assert path.shape == (4, STEPS, 1, 8, 8)
        np.testing.assert_array_equal(path[:, -1], noise)


def test_exact_inversion_in_the_job_samples_back_to_the_input(tmp_path):
    """``--exact`` (the CLI in a subprocess): sampling the written noise back with the job's scheduler
    (uniform in log-SNR without --config) gives the chunk again, every row's round trip is recorded
    and matches the measured one (plain inversion, from the same chunks, is far worse)."""
    import dpmjax

    make_store(tmp_path / "input", 2)
    steps = 10
    command = [sys.executable, "-m", "dpmjax", "invert-batch", str(tmp_path / "input"), str(tmp_path / "exact"),
               "--steps", str(steps), "--exact"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "exact inversion: 8 of 8 rows within round trip 1e-05" in done.stdout, done.stdout
    assert batch.main([str(tmp_path / "input"), str(tmp_path / "plain"), "--steps", str(steps)]) == 0
    assert json.loads((tmp_path / "exact" / "manifest.json").read_text())["exact"] is True
    samplers = {"exact": dpmjax.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min", use_lu_lambdas=True),
                "plain": dpmjax.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")}
    model_fn = digits.unguided_model()
    for name in sorted(p.name for p in (tmp_path / "input").glob("*.npy")):
        x = np.load(tmp_path / "input" / name)
        back = {kind: np.asarray(dpmjax.sample(model_fn, np.load(tmp_path / kind / "chunks" / name), samplers[kind], steps).sample)
                for kind in ("exact", "plain")}
        errors = {kind: np.max(np.abs(back[kind] - x).reshape(len(x), -1), axis=1) / np.maximum(1, np.max(np.abs(x)))
                  for kind in back}
        assert np.max(errors["exact"]) <= 1e-5 and np.min(errors["plain"]) > 100 * np.max(errors["exact"]), (name, errors)
        recorded = np.load(tmp_path / "exact" / "round_trips" / name)
        np.testing.assert_allclose(recorded, errors["exact"], atol=1e-6, rtol=0)
    assert all(e["rows_not_converged"] == [] for e in events(tmp_path / "exact") if e["event"] == "recorded")


def test_rows_exact_inversion_cannot_reach_are_reported_not_recorded_as_exact(tmp_path):
    """Five steps on the log-SNR grid ending at sigma_min make four real steps: these held-out digits
    lie outside what that sampler can produce (round trips 0.4-1). The job records their noise (the
    best found) and their round trips, and says which rows did not converge."""
    make_store(tmp_path / "input", 1)
    command = [sys.executable, "-m", "dpmjax", "invert-batch", str(tmp_path / "input"), str(tmp_path / "out"),
               "--steps", "5", "--exact"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == batch.EXIT_NOT_CONVERGED, done.stderr
    recorded = [e for e in events(tmp_path / "out") if e["event"] == "recorded"]
    missed = recorded[0]["rows_not_converged"]
    round_trips = np.load(tmp_path / "out" / "round_trips" / "part-00000.npy")
    assert missed == np.flatnonzero(round_trips > 1e-5).tolist() and len(missed) >= 1
    assert f"NOT CONVERGED part-00000.npy: rows {missed}" in done.stdout, done.stdout


def _job(input_dir: Path, output: Path, devices: int, processes: int = 1, *extra: str):
    """The job in fresh processes with ``devices`` virtual CPU devices each (jax.distributed on
    loopback for several processes)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "dpmjax", "invert-batch", str(input_dir), str(output), "--steps", str(STEPS), *extra]
    if processes > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command += ["--distributed", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(processes)]
    jobs = [subprocess.Popen(command + (["--process-id", str(p)] if processes > 1 else []), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in range(processes)]
    for job in jobs:
        out, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
    return outputs(output)


@pytest.mark.slow
def test_one_device_eight_devices_and_two_hosts_write_the_same_bits(tmp_path):
    """Whole chunks per device, one single-device program: the noise depends on the chunk alone.
    Row counts 1-8 matter: XLA's CPU matmul rounds 1, 2-48 and 64 rows differently, so a chunk
    split over the devices would differ by ~1e-6 (it did, before the job ran whole chunks)."""
    images = digits.heldout()[0]
    (tmp_path / "input").mkdir()
    sizes = [8, 1, 3, 4, 8, 5, 2, 8, 6, 7]
    for i, rows in enumerate(sizes):
        np.save(tmp_path / "input" / f"part-{i:02d}.npy", images[4 * i:][:rows])
    one = _job(tmp_path / "input", tmp_path / "one", 1)
    eight = _job(tmp_path / "input", tmp_path / "eight", 8)
    two_by_four = _job(tmp_path / "input", tmp_path / "two_by_four", 4, 2)
    assert sorted(one) == sorted(eight) == sorted(two_by_four) == [f"part-{i:02d}.npy" for i in range(len(sizes))]
    for name in one:
        np.testing.assert_array_equal(eight[name], one[name], err_msg=name)
        np.testing.assert_array_equal(two_by_four[name], one[name], err_msg=name)
    manifest = json.loads((tmp_path / "two_by_four" / "manifest.json").read_text())
    assert manifest["missing"] == [] and len(manifest["shards"]) == len(sizes)  # written after both hosts finished
    assert manifest["batch_rows"] == 8
    assert len({e["pid"] for e in events(tmp_path / "two_by_four")}) == 2
    for run in ("eight", "two_by_four"):  # every device inverted chunks: the comparison is not vacuous
        assert len({e["device"] for e in events(tmp_path / run) if e["event"] == "recorded"}) == 8, run


def test_chunks_run_in_pieces_of_batch_rows(tmp_path):
    """Any chunk size, one program: pieces of exactly ``batch_rows`` rows, the last padded; the
    padding changes nothing and a chunk larger than ``batch_rows`` equals its pieces run alone."""
    images = digits.heldout()[0]
    (tmp_path / "input").mkdir()
    np.save(tmp_path / "input" / "a.npy", images[:10])
    np.save(tmp_path / "input" / "b.npy", images[10:13])
    summary = batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=STEPS, batch_rows=4, progress=False)
    assert sorted(summary.recorded) == ["a.npy", "b.npy"] and summary.rows == 13
    got = outputs(tmp_path / "out")
    assert got["a.npy"].shape == (10, 1, 8, 8) and got["b.npy"].shape == (3, 1, 8, 8)
    (tmp_path / "pieces").mkdir()
    for i, begin in enumerate((0, 4, 8)):
        np.save(tmp_path / "pieces" / f"a{i}.npy", images[begin:begin + 4])
    batch.run(tmp_path / "pieces", tmp_path / "pieces_out", num_inference_steps=STEPS, progress=False)
    pieces = outputs(tmp_path / "pieces_out")
    np.testing.assert_array_equal(got["a.npy"][:8], np.concatenate([pieces["a0.npy"], pieces["a1.npy"]]))
    np.testing.assert_array_equal(got["a.npy"][8:], pieces["a2.npy"][:2])  # padded: images 10-11 stood in for rows 2-3
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["batch_rows"] == 4
    with pytest.raises(ValueError, match="batch_rows must be an integer >= 1"):
        batch.run(tmp_path / "input", tmp_path / "out", batch_rows=0)


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    """The output store holds one job's noise: resuming it with other rows per call, steps or
    scheduler would mix two jobs' results silently."""
    import dpmjax

    make_store(tmp_path / "input", 2)
    batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=STEPS, batch_rows=4, progress=False)
    with pytest.raises(ValueError, match=r"batch_rows: was 4, now 2.*new output folder"):
        batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=STEPS, batch_rows=2, progress=False)
    with pytest.raises(ValueError, match=r"num_inference_steps: was 5, now 6"):
        batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=STEPS + 1, batch_rows=4, progress=False)
    order_one = dpmjax.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min", solver_order=1)
    with pytest.raises(ValueError, match=r"scheduler config differs in solver_order"):
        batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=STEPS, scheduler=order_one, batch_rows=4,
                      progress=False)
    assert batch.main([str(tmp_path / "input"), str(tmp_path / "out"), "--steps", str(STEPS), "--batch-rows", "4"]) == 0


def write_zarr(folder: Path, data: np.ndarray, chunk_rows: int, version: int) -> None:
    import tensorstore as ts

    chunks = [chunk_rows, *data.shape[1:]]
    metadata = ({"shape": list(data.shape), "chunks": chunks, "dtype": "<f4"} if version == 2 else
                {"shape": list(data.shape), "data_type": "float32",
                 "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}}})
    array = ts.open({"driver": "zarr" if version == 2 else "zarr3", "kvstore": {"driver": "file", "path": str(folder)},
                     "metadata": metadata}, create=True).result()
    array[...] = data


@pytest.mark.parametrize("version", [2, 3])
def test_a_zarr_array_is_inverted_in_its_own_row_chunks(tmp_path, version):
    """A zarr array (tensorstore) in, the same noise as .npy shards holding the same row ranges;
    a corrupt chunk file and a NaN are reported by their row range while the rest is done."""
    images = np.asarray(digits.heldout()[0][:20], np.float32)
    write_zarr(tmp_path / "latents.zarr", images, chunk_rows=8, version=version)
    (tmp_path / "shards").mkdir()
    names = ["rows-00-08.npy", "rows-08-16.npy", "rows-16-20.npy"]
    for name, (begin, end) in zip(names, ((0, 8), (8, 16), (16, 20))):
        np.save(tmp_path / "shards" / name, images[begin:end])
    summary = batch.run(tmp_path / "latents.zarr", tmp_path / "out", num_inference_steps=STEPS, progress=False)
    assert sorted(summary.recorded) == names and summary.rows == 20
    batch.run(tmp_path / "shards", tmp_path / "from_npy", num_inference_steps=STEPS, progress=False)
    got, expected = outputs(tmp_path / "out"), outputs(tmp_path / "from_npy")
    for name in names:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["row_shape"] == [1, 8, 8]

    bad = images.copy()
    bad[17, 0, 3, 3] = np.nan
    write_zarr(tmp_path / "bad.zarr", bad, chunk_rows=8, version=version)
    chunk_file = (tmp_path / "bad.zarr" / "1.0.0.0") if version == 2 else (tmp_path / "bad.zarr" / "c" / "1" / "0" / "0" / "0")
    chunk_file.write_bytes(b"not a zarr chunk")
    summary = batch.run(tmp_path / "bad.zarr", tmp_path / "bad_out", num_inference_steps=STEPS, progress=False)
    assert summary.recorded == ["rows-00-08.npy"]
    assert summary.failed["rows-08-16.npy"].startswith("unreadable")
    assert summary.failed["rows-16-20.npy"] == "1 non-finite input values"


def test_an_input_that_is_no_store_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        batch.run(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "broken.zarr").mkdir()
    (tmp_path / "broken.zarr" / ".zarray").write_text("{not json")
    with pytest.raises(ValueError, match="is not a readable zarr array"):
        batch.run(tmp_path / "broken.zarr", tmp_path / "out")


# ----------------------------------------------------------------------------- hostile inputs and faults
def cli(*args, **popen) -> subprocess.Popen:
    """``dpmjax invert-batch ARGS`` started in a fresh process (stdout and stderr captured as text)."""
    command = [sys.executable, "-m", "dpmjax", "invert-batch", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finished(job: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = job.communicate(timeout=300)
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


def run_cli(*args) -> subprocess.CompletedProcess:
    return finished(cli(*args))


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user's mistake: exit status 2, one line on stderr naming ``fragments``, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)


def test_an_output_that_is_inside_or_holds_the_input_is_refused(store, tmp_path):
    """The job never writes into its input: OUTPUT == INPUT (which would overwrite the input's own
    manifest.json), OUTPUT inside INPUT and INPUT inside OUTPUT are refused, nothing written."""
    root, names = store
    data = tmp_path / "data"
    make_store(data / "input", 2)
    manifest = json.dumps({"shards": ["part-00000.npy", "part-00001.npy"], "row_shape": [1, 8, 8]})
    (data / "input" / "manifest.json").write_text(manifest)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    jobs = {"is the input": cli(data / "input", data / "input", "--steps", STEPS),
            "lies inside the input": cli(data / "input", data / "input" / "noise", "--steps", STEPS),
            "contains the input": cli(data / "input", data, "--steps", STEPS)}
    for relation, job in jobs.items():
        done = finished(job)
        assert_one_line_error(done, relation, str(data / "input"))
    assert (data / "input" / "manifest.json").read_text() == manifest
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_manifest_shards_in_subfolders_are_read_as_named(store, tmp_path):
    """``a/000.npy`` and ``b/000.npy`` are two shards, read from their own folders and written to
    ``chunks/a/000.npy`` and ``chunks/b/000.npy``; names that leave the input are refused."""
    root, names = store
    for folder, name in (("a", names[0]), ("b", names[1])):
        (tmp_path / "input" / folder).mkdir(parents=True)
        (tmp_path / "input" / folder / "000.npy").write_bytes((root / "input" / name).read_bytes())
    (tmp_path / "input" / "000.npy").write_bytes((root / "input" / names[2]).read_bytes())  # the base name: not read
    (tmp_path / "input" / "manifest.json").write_text(json.dumps({"shards": ["a/000.npy", "./b//000.npy"]}))
    done = run_cli(tmp_path / "input", tmp_path / "out", "--steps", STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = outputs(root / "reference")
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "chunks" / "a" / "000.npy"), reference[names[0]])
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "chunks" / "b" / "000.npy"), reference[names[1]])
    assert not (tmp_path / "out" / "chunks" / "000.npy").exists()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"] == ["a/000.npy", "b/000.npy"]

    for entry in ("../input/a/000.npy", str(tmp_path / "input" / "a" / "000.npy")):
        (tmp_path / "input" / "manifest.json").write_text(json.dumps({"shards": [entry]}))
        assert_one_line_error(run_cli(tmp_path / "input", tmp_path / "other", "--steps", STEPS), entry, "leaves the input folder")
        assert not (tmp_path / "other").exists()


SLOW_MODEL = '''
import time

from dpmjax.models import digits


def model():
    """The digits model, a second late: two jobs started together both get past their checks."""
    time.sleep(1.5)
    return digits.unguided_model()
'''


def test_two_jobs_with_other_settings_cannot_share_an_output(tmp_path):
    """Started together on one output, the job that claims it first runs; the other is refused,
    however their checks interleave (a model that loads slowly stretches the gap between them)."""
    make_store(tmp_path / "input", 1)
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    jobs = {steps: cli(tmp_path / "input", tmp_path / "out", "--steps", steps, "--model", "slow_model:model", env=env)
            for steps in (2, 3)}
    done = {steps: finished(job) for steps, job in jobs.items()}
    assert sorted(d.returncode for d in done.values()) == [0, 2], {s: (d.returncode, d.stderr[-2000:]) for s, d in done.items()}
    winner = next(steps for steps, d in done.items() if d.returncode == 0)
    loser = next(steps for steps, d in done.items() if d.returncode == 2)
    assert_one_line_error(done[loser], f"num_inference_steps: was {winner}, now {loser}", "new output folder")
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["num_inference_steps"] == winner
    assert {e["pid"] for e in events(tmp_path / "out")} == {jobs[winner].pid}


def test_two_runs_of_one_job_at_once_compute_every_chunk_once(store, tmp_path):
    """Two runs with the same settings on one output at once (a job started twice): each chunk is
    claimed by one of them, computed and logged once, and both finish with the whole store."""
    root, names = store
    for name in names[:16]:
        (tmp_path / "input").mkdir(exist_ok=True)
        (tmp_path / "input" / name).write_bytes((root / "input" / name).read_bytes())
    jobs = [cli(tmp_path / "input", tmp_path / "out", "--steps", STEPS) for _ in range(2)]
    for job in jobs:
        done = finished(job)
        assert done.returncode == 0, done.stderr[-3000:]
    recorded = [e["chunk"] for e in events(tmp_path / "out") if e["event"] == "recorded"]
    started = [e["chunk"] for e in events(tmp_path / "out") if e["event"] == "started"]
    assert sorted(recorded) == sorted(started) == names[:16]
    got, expected = outputs(tmp_path / "out"), outputs(root / "reference")
    for name in names[:16]:
        np.testing.assert_array_equal(got[name], expected[name])
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["missing"] == []
    assert list((tmp_path / "out" / "claims").iterdir()) == []  # a recorded chunk's claim is removed


def test_a_resume_on_a_changed_input_is_refused_naming_the_shard(store, tmp_path):
    """Every shard's size and hash are recorded with the output; a resume whose input has a shard
    changed, added or removed is refused with the shard named, before anything is written."""
    root, names = store
    (tmp_path / "input").mkdir()
    for name in names[:3]:
        (tmp_path / "input" / name).write_bytes((root / "input" / name).read_bytes())
    done = run_cli(tmp_path / "input", tmp_path / "out", "--steps", STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["input"]["path"] == str((tmp_path / "input").resolve()) and settings["input_shards"] == names[:3]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input_fingerprints"][names[1]]["size"] == (tmp_path / "input" / names[1]).stat().st_size

    x = np.load(tmp_path / "input" / names[1])
    np.save(tmp_path / "input" / names[1], x[::-1])  # the same size, other bytes
    log = (tmp_path / "out" / "events.jsonl").read_text()
    assert_one_line_error(run_cli(tmp_path / "input", tmp_path / "out", "--steps", STEPS), f"input shard {names[1]}", "bytes changed")
    np.save(tmp_path / "input" / names[1], x)
    np.save(tmp_path / "input" / names[5], x)
    assert_one_line_error(run_cli(tmp_path / "input", tmp_path / "out", "--steps", STEPS), f"shard {names[5]} is new")
    assert (tmp_path / "out" / "events.jsonl").read_text() == log


def test_an_invalid_setting_writes_nothing(tmp_path):
    """``--steps 1001`` (more than the 1000 training steps) is refused before the output exists, so
    the next, valid run is not refused for 'other settings'."""
    make_store(tmp_path / "input", 1)
    assert_one_line_error(run_cli(tmp_path / "input", tmp_path / "out", "--steps", 1001), "num_inference_steps must lie in")
    assert not (tmp_path / "out").exists()
    done = run_cli(tmp_path / "input", tmp_path / "out", "--steps", 2)
    assert done.returncode == 0, done.stderr[-3000:]


def test_bad_shards_are_quarantined_and_never_stop_the_job(tmp_path):
    """A 0-row shard, a text file, an .npz, float64 values beyond float32, a dangling link and a
    folder named like a shard are quarantined with a reason that says what is wrong; shards with
    names of 246 and 255 bytes are inverted (temporary names are short)."""
    images = np.asarray(digits.heldout()[0][:4], np.float32)
    folder = tmp_path / "input"
    folder.mkdir()
    long_names = ["l" * 242 + ".npy", "m" * 251 + ".npy"]
    for name in ["good.npy", *long_names]:
        np.save(folder / name, images)
    np.save(folder / "empty.npy", np.zeros((0, 1, 8, 8), np.float32))
    (folder / "text.npy").write_text("1,2,3\n4,5,6\n")
    np.savez(folder / "archive", x=images)
    (folder / "archive.npz").rename(folder / "archive.npy")
    np.save(folder / "huge.npy", np.full((4, 1, 8, 8), 1e300))
    (folder / "dangling.npy").symlink_to(tmp_path / "nowhere.npy")
    (folder / "folder.npy").mkdir()
    done = run_cli(folder, tmp_path / "out", "--steps", STEPS)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    failed = {line.split(": ", 1)[0].removeprefix("  FAILED "): line.split(": ", 1)[1]
              for line in done.stdout.splitlines() if line.startswith("  FAILED ")}
    assert set(failed) == {"empty.npy", "text.npy", "archive.npy", "huge.npy", "dangling.npy", "folder.npy"}, done.stdout
    assert failed["empty.npy"].startswith("no rows")
    assert failed["text.npy"].startswith("not a .npy array") and "pickle" not in failed["text.npy"]
    assert failed["archive.npy"].startswith("a zip archive")
    assert "overflow float32" in failed["huge.npy"] and "1e+300" in failed["huge.npy"]
    assert failed["dangling.npy"].startswith("unreadable") and failed["folder.npy"].startswith("unreadable")
    assert sorted(outputs(tmp_path / "out")) == sorted(["good.npy", *long_names])
    for name in long_names:
        np.testing.assert_array_equal(np.load(tmp_path / "out" / "chunks" / name), np.load(tmp_path / "out" / "chunks" / "good.npy"))


def test_missing_zarr_chunk_files_are_reported_unless_fill_values_are_data(tmp_path):
    """A zarr chunk file that is missing would read as the fill value: its rows are quarantined by
    row range, unless ``--fill-value-is-data``; putting the file back fixes the quarantined chunk,
    while a chunk recorded from fill values is never topped up from the new file."""
    images = np.asarray(digits.heldout()[0][:20], np.float32)
    write_zarr(tmp_path / "latents.zarr", images, chunk_rows=8, version=3)
    chunk_file = tmp_path / "latents.zarr" / "c" / "1" / "0" / "0" / "0"
    saved = chunk_file.read_bytes()
    chunk_file.unlink()
    done = run_cli(tmp_path / "latents.zarr", tmp_path / "out", "--steps", STEPS)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "FAILED rows-08-16.npy: rows 8-16: chunk file c/1/0/0/0 is missing" in done.stdout, done.stdout
    assert sorted(outputs(tmp_path / "out")) == ["rows-00-08.npy", "rows-16-20.npy"]

    summary = batch.run(tmp_path / "latents.zarr", tmp_path / "zeros", num_inference_steps=STEPS, progress=False,
                            fill_value_is_data=True)
    assert sorted(summary.recorded) == ["rows-00-08.npy", "rows-08-16.npy", "rows-16-20.npy"] and not summary.failed

    chunk_file.write_bytes(saved)
    summary = batch.run(tmp_path / "latents.zarr", tmp_path / "out", num_inference_steps=STEPS, progress=False)
    assert summary.recorded == ["rows-08-16.npy"] and not summary.failed
    with pytest.raises(ValueError, match="input shard rows-08-16.npy is not the one"):
        batch.run(tmp_path / "latents.zarr", tmp_path / "zeros", num_inference_steps=STEPS, progress=False,
                      fill_value_is_data=True)


def test_temporary_files_of_killed_runs_are_removed_wherever_the_job_writes(store, tmp_path):
    """Dead writers' temporary files at the output root and in the folders the job writes are
    removed by the next run; a live process' file, another host's recent file, an old file whose
    name is not exactly the job's and one in a folder the job does not write are left alone."""
    import shutil

    root, names = store
    (tmp_path / "input").mkdir()
    for name in names[:2]:
        (tmp_path / "input" / name).write_bytes((root / "input" / name).read_bytes())
    out = tmp_path / "out"
    assert run_cli(tmp_path / "input", out, "--steps", STEPS).returncode == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = files.HOST_TAG
    leftovers = [out / f".0123456789.{tag}.{dead.pid}.x1y2z3_a.tmp", out / "chunks" / f".0123456789.{tag}.{dead.pid}.q1w2e3r4.tmp",
                 out / "failed" / f".0123456789.{tag}.{dead.pid}.r4t5y6u7.tmp",
                 out / "chunks" / "sub" / f".0123456789.{tag}.{dead.pid}.sub00001.tmp"]
    kept = [out / f".0123456789.{tag}.{os.getpid()}.live0001.tmp", out / f".0123456789.0a0b0c0d.{dead.pid}.recent01.tmp"]
    old_elsewhere = out / "chunks" / f".0123456789.0a0b0c0d.{dead.pid}.old00001.tmp"
    not_ours = [out / "chunks" / f".notes.{dead.pid}.abc.tmp", out / f".manifest.json.host.{dead.pid}.abc123.tmp",
                out / "mine" / f".0123456789.{tag}.{dead.pid}.users001.tmp"]
    for path in leftovers + kept + [old_elsewhere] + not_ours:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    for path in [old_elsewhere] + not_ours:
        os.utime(path, (time.time() - 2 * 3600,) * 2)
    done = run_cli(tmp_path / "input", out, "--steps", STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p for p in leftovers + [old_elsewhere] if p.exists()] == []
    assert all(p.exists() for p in kept + not_ours)
    shutil.rmtree(out)


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_job_cleanly_and_a_resume_finishes_it(store, tmp_path, signal_number):
    """SIGINT or SIGTERM once a chunk is logged: a non-zero exit, one line on stderr (no traceback),
    no partial output; the resume finishes the job, equal to an uninterrupted run."""
    root, names = store
    (tmp_path / "input").mkdir()
    for name in names[:20]:
        (tmp_path / "input" / name).write_bytes((root / "input" / name).read_bytes())
    out = tmp_path / "out"
    job = cli(tmp_path / "input", out, "--steps", STEPS)
    while job.poll() is None and not (
            (out / "events.jsonl").exists() and any(e["event"] == "recorded" for e in events(out))):
        time.sleep(0.003)
    job.send_signal(signal_number)
    done = finished(job)
    assert done.returncode == 128 + signal_number, (done.returncode, done.stdout, done.stderr[-3000:])
    *progress, last = done.stderr.strip().splitlines()  # before the line: only the progress line's redraws ("\r")
    assert "Traceback" not in done.stderr and len(last) < 200, done.stderr[-3000:]
    assert all(line.startswith("invert-batch [") for line in progress if line), done.stderr[-3000:]
    assert last.startswith(f"invert-batch: stopped by {signal.Signals(signal_number).name}") and "resume" in last, last
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob(".*.tmp")]
    recorded = [e["chunk"] for e in events(out) if e["event"] == "recorded"]
    assert 1 <= len(recorded) < 20

    done = run_cli(tmp_path / "input", out, "--steps", STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    got, expected = outputs(out), outputs(root / "reference")
    assert sorted(got) == names[:20]
    for name in names[:20]:
        np.testing.assert_array_equal(got[name], expected[name])


def test_user_mistakes_get_one_line_errors(tmp_path):
    """A manifest without a shard list (or with a string), malformed JSON, an output that is a file,
    a settings.json that is not this job's, a bad --config and the default model on rows of
    another shape: one line each, naming the file or the setting, no traceback."""
    make_store(tmp_path / "input", 1)
    cases = {}

    def case(label: str, *args, fragments=()):
        cases[label] = (cli(*args), fragments)

    for label, text in (("no shards", '{"row_shape": [1, 8, 8]}'), ("a string", '{"shards": "part-00000.npy"}'),
                        ("not json", '{"shards": [')):
        folder = tmp_path / label
        make_store(folder, 1)
        (folder / "manifest.json").write_text(text)
        case(label, folder, tmp_path / f"out-{label}", fragments=(str(folder / "manifest.json"),))
    (tmp_path / "a file").write_text("not a folder")
    case("output is a file", tmp_path / "input", tmp_path / "a file", fragments=(str(tmp_path / "a file"), "is a file"))
    for label, text in (("settings a list", "[1, 2]"), ("settings not json", "{")):
        (tmp_path / label).mkdir()
        (tmp_path / label / "settings.json").write_text(text)
        case(label, tmp_path / "input", tmp_path / label, "--steps", STEPS, fragments=(str(tmp_path / label / "settings.json"),))
    (tmp_path / "bad.json").write_text('{"solver_order": 7}')
    (tmp_path / "broken.json").write_text('{"solver_order": ')
    for config in ("bad.json", "broken.json", "missing.json"):
        case(config, tmp_path / "input", tmp_path / f"out-{config}", "--config", tmp_path / config,
             fragments=(f"scheduler config {tmp_path / config}",))
    images = tmp_path / "rgb"
    images.mkdir()
    np.save(images / "x.npy", np.zeros((2, 3, 16, 16), np.float32))
    case("other shape", images, tmp_path / "out-rgb", "--steps", STEPS,
         fragments=("model dpmjax.models.digits:unguided_model cannot take rows of shape (3, 16, 16)",))
    for label, (job, fragments) in cases.items():
        done = finished(job)
        assert_one_line_error(done, *fragments)
    assert not list(tmp_path.glob("out-*"))
    assert (tmp_path / "settings a list" / "settings.json").read_text() == "[1, 2]"


# ----------------------------------------------------------------------------- one job per output, one input per job
def test_two_inputs_with_the_same_shard_names_cannot_share_an_output(tmp_path):
    """Two runs started together on one output from two inputs whose shards have the same names:
    the input's path is part of the job, so the run that claims the output first runs and the other
    is refused; a resume from the same data moved elsewhere is refused, saying why."""
    import shutil

    make_store(tmp_path / "inA", 1)
    (tmp_path / "inB").mkdir()
    np.save(tmp_path / "inB" / "part-00000.npy", np.load(tmp_path / "inA" / "part-00000.npy")[::-1].copy())
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    jobs = {name: cli(tmp_path / name, tmp_path / "out", "--steps", STEPS, "--model", "slow_model:model", env=env)
            for name in ("inA", "inB")}
    done = {name: finished(job) for name, job in jobs.items()}
    assert sorted(d.returncode for d in done.values()) == [0, 2], {n: (d.returncode, d.stderr[-2000:]) for n, d in done.items()}
    winner = next(name for name, d in done.items() if d.returncode == 0)
    loser = next(name for name, d in done.items() if d.returncode == 2)
    assert_one_line_error(done[loser], f"input: was {(tmp_path / winner).resolve()}, now {(tmp_path / loser).resolve()}",
                          "the input's path is part of the job")
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert settings["input"]["path"] == manifest["input"]["path"] == str((tmp_path / winner).resolve())
    assert {e["pid"] for e in events(tmp_path / "out")} == {jobs[winner].pid}

    shutil.copytree(tmp_path / winner, tmp_path / "moved")
    with pytest.raises(ValueError, match="the input's path is part of the job"):
        batch.run(tmp_path / "moved", tmp_path / "out", num_inference_steps=STEPS, progress=False)


def test_a_fingerprint_another_run_recorded_differently_is_refused(tmp_path):
    """Fingerprints are recorded once the output is claimed: a record another run wrote meanwhile
    with other bytes for the same shard refuses this run, naming the shard."""
    path = tmp_path / "inputs" / "part-00000.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"chunk": "part-00000.npy", "fingerprint": {"size": 1, "sha256": "aa"}}))
    same = {path: {"chunk": "part-00000.npy", "fingerprint": {"size": 1, "sha256": "aa"}}}
    output_store.OutputStore(tmp_path)._write_fingerprints(same, {})
    other = {path: {"chunk": "part-00000.npy", "fingerprint": {"size": 1, "sha256": "bb"}}}
    with pytest.raises(ValueError, match="input shard part-00000.npy is not the one"):
        output_store.OutputStore(tmp_path)._write_fingerprints(other, {})


def test_a_quarantined_shard_fixed_with_other_rows_is_computed_by_the_resume(tmp_path):
    """The default rows per call are derived once and kept: fixing a quarantined shard in place,
    even with more rows than any other, does not make the resume 'another job'."""
    make_store(tmp_path / "input", 1)
    (tmp_path / "input" / "part-00001.npy").write_text("not an array")
    summary = batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=STEPS, progress=False)
    assert summary.recorded == ["part-00000.npy"] and list(summary.failed) == ["part-00001.npy"]
    np.save(tmp_path / "input" / "part-00001.npy", np.asarray(digits.heldout()[0][:8], np.float32))
    summary = batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=STEPS, progress=False)
    assert summary.recorded == ["part-00001.npy"] and not summary.failed
    assert np.load(tmp_path / "out" / "chunks" / "part-00001.npy").shape == (8, 1, 8, 8)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["batch_rows"] == 4
    with pytest.raises(ValueError, match="batch_rows: was 4, now 8"):  # asked for explicitly: another job
        batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=STEPS, batch_rows=8, progress=False)


def test_trajectories_are_a_setting_and_stale_claims_are_removed(tmp_path):
    """A resume without --save-trajectory after a run with it would leave trajectories missing: it
    is refused. A claim file left by a kill between recording a chunk and giving its claim back is
    removed by the next run."""
    make_store(tmp_path / "input", 2)
    batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=STEPS, save_trajectory=True, progress=False)
    with pytest.raises(ValueError, match="save_trajectory: was True, now False"):
        batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=STEPS, progress=False)
    (tmp_path / "out" / "claims" / files.short_hash("part-00001.npy")).write_text("part-00001.npy\nhost 1\n")
    summary = batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=STEPS, save_trajectory=True,
                            progress=False)
    assert summary.recorded == [] and list((tmp_path / "out" / "claims").iterdir()) == []


def test_float16_shards_are_checked_without_warnings_and_only_files_count_as_done(tmp_path):
    """float16 cannot overflow float32: its check warns of nothing. A folder where a chunk's record
    would be is not a record: the manifest lists it as missing."""
    import warnings

    from dpmjax.apps.batch.input_stores import checked

    x = np.asarray(digits.heldout()[0][:2], np.float16)
    x[0, 0, 0, 0] = np.finfo(np.float16).max
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checked(x, (1, 8, 8)).dtype == np.float32
    (tmp_path / "chunks" / "x.npy").mkdir(parents=True)
    output_store.OutputStore(tmp_path).write_manifest(names=["x.npy"], row_shape=(1, 8, 8), settings={})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"] == [] and manifest["missing"] == ["x.npy"]


def test_outputs_models_and_manifests_that_cannot_work_get_one_line_errors(tmp_path):
    """A folder of someone else's files as OUTPUT (its files are left alone, hidden temporary ones
    too), OUTPUT below a file, a --model that is no factory or needs arguments, manifest entries of
    which one is the other's folder, and one holding a NUL byte: one line each, exit status 2."""
    make_store(tmp_path / "input", 1)
    user = tmp_path / "user"
    (user / "notes").mkdir(parents=True)
    hidden = user / "notes" / f".draft.{os.getpid()}.abc.tmp"
    hidden.write_text("mine")
    os.utime(hidden, (time.time() - 2 * 3600,) * 2)
    (tmp_path / "a file").write_text("x")
    nested = tmp_path / "nested"
    (nested / "x.npy").mkdir(parents=True)
    np.save(nested / "x.npy" / "y.npy", np.zeros((2, 1, 8, 8), np.float32))
    (nested / "manifest.json").write_text(json.dumps({"shards": ["x.npy", "x.npy/y.npy"]}))
    nul = tmp_path / "nul"
    make_store(nul, 1)
    (nul / "manifest.json").write_text(json.dumps({"shards": ["part-\u000000000.npy"]}))
    cases = {"user folder": (cli(tmp_path / "input", user, "--steps", STEPS), (str(user), "not an output of this job")),
             "below a file": (cli(tmp_path / "input", tmp_path / "a file" / "out"), (str(tmp_path / "a file"), "is a file")),
             "not callable": (cli(tmp_path / "input", tmp_path / "o1", "--model", "math:pi"), ("--model math:pi: ", "float")),
             "needs arguments": (cli(tmp_path / "input", tmp_path / "o2", "--model", "json:loads"),
                                 ("--model json:loads: ", "no arguments")),
             "folder and shard": (cli(nested, tmp_path / "o3"), ("'x.npy' and 'x.npy/y.npy'", str(nested / "manifest.json"))),
             "nul": (cli(nul, tmp_path / "o4"), (str(nul / "manifest.json"), "'part-\\x0000000.npy'", "NUL byte"))}
    for label, (job, fragments) in cases.items():
        assert_one_line_error(finished(job), *fragments)
    assert hidden.read_text() == "mine" and sorted(p.name for p in user.rglob("*")) == sorted(["notes", hidden.name])
    assert not list(tmp_path.glob("o[0-9]"))


def test_a_model_module_in_the_current_folder_is_found_by_the_installed_command(tmp_path):
    """``dpmjax invert-batch --model mymodels:make`` run from the folder holding ``mymodels.py``
    imports it there, as ``python -m`` would (the console script's own path lacks that folder)."""
    make_store(tmp_path / "input", 1)
    (tmp_path / "mymodels.py").write_text("def make():\n    return lambda x, t: 0.1 * x\n")
    command = Path(sys.executable).parent / "dpmjax"
    assert command.exists(), command
    done = subprocess.run([str(command), "invert-batch", "input", "out", "--model", "mymodels:make", "--steps", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["model"] == "mymodels:make"


def test_the_guide_s_recipe_samples_an_exact_job_s_noise_back_to_its_input(tmp_path):
    """The batch-job guide's "Back from the noise" block, run as written on an ``--exact`` job's
    output: every row comes back within the round trip the job recorded for it."""
    names = make_store(tmp_path / "input", 1)
    done = run_cli(tmp_path / "input", tmp_path / "out", "--steps", 10, "--exact")
    assert done.returncode == 0, done.stderr[-3000:]
    guide = (Path(__file__).parent.parent / "docs" / "guides" / "batch-job.md").read_text()
    section = guide[guide.index("### Back from the noise"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(code.replace('"OUTPUT"', repr(str(tmp_path / "out"))), scope)
    x = np.load(tmp_path / "input" / names[0])
    trips = np.load(tmp_path / "out" / "round_trips" / names[0])
    error = np.max(np.abs(np.asarray(scope["back"]) - x).reshape(len(x), -1), axis=1) / np.maximum(
        1.0, np.max(np.abs(x).reshape(len(x), -1), axis=1))
    np.testing.assert_allclose(error, trips, rtol=1e-3, atol=1e-7)
    assert np.all(trips <= batch.EXACT_TOLERANCE)
