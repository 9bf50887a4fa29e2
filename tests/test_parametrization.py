"""The parametrisation object: conversions, respaced schedules, and every member's closed forms."""
import pytest
import torch

from difflab.denoiser import Denoiser
from difflab.parametrization import eps_from_v, eps_from_x0, v_from_x0_eps, x0_from_eps, x0_from_v
from difflab.schedule import NoiseSchedule


class TimeRecorder(torch.nn.Module):
    """Returns a fixed function of x and records the time input it was given."""

    def __init__(self):
        super().__init__()
        self.times = []

    def forward(self, x, t):
        self.times.append(t.double().clone())
        return 0.5 * x


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
