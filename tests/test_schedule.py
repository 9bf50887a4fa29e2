import math

import pytest
import torch

from difflab.errors import ConfigError
from difflab.config import from_dict, to_dict
from difflab.samplers import SamplerConfig
from difflab.schedule import BetaSchedule, NoiseSchedule, ScheduleConfig, VarianceType, posterior

ALL = list(BetaSchedule)


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("T", [50, 100, 1000, 4000])
def test_alpha_bar_is_cumprod_and_strictly_decreasing(kind, T):
    s = NoiseSchedule.from_name(kind, T)
    assert s.betas.dtype == torch.float64 and s.alphas_cumprod.dtype == torch.float64
    assert torch.equal(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    ab = s.alphas_cumprod
    assert bool((ab > 0).all()) and bool((ab <= 1).all())
    assert bool((ab[1:] < ab[:-1]).all())
    assert torch.allclose(s.sigmas, ((1 - ab) / ab).sqrt())


def test_linear_matches_ddpm_paper():
    s = NoiseSchedule.from_name("linear", 1000)
    assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(0.02)
    assert torch.allclose(s.betas[1:] - s.betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    # abar_T of the DDPM schedule: prod(1 - linspace(1e-4, 0.02, 1000)) = 4.0358e-05
    prod = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(1000))
    assert float(s.alphas_cumprod[-1]) == pytest.approx(prod, rel=1e-10)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(4.0358e-05, rel=1e-4)


def test_linear_scaled_for_other_T_keeps_the_curve():
    a = NoiseSchedule.from_name("linear", 1000).alphas_cumprod
    b = NoiseSchedule.from_name("linear", 4000).alphas_cumprod
    # log abar ~ -sum(beta): the same integral, up to O(beta^2) terms
    assert math.log(float(b[-1])) == pytest.approx(math.log(float(a[-1])), rel=0.01)
    assert math.log(float(b[1999])) == pytest.approx(math.log(float(a[499])), rel=0.01)
    with pytest.raises(ConfigError, match="too few"):
        ScheduleConfig(kind="linear", timesteps=10)
    assert len(NoiseSchedule.from_name("cosine", 10)) == 10


def test_cosine_matches_formula():
    T, s_off = 1000, 0.008
    s = NoiseSchedule.from_name("cosine", T)
    f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2
    for i in [0, 1, 10, 250, 500, 900]:
        assert float(s.alphas_cumprod[i]) == pytest.approx(f(i + 1) / f(0), rel=1e-9)
    assert float(s.betas.max()) <= 0.999


def test_quadratic_is_linear_in_sqrt_beta_and_sigmoid_forms():
    q = NoiseSchedule.from_name("quadratic", 1000).betas.sqrt()
    assert torch.allclose(q[1:] - q[:-1], (q[1] - q[0]).expand(999))
    sg = NoiseSchedule.from_name("sigmoid", 1000).betas
    assert float(sg[0]) == pytest.approx(1e-4 + (0.02 - 1e-4) * (1 / (1 + math.exp(6))))
    assert float(sg[499] + sg[500]) / 2 == pytest.approx((1e-4 + 0.02) / 2, rel=1e-3)
    sa = NoiseSchedule.from_name("sigmoid-alphabar", 1000, sigmoid_start=-3, sigmoid_end=3, sigmoid_tau=1)
    v0, v1 = 1 / (1 + math.exp(3)), 1 / (1 + math.exp(-3))
    gamma = lambda u: (v1 - 1 / (1 + math.exp(-(u * 6 - 3)))) / (v1 - v0)
    assert float(sa.alphas_cumprod[499]) == pytest.approx(gamma(0.5), rel=1e-9)


def test_q_sample_moments():
    s = NoiseSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7)
    for ti in [0, 100, 500, 999]:
        t = torch.full((len(x0),), ti)
        xt = s.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        ab = float(s.alphas_cumprod[ti])
        assert float(xt.mean()) == pytest.approx(math.sqrt(ab) * 0.7, abs=5e-3)
        assert float(xt.var()) == pytest.approx(1 - ab, rel=1e-2, abs=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(kind):
    s = NoiseSchedule.from_name(kind, 1000)
    x0, xt = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-1.2]], dtype=torch.float64)
    for ti in [1, 10, 500, 999]:
        ab_prev, alpha, beta = s.alphas_cumprod[ti - 1], s.alphas[ti], s.betas[ti]
        # q(x_{t-1} | x_0) = N(sqrt(ab_prev) x0, 1 - ab_prev); q(x_t | x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta)
        prec = 1 / (1 - ab_prev) + alpha / beta
        var = 1 / prec
        mean = var * (ab_prev.sqrt() * 0.3 / (1 - ab_prev) + alpha.sqrt() * -1.2 / beta)
        # the formula on floats (what the DDPM sampler uses) and the schedule's tables built from it
        post = posterior(float(s.alphas_cumprod[ti]), float(ab_prev))
        m = post.coef_x0 * 0.3 + post.coef_xt * -1.2
        assert m == pytest.approx(float(mean), rel=1e-9)
        assert post.variance == pytest.approx(float(var), rel=1e-9)
        table_mean = s.posterior_mean_coef1[ti] * x0 + s.posterior_mean_coef2[ti] * xt
        assert float(table_mean) == pytest.approx(float(mean), rel=1e-9)
        assert float(s.posterior_variance[ti]) == pytest.approx(float(var), rel=1e-9)


