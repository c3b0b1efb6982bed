"""The batch job under hostile inputs and faults: exact-inversion failures that survive a resume,
inputs and outputs that lead elsewhere through symlinks, sizes checked before they are allocated,
names that are not UTF-8 or too long, a corrupt log, a full disk, a model that exits, and
thousands of missing shards. Each through the command users run (``dpmjax invert-batch`` in a
subprocess) unless the property is the library's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpmjax.apps import batch
from dpmjax.apps.batch import input_stores
from test_batch_job import STEPS, assert_one_line_error, events, make_store, outputs, run_cli

TOLERANCE = batch.EXACT_TOLERANCE


def listing(folder: Path) -> dict:
    """Every file under ``folder`` (symlinks not followed) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


# ----------------------------------------------------------------------------- exact inversion: failures are permanent
def test_exact_rows_that_missed_are_counted_after_a_resume_in_the_summary_the_manifest_and_the_exit_status(tmp_path):
    """Five steps on the log-SNR grid cannot reach these held-out digits (round trips 0.4-1). A run
    killed after two of three chunks (here: the third chunk's record removed, as a kill before its
    write leaves it) and resumed must still count the first two chunks' rows from round_trips/: the
    summary, manifest.json (per shard) and the exit status (3) all say how many rows missed."""
    make_store(tmp_path / "input", 3)
    out = tmp_path / "out"
    first = run_cli(tmp_path / "input", out, "--steps", 5, "--exact")
    assert first.returncode == batch.EXIT_NOT_CONVERGED, first.stderr[-3000:]
    (out / "chunks" / "part-00002.npy").unlink()  # the kill: chunk 2 never recorded
    (out / "manifest.json").unlink()
    resumed = run_cli(tmp_path / "input", out, "--steps", 5, "--exact")
    assert resumed.returncode == batch.EXIT_NOT_CONVERGED, resumed.stderr[-3000:]
    trips = {name: np.load(out / "round_trips" / name) for name in sorted(os.listdir(out / "round_trips"))}
    total = sum(t.size for t in trips.values())
    within = sum(int(np.sum(t <= TOLERANCE)) for t in trips.values())
    assert total == 12 and within < total
    assert "1 chunks inverted" in resumed.stdout and "2 already done" in resumed.stdout, resumed.stdout
    assert f"exact inversion: {within} of {total} rows within round trip 1e-05" in resumed.stdout, resumed.stdout
    for name, t in trips.items():
        if np.any(t > TOLERANCE):
            assert f"NOT CONVERGED {name}: rows {np.flatnonzero(t > TOLERANCE).tolist()}" in resumed.stdout
    report = json.loads((out / "manifest.json").read_text())["exact_inversion"]
    assert (report["rows"], report["rows_converged"], report["tolerance"]) == (total, within, TOLERANCE)
    for name, t in trips.items():
        shard = report["shards"][name]
        assert (shard["rows"], shard["rows_converged"]) == (t.size, int(np.sum(t <= TOLERANCE)))
        assert shard["worst_round_trip"] == pytest.approx(float(t.max()), rel=1e-6)
    assert report["worst_round_trip"] == pytest.approx(max(float(t.max()) for t in trips.values()), rel=1e-6)
    # a rerun with nothing left to do says the same: failures are never forgotten
    again = run_cli(tmp_path / "input", out, "--steps", 5, "--exact")
    assert again.returncode == batch.EXIT_NOT_CONVERGED
    assert f"exact inversion: {within} of {total} rows" in again.stdout, again.stdout


