"""--device: resolution and one-line errors (no GPU needed: CUDA/MPS availability is faked where a
test needs it), and noise that does not depend on the device."""
import pytest
import torch

from difflab.cli import main
from difflab.devices import resolve_device
from difflab.errors import ConfigError
from difflab.samplers import image_generators
from difflab.samplers.noise import randn


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None) == resolve_device(" CPU ")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps") == resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"--device cuda:2: only 2 CUDA device\(s\) are visible"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec, message", [
    ("gpu", "--device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("cuda:x", "--device must be auto, cpu, cuda, cuda:N or mps"),
    ("cuda", "--device cuda: no CUDA GPU is visible to torch here"),
    ("cuda:0", "--device cuda:0: no CUDA GPU is visible to torch here"),
    ("mps", "--device mps: this torch has no usable MPS device"),
])
def test_unavailable_or_unknown_devices_are_one_line_errors(monkeypatch, spec, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        resolve_device(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_noise_is_drawn_on_the_cpu_whatever_the_target_device():
    """Per-image generators are CPU generators and randn moves what they drew: the same numbers a
    CPU draw gives, so a seed means the same noise on every device."""
    gens = image_generators(3, range(4))
    assert all(g.device.type == "cpu" for g in gens)
    expected = torch.stack([torch.randn(2, 5, generator=torch.Generator().manual_seed(g.initial_seed())) for g in gens])
    assert torch.equal(randn((4, 2, 5), image_generators(3, range(4)), device="cpu"), expected)
    meta = randn((4, 2, 5), image_generators(3, range(4)), device="meta")  # drawn on the CPU, then moved
    assert meta.device.type == "meta" and meta.shape == (4, 2, 5)


@pytest.mark.parametrize("argv", [
    ["sample", "--run", "RUN", "--device", "cuda"],
    ["train", "--data", "fashion-mnist", "--out", "OUT", "--device", "cuda:0", "--max-steps", "1"],
    ["eval", "--fake", "RUN", "--real", "RUN", "--device", "cuda", "--metrics", "fid"],
    ["fid-stats", "RUN", "--device", "tpu"],
    ["demo", "--out", "OUT", "--device", "cuda", "--minutes", "0"],
])
def test_commands_refuse_a_missing_device_in_one_line(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for k in range(2):
        Image.new("RGB", (16, 16), (k * 100, 0, 0)).save(tmp_path / "imgs" / f"{k}.png")
    args = [a.replace("RUN", str(tmp_path / "imgs")).replace("OUT", str(tmp_path / "out")) for a in argv]
    if argv[0] == "sample":  # a real run to load
        assert main(["train", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "run"), "--preset", "tiny",
                     "--image-size", "16", "--batch-size", "2", "--max-steps", "1", "--no-progress",
                     "train.sample_every=0", "--device", "cpu"]) == 0
        args[2] = str(tmp_path / "run")
        capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device" in err, err


def test_to_device_converts_on_the_host_and_leaves_cpu_tensors_alone():
    from difflab.devices import to_device

    x = torch.arange(4, dtype=torch.float64) / 3
    y = to_device(x, torch.device("cpu"), torch.float32)
    assert y.dtype == torch.float32 and torch.equal(y, x.float())
    assert to_device(x, torch.device("cpu")) is x  # nothing to copy