def test_variance_choices():
    s = NoiseSchedule.from_name("linear", 1000)
    post = posterior(s.alphas_cumprod, s.alphas_cumprod_prev)
    small = post.reverse_variance(VarianceType.FIXED_SMALL)
    large = post.reverse_variance(VarianceType.FIXED_LARGE)
    assert float(small[0]) == 0.0 and bool((small[1:] > 0).all())
    assert torch.allclose(large, s.betas, rtol=1e-9, atol=0)
    assert bool((large >= small).all())
    # the step to data (abar_s = 1) has mean x_0 and no variance
    last = posterior(float(s.alphas_cumprod[0]), 1.0)
    assert last.coef_x0 == pytest.approx(1.0) and last.coef_xt == 0.0 and last.variance == 0.0




def test_fractional_t_interpolates_log_sigma_and_inverts():
    s = NoiseSchedule.from_name("cosine", 1000)
    assert torch.allclose(s.sigma_at(torch.arange(1000.0)), s.sigmas, rtol=1e-13, atol=0)
    mid = s.sigma_at(10.5)
    assert float(mid) == pytest.approx(math.sqrt(float(s.sigmas[10] * s.sigmas[11])), rel=1e-12)
    t = torch.tensor([0.0, 0.25, 17.5, 998.9])
    assert torch.allclose(s.t_at_sigma(s.sigma_at(t)), t.double(), atol=1e-9)


def test_respace_keeps_alpha_bar_and_maps_back():
    s = NoiseSchedule.from_name("linear", 1000)
    kept = [0, 99, 199, 499, 999]
    r = s.respace(kept)
    assert len(r) == 5
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[kept], rtol=1e-12)
    assert r.timestep_map.tolist() == kept
    assert torch.allclose(r.alphas_cumprod, torch.cumprod(1 - r.betas, 0), rtol=1e-12)
    with pytest.raises(ConfigError):
        s.respace([0, 1000])


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ConfigError, match="'linear'.*'cosine'"):
        ScheduleConfig(kind="cosin")
    with pytest.raises(ConfigError, match="variance type"):
        SamplerConfig(sampler="ddpm", variance="huge")


def test_config_round_trip():
    import json
    c = ScheduleConfig(kind="sigmoid-alphabar", timesteps=500, sigmoid_tau=0.7)
    assert from_dict(ScheduleConfig, json.loads(json.dumps(to_dict(c)))) == c