def test_a_budget_and_a_tolerance_from_the_cli_are_the_job_s_settings_and_judge_its_rows(tmp_path):
    """--max-calls-per-step 2 leaves exact inversion only plain inversion and its check: on ten steps
    every row misses 1e-5 (exit 3, each chunk's rows named). The same budget judged by --tolerance 0.9
    records the same round trips and passes (exit 0). Both settings are recorded in settings.json
    and a resume with another budget is refused before anything is computed."""
    make_store(tmp_path / "input", 1)
    strict, loose = tmp_path / "strict", tmp_path / "loose"
    first = run_cli(tmp_path / "input", strict, "--steps", 10, "--exact", "--max-calls-per-step", 2)
    assert first.returncode == batch.EXIT_NOT_CONVERGED, first.stderr[-3000:]
    assert "exact inversion: 0 of 4 rows within round trip 1e-05" in first.stdout, first.stdout
    assert "NOT CONVERGED part-00000.npy: rows [0, 1, 2, 3]" in first.stdout, first.stdout
    assert json.loads((strict / "settings.json").read_text())["exact_settings"] == {"max_calls_per_step": 2}
    second = run_cli(tmp_path / "input", loose, "--steps", 10, "--exact", "--max-calls-per-step", 2, "--tolerance", 0.9)
    assert second.returncode == batch.EXIT_OK, (second.stdout, second.stderr[-3000:])
    assert "exact inversion: 4 of 4 rows within round trip 0.9" in second.stdout, second.stdout
    assert json.loads((loose / "manifest.json").read_text())["exact_inversion"]["tolerance"] == 0.9
    np.testing.assert_array_equal(np.load(strict / "round_trips" / "part-00000.npy"),
                                  np.load(loose / "round_trips" / "part-00000.npy"))
    before = listing(strict)
    other = run_cli(tmp_path / "input", strict, "--steps", 10, "--exact", "--max-calls-per-step", 50)
    assert_one_line_error(other, "exact_settings", "'max_calls_per_step': 2", "'max_calls_per_step': 50")
    assert listing(strict) == before


@pytest.mark.parametrize("options, named", [
    (("--max-calls-per-step", 4), "--max-calls-per-step is exact inversion's: add --exact"),
    (("--tolerance", 1e-4, "--max-calls-per-step", 4), "--tolerance and --max-calls-per-step are exact inversion's"),
    (("--exact", "--max-calls-per-step", 1), "--max-calls-per-step must be an integer >= 2"),
    (("--exact", "--tolerance", 0), "--tolerance must be a number in (0, 1)"),
    (("--exact", "--tolerance", "nan"), "--tolerance must be a number in (0, 1)"),
])
def test_exact_inversion_options_that_cannot_work_are_one_line_errors(tmp_path, options, named):
    make_store(tmp_path / "input", 1)
    assert_one_line_error(run_cli(tmp_path / "input", tmp_path / "out", *options), named)
    assert not (tmp_path / "out").exists()


def test_a_job_written_before_exact_settings_were_recorded_resumes(tmp_path):
    """settings.json without ``exact_settings`` (outputs of earlier versions) means exact=True's
    defaults: the job resumes (nothing to do)."""
    make_store(tmp_path / "input", 1)
    out = tmp_path / "out"
    assert run_cli(tmp_path / "input", out, "--steps", 3).returncode == batch.EXIT_OK
    settings = json.loads((out / "settings.json").read_text())
    assert settings.pop("exact_settings") == {}
    (out / "settings.json").write_text(json.dumps(settings))
    again = run_cli(tmp_path / "input", out, "--steps", 3)
    assert again.returncode == batch.EXIT_OK and "1 already done" in again.stdout, (again.stdout, again.stderr[-3000:])


