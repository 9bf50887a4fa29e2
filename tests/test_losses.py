import pytest
import torch

from difflab.config import from_dict, to_dict
from difflab.denoiser import Denoiser
from difflab.errors import ConfigError
from difflab.losses import per_example_loss
from difflab.parametrization import LossConfig, Prediction
from difflab.schedule import NoiseSchedule

from gaussian import posterior_mean_coefs
from nets import Fixed


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


def _outputs(prediction: str, x0, eps, x_t, abar, sched, t):
    """What a network of each parametrisation outputs for the pair (x0, eps) at abar: written out
    from the definitions (Ho et al. 2020; Salimans & Ho 2022), not with difflab's conversions."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "edm":  # F = (x_0 - c_skip y) / c_out, Karras et al. 2022, table 1, sigma_data = 0.5
        sigma2 = (1 - abar) / abar
        c_skip, c_out = 0.25 / (sigma2 + 0.25), (sigma2 * 0.25 / (sigma2 + 0.25)).sqrt()
        return (x0 - c_skip * x_t / abar.sqrt()) / c_out
    if prediction == "x_prev":
        c1, c2 = (c.reshape(-1, *[1] * (x0.ndim - 1)).to(x0.dtype) for c in posterior_mean_coefs(sched, t))
        return c1 * x0 + c2 * x_t
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0  # v


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "x_prev", "edm"])
def test_min_snr_loss_is_the_same_x0_loss_in_every_parametrisation(prediction):
    """min(SNR, gamma) * ||x0 - x0_hat||^2 must be what Denoiser.loss gives for a network whose
    output means x0_hat, whatever the network predicts."""
    sched = NoiseSchedule.from_name("cosine", 1000)
    t = torch.tensor([1.0, 50, 300, 700, 990])
    abar = sched.alphas_cumprod[t.long()].reshape(-1, 1)
    snr = (abar / (1 - abar)).flatten()
    g = torch.Generator().manual_seed(1)
    x0, eps, x0_hat = (torch.randn(5, 16, generator=g, dtype=torch.float64) for _ in range(3))
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    eps_hat = (x_t - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
    want = snr.clamp(max=5.0) * ((x0 - x0_hat) ** 2).mean(1)
    out = _outputs(prediction, x0_hat, eps_hat, x_t, abar, sched, t).float()
    den = Denoiser(Fixed(out), sched, LossConfig(prediction=prediction, weighting="min-snr", min_snr_gamma=5.0))
    got = den.loss(x0.float(), t, eps.float())
    assert torch.allclose(got.double(), want, rtol=2e-3), prediction
    plain = Denoiser(Fixed(out), sched, LossConfig(prediction=prediction)).loss(x0.float(), t, eps.float())
    target = _outputs(prediction, x0, eps, x_t, abar, sched, t)
    assert torch.allclose(plain.double(), ((out.double() - target) ** 2).mean(1), rtol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "x_prev", "edm"])
def test_loss_is_zero_for_the_perfect_prediction(prediction):
    sched = NoiseSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    abar = sched.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    target = _outputs(prediction, x0, noise, x_t, abar, sched, t)
    cfg = LossConfig(prediction=prediction, weighting="min-snr")
    perfect = Denoiser(Fixed(target), sched, cfg).loss(x0, t, noise)
    assert perfect.shape == (4,) and float(perfect.abs().max()) < 1e-10
    wrong = Denoiser(Fixed(torch.zeros_like(x0)), sched, cfg).loss(x0, t, noise)
    assert bool((wrong > 0).all())


def test_loss_config_validates_and_round_trips():
    with pytest.raises(ConfigError, match="'none', 'min-snr'"):
        LossConfig(weighting="snr")
    with pytest.raises(ConfigError, match="prediction type"):
        LossConfig(prediction="score")
    cfg = LossConfig(loss="huber", prediction=Prediction.V)
    assert from_dict(LossConfig, to_dict(cfg)) == cfg
