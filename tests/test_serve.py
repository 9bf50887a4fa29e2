"""``difflab serve``: the queue and the request checks on their own, then the page in a real browser
(headless Chromium driven by Playwright) against a server started on a tiny trained run: a generated
PNG is the file the printed ``difflab sample`` command writes, byte for byte (and so for SDEdit and
inpainting); a brush-drawn mask keeps every pixel outside it; cancelling stops a long sampling; bad
input is a message on the page and a log line; concurrent requests complete in order; nothing is
loaded from another site. Screenshots of each tab go to ``$DIFFLAB_SCREENSHOTS`` (docs/img for the
README; ``$DIFFLAB_SERVE_RUN`` and ``$DIFFLAB_SERVE_UPSCALER`` take them on real runs instead).

The browser tests skip, saying so, where no Chromium or no Playwright is found (``apt-get install
chromium``; ``.ci/run`` installs it, and under CI a missing browser fails)."""
from __future__ import annotations

import importlib.util
import io
import os
import select
import shlex
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.conditioning import CondConfig
from difflab.errors import ConfigError, DataError, DifflabError
from needs import missing

if importlib.util.find_spec("starlette") is None:
    missing("the ui extra (starlette) for difflab serve", "pip install -e '.[ui]'", module_level=True)

from difflab.serve.jobs import Job, JobQueue, QueueFull, State  # noqa: E402
from difflab.serve.studio import Limits, Studio  # noqa: E402

TINY = ["--preset", "tiny", "--batch-size", "4", "--max-steps", "2", "--no-progress", "train.sample_every=2",
        "train.sample_grid_size=4", "train.precision=fp32"]