def test_the_library_call_takes_exact_inversion_settings_and_refuses_other_values(tmp_path):
    make_store(tmp_path / "input", 1)
    with pytest.raises(ValueError, match="exact must be True, False or a dpmjax.ExactInversion"):
        batch.run(tmp_path / "input", tmp_path / "out", num_inference_steps=3, exact="yes", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_recorded_exact_chunk_without_its_round_trips_counts_as_not_converged(tmp_path):
    """The round trips are written before the noise; if they are lost anyway the rows are not
    passed off as exact."""
    make_store(tmp_path / "input", 1)
    out = tmp_path / "out"
    batch.run(tmp_path / "input", out, num_inference_steps=3, exact=True, progress=False)
    (out / "round_trips" / "part-00000.npy").unlink()
    summary = batch.run(tmp_path / "input", out, num_inference_steps=3, exact=True, progress=False)
    assert summary.exact_rows == 4 and summary.not_converged == {"part-00000.npy": [0, 1, 2, 3]}
    shard = json.loads((out / "manifest.json").read_text())["exact_inversion"]["shards"]["part-00000.npy"]
    assert shard["rows_converged"] == 0 and shard["round_trips"] == "missing"


# ----------------------------------------------------------------------------- inputs that do nothing
def test_a_zarr_array_without_rows_is_refused_like_an_empty_folder(tmp_path):
    ts = pytest.importorskip("tensorstore")
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "empty.zarr")},
            "metadata": {"shape": [0, 1, 8, 8], "chunks": [4, 1, 8, 8], "dtype": "<f4"}}
    ts.open(spec, create=True).result()
    done = run_cli(tmp_path / "empty.zarr", tmp_path / "out", "--steps", STEPS)
    assert_one_line_error(done, "no rows: nothing to invert")
    (tmp_path / "none").mkdir()
    assert_one_line_error(run_cli(tmp_path / "none", tmp_path / "out2"), "no .npy files")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


# ----------------------------------------------------------------------------- paths: resolved, not text
def test_shards_that_lead_outside_the_input_through_symlinks_are_never_read(tmp_path):
    """``INPUT/root -> /`` with a manifest entry ``root/.../secret.npy``, and a ``*.npy`` symlink to a
    file elsewhere: refused before anything is written, naming the shard. A shard whose symlink is
    changed to lead outside after the job started is quarantined, not read."""
    outside = tmp_path / "outside"
    make_store(outside, 1)
    secret = outside / "part-00000.npy"
    listed = tmp_path / "listed"
    make_store(listed, 1)
    (listed / "root").symlink_to("/")
    (listed / "manifest.json").write_text(json.dumps({"shards": ["part-00000.npy", f"root{secret}"]}))
    assert_one_line_error(run_cli(listed, tmp_path / "out1", "--steps", STEPS), f"input shard root{secret}",
                          "leads outside the input folder")
    globbed = tmp_path / "globbed"
    make_store(globbed, 1)
    (globbed / "z.npy").symlink_to(secret)
    assert_one_line_error(run_cli(globbed, tmp_path / "out2", "--steps", STEPS), "input shard z.npy",
                          "leads outside the input folder")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
    # a symlink inside the input is fine; one retargeted outside after the start is caught as it is read
    inner = tmp_path / "inner"
    make_store(inner, 1)
    (inner / "z.npy").symlink_to(inner / "part-00000.npy")
    store = input_stores.open_store(inner)
    assert store.read("z.npy", None).shape == (4, 1, 8, 8)
    (inner / "z.npy").unlink()
    (inner / "z.npy").symlink_to(secret)
    with pytest.raises(input_stores.ChunkError, match="leads outside the input folder"):
        store.read("z.npy", None)


def test_an_output_folder_replaced_by_a_symlink_into_the_input_is_refused_and_nothing_is_written(tmp_path):
    """A resume where ``OUTPUT/chunks`` became a symlink into INPUT would write the noise into the
    input: refused with one line, and the input keeps every byte."""
    make_store(tmp_path / "input", 2)
    out = tmp_path / "out"
    assert run_cli(tmp_path / "input", out, "--steps", STEPS).returncode == 0
    before = listing(tmp_path / "input")
    (out / "chunks" / "part-00001.npy").unlink()
    (out / "chunks").rename(tmp_path / "moved")
    (out / "chunks").symlink_to(tmp_path / "input")
    assert_one_line_error(run_cli(tmp_path / "input", out, "--steps", STEPS), "chunks/ is a symlink")
    assert listing(tmp_path / "input") == before
    # the library's writes check each target as well: a folder that turns into a symlink later is refused
    store = batch.OutputStore(out)
    with pytest.raises(OSError, match="leads outside the output folder"):
        store.write_chunk(name="part-00001.npy", noise=np.zeros((4, 1, 8, 8), np.float32))
    assert listing(tmp_path / "input") == before


