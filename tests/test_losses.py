import pytest
import torch

from difflab.errors import ConfigError
from difflab.losses import LossConfig, diffusion_loss, min_snr_weight, per_example_loss
from difflab.schedule import NoiseSchedule, Prediction, eps_from_x0, v_from_x0_eps


def test_per_example_losses_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    d = (a - b).flatten(1)
    assert torch.allclose(per_example_loss(a, b, "l2"), (d**2).mean(1))
    assert torch.allclose(per_example_loss(a, b, "l1"), d.abs().mean(1))
    hub = torch.where(d.abs() < 0.5, 0.5 * d**2, 0.5 * (d.abs() - 0.25)).mean(1)
    assert torch.allclose(per_example_loss(a, b, "huber", 0.5), hub)
    with pytest.raises(ConfigError, match="'l1', 'l2', 'huber'"):
        per_example_loss(a, b, "l3")


def test_min_snr_weight_is_the_same_x0_weight_in_every_parametrisation():
    """min(SNR, gamma) * ||x0 - x0_hat||^2 must be what each target's weighted loss equals."""
    sched = NoiseSchedule.from_name("cosine", 1000)
    t = torch.tensor([1, 50, 300, 700, 990])
    abar = sched.alphas_cumprod[t].float().reshape(-1, 1)
    snr = sched.snr[t].float()
    g = torch.Generator().manual_seed(1)
    x0, eps, x0_hat = (torch.randn(5, 16, generator=g) for _ in range(3))
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    eps_hat = eps_from_x0(x_t, x0_hat, abar)
    want = snr.clamp(max=5.0) * ((x0 - x0_hat) ** 2).mean(1)
    pairs = {
        Prediction.X0: (x0_hat, x0),
        Prediction.EPS: (eps_hat, eps),
        Prediction.V: (v_from_x0_eps(x0_hat, eps_hat, abar), v_from_x0_eps(x0, eps, abar)),
    }
    for pred, (p, target) in pairs.items():
        got = min_snr_weight(snr, pred, 5.0) * per_example_loss(p, target, "l2")
        assert torch.allclose(got, want, rtol=1e-3), pred


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_diffusion_loss_is_zero_for_the_perfect_prediction(prediction):
    sched = NoiseSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    abar = sched.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    target = {"eps": noise, "x0": x0, "v": v_from_x0_eps(x0, noise, abar)}[prediction]
    cfg = LossConfig(prediction=prediction, weighting="min-snr")
    perfect = diffusion_loss(lambda x, tt: target, sched, x0, t, noise, cfg)
    assert perfect.shape == (4,) and float(perfect.abs().max()) < 1e-8
    wrong = diffusion_loss(lambda x, tt: torch.zeros_like(x), sched, x0, t, noise, cfg)
    assert bool((wrong > 0).all())


def test_loss_config_validates():
    with pytest.raises(ConfigError, match="'none', 'min-snr'"):
        LossConfig(weighting="snr")
    assert LossConfig(**LossConfig(loss="huber").to_dict()) == LossConfig(loss="huber")