# -- the queue -----------------------------------------------------------------------------------------
def _wait(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_the_queue_runs_one_job_at_a_time_in_order_and_survives_failures():
    lines: list[str] = []
    queue = JobQueue(max_waiting=3, log=lines.append)
    running, overlap, order = [0], [False], []
    gate = threading.Event()

    def work(name, fail=None):
        def run(job):
            running[0] += 1
            overlap[0] |= running[0] > 1
            gate.wait(5)
            order.append(name)
            running[0] -= 1
            if fail:
                raise fail
        return run

    jobs = [Job("generate", "a", work("a")), Job("generate", "b", work("b", DataError("b.png: not an image"))),
            Job("generate", "c", work("c", RuntimeError("boom\nsecond line"))), Job("generate", "d", work("d"))]
    assert queue.submit(jobs[0]) == 1
    _wait(lambda: jobs[0].state is State.RUNNING)
    assert [queue.submit(j) for j in jobs[1:]] == [1, 2, 3]
    assert [queue.position(j) for j in jobs] == [0, 1, 2, 3]
    with pytest.raises(QueueFull, match="the queue is full"):
        queue.submit(Job("generate", "e", work("e")))
    gate.set()
    assert queue.wait_idle(10)
    assert order == ["a", "b", "c", "d"] and not overlap[0]
    assert [j.state for j in jobs] == [State.DONE, State.FAILED, State.FAILED, State.DONE]
    assert [j.finished_seq for j in jobs] == [1, 2, 3, 4]
    assert jobs[1].error == "b.png: not an image"
    assert jobs[2].error == "internal error: RuntimeError: boom second line"  # one line, no traceback
    assert any("failed: internal error: RuntimeError" in line for line in lines)
    assert all("\n" not in line and "Traceback" not in line for line in lines)
    queue.close()


def test_cancel_drops_a_waiting_job_and_stops_a_running_one_at_its_next_step():
    queue = JobQueue(max_waiting=2, log=lambda _: None)
    steps = []

    def long(job):
        job.set_total(10_000)
        for i in range(10_000):
            job.step(types.SimpleNamespace(x0=torch.zeros(1, 1, 2, 2)))
            steps.append(i)
            time.sleep(0.002)

    first, second = Job("generate", "long", long), Job("generate", "next", long)
    queue.submit(first)
    queue.submit(second)
    _wait(lambda: len(steps) > 3)
    queue.cancel(second.id)
    assert second.state is State.CANCELLED and queue.position(second) == 0  # at once
    queue.cancel(first.id)
    assert queue.wait_idle(5)
    assert first.state is State.CANCELLED and first.done < 10_000 and len(steps) == first.done
    assert len(steps) < 10_000 and second.done == 0
    queue.close()


# -- requests and uploads, without a browser ----------------------------------------------------------
@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    """12 random 16 px images in two class folders."""
    root = tmp_path_factory.mktemp("serve-data")
    g = torch.Generator().manual_seed(0)
    for k in range(12):
        cls = "cats" if k % 2 else "dogs"
        (root / cls).mkdir(exist_ok=True)
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(root / cls / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_folder):
    """A tiny class-conditional 16 px run and a tiny 8 -> 16 px super-resolution run."""
    root = tmp_path_factory.mktemp("serve-runs")
    assert main(["train", "--data", str(data_folder), "--labels", "folders", "--image-size", "16", "--out", str(root / "base"),
                 *TINY]) == 0
    assert main(["train", "--data", str(data_folder), "--task", "upscale", "--from", "8", "--image-size", "16",
                 "--out", str(root / "sr"), *TINY]) == 0
    return root


@pytest.fixture(scope="module")
def studio(runs, tmp_path_factory):
    from difflab.runs import load_run

    return Studio(load_run(runs / "base"), str(runs / "base"), tmp_path_factory.mktemp("studio-out"),
                  upscaler=load_run(runs / "sr"), upscaler_arg=str(runs / "sr"), limits=Limits(upload_bytes=4096))


@pytest.mark.parametrize("form, message", [
    ({"steps": "0"}, r"Steps \(--steps\) must be a whole number from 1 to 1000, got '0'"),
    ({"steps": "2.5"}, r"Steps \(--steps\) must be a whole number"),
    ({"n": "17"}, r"Images \(-n\) must be a whole number from 1 to 16, got '17'"),
    ({"seed": "-1"}, r"Seed \(--seed\) must be a whole number from 0 to 4294967295"),
    ({"class": "cats", "guidance": "nan"}, r"Guidance \(--guidance\) must be a number from 0 to 20, got 'nan'"),
    ({"class": "horses"}, r"unknown class 'horses'"),
    ({"prompt": "a cat"}, r"Prompt \(--prompt\): this run was not trained on captions"),
    ({"sampler": "plms"}, r"Sampler \(--sampler\) must be one of ddpm, ddim"),
    ({"task": "edit", "image": "../../etc/passwd"}, r"Image: '../../etc/passwd' is not an image this server has"),
    ({"task": "edit", "image": "uploads/0123456789abcdef.png"}, r"Image: uploads/0123456789abcdef.png is no longer in"),
    ({"task": "edit", "image": "", "strength": "0.5"}, r"is not an image this server has"),
    ({"task": "bake"}, r"task must be one of generate, edit, inpaint, upscale"),
])
def test_bad_requests_are_one_line_errors_naming_the_field(studio, form, message):
    with pytest.raises(DifflabError, match=message) as e:
        studio.prepare({"task": "generate", **form})
    assert "\n" not in str(e.value)


def test_a_request_becomes_the_command_that_reproduces_it(studio, runs):
    prepared = studio.prepare({"task": "generate", "class": "dogs", "guidance": "2.5", "sampler": "dpmpp-2m-sde", "steps": "7",
                               "seed": "123", "n": "3"})
    argv = shlex.split(prepared.job.command)
    assert argv == ["difflab", "sample", "--run", str(runs / "base"), "--class", "dogs", "--guidance", "2.5",
                    "--sampler", "dpmpp-2m-sde", "--steps", "7", "--seed", "123", "-n", "3", "--format", "png",
                    "--out", f"repro/{prepared.job.id}"]
    assert prepared.args.guidance == 2.5 and prepared.args.seed == 123 and prepared.args.classes == "dogs"
    unconditional = studio.prepare({"task": "generate", "class": "", "guidance": "3", "seed": "random"})
    assert "--guidance" not in unconditional.job.command and "--class" not in unconditional.job.command
    assert 0 <= unconditional.args.seed < 2**32  # "random" draws a seed, and the command names it


def test_the_progress_totals_count_every_callback(studio):
    """The page's progress bar: a sampler calls back once per grid step, inpainting once per network call."""
    from difflab.edit import inpaint_batches, make_mask
    from difflab.edit.inpaint import network_calls
    from difflab.samplers import SamplerConfig, SamplerKind, make_grid, sample

    run = studio.run
    den = run.denoiser(precision="fp32")
    for kind in SamplerKind:
        calls = []
        cfg = SamplerConfig.default_for(kind, steps=3)
        sample(den, 2, run.image_shape, cfg, progress=False, callback=calls.append)
        assert len(calls) == len(make_grid(run.schedule, cfg)) and [c.i for c in calls] == list(range(len(calls))), kind
    calls = []
    images = torch.zeros(1, *run.image_shape)
    list(inpaint_batches(den, images, make_mask("center", 16)[None], 2, SamplerConfig(sampler="ddpm", steps=6), jump=2,
                         resample=3, progress=False, callback=calls.append))
    assert len(calls) == network_calls(6, 2, 3) and [c.i for c in calls] == list(range(len(calls)))


def test_a_latent_run_generates_and_edits_the_decoded_pixels_of_its_commands(data_folder, tmp_path):
    """The page on a latent run (difflab.latent): it describes the 16 px images the run makes (not its
    4 x 4 latents), and for generation, SDEdit and inpainting its x0 previews and results are decoded
    images, the same bytes as the printed command writes."""
    from difflab.runs import load_run

    ae, ldm = tmp_path / "ae", tmp_path / "ldm"
    assert main(["train-autoencoder", "--data", str(data_folder), "--image-size", "16", "--out", str(ae), "--max-steps", "2",
                 "--batch-size", "4", "--holdout", "2", "--no-progress", "net.width=8", "net.max_width=16",
                 "train.sample_every=0", "train.precision=fp32"]) == 0
    assert main(["train", "--latent-of", str(ae), "--data", str(data_folder), "--out", str(ldm), *TINY]) == 0
    studio = Studio(load_run(ldm), str(ldm), tmp_path / "out", limits=Limits(upload_bytes=4096))
    assert (studio.info()["image_size"], studio.info()["channels"]) == (16, 3)
    image = studio.store_upload((data_folder / "dogs" / "0.png").read_bytes(), "face.png")["ref"]
    buf = io.BytesIO()
    Image.fromarray(np.where(np.arange(16)[None, :] < 6, 255, 0).astype(np.uint8).repeat(16, 0)).save(buf, format="PNG")
    mask = studio.store_upload(buf.getvalue(), "mask.png", "mask")["ref"]
    forms = {"generate": {"task": "generate"}, "edit": {"task": "edit", "image": image, "strength": "0.6"},
             "inpaint": {"task": "inpaint", "image": image, "mask": mask, "jump": "1", "resample": "2"}}
    for task, form in forms.items():
        job = studio.prepare({**form, "steps": "3", "seed": "5", "n": "2", "precision": "fp32"}).job
        job.work(job)
        preview = Image.open(io.BytesIO(job.preview))
        assert preview.mode == "RGB" and preview.size[1] >= 16, task  # decoded 16 px images, not 4-channel latents
        page_files = sorted((tmp_path / "out" / task / job.id).glob("*.png"))
        argv = shlex.split(job.command)[1:]
        out = tmp_path / "cli" / task
        argv[argv.index("--out") + 1] = str(out)
        if "--image" in argv:  # the upload and mask as files the command can read
            argv[argv.index("--image") + 1] = str(studio.out / image)
        if "--mask" in argv:
            argv[argv.index("--mask") + 1] = str(studio.out / mask)
        assert main([*argv, "--no-progress"]) == 0, task
        assert [f.name for f in page_files] == ["1.png", "2.png"], task
        cli_files = sorted(out.glob("*.png"))
        assert len(cli_files) == 2, task
        for f, c in zip(page_files, cli_files):
            assert Image.open(f).size == (16, 16) and f.read_bytes() == c.read_bytes(), task


def test_a_caption_run_needs_a_prompt():
    cond = CondConfig(attributes=("hair", "eyes"), classes=(("blue", "red"), ("green", "brown")), captions=True)
    run = types.SimpleNamespace(config=types.SimpleNamespace(cond=cond), schedule=types.SimpleNamespace(num_timesteps=1000))
    s = Studio.__new__(Studio)
    s.run, s.limits = run, Limits()
    s._prepare_lock = threading.Lock()
    for form, message in [({"prompt": "   "}, "Prompt \\(--prompt\\) is empty"),
                          ({"prompt": "x" * 501}, "at most 500"),
                          ({"prompt": "blue hair", "labels": {"hair": "blue"}}, "a prompt or tags, not both")]:
        with pytest.raises(ConfigError, match=message):
            s.prepare({"task": "generate", **form})


def _png(size=(16, 16), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def test_uploads_are_checked_and_kept_inside_out(studio):
    kept = studio.store_upload(_png((20, 12)), "photo.png")
    assert kept["ref"].startswith("uploads/") and (studio.out / kept["ref"]).is_file()
    assert kept["notes"] == ["photo.png is 20x12: the run sees it fitted to 16x16 (central square, Lanczos)"]
    assert studio.path_of(kept["ref"]) == studio.out / kept["ref"]
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="TIFF")
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(noise, format="PNG")
    png = noise.getvalue()
    for data, name, kind, message in [
        (b"", "empty.png", "image", "empty.png: empty file"),
        (b"GIF89a not really", "broken.gif", "image", "broken.gif: not an image"),
        (png[: len(png) // 2], "cut.png", "image", "cut.png: cannot decode"),
        (b"x" * 5000, "big.png", "image", "more than this server takes"),
        (buf.getvalue(), "scan.tiff", "image", "TIFF files are not taken"),
        (_png((5000, 4), "1"), "wide.png", "image", "wide.png: 5000x4 pixels is larger than this server takes \\(4096"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "mask.jpg", "mask", "not an image"),
    ]:
        with pytest.raises(DataError, match=message):
            studio.store_upload(data, name, kind)
    assert sorted(p.name for p in (studio.out / "uploads").iterdir()) == [Path(kept["ref"]).name]  # nothing else kept


def test_serve_refuses_bad_setups_in_one_line(runs, capsys):
    base, sr = str(runs / "base"), str(runs / "sr")
    for argv, message in [
        (["--run", str(runs / "missing"), "--port", "0"], "missing"),
        (["--run", sr, "--port", "0"], "is a super-resolution run: serve a base run"),
        (["--run", base, "--upscaler", base, "--port", "0"], "is not a super-resolution run"),
        (["--run", base, "--port", "70000"], "expected a port number 0-65535, got '70000'"),
        (["--run", base, "--max-upload-mb", "0"], "expected a size in MiB"),
        (["--run", base, "--host", "no.such.host.invalid", "--port", "0"], "cannot listen there"),
    ]:
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        assert main(["serve", "--run", str(runs / "base"), "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen there" in capsys.readouterr().err


def test_host_headers_name_loopback_or_not():
    from difflab.serve.app import addressed_to_loopback

    for host in ("127.0.0.1:7860", "localhost", "LOCALHOST:80", "[::1]:7860", "[::1]"):
        assert addressed_to_loopback(host), host
    for host in ("evil.example", "evil.example:7860", "127.0.0.1.evil.example", "", "[::2]:80", "localhost.:1"):
        assert not addressed_to_loopback(host), host


def test_the_server_guards_its_doors(server):
    """Other sites' pages (a foreign Host, a POST without the page's header) and malformed requests get a
    one-line JSON error; the page itself forbids loading anything from elsewhere."""
    import json
    import urllib.error
    import urllib.request

    def call(path, data=None, headers=None):
        req = urllib.request.Request(server.url.rstrip("/") + path, data=data, headers=headers or {},
                                     method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    status, headers, body = call("/")
    assert status == 200 and b"<canvas" in body and "default-src 'self'" in headers["content-security-policy"]
    assert b"http://" not in body and b"https://" not in body  # no address of anything elsewhere in the page
    status, _, body = call("/api/info", headers={"Host": "rebound.example:7860"})
    assert status == 400 and json.loads(body) == {"error": "this server answers requests to a loopback address only"}
    assert call("/api/jobs", data=b"{}", headers={"Content-Type": "application/json"})[0] == 403
    status, _, body = call("/api/jobs", data=b"not json", headers={"X-Difflab": "1"})
    assert status == 400 and json.loads(body) == {"error": "the request is not JSON"}
    status, _, body = call("/api/jobs", data=b"[1, 2]", headers={"X-Difflab": "1"})
    assert status == 400 and json.loads(body) == {"error": "the request must be a JSON object of fields"}
    assert call("/api/jobs/0123456789ab")[0] == 404
    status, _, body = call("/files/uploads/..%2F..%2Fserve.log")
    assert status == 400 and b"is not an image this server has" in body
    assert call("/api/upload", data=b"", headers={"X-Difflab": "1", "X-Filename": "none.png"})[0] == 400
    assert "Traceback" not in server.log()


def test_sigterm_stops_the_server_cleanly(runs, tmp_path):
    """A service manager's SIGTERM: the server finishes, says so, and exits 0 (no traceback, no silent kill)."""
    s = Server(["--run", str(runs / "base"), "--out", str(tmp_path / "out")], tmp_path, tmp_path / "serve.log")
    s.proc.terminate()
    out, _ = s.proc.communicate(timeout=30)
    assert s.proc.returncode == 0, s.log()
    assert "difflab serve: stopped" in out and "Traceback" not in s.log()


# -- the page in a real browser ----------------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return ""


def _skip(why: str):
    missing("a browser for the tests of difflab serve", why)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("Playwright is not installed (pip install -e '.[test]')")
    path = _chromium()
    if not path:
        _skip("no Chromium found (Debian: apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Server:
    """``difflab serve`` in a subprocess on a free port; ``log()`` is what it printed to stderr."""

    def __init__(self, argv: list[str], cwd: Path, log_file: Path) -> None:
        self.log_file = log_file
        self.proc = subprocess.Popen([sys.executable, "-m", "difflab", "serve", *argv, "--port", "0"], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=self.log_file.open("w"), text=True)
        end, line = time.monotonic() + 60, ""
        assert self.proc.stdout is not None
        while "http://" not in line:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, end - time.monotonic()))
            if not ready or self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"difflab serve did not start: {self.log()}")
            line = self.proc.stdout.readline()
        self.url = line.split("at ", 1)[1].split()[0]

    def log(self) -> str:
        return self.log_file.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("serve-cwd")
    s = Server(["--run", str(runs / "base"), "--upscaler", str(runs / "sr"), "--out", str(cwd / "out"),
                "--max-upload-mb", "0.25", "--queue", "3"], cwd, cwd / "serve.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    elsewhere: list[str] = []
    pg.on("request", lambda r: None if r.url.startswith((server.url, "data:", "blob:")) else elsewhere.append(r.url))
    pg.goto(server.url)
    pg.wait_for_selector("body[data-ready='1']")
    yield pg
    assert not elsewhere, f"the page asked for something outside the server: {elsewhere}"
    context.close()


def _fill(pg, form, **values):
    for name, value in values.items():
        selector = f"#form-{form} [name='{name}']"
        if pg.locator(selector).evaluate("e => e.tagName") == "SELECT":
            pg.select_option(selector, str(value))
        else:
            pg.fill(selector, str(value))


def _submit(pg, form):
    """Click the form's button; the new job's card (a locator), found by the jobs listed before."""
    before = set(pg.locator(".job").evaluate_all("cards => cards.map(c => c.id)"))
    pg.click(f"#form-{form} button.primary")
    pg.wait_for_function("n => document.querySelectorAll('.job').length > n", arg=len(before))
    new = [i for i in pg.locator(".job").evaluate_all("cards => cards.map(c => c.id)") if i not in before]
    assert len(new) == 1
    return pg.locator(f"#{new[0]}")


def _done(card, timeout=30_000):
    card.locator(".state").wait_for()
    card.page.wait_for_function("id => ['done', 'failed', 'cancelled'].includes(document.getElementById(id).dataset.state)",
                                arg=card.get_attribute("id"), timeout=timeout)
    assert card.get_attribute("data-state") == "done", card.locator(".error").text_content()


def _download(pg, card, k, folder: Path) -> Path:
    with pg.expect_download() as dl:
        card.locator(f"figure.result[data-index='{k}'] a.download").click()
    path = folder / dl.value.suggested_filename
    dl.value.save_as(path)
    return path


def _reproduce(command: str, cwd: Path, monkeypatch) -> None:
    argv = shlex.split(command)
    assert argv[0] == "difflab"
    monkeypatch.chdir(cwd)
    assert main(argv[1:] + ["--no-progress"]) == 0


def _flag(command: str, flag: str) -> str:
    argv = shlex.split(command)
    return argv[argv.index(flag) + 1]


def test_generate_gives_the_pixels_of_the_printed_command(page, tmp_path, monkeypatch):
    _fill(page, "generate", **{"class": "dogs", "guidance": "2", "sampler": "ddim", "steps": "6", "seed": "1234", "n": "3"})
    card = _submit(page, "generate")
    _done(card)
    assert card.locator("figure.result").count() == 3
    assert card.locator("figure.result[data-index='2'] .seed").text_content() == "seed 1234 · image 2"
    command = card.locator("pre.command").text_content()
    assert command.startswith("difflab sample --run ")
    assert "--class dogs --guidance 2 --sampler ddim --steps 6 --seed 1234 -n 3 --format png" in command
    downloaded = [_download(page, card, k, tmp_path) for k in (1, 3)]
    _reproduce(command, tmp_path, monkeypatch)
    out = tmp_path / _flag(command, "--out")
    assert downloaded[0].read_bytes() == (out / "1.png").read_bytes()  # same file, byte for byte
    assert downloaded[1].read_bytes() == (out / "3.png").read_bytes()
    assert card.locator("figure.result[data-index='3'] .file").text_content() == "= 3.png"


def test_sdedit_of_a_generated_image_reproduces_too(page, tmp_path, monkeypatch):
    page.locator(".job[data-state=done] figure.result .use").first.click()  # from the Generate tab: opens Edit
    assert page.locator("#form-edit").is_visible()
    _fill(page, "edit", strength="0.6", steps="5", seed="9", n="2")
    card = _submit(page, "edit")
    _done(card)
    command = card.locator("pre.command").text_content()
    assert command.startswith("difflab edit --run ") and "--strength 0.6" in command and "/generate/" in command
    got = _download(page, card, 2, tmp_path)
    _reproduce(command, tmp_path, monkeypatch)
    stem = Path(_flag(command, "--image")).stem
    assert got.read_bytes() == (tmp_path / _flag(command, "--out") / f"{stem}-2.png").read_bytes()


def test_a_brush_drawn_mask_keeps_every_pixel_outside_it(page, tmp_path, monkeypatch):
    from difflab.edit import load_mask

    page.click("#tabs button[data-tab=inpaint]")
    page.wait_for_function("() => editor.img !== null && editor.mask !== null")
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + 0.3 * box["width"], box["y"] + 0.25 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.7 * box["width"], box["y"] + 0.6 * box["height"], steps=10)
    page.mouse.up()
    _fill(page, "inpaint", steps="6", jump="2", resample="2", seed="5", n="1")
    card = _submit(page, "inpaint")
    _done(card)
    command = card.locator("pre.command").text_content()
    assert command.startswith("difflab inpaint ") and "--sampler ddpm --steps 6" in command
    mask = load_mask(_flag(command, "--mask"), 16, (16, 16))[0].numpy()
    assert 4 < mask.sum() < 200 and mask[4, 5] and not mask[0, 0] and not mask[15, 15]  # the stroke, and only it
    source = np.asarray(Image.open(_flag(command, "--image")).convert("RGB"))
    got = _download(page, card, 1, tmp_path)
    result = np.asarray(Image.open(got).convert("RGB"))
    assert np.array_equal(result[~mask], source[~mask])
    assert not np.array_equal(result[mask], source[mask])
    _reproduce(command, tmp_path, monkeypatch)
    stem = Path(_flag(command, "--image")).stem
    assert got.read_bytes() == (tmp_path / _flag(command, "--out") / f"{stem}-1.png").read_bytes()


def test_upscale_tab(page, tmp_path):
    page.click("#tabs button[data-tab=upscale]")
    _fill(page, "upscale", steps="4", seed="3", n="1")
    card = _submit(page, "upscale")
    _done(card)
    assert "note: resized 1 of 1 input image(s) to the run's 8x8" in card.locator(".notes").text_content()
    assert card.locator("pre.command").text_content().startswith("difflab upscale --run ")
    with Image.open(_download(page, card, 1, tmp_path)) as img:
        assert img.size == (16, 16)


def test_bad_input_is_a_message_on_the_page_and_a_log_line(page, server, tmp_path):
    page.click("#tabs button[data-tab=edit]")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really an image")
    page.set_input_files("#form-edit input[type=file]", str(broken))
    message = page.locator("#form-edit .message.error")
    message.wait_for()
    assert message.text_content() == "broken.png: not an image (PNG, JPEG, WebP, BMP or GIF)"
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png() + os.urandom(400_000))
    page.set_input_files("#form-edit input[type=file]", str(huge))
    page.wait_for_function("() => document.querySelector('#form-edit .message').textContent.includes('more than')")
    assert "huge.png: 0.4 MiB is more than this server takes (0.25 MiB)" in message.text_content()
    page.click("#tabs button[data-tab=generate]")
    _fill(page, "generate", steps="0")
    page.click("#form-generate button.primary")
    page.wait_for_function("() => document.querySelector('#form-generate .message').textContent.includes('Steps')")
    assert page.locator("#form-generate .message").text_content() == \
        "Steps (--steps) must be a whole number from 1 to 1000, got '0'"
    log = server.log()
    assert "refused POST /api/upload: broken.png: not an image" in log and "refused POST /api/upload: huge.png" in log
    assert "refused POST /api/jobs: Steps (--steps) must be" in log and "Traceback" not in log


def test_cancel_stops_a_long_sampling_and_a_full_queue_says_so(page):
    page.click("#tabs button[data-tab=generate]")
    _fill(page, "generate", **{"class": "cats", "sampler": "ddpm", "steps": "1000", "n": "16", "seed": "1"})
    long = _submit(page, "generate")
    long.locator(".live.on img.preview").wait_for()  # running, with a live x0 estimate
    assert long.get_attribute("data-state") == "running"
    waiting = [_submit(page, "generate") for _ in range(3)]  # the queue takes 3
    waiting[-1].locator(".state", has_text="waiting · position 3 in queue").wait_for()
    page.click("#form-generate button.primary")
    page.wait_for_function("() => document.querySelector('#form-generate .message').textContent.includes('queue is full')")
    assert page.locator("#form-generate .message").text_content().startswith("the queue is full (3 requests waiting")
    for card in [*waiting, long]:
        card.locator("button.cancel").click()
    for card in [*waiting, long]:
        page.wait_for_function("id => document.getElementById(id).dataset.state === 'cancelled'", arg=card.get_attribute("id"),
                               timeout=10_000)
    assert "cancelled at step" in long.locator(".state").text_content()
    assert waiting[0].locator(".state").text_content() == "cancelled"


def test_requests_fired_at_once_all_complete_in_order(page):
    answers = page.evaluate("""() => Promise.all([11, 12, 13, 14].slice(0, 3).map(seed => api('/api/jobs', {method: 'POST',
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify({task: 'generate', sampler: 'ddim', steps: '60',
        seed: String(seed), n: '4', class: 'cats'})})))""")
    assert len({a["seq"] for a in answers}) == 3 and max(a["position"] for a in answers) >= 1  # some had to wait
    ids = [a["id"] for a in sorted(answers, key=lambda a: a["seq"])]
    for job_id in ids:
        page.wait_for_function("id => document.getElementById('job-' + id)?.dataset.state === 'done'", arg=job_id, timeout=30_000)
    finished = [int(page.locator(f"#job-{i}").get_attribute("data-finished-seq")) for i in ids]
    assert finished == sorted(finished)  # in submission order
    seeds = [page.locator(f"#job-{i} figure.result").first.get_attribute("data-seed") for i in ids]
    assert sorted(seeds) == ["11", "12", "13"]


def test_screenshots_of_every_tab(browser, request, tmp_path):
    """Each tab after a request, the Generate tab with a sampling under way (progress bar and live x0
    estimate). Into ``$DIFFLAB_SCREENSHOTS`` when set (the README's: docs/img), on the runs named by
    ``$DIFFLAB_SERVE_RUN`` / ``$DIFFLAB_SERVE_UPSCALER`` when set; otherwise on the tiny run, kept in a
    temporary folder and checked to be whole pages."""
    shots = Path(os.environ.get("DIFFLAB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    own = None
    if os.environ.get("DIFFLAB_SERVE_RUN"):  # from this folder, writing into RUN/serve as a user's server would
        up = os.environ.get("DIFFLAB_SERVE_UPSCALER")
        own = Server(["--run", os.environ["DIFFLAB_SERVE_RUN"], *(["--upscaler", up] if up else [])], Path.cwd(),
                     tmp_path / "serve.log")
    url = (own or request.getfixturevalue("server")).url
    quick = {} if own else {"steps": "10"}  # the tiny run: few steps, the test is about the pages

    def shoot(name):
        pg.evaluate("() => window.scrollTo(0, 0)")
        pg.screenshot(path=str(shots / f"serve-{name}.png"))

    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    pg = context.new_page()
    pg.set_default_timeout(120_000)
    try:
        pg.goto(url)
        pg.wait_for_selector("body[data-ready='1']")
        kind = pg.evaluate("() => state.info.cond.kind")

        def condition(form, prompt, pick):  # a prompt, or the pick-th class or tags
            if kind == "text":
                pg.fill(f"#form-{form} [name=prompt]", prompt)
            elif kind == "classes":
                pg.select_option(f"#form-{form} [name=class]", index=pick)
            elif kind == "tags":
                for select in pg.locator(f"#form-{form} select[name^='label:']").all():
                    select.select_option(index=pick)
            if kind != "none":
                _fill(pg, form, guidance="3")

        condition("generate", "a girl with blue hair and red eyes", 1)
        _fill(pg, "generate", seed="7", n="8", **quick)
        _done(_submit(pg, "generate"))
        _fill(pg, "generate", seed="8", n="8", steps="60" if quick else str(max(200, int(pg.evaluate("() => state.info.steps")))))
        running = _submit(pg, "generate")
        pg.wait_for_function("id => { const c = document.getElementById(id); return c.querySelector('.live.on') && "
                             "parseFloat(c.querySelector('.fill').style.width) >= 40; }", arg=running.get_attribute("id"))
        shoot("generate")
        _done(running)
        pg.locator(f"#{running.get_attribute('id')} figure.result .use").nth(3).click()
        condition("edit", "a girl with blonde hair and green eyes", 2)
        _fill(pg, "edit", seed="3", strength="0.6", **quick)
        _done(_submit(pg, "edit"))
        shoot("edit")
        pg.click("#tabs button[data-tab=inpaint]")
        pg.wait_for_function("() => editor.img !== null && editor.mask !== null")
        box = pg.locator("#mask-canvas").bounding_box()
        pg.mouse.move(box["x"] + 0.25 * box["width"], box["y"] + 0.55 * box["height"])
        pg.mouse.down()
        for k, y in enumerate((0.55, 0.62, 0.69, 0.76, 0.83)):  # a zigzag that fills the lower face
            x = box["x"] + (0.75 if k % 2 == 0 else 0.25) * box["width"]
            pg.mouse.move(x, box["y"] + y * box["height"], steps=10)
            pg.mouse.move(x, box["y"] + (y + 0.07) * box["height"], steps=3)
        pg.mouse.up()
        _fill(pg, "inpaint", seed="4", n="4", **quick)
        _done(_submit(pg, "inpaint"))
        shoot("inpaint")
        pg.click("#tabs button[data-tab=upscale]")
        if pg.evaluate("() => state.info.upscaler !== null"):
            _fill(pg, "upscale", seed="5", n="2", **quick)
            _done(_submit(pg, "upscale"))
        shoot("upscale")
    finally:
        context.close()
        if own is not None:
            own.stop()
    for tab in ("generate", "edit", "inpaint", "upscale"):
        with Image.open(shots / f"serve-{tab}.png") as img:
            assert img.size == (1280, 900)
            assert len(img.convert("RGB").getcolors(1 << 20) or []) > 50  # a rendered page, not a blank one