def test_symlink_loops_and_dangling_symlinks_as_input_or_output_are_one_line_errors(tmp_path):
    make_store(tmp_path / "input", 1)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert_one_line_error(run_cli(tmp_path / "loop", tmp_path / "out", "--steps", STEPS), "input", "symlink loop")
    assert_one_line_error(run_cli(tmp_path / "input", tmp_path / "loop", "--steps", STEPS), "output", "symlink loop")
    assert_one_line_error(run_cli(tmp_path / "input", tmp_path / "dangling", "--steps", STEPS),
                          f"output {tmp_path / 'dangling'} is a symlink to {tmp_path / 'nowhere'}, which does not exist")
    assert_one_line_error(run_cli(tmp_path / "dangling", tmp_path / "out", "--steps", STEPS), "which does not exist")
    assert not (tmp_path / "out").exists() and not (tmp_path / "nowhere").exists()


# ----------------------------------------------------------------------------- sizes before allocations
def test_sizes_are_refused_before_anything_of_that_size_is_allocated(tmp_path):
    """``--batch-rows 1000000000`` (512 GB of pieces) and a manifest ``row_shape`` of 1e15 values: one
    line saying the size and the limit, nothing written. A shard whose header claims more rows than
    memory holds is quarantined from its header, its data never read."""
    make_store(tmp_path / "input", 1)
    assert_one_line_error(run_cli(tmp_path / "input", tmp_path / "out1", "--batch-rows", 10 ** 9, "--steps", STEPS),
                          "batch_rows 1000000000", "of memory", "--batch-rows")
    huge = tmp_path / "huge"
    make_store(huge, 1)
    (huge / "manifest.json").write_text(json.dumps({"shards": ["part-00000.npy"], "row_shape": [100000] * 3}))
    assert_one_line_error(run_cli(huge, tmp_path / "out2", "--steps", STEPS), "(100000, 100000, 100000)", "of memory")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
    claims = tmp_path / "claims"
    make_store(claims, 1)
    with open(claims / "part-00001.npy", "wb") as f:  # a header for 2**40 rows, and no data
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2 ** 40, 1, 8, 8)})
    done = run_cli(claims, tmp_path / "out3", "--steps", STEPS)
    assert done.returncode == batch.EXIT_FAILED, done.stderr[-3000:]
    reason = json.loads((tmp_path / "out3" / "failed" / "part-00001.json").read_text())["reason"]
    assert "too large to read whole" in reason and "host memory" in reason, reason
    assert (tmp_path / "out3" / "chunks" / "part-00000.npy").is_file()


