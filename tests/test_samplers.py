import math

import pytest
import torch

from difflab.denoiser import Denoiser, dynamic_threshold
from difflab.errors import ConfigError
from difflab.samplers import (
    SamplerConfig, discrete_grid, image_generators, make_grid, sample, sample_ddim, sample_ddpm,
    spaced_timesteps,
)
from difflab.samplers.noise import randn
from difflab.schedule import NoiseSchedule

from gaussian import GaussianModel, exact_ode_solution

MU, S = 0.4, 0.3


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_name("linear", 1000)


def gaussian_denoiser(schedule, prediction="eps"):
    return Denoiser(GaussianModel(schedule, MU, S, prediction), schedule, prediction)


def noise(n=20_000, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def assert_data_moments(x, mean_tol=4e-3, var_rel=0.03):
    assert float(x.mean()) == pytest.approx(MU, abs=mean_tol)
    assert float(x.var()) == pytest.approx(S**2, rel=var_rel)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "x_prev", "edm"])
def test_ddpm_full_grid_reaches_the_data_gaussian(schedule, prediction):
    x = sample_ddpm(gaussian_denoiser(schedule, prediction), noise(), discrete_grid(schedule),
                    generator=torch.Generator().manual_seed(1))
    assert_data_moments(x)


def test_respaced_ddpm_variances_bracket_the_data_and_converge(schedule):
    """Ho et al. 2020 (sec. 3.2): fixed-small and fixed-large are the two extreme reverse variances;
    on a coarse respaced grid they under- and over-disperse, and both converge as steps grow."""
    den = gaussian_denoiser(schedule)
    for steps, rel in [(100, None), (500, 0.06)]:
        out = {}
        for variance in ["fixed-small", "fixed-large"]:
            out[variance] = sample_ddpm(den, noise(8000), discrete_grid(schedule, steps), variance=variance,
                                        generator=torch.Generator().manual_seed(2))
            assert float(out[variance].mean()) == pytest.approx(MU, abs=5e-3)
        small, large = float(out["fixed-small"].var()), float(out["fixed-large"].var())
        assert small < S**2 < large
        if rel:
            assert small == pytest.approx(S**2, rel=rel) and large == pytest.approx(S**2, rel=rel)


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_ddim_converges_to_the_exact_ode_solution_at_first_order(schedule, spacing):
    den = gaussian_denoiser(schedule)
    x_T = noise(4000)
    exact = exact_ode_solution(schedule, x_T, MU, S, 999.0)
    steps, errors, var_errors = [10, 20, 50, 100], [], []
    for n in steps:
        x = sample_ddim(den, x_T, discrete_grid(schedule, n, spacing))
        assert float(x.mean()) == pytest.approx(MU, abs=1e-2)
        errors.append(float((x.double() - exact).pow(2).mean().sqrt()))
        var_errors.append(abs(float(x.var()) - S**2))
    assert errors == sorted(errors, reverse=True) and var_errors == sorted(var_errors, reverse=True)
    slope = torch.linalg.lstsq(
        torch.tensor([[math.log(n), 1.0] for n in steps], dtype=torch.float64),
        torch.tensor([[math.log(e)] for e in errors], dtype=torch.float64),
    ).solution[0, 0]
    assert -1.25 < float(slope) < -0.8, (float(slope), errors)  # first order
    assert var_errors[-1] < 0.1 * S**2


def test_ddim_eta_one_is_ddpm_fixed_small(schedule):
    den, grid = gaussian_denoiser(schedule), discrete_grid(schedule, 50)
    a = sample_ddim(den, noise(500), grid, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = sample_ddpm(den, noise(500), grid, variance="fixed-small", generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("prediction", ["x0", "v", "x_prev", "edm"])
def test_every_prediction_type_gives_the_same_sampler_result(schedule, prediction):
    grid = discrete_grid(schedule, 20)
    ref = sample_ddim(gaussian_denoiser(schedule, "eps"), noise(200), grid)
    other = sample_ddim(gaussian_denoiser(schedule, prediction), noise(200), grid)
    assert torch.allclose(ref, other, atol=1e-4)


def test_grid_is_float64_and_ends_at_data(schedule):
    for steps in [1, 2, 7, 10, 999, 1000]:
        for spacing in ["uniform", "quadratic"]:
            g = discrete_grid(schedule, steps, spacing)
            assert g.t.dtype == torch.float64 and len(g) == steps
            assert float(g.sigma[-1]) == 0.0
            assert float(g.t[0]) == 999 and (steps == 1 or float(g.t[-1]) == 0)
            assert len(set(g.t.tolist())) == steps
    quad = spaced_timesteps(1000, 10, "quadratic")
    assert (quad[1:] - quad[:-1]).tolist() == sorted((quad[1:] - quad[:-1]).tolist())
    with pytest.raises(ConfigError, match="steps"):
        make_grid(schedule, SamplerConfig(steps=1001))


def test_callback_sees_every_step(schedule):
    seen = []
    grid = discrete_grid(schedule, 5)
    out = sample_ddim(gaussian_denoiser(schedule), noise(8), grid, callback=seen.append)
    assert [s.i for s in seen] == list(range(5))
    assert [s.t for s in seen] == grid.t.tolist()
    assert torch.equal(seen[-1].x_next, out) and seen[0].x0.shape == out.shape


def test_same_seed_same_image_whatever_the_batch(schedule):
    den = gaussian_denoiser(schedule)
    cfg = SamplerConfig(sampler="ddpm", steps=20)
    a = sample(den, 7, (4,), cfg, seed=5, batch_size=7, progress=False)
    b = sample(den, 7, (4,), cfg, seed=5, batch_size=3, progress=False)
    c = sample(den, 3, (4,), cfg, seed=5, batch_size=2, start=4, progress=False)
    assert torch.equal(a, b)
    assert torch.equal(a[4:], c)
    assert not torch.equal(a, sample(den, 7, (4,), cfg, seed=6, progress=False))


def test_per_image_generators_are_independent_streams():
    gens = image_generators(0, range(3))
    x = randn((3, 1000), gens)
    assert float(torch.corrcoef(x).abs().triu(1).max()) < 0.1


def test_clipping_modes(schedule):
    class Wild(torch.nn.Module):
        def forward(self, x, t):
            return torch.full_like(x, -50.0)  # eps so large that x0_hat is far out of range
    x = torch.randn(4, 3, 8, 8)
    for clip in ["clip", "dynamic"]:
        out = Denoiser(Wild(), schedule, "eps", clip=clip).predict(x, 500)
        assert float(out.x0.abs().max()) <= 1 + 1e-6
        abar = float(schedule.alphas_cumprod[500])
        assert torch.allclose(x, math.sqrt(abar) * out.x0 + math.sqrt(1 - abar) * out.eps, atol=1e-4)
    y = torch.tensor([[0.5, -3.0, 2.0, 0.1]])
    assert torch.allclose(dynamic_threshold(y, 1.0), y / 3.0)


def test_options_are_checked_at_construction(schedule):
    with pytest.raises(ConfigError, match="'ddpm', 'ddim'"):
        SamplerConfig(sampler="dpm")
    with pytest.raises(ConfigError, match="prediction type"):
        Denoiser(lambda x, t: x, schedule, "score")
    with pytest.raises(ConfigError, match="eta"):
        SamplerConfig(sampler="ddpm", eta=0.5)
    with pytest.raises(ConfigError, match="eta"):
        SamplerConfig(eta=1.5)
