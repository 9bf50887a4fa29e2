"""The parametrisation object: conversions, respaced schedules, and every member's closed forms."""
import math

import pytest
import torch

from difflab.denoiser import Denoiser
from difflab.parametrization import LossConfig, Prediction, eps_from_v, eps_from_x0, v_from_x0_eps, x0_from_eps, x0_from_v
from difflab.schedule import NoiseSchedule, posterior

from nets import Fixed, TimeRecorder


def test_parametrisation_round_trips():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g, dtype=torch.float64)
    abar = torch.rand(64, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    v = v_from_x0_eps(x0, eps, abar)
    assert torch.allclose(x0_from_eps(xt, eps, abar), x0, atol=1e-12)
    assert torch.allclose(eps_from_x0(xt, x0, abar), eps, atol=1e-12)
    assert torch.allclose(x0_from_v(xt, v, abar), x0, atol=1e-12)
    assert torch.allclose(eps_from_v(xt, v, abar), eps, atol=1e-12)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_a_respaced_schedule_reaches_the_network_as_training_timesteps(prediction):
    base = NoiseSchedule.from_name("linear", 1000)
    kept = [0, 99, 249, 499, 749, 999]
    respaced = base.respace(kept)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    on_base, on_respaced = TimeRecorder(), TimeRecorder()
    want = Denoiser(on_base, base, prediction).predict(x, torch.tensor(kept, dtype=torch.float64))
    got = Denoiser(on_respaced, respaced, prediction).predict(x, torch.arange(6.0))
    assert on_respaced.times[0].tolist() == kept  # not 0..5
    assert torch.equal(got.x0, want.x0) and torch.equal(got.eps, want.eps)
    # between two respaced steps: the training time with the same noise level
    Denoiser(on_respaced, respaced, prediction).predict(x[:1], 2.5)
    t_mid = float(on_respaced.times[-1])
    assert 249 < t_mid < 499
    assert float(base.sigma_at(t_mid)) == pytest.approx(float(respaced.sigma_at(2.5)), rel=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "x_prev", "edm"])
@pytest.mark.parametrize("t", [0.0, 1.0, 17.0, 17.25, 500.0, 998.5, 999.0])
def test_the_target_converts_back_to_x0_and_eps(prediction, t):
    """A network that outputs exactly the training target makes the denoiser return x_0 and eps."""
    sched = NoiseSchedule.from_name("linear", 1000)
    den = Denoiser(TimeRecorder(), sched, prediction)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    lv = den.param.level(torch.full((4,), t))
    abar = float(sched.alpha_bar_at(t))
    x_t = abar**0.5 * x0 + (1 - abar) ** 0.5 * eps
    x0_back, eps_back = den.param.to_x0_eps(x_t, den.param.target(x0, eps, x_t, lv), lv)
    assert torch.allclose(x0_back, x0, atol=1e-9) and torch.allclose(eps_back, eps, atol=1e-9)


def test_x_prev_output_is_the_mean_of_a_full_grid_ddpm_step():
    """For x_prev the network's output is DDPM's step mean on the full grid: the sampler's posterior
    (schedule.posterior) applied to the denoiser's x0_hat must give the output back."""
    sched = NoiseSchedule.from_name("cosine", 1000)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    den = Denoiser(TimeRecorder(), sched, "x_prev")  # output 0.5 x
    for t in [1, 10, 400, 999]:
        x0_hat = den.denoise(x, float(t))
        post = posterior(float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[t - 1]))
        assert torch.allclose(post.coef_x0 * x0_hat + post.coef_xt * x.float(), 0.5 * x.float(), atol=2e-4), t


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("faces")
    g = torch.Generator().manual_seed(0)
    for k in range(16):
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(root / f"{k}.png")
    return root


@pytest.mark.parametrize("prediction", [p.value for p in Prediction])
def test_every_prediction_trains_and_samples_from_the_cli(tmp_path, capsys, faces, prediction):
    import json

    from difflab.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", str(faces), "--out", str(run), "--preset", "tiny", "--image-size", "16",
                 "--batch-size", "8", "--max-steps", "4", "--no-progress", "train.log_every=2", "train.sample_every=0",
                 f"loss.prediction={prediction}"]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(map(math.isfinite, losses))
    for sampler in ["ddpm", "dpmpp-2m"]:
        out = tmp_path / sampler
        assert main(["sample", "--run", str(run), "-n", "2", "--sampler", sampler, "--steps", "5", "--out", str(out),
                     "--format", "png", "--no-progress"]) == 0, capsys.readouterr().err
        assert sorted(p.name for p in out.glob("*.png")) == ["1.png", "2.png"]


def test_edm_scalings_weight_and_noise_levels():
    """Karras et al. 2022, table 1: the network's input has unit variance at every noise level for
    data of standard deviation sigma_data; the loss on F is lambda(sigma) ||D - x_0||^2 with
    lambda = (sigma^2 + sd^2) / (sigma sd)^2; training noise levels are log-normal(P_mean, P_std)."""
    sched = NoiseSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(5)
    x0 = 0.5 * torch.randn(4000, 16, generator=g, dtype=torch.float64)  # sigma_data = 0.5
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for t in [0.0, 100.0, 400.0, 999.0]:
        den = Denoiser(TimeRecorder(), sched, LossConfig(prediction="edm"))
        lv = den.param.level(torch.full((len(x0),), t))
        abar = float(sched.alpha_bar_at(t))
        x_in, c_noise = den.param.network_input(abar**0.5 * x0 + (1 - abar) ** 0.5 * eps, lv)
        assert float(x_in.var()) == pytest.approx(1.0, rel=0.03)
        sigma = ((1 - abar) / abar) ** 0.5
        assert float(c_noise[0]) == pytest.approx(250 * math.log(sigma), rel=1e-9)

    t = torch.tensor([3.0, 50.0, 300.0, 900.0])
    x0, eps, f = (torch.randn(4, 32, generator=g, dtype=torch.float64) for _ in range(3))
    loss = Denoiser(Fixed(f.float()), sched, LossConfig(prediction="edm")).loss(x0.float(), t, eps.float())
    abar = sched.alphas_cumprod[t.long()].reshape(-1, 1)
    sigma = ((1 - abar) / abar).sqrt()
    y = x0 + sigma * eps
    d = 0.25 / (sigma**2 + 0.25) * y + sigma * 0.5 / (sigma**2 + 0.25).sqrt() * f
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(loss.double(), (lam * (d - x0) ** 2).mean(1), rtol=1e-4)

    ts = Denoiser(TimeRecorder(), sched, LossConfig(prediction="edm", p_mean=-1.0, p_std=0.8)).sample_t(
        20_000, torch.Generator().manual_seed(6))
    log_sigma = sched.sigma_at(ts).log()
    assert float(log_sigma.mean()) == pytest.approx(-1.0, abs=0.02)
    assert float(log_sigma.std()) == pytest.approx(0.8, rel=0.02)
