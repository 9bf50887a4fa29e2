"""Several `difflab sample` shards into one folder, and reading a folder while it is written
(difflab.sample_sets): whole files only, the union of the shards, one-line refusals of mixed folders."""
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from difflab.cli import main

TINY = ["--preset", "tiny", "--image-size", "16", "--batch-size", "8", "--no-progress", "train.sample_every=0",
        "train.precision=fp32"]
SAMPLE = ["--steps", "3", "--format", "png", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    g = torch.Generator().manual_seed(0)
    for k in range(16):
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(root / f"{k}.png")
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--data", str(root), "--out", str(out), "--max-steps", "2", *TINY]) == 0
    return out


def _popen(run, out, *flags):
    """`difflab sample` in its own process (one thread, like the test process under OMP_NUM_THREADS=1)."""
    argv = [sys.executable, "-m", "difflab", "sample", "--run", str(run), "--out", str(out), *SAMPLE, *map(str, flags)]
    return subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(procs):
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    for _, _, err in results:
        assert "Traceback" not in err, err
    return results


def _sample_here(capsys, run, out, *flags):
    """`difflab sample` in this process, with one torch thread (bit-identical to the subprocesses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["sample", "--run", str(run), "--out", str(out), *SAMPLE, *map(str, flags)])
    finally:
        torch.set_num_threads(threads)
    out_, err = capsys.readouterr()
    return code, out_, err


def _records(folder: Path):
    return {p.name: json.loads(p.read_text()) for p in folder.parent.glob(f"{folder.name}.sampling*.json")}


def test_concurrent_overlapping_shards_write_exactly_one_runs_images(tmp_path, capsys, trained_run):
    """Three shards at once, the third overlapping both others: all succeed, and the folder holds
    1.png ... 20.png with the bytes a single -n 20 run writes, and one complete record per shard."""
    whole, shards = tmp_path / "whole", tmp_path / "shards"
    code, _, err = _sample_here(capsys, trained_run, whole, "-n", 20, "--batch-size", 5)
    assert code == 0, err
    results = _wait([_popen(trained_run, shards, "-n", 10, "--batch-size", 5),
                     _popen(trained_run, shards, "--start", 10, "-n", 10, "--batch-size", 5),
                     _popen(trained_run, shards, "--start", 5, "-n", 10, "--batch-size", 5)])
    assert [code for code, _, _ in results] == [0, 0, 0], results
    assert sorted(os.listdir(shards)) == sorted(f"{k}.png" for k in range(1, 21))  # and no temporary file
    for k in range(1, 21):
        assert (shards / f"{k}.png").read_bytes() == (whole / f"{k}.png").read_bytes(), k
    records = _records(shards)
    assert sorted(records) == ["shards.sampling-from-11.json", "shards.sampling-from-6.json", "shards.sampling.json"]
    assert all(r["complete"] and r["seconds"] > 0 for r in records.values())
    assert sorted((r["start"], r["n"]) for r in records.values()) == [(0, 10), (5, 10), (10, 10)]


def test_concurrent_shards_of_different_samplings_one_is_refused(tmp_path, trained_run):
    """Two shards of different seeds at once into one folder (not even overlapping): the folder's lock
    lets exactly one claim it; the other exits 2 with one line naming the difference, writing nothing."""
    out = tmp_path / "s"
    results = _wait([_popen(trained_run, out, "-n", 6, "--seed", 0), _popen(trained_run, out, "--start", 6, "-n", 6,
                                                                             "--seed", 1)])
    assert sorted(code for code, _, _ in results) == [0, 2], results
    (_, _, err), = [r for r in results if r[0] == 2]
    assert err.count("\n") == 1 and err.startswith("difflab: error: --out") and "another sampling" in err and "seed" in err
    (winner, _, _), = [r for r in results if r[0] == 0]
    records = _records(out)
    assert len(records) == 1
    (record,) = records.values()
    first = record["start"] + 1
    assert sorted(os.listdir(out)) == sorted(f"{k}.png" for k in range(first, first + 6))


def _has_open(pid: int, folder: Path) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    target = str(folder.resolve())
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="watches the shard's open files in /proc (Linux)")
def test_a_shard_checks_the_folder_under_its_lock(tmp_path, capsys, trained_run):
    """The check-and-claim is atomic: while another process holds the folder's lock, a shard that has
    opened the folder to lock it writes nothing; what was claimed meanwhile decides, once it may go on."""
    from difflab.io import atomic_write_json, locked

    assert _sample_here(capsys, trained_run, tmp_path / "ref", "-n", 2)[0] == 0
    theirs = json.loads((tmp_path / "ref.sampling.json").read_text())
    out = tmp_path / "s"
    out.mkdir()
    with locked(out):
        proc = _popen(trained_run, out, "-n", 2, "--seed", 1)
        deadline = time.monotonic() + 60
        while not _has_open(proc.pid, out):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        time.sleep(0.5)
        assert proc.poll() is None and _records(out) == {} and not list(out.iterdir())  # waiting for the lock
        # meanwhile a shard of another seed claims the folder, as one holding the lock may
        atomic_write_json(tmp_path / "s.sampling.json", {**theirs, "images": str(out.resolve()), "complete": False})
    code, _, err = _wait([proc])[0]
    assert code == 2 and "another sampling (s.sampling.json: seed 0 there, 1 here)" in err, err
    assert not list(out.iterdir())


def test_jpeg_folders_record_their_quality_and_refuse_another(tmp_path, capsys, trained_run):
    """The hand-in JPEGs: quality 100 with 4:2:0 chroma unless asked otherwise (FID moves with the
    encoding, see difflab.visualize.images.JPEG_QUALITY); a shard at another quality is refused."""
    from PIL import JpegImagePlugin

    out = tmp_path / "j"
    code, _, err = _sample_here(capsys, trained_run, out, "-n", 2, "--format", "jpg")
    assert code == 0, err
    record = json.loads((tmp_path / "j.sampling.json").read_text())
    assert record["format"] == "jpg" and record["jpeg_quality"] == 100
    with Image.open(out / "1.jpg") as im:
        assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0
        ours = im.quantization
        pixels = im.convert("RGB")
    for quality in (100, 95):  # the tables Pillow writes at each quality: ours are 100's, not 95's
        buf = io.BytesIO()
        pixels.save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
        with Image.open(buf) as ref:
            assert (ref.quantization == ours) == (quality == 100)
    code, _, err = _sample_here(capsys, trained_run, out, "--start", 2, "-n", 2, "--format", "jpg", "--jpeg-quality", 95)
    assert code == 2 and "jpeg_quality 100 there, 95 here" in err, err
    code, _, err = _sample_here(capsys, trained_run, out, "-n", 2, "--format", "jpg", "--jpeg-quality", 101)
    assert code == 2 and "--jpeg-quality" in err and "above 100" in err, err


def test_mixed_folders_are_refused_before_any_work(tmp_path, capsys, trained_run):
    out = tmp_path / "s"
    code, printed, err = _sample_here(capsys, trained_run, out, "-n", 4)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    record = (tmp_path / "s.sampling.json").read_text()

    def refused(message, *flags):
        code, _, err = _sample_here(capsys, trained_run, out, *flags)
        assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing removed
        assert [p.name for p in tmp_path.glob("s.sampling*.json")] == ["s.sampling.json"]
        assert (tmp_path / "s.sampling.json").read_text() == record

    refused("images 1-4 of another sampling (s.sampling.json: seed 0 there, 7 here)", "-n", 2, "--seed", 7)
    refused("sampler.steps 3 there, 4 here", "--start", 4, "-n", 2, "--steps", 4)  # not even overlapping
    refused('format "png" there, "jpg" here', "-n", 2, "--format", "jpg")
    (out / "extra.png").write_bytes((out / "1.png").read_bytes())
    before["extra.png"] = before["1.png"]
    refused("holds 1 image(s) that no sampling record beside it accounts for (extra.png)", "-n", 2)
    (out / "extra.png").unlink()
    del before["extra.png"]
    (out / "5.jpg").write_bytes(b"")  # another format: eval would score it too
    before["5.jpg"] = b""
    refused("image(s) other than the .png files of a sample set (5.jpg)", "--start", 4, "-n", 2)
    (out / "5.jpg").unlink()
    del before["5.jpg"]

    # a folder written by another command (edit's record has no sampler)
    other = tmp_path / "e"
    other.mkdir()
    (tmp_path / "e.sampling.json").write_text(json.dumps({"run": str(trained_run), "n": 2, "task": "sdedit"}))
    code, _, err = _sample_here(capsys, trained_run, other, "-n", 2)
    assert code == 2 and "output of another command (its record e.sampling.json" in err and not list(other.iterdir())
    (tmp_path / "e.sampling.json").write_text("{not json")
    code, _, err = _sample_here(capsys, trained_run, other, "-n", 2)
    assert code == 2 and err.count("\n") == 1 and "sampling record" in err and "unreadable" in err


def test_shards_of_one_sampling_keep_every_record(tmp_path, capsys, trained_run):
    """Rerunning a shard, or one with the same start and another -n, overlaps: allowed (the same images),
    and no record is lost (the old code overwrote <folder>.sampling.json with the smaller shard's)."""
    out = tmp_path / "s"
    assert _sample_here(capsys, trained_run, out, "-n", 6)[0] == 0
    six = {k: (out / f"{k}.png").read_bytes() for k in range(1, 7)}
    code, printed, err = _sample_here(capsys, trained_run, out, "-n", 2)
    assert code == 0, err
    assert "note: images 1-2 are also in s.sampling.json, of the same sampling" in printed
    records = _records(out)
    assert sorted(records) == ["s.sampling-1-to-2.json", "s.sampling.json"]
    assert records["s.sampling.json"]["n"] == 6 and records["s.sampling-1-to-2.json"]["n"] == 2
    code, printed, err = _sample_here(capsys, trained_run, out, "-n", 6)  # the same shard again: its own record
    assert code == 0 and sorted(_records(out)) == sorted(records), err
    # the same shard again (the same batches): the same bytes
    assert {k: (out / f"{k}.png").read_bytes() for k in range(1, 7)} == six
    assert sorted(os.listdir(out)) == sorted(f"{k}.png" for k in range(1, 7))


def test_a_failed_start_leaves_no_claim(tmp_path, capsys, trained_run, monkeypatch):
    """A sampling that fails before its first image removes its claim, so it does not block the folder;
    one that fails later leaves its record marked incomplete (its images need it)."""
    import difflab.samplers

    out = tmp_path / "s"

    def fail(*args, **kwargs):
        raise RuntimeError("boom")
        yield  # a generator, like sample_batches

    monkeypatch.setattr(difflab.samplers, "sample_batches", fail)
    with pytest.raises(RuntimeError, match="boom"):
        _sample_here(capsys, trained_run, out, "-n", 2)
    assert _records(out) == {} and not list(out.iterdir())
    monkeypatch.undo()
    import difflab.visualize.images as images

    real_save, calls = images.save_numbered, []

    def save_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("disk full")
        real_save(*args, **kwargs)

    monkeypatch.setattr(images, "save_numbered", save_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        _sample_here(capsys, trained_run, out, "-n", 4, "--batch-size", 2)
    assert [r["complete"] for r in _records(out).values()] == [False]
    assert sorted(os.listdir(out)) == ["1.png", "2.png"]


def test_eval_reader_lists_only_whole_images_while_a_folder_is_written(tmp_path, trained_run):
    """The reader eval uses (FolderScan: find_images + open_image), run over and over while a
    subprocess writes 60 images one at a time: every file it lists decodes fully, never a temporary
    file, and the records beside the folder always name every image listed (claimed before written)."""
    from difflab.errors import DataError
    from difflab.metrics.features import FolderScan
    from difflab.sample_sets import sample_set_status

    out = tmp_path / "s"
    proc = _popen(trained_run, out, "-n", 60, "--batch-size", 1)
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = proc.poll() is not None  # read once more after the writer has finished
        try:
            scan = FolderScan(out)
        except DataError:  # no folder or no image yet
            assert not done, proc.communicate()
            time.sleep(0.02)
            continue
        for _ in scan.batches(8, progress=False):
            pass
        assert scan.skipped == [] and len(scan.paths) == len(scan.files), scan.skipped
        assert all(not p.name.startswith(".") and p.suffix == ".png" for p in scan.files)
        status = sample_set_status(out, scan.files)
        assert status is not None and status.expected == 60
        assert len(status.missing) == 60 - len(scan.files)  # every listed image is one the record names
        seen.append(len(scan.files))
        if done:
            break
    code, _, err = _wait([proc])[0]
    assert code == 0, err
    assert seen[-1] == 60 and sample_set_status(out, FolderScan(out).files).incomplete == ()
    assert any(0 < n < 60 for n in seen), seen  # it did read a folder mid-write


def test_reader_skips_temporary_files(tmp_path):
    """A half-written image under its temporary name (what atomic_path writes) is never listed."""
    from difflab.metrics.features import FolderScan

    Image.new("RGB", (8, 8)).save(tmp_path / "1.png")
    whole = (tmp_path / "1.png").read_bytes()
    (tmp_path / ".2.png.k3j4h5g6.tmp").write_bytes(whole[: len(whole) // 2])
    (tmp_path / ".2.png").write_bytes(whole[: len(whole) // 2])
    scan = FolderScan(tmp_path)
    assert [p.name for p in scan.files] == ["1.png"]


def test_eval_reports_images_missing_from_a_folder_still_written(tmp_path, capsys, trained_run, lbp_cascade_path):
    """eval of a folder whose records name images not there yet (a shard still writing) scores the
    images present, says how many, and warns in one line which are missing and which record is open."""
    from difflab.sample_sets import claim

    out = tmp_path / "s"
    assert _sample_here(capsys, trained_run, out, "-n", 4)[0] == 0
    done = json.loads((tmp_path / "s.sampling.json").read_text())
    claim(out, {k: v for k, v in done.items() if k not in ("complete", "writer", "images")} | {"start": 4, "n": 3})
    scores = tmp_path / "scores.json"
    code = main(["eval", "--fake", str(out), "--metrics", "detect", "--detectors", "lbp", "--cascade", str(lbp_cascade_path),
                 "--json", str(scores), "--no-progress"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert err.count("\n") == 1 and err.startswith("difflab: warning: --fake")
    assert "4 of the 7 images its sampling records name are there (missing 5-7)" in err
    assert "s.sampling-from-5.json not complete" in err and "using the 4 image files found" in err
    r = json.loads(scores.read_text())
    assert r["n_fake"] == 4 and r["n_fake_expected"] == 7
    assert "4 generated (its sampling records name 7)" in printed
    (tmp_path / "s.sampling-from-9.json").write_text("{")  # a damaged record warns, and the scores still come
    code = main(["eval", "--fake", str(out), "--metrics", "detect", "--detectors", "lbp", "--cascade", str(lbp_cascade_path),
                 "--no-progress"])
    printed, err = capsys.readouterr()
    assert code == 0 and err.count("\n") == 1 and "s.sampling-from-9.json is unreadable" in err, err
    assert "4 generated" in printed and "records name" not in printed


def test_a_file_system_that_cannot_lock_warns_and_goes_on(tmp_path, monkeypatch):
    import errno
    import fcntl

    from difflab.errors import DifflabWarning
    from difflab.io import locked

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with pytest.warns(DifflabWarning, match="cannot lock .*No locks available"):
        with locked(tmp_path):
            ran.append(1)
    assert ran == [1]
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EBADF, "Bad file descriptor")))
    with pytest.raises(OSError), locked(tmp_path):
        pass