# ----------------------------------------------------------------------------- bad bytes are data
def test_a_shard_name_that_is_not_utf8_is_inverted_and_named_escaped(tmp_path):
    """One shard name with a 0xff byte: inverted like any other (the output file has the same
    bytes in its name); a bad shard with such a name is reported with the byte escaped."""
    make_store(tmp_path / "input", 1)
    odd = os.fsdecode(b"odd-\xff.npy")
    np.save(tmp_path / "input" / odd, np.load(tmp_path / "input" / "part-00000.npy"))
    (tmp_path / "input" / os.fsdecode(b"bad-\xfe.npy")).write_text("not an array")
    done = run_cli(tmp_path / "input", tmp_path / "out", "--steps", STEPS)
    assert done.returncode == batch.EXIT_FAILED and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "2 chunks inverted" in done.stdout and r"FAILED bad-\xfe.npy: not a .npy array" in done.stdout, done.stdout
    noise = outputs(tmp_path / "out")
    np.testing.assert_array_equal(noise[odd], noise["part-00000.npy"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert odd in manifest["shards"]


def test_a_corrupt_line_in_the_event_log_is_skipped_and_reported(tmp_path):
    """Bytes that are not UTF-8 in ``events.jsonl`` (a stray write, a disk error) never block a
    resume: the line is skipped, the job says which, and the audit keeps one "recorded" per chunk."""
    make_store(tmp_path / "input", 2)
    out = tmp_path / "out"
    assert run_cli(tmp_path / "input", out, "--steps", STEPS).returncode == 0
    with open(out / "events.jsonl", "ab") as f:
        f.write(b"\xff\xfe{not json\n")
    (out / "chunks" / "part-00001.npy").unlink()
    lines = len((out / "events.jsonl").read_bytes().splitlines())
    done = run_cli(tmp_path / "input", out, "--steps", STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"events.jsonl: 1 line(s) are no JSON event (the first is line {lines})" in done.stderr, done.stderr
    good = [json.loads(line) for line in (out / "events.jsonl").read_bytes().splitlines() if not line.startswith(b"\xff")]
    assert sum(e["event"] == "recorded" and e["chunk"] == "part-00000.npy" for e in good) == 1


# ----------------------------------------------------------------------------- faults while writing
def _with_file_size_limit(limit: int, command: list) -> list:
    """``command`` (a ``python -m`` call) run with files unable to grow past ``limit`` bytes: writes
    fail with EFBIG, as on a full disk (the signal that would kill the process is ignored)."""
    assert command[1] == "-m"
    start = (f"import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); sys.argv = {command[2:]!r}; "
             f"runpy.run_module({command[2]!r}, run_name='__main__', alter_sys=True)")
    return [command[0], "-c", start]


def test_a_write_that_fails_names_the_file_leaves_no_partial_record_and_the_rerun_resumes(tmp_path):
    """Files may not grow past 8 KiB: settings and logs fit, the 100-row chunks (25 KiB) do not. The
    job stops with one line naming the file and the cause (exit 1), leaves no temporary file and no
    record of the chunk; the rerun without the limit writes the same bits as a run never hindered."""
    rows = 100
    (tmp_path / "input").mkdir()
    from dpmjax.models import digits

    data = digits.heldout()[0][:rows]
    np.save(tmp_path / "input" / "big.npy", data)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dpmjax", "invert-batch", str(tmp_path / "input"), str(out), "--steps", str(STEPS)]
    done = subprocess.run(_with_file_size_limit(8192, command), capture_output=True, text=True, timeout=300)
    assert done.returncode == batch.EXIT_FAILED, (done.returncode, done.stderr[-3000:])
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and "cannot write" in last and "chunks/big.npy" in last, done.stderr[-3000:]
    assert "File too large" in last and "rerun the same command to resume" in last, last
    assert not (out / "chunks" / "big.npy").exists()
    assert not [p for p in out.rglob("*.tmp")], list(out.rglob("*"))
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    reference = batch.run(tmp_path / "input", tmp_path / "reference", num_inference_steps=STEPS, progress=False)
    assert reference.recorded == ["big.npy"]
    np.testing.assert_array_equal(np.load(out / "chunks" / "big.npy"), np.load(tmp_path / "reference" / "chunks" / "big.npy"))


def test_a_folder_name_too_long_for_the_file_system_is_quarantined_not_a_stopped_job(tmp_path):
    make_store(tmp_path / "input", 1)
    long_name = "f" * 300 + "/b.npy"
    (tmp_path / "input" / "manifest.json").write_text(json.dumps({"shards": ["part-00000.npy", long_name]}))
    done = run_cli(tmp_path / "input", tmp_path / "out", "--steps", STEPS)
    assert done.returncode == batch.EXIT_FAILED and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "1 chunks inverted" in done.stdout and "1 failed" in done.stdout, done.stdout
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / "failed").glob("*.json")]
    assert [r["chunk"] for r in records] == [long_name]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["missing"] == [long_name]
    # the library refuses to name an output after it, whatever the input file system allowed
    assert "longer than the 255 bytes" in batch.OutputStore(tmp_path / "out").can_record(long_name)


# ----------------------------------------------------------------------------- exit statuses mean something
def _run_with_model(tmp_path: Path, *, out: Path, model: str) -> subprocess.CompletedProcess:
    """``dpmjax invert-batch tmp_path/input OUT --model MODEL`` with ``tmp_path/models`` importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "models"), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "dpmjax", "invert-batch", str(tmp_path / "input"), str(out),
               "--model", model, "--steps", str(STEPS)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_a_model_that_exits_is_a_failure_never_a_success(tmp_path):
    """``--model builtins:exit`` (SystemExit from the factory) is refused, exit 2, nothing written; a
    model that raises SystemExit while the job runs stops it with exit 1, naming the chunk."""
    make_store(tmp_path / "input", 1)
    assert_one_line_error(run_cli(tmp_path / "input", tmp_path / "out1", "--model", "builtins:exit"),
                          "--model builtins:exit", "SystemExit")
    assert not (tmp_path / "out1").exists()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "exiting.py").write_text(
        "import sys\n"
        "def model():\n"
        "    traced = []\n"
        "    def model_fn(x, t):\n"
        "        traced.append(1)\n"
        "        if len(traced) > 1:  # the job's check traces it once; the inversion exits\n"
        "            sys.exit(0)\n"
        "        return x\n"
        "    return model_fn\n")
    done = _run_with_model(tmp_path, out=tmp_path / "out2", model="exiting:model")
    assert done.returncode == batch.EXIT_FAILED, (done.returncode, done.stderr[-3000:])
    assert "chunk part-00000.npy: SystemExit" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out2" / "chunks" / "part-00000.npy").exists()


def test_thousands_of_missing_shards_are_quarantined_together(tmp_path):
    """3,000 manifest entries whose files do not exist, beside one real shard: each is reported
    (one record and one event each) but without a claim file, a fingerprint record and fsyncs of
    its own; the real shard is inverted; exit 1."""
    make_store(tmp_path / "input", 1)
    missing = [f"gone/{i:05d}.npy" for i in range(3000)]
    (tmp_path / "input" / "manifest.json").write_text(json.dumps({"shards": ["part-00000.npy", *missing]}))
    done = run_cli(tmp_path / "input", tmp_path / "out", "--steps", STEPS)
    assert done.returncode == batch.EXIT_FAILED, done.stderr[-3000:]
    assert "1 chunks inverted" in done.stdout and "3000 failed" in done.stdout
    assert "and 2980 more failed chunks" in done.stdout, done.stdout[-2000:]
    out = tmp_path / "out"
    failed = sorted(p.relative_to(out / "failed").as_posix() for p in (out / "failed").rglob("*.json"))
    assert failed == [name.replace(".npy", ".json") for name in missing]
    assert "No such file or directory" in json.loads((out / "failed" / "gone" / "00000.json").read_text())["reason"]
    assert len(list((out / "claims").iterdir())) <= 1  # the real shard's, at most
    assert [p.name for p in (out / "inputs").rglob("*.json")] == ["part-00000.json"]
    logged = [e for e in events(out) if e["event"] == "failed"]
    assert sorted(e["chunk"] for e in logged) == missing
    # once the files exist, the rerun computes them
    (tmp_path / "input" / "gone").mkdir()
    for name in missing[:2]:
        np.save(tmp_path / "input" / name, np.load(tmp_path / "input" / "part-00000.npy"))
    (tmp_path / "input" / "manifest.json").write_text(json.dumps({"shards": ["part-00000.npy", *missing]}))
    again = run_cli(tmp_path / "input", out, "--steps", STEPS)
    assert again.returncode == batch.EXIT_FAILED and "2 chunks inverted" in again.stdout, again.stdout[-2000:]
    assert not (out / "failed" / "gone" / "00000.json").exists()


# ----------------------------------------------------------------------------- the job's own files, never links
def test_job_files_replaced_by_symlinks_are_never_read_as_records_or_written_through(tmp_path):
    """On a resume: ``events.jsonl`` made a symlink to an input shard is refused (the shard keeps its
    bytes); a claim file made a symlink to a user's file leaves that file untouched; a noise record
    made a symlink is no record: the chunk is computed and the link replaced by the real file."""
    make_store(tmp_path / "input", 3)
    out = tmp_path / "out"
    assert run_cli(tmp_path / "input", out, "--steps", STEPS).returncode == 0
    reference = (out / "chunks" / "part-00002.npy").read_bytes()
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file\n")
    before = listing(tmp_path / "input")

    (out / "events.jsonl").rename(tmp_path / "events.jsonl")
    (out / "events.jsonl").symlink_to(tmp_path / "input" / "part-00000.npy")
    (out / "chunks" / "part-00001.npy").unlink()
    assert_one_line_error(run_cli(tmp_path / "input", out, "--steps", STEPS), "events.jsonl is a symlink")
    assert listing(tmp_path / "input") == before
    (out / "events.jsonl").unlink()
    (tmp_path / "events.jsonl").rename(out / "events.jsonl")

    from dpmjax.apps.batch.files import short_hash

    claim = out / "claims" / short_hash("part-00001.npy")
    claim.unlink(missing_ok=True)
    claim.symlink_to(victim)
    (out / "chunks" / "part-00002.npy").unlink()
    (out / "chunks" / "part-00002.npy").symlink_to(victim)
    done = run_cli(tmp_path / "input", out, "--steps", STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 chunks inverted" in done.stdout and "1 already done" in done.stdout, done.stdout
    assert victim.read_text() == "the user's file\n" and listing(tmp_path / "input") == before
    record = out / "chunks" / "part-00002.npy"
    assert not record.is_symlink() and record.read_bytes() == reference
    umask = os.umask(0)
    os.umask(umask)
    assert (record.stat().st_mode & 0o777) == 0o666 & ~umask  # the usual mode, not a temporary file's 0600


def test_a_fifo_or_rows_without_values_are_quarantined_never_waited_for(tmp_path):
    """A FIFO named ``*.npy`` would block the job until someone writes to it; rows of shape
    (0, 8, 8) hold nothing to invert. Both are quarantined saying so; the real shard is done."""
    make_store(tmp_path / "input", 1)
    os.mkfifo(tmp_path / "input" / "pipe.npy")
    np.save(tmp_path / "input" / "empty-rows.npy", np.zeros((4, 0, 8, 8), np.float32))
    done = run_cli(tmp_path / "input", tmp_path / "out", "--steps", STEPS)
    assert done.returncode == batch.EXIT_FAILED, done.stderr[-3000:]
    reasons = {r["chunk"]: r["reason"] for r in (json.loads(p.read_text()) for p in (tmp_path / "out" / "failed").glob("*.json"))}
    assert "a FIFO" in reasons["pipe.npy"] and "hold no values" in reasons["empty-rows.npy"], reasons
    assert (tmp_path / "out" / "chunks" / "part-00000.npy").is_file()
    ts = pytest.importorskip("tensorstore")
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "flat.zarr")},
            "metadata": {"shape": [4, 0, 8, 8], "chunks": [4, 1, 8, 8], "dtype": "<f4"}}
    ts.open(spec, create=True).result()
    assert_one_line_error(run_cli(tmp_path / "flat.zarr", tmp_path / "out2", "--steps", STEPS), "rows hold no values")


def test_a_model_that_exits_inside_a_compiled_callback_is_named_in_the_last_line(tmp_path):
    """A model whose host callback calls ``sys.exit``: JAX wraps the exit in its own error with the
    traceback inside; the job's one line names ``SystemExit``, exit 1."""
    make_store(tmp_path / "input", 1)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "callback_exit.py").write_text(
        "import sys\n"
        "import jax\n"
        "def model():\n"
        "    def leave(x):\n"
        "        sys.exit(0)\n"
        "    return lambda x, t: jax.pure_callback(leave, jax.ShapeDtypeStruct(x.shape, x.dtype), x)\n")
    done = _run_with_model(tmp_path, out=tmp_path / "out", model="callback_exit:model")
    assert done.returncode == batch.EXIT_FAILED, (done.returncode, done.stderr[-3000:])
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dpmjax invert-batch: the job stopped while inverting chunk part-00000.npy: SystemExit"), last
