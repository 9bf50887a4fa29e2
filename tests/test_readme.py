"""The README's Python examples run as written, and its command lines name real commands and flags."""
import re
import shlex
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_training_example_runs():
    (code,) = [b for b in PYTHON_BLOCKS if "denoiser.loss" in b]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    images = scope["images"]
    assert images.shape == (8, 1, 16, 16)
    assert bool(images.isfinite().all())


def test_readme_sampling_example_runs(tmp_path, monkeypatch):
    from difflab.cli import main

    import torch
    from PIL import Image

    (code,) = [b for b in PYTHON_BLOCKS if "load_run(" in b]
    monkeypatch.chdir(tmp_path)
    faces = tmp_path / "faces"
    faces.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(8):
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(faces / f"{k}.png")
    assert main(["train", "--data", "faces", "--image-size", "16", "--preset", "tiny", "--out", "runs/faces",
                 "--batch-size", "4", "--max-steps", "1", "--no-progress", "train.sample_every=0", "sampler.steps=3"]) == 0
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["images"].shape == (16, 3, 16, 16) and (tmp_path / "grid.png").is_file()


def _readme_commands() -> list[list[str]]:
    """Every `difflab ...` line of the README's bash blocks, continuation lines joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("difflab "):
                commands.append(shlex.split(line)[1:])
    return commands


@pytest.mark.parametrize("argv", _readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_commands_parse(argv):
    """Each command line of the README is accepted by the CLI's parser (nothing is run)."""
    from difflab.cli import build_parser

    if argv == ["--version"]:
        return
    args = build_parser().parse_args(argv)
    assert args.command == argv[0]
