"""Fast samplers (Euler, Heun, DPM-Solver++) and the grid module, against closed forms.

The data are Gaussian with one scale per dimension (0.05 ... 1, like the spread of variances in an
image), so the ideal denoiser and the probability-flow ODE are exact (tests/gaussian.py). One scale
would make every sampler's error a single number per step count that can cross zero by luck; 16
scales average that away.

Every grid ends with the same first-order step from the schedule's sigma_min (t = 0) to sigma = 0,
so as steps grow every sampler converges to the exact ODE solution down to sigma_min followed by
the x0 prediction there (:func:`converged`). The orders are measured against that limit; its own
distance to the exact sigma = 0 solution is a fixed, step-independent floor (checked below).
"""
import math

import pytest
import torch

from difflab.config import from_dict, to_dict
from difflab.denoiser import Denoiser
from difflab.errors import ConfigError
from difflab.samplers import (
    GridKind, SamplerConfig, SamplerKind, build_grid, discrete_grid, karras_sigmas, log_snr_sigmas, make_grid, nfe, run_sampler,
    sample, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m, sample_euler, sample_heun,
)
from difflab.samplers.dpmpp import sample_dpmpp_3m_sde
from difflab.samplers.dpmpp import phi
from difflab.schedule import NoiseSchedule

from gaussian import GaussianModel, exact_ode_solution

MU = 0.4
SCALES = torch.linspace(0.05, 1.0, 16, dtype=torch.float64)
STEPS = [10, 20, 40, 80, 160]
ALL_SAMPLERS = [kind.value for kind in SamplerKind]  # every registry row is checked below
# sampler -> (function, stated order)
ODE = {
    "ddim": (sample_ddim, 1), "euler": (sample_euler, 1), "heun": (sample_heun, 2),
    "dpmpp-2m": (sample_dpmpp_2m, 2), "dpmpp-3m": (sample_dpmpp_3m, 3),
}


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_name("linear", 1000)


def gaussian_denoiser(schedule, prediction="eps"):
    return Denoiser(GaussianModel(schedule, MU, SCALES, prediction), schedule, prediction)


def noise(n=2000, seed=0, dtype=torch.float64):
    return torch.randn(n, len(SCALES), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def converged(schedule, x_T):
    """The many-steps limit of every sampler: the exact PF-ODE from sigma_max to sigma_min (in
    y = x / sqrt(abar), y - mu scales by sqrt(s^2 + sigma^2)), then x0_hat at sigma_min."""
    s2, lo, hi = SCALES**2, schedule.sigma_min, schedule.sigma_max
    y_min = MU + (x_T.double() * math.sqrt(1 + hi**2) - MU) * ((s2 + lo**2) / (s2 + hi**2)).sqrt()
    return MU + (y_min - MU) * s2 / (s2 + lo**2)


def rmse(a, b):
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def slope(steps, errors):
    """Least-squares slope of log(error) against log(steps)."""
    a = torch.tensor([[math.log(n), 1.0] for n in steps], dtype=torch.float64)
    b = torch.tensor([[math.log(e)] for e in errors], dtype=torch.float64)
    return float(torch.linalg.lstsq(a, b).solution[0, 0])


@pytest.fixture(scope="module")
def errors(schedule):
    """RMSE against the converged solution, {grid: {sampler: [error at each of STEPS]}}."""
    den, x_T = gaussian_denoiser(schedule), noise()
    ref = converged(schedule, x_T)
    table = {}
    for kind in ["karras", "log-snr"]:
        grids = {n: build_grid(schedule, n, kind) for n in STEPS}
        table[kind] = {name: [rmse(fn(den, x_T, grids[n]), ref) for n in STEPS] for name, (fn, _) in ODE.items()}
    return table


def test_every_ode_sampler_converges_at_its_stated_order(errors):
    """Slope of log(error) on log(steps), fitted over 20..160 Karras steps, where every sampler is
    in its asymptotic regime (below 20 steps the multistep solvers are not yet)."""
    for name, (_, order) in ODE.items():
        errs = errors["karras"][name][1:]
        assert errs == sorted(errs, reverse=True), (name, errs)
        fitted = -slope(STEPS[1:], errs)
        assert order - 0.2 < fitted < order + 0.6, (name, fitted, errs)


def test_higher_order_pays_off_at_high_step_counts(errors):
    for kind in ["karras", "log-snr"]:
        e = {name: errs[-1] for name, errs in errors[kind].items()}
        assert e["dpmpp-3m"] < e["dpmpp-2m"] < e["euler"] / 10 and e["heun"] < e["euler"] / 5, (kind, e)


def test_dpmpp_2m_beats_ddim_at_10_steps_on_the_same_grid(errors):
    """Lu et al. 2022's point. Measured ratios (DDIM error / 2M error): about 2.3 on karras and
    6.6 on log-snr. The uniform-t integer grid is the exception (2M is worse than DDIM there at 10
    steps): its step into t = 0 is about 5x longer in log-SNR than the step before, and 2M's linear
    extrapolation of x0_hat over it overshoots; the order also drops below 2 on that grid, because
    that ratio grows with the number of steps."""
    ratio = {kind: errors[kind]["ddim"][0] / errors[kind]["dpmpp-2m"][0] for kind in errors}
    assert ratio["karras"] > 1.8 and ratio["log-snr"] > 4, ratio


def test_euler_is_ddim_on_the_same_grid(schedule):
    """In y = x / sqrt(abar) an Euler step in sigma is y' = D + (sigma'/sigma)(y - D): DDIM's update."""
    den, x = gaussian_denoiser(schedule), noise(300, dtype=torch.float32)
    for kind in ["uniform", "karras"]:
        grid = build_grid(schedule, 15, kind)
        assert torch.allclose(sample_euler(den, x, grid), sample_ddim(den, x, grid), atol=2e-5)


def test_the_final_step_floor_is_small_and_fixed(schedule):
    """The converged limit differs from the exact solution at sigma = 0 only by the last step's
    x0 prediction at sigma_min, an error of about (y - mu) sigma_min^2 / (2 s^2)."""
    x_T = noise()
    exact = exact_ode_solution(schedule, x_T, MU, SCALES, schedule.num_timesteps - 1)
    gap = (converged(schedule, x_T) - exact).abs()
    bound = (exact - MU).abs() * schedule.sigma_min**2 / (2 * SCALES**2) * 1.01 + 1e-12
    assert bool((gap <= bound).all()) and rmse(converged(schedule, x_T), exact) < 2e-3


@pytest.mark.parametrize("name, steps", [("ddim", 40), ("euler", 40), ("heun", 20), ("dpmpp-2m", 20), ("dpmpp-3m", 20)])
def test_ode_samples_have_the_data_moments(schedule, name, steps):
    x = sample(gaussian_denoiser(schedule), 4000, (len(SCALES),), SamplerConfig(sampler=name, steps=steps, grid="log-snr"),
               progress=False, batch_size=4000).double()
    assert float((x.mean(0) - MU).abs().max()) < 0.05
    assert float((x.std(0) / SCALES - 1).abs().max()) < 0.1, (x.std(0) / SCALES - 1)


def test_sde_samplers_reach_the_data_moments(schedule):
    den, x = gaussian_denoiser(schedule), noise(4000, dtype=torch.float32)
    for name, kw in [("dpmpp-2m-sde", {}), ("dpmpp-3m-sde", {}), ("heun", {"churn": 10.0})]:
        cfg = SamplerConfig(sampler=name, steps=30, **kw)
        out = run_sampler(den, x, make_grid(schedule, cfg), cfg, generator=torch.Generator().manual_seed(1)).double()
        assert float((out.mean(0) - MU).abs().max()) < 0.05, name
        assert float((out.std(0) / SCALES - 1).abs().max()) < 0.1, (name, out.std(0) / SCALES - 1)
        ode = run_sampler(den, x, make_grid(schedule, cfg), SamplerConfig(sampler=name, steps=30))
        assert not torch.allclose(out.float(), ode, atol=1e-3), name  # the noise really is injected


def test_sde_special_cases_are_closed_forms(schedule):
    den, x = gaussian_denoiser(schedule), noise(300, dtype=torch.float32)
    grid = build_grid(schedule, 12, "log-snr")
    # eta = 0 removes the noise and leaves the ODE solver
    assert torch.allclose(sample_dpmpp_2m_sde(den, x, grid, eta=0.0), sample_dpmpp_2m(den, x, grid), atol=1e-5)
    assert torch.allclose(sample_dpmpp_3m_sde(den, x, grid, eta=0.0), sample_dpmpp_3m(den, x, grid), atol=1e-5)
    # its first-order step is DDPM's posterior sample (same noise), and the last returns x0_hat
    two = build_grid(schedule, 2, "karras")
    a = sample_dpmpp_2m_sde(den, x, two, generator=torch.Generator().manual_seed(4))
    b = sample_ddpm(den, x, two, variance="fixed-small", generator=torch.Generator().manual_seed(4))
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("cfg", [SamplerConfig(sampler="dpmpp-2m-sde", steps=8), SamplerConfig(sampler="dpmpp-3m-sde", steps=8),
                                 SamplerConfig(sampler="heun", steps=6, churn=5.0)])
def test_stochastic_samplers_give_the_same_images_whatever_the_batch(schedule, cfg):
    den = gaussian_denoiser(schedule)
    shape = (len(SCALES),)
    a = sample(den, 7, shape, cfg, seed=5, batch_size=7, progress=False)
    b = sample(den, 7, shape, cfg, seed=5, batch_size=3, progress=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(den, 7, shape, cfg, seed=6, progress=False))


@pytest.mark.parametrize("name", ALL_SAMPLERS)
@pytest.mark.parametrize("prediction", ["x0", "v", "x_prev", "edm"])
def test_every_prediction_type_gives_the_same_result(schedule, name, prediction):
    cfg = SamplerConfig(sampler=name, steps=12)
    grid, x = make_grid(schedule, cfg), noise(200, dtype=torch.float32)
    ref = run_sampler(gaussian_denoiser(schedule, "eps"), x, grid, cfg, generator=torch.Generator().manual_seed(3))
    other = run_sampler(gaussian_denoiser(schedule, prediction), x, grid, cfg, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ref, other, atol=1e-4)


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.ts = inner, 0, []

    def forward(self, x, t):
        self.calls += 1
        self.ts.append(float(t[0]))
        return self.inner(x, t)


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_nfe_and_callback(schedule, name):
    model = Counting(GaussianModel(schedule, MU, SCALES))
    cfg, x, seen = SamplerConfig(sampler=name, steps=7), noise(5, dtype=torch.float32), []
    grid = make_grid(schedule, cfg)
    out = run_sampler(Denoiser(model, schedule), x, grid, cfg, callback=seen.append)
    assert model.calls == cfg.nfe(1000) == nfe(name, 7) == (13 if name == "heun" else 7)
    assert [s.i for s in seen] == list(range(7)) and [s.t for s in seen] == grid.t.tolist()
    assert torch.allclose(seen[0].x, x, atol=1e-6) and torch.equal(seen[-1].x_next, out)
    for a, b in zip(seen, seen[1:]):
        assert torch.allclose(a.x_next, b.x, atol=1e-6)
    assert all(0 <= t <= 999 for t in model.ts)


@pytest.mark.parametrize("sched", ["linear", "cosine"])
def test_grids_are_float64_decreasing_and_end_at_data(sched):
    schedule = NoiseSchedule.from_name(sched, 1000)
    lo, hi = schedule.sigma_min, schedule.sigma_max
    for kind in GridKind:
        for steps in [1, 2, 3, 10, 57, 1000]:
            g = build_grid(schedule, steps, kind)
            assert g.t.dtype == g.sigma.dtype == torch.float64 and len(g) == steps
            assert float(g.sigma[-1]) == 0.0 and bool((g.sigma[1:] < g.sigma[:-1]).all())
            assert bool((g.t[1:] <= g.t[:-1]).all()) and float(g.t.min()) >= 0 and float(g.t.max()) <= 999
            assert float(g.t[0]) == 999 and float(g.sigma[0]) == pytest.approx(hi, rel=1e-12)
            if steps > 1:
                assert float(g.t[-1]) == 0 and float(g.sigma[-2]) == pytest.approx(lo, rel=1e-12)
            # the network's time and the grid's noise level agree (log-sigma interpolation)
            assert torch.allclose(schedule.sigma_at(g.t), g.sigma[:-1], rtol=1e-9)
    k = build_grid(schedule, 12, "karras").sigma[:-1]
    assert torch.allclose(k, karras_sigmas(12, lo, hi, 7.0))
    assert torch.allclose(k ** (1 / 7), torch.linspace(hi ** (1 / 7), lo ** (1 / 7), 12, dtype=torch.float64))
    s = build_grid(schedule, 12, "log-snr").sigma[:-1]
    assert torch.allclose(s, log_snr_sigmas(12, lo, hi))
    log_snr = -2 * s.log()
    assert torch.allclose(log_snr, torch.linspace(-2 * math.log(hi), -2 * math.log(lo), 12, dtype=torch.float64))
    assert torch.equal(build_grid(schedule, 20, "quadratic").t, discrete_grid(schedule, 20, "quadratic").t)
    assert torch.equal(build_grid(schedule, 20, "uniform").sigma, discrete_grid(schedule, 20).sigma)


@pytest.mark.parametrize("kind", list(GridKind))
def test_trailing_grids_leave_out_t0_and_keep_the_rest(schedule, kind):
    for steps in [1, 5, 10, 998]:
        full, g = build_grid(schedule, steps + 1, kind), build_grid(schedule, steps, kind, trailing=True)
        assert len(g) == steps and float(g.t[0]) == 999 and float(g.t.min()) > 0
        assert torch.equal(g.t, full.t[:-1]) and torch.equal(g.sigma[:-1], full.sigma[:-2]) and float(g.sigma[-1]) == 0.0
    if not kind.in_sigma:
        with pytest.raises(ConfigError, match="trailing"):
            build_grid(schedule, 1000, kind, trailing=True)


def test_trailing_grid_converges_to_the_same_limit_at_second_order(schedule):
    """On a trailing grid the last network call is at the second-lowest point, which tends to
    sigma_min as steps grow, so 2M still converges to the x0 prediction at sigma_min after the
    exact ODE, at second order."""
    den, x_T = gaussian_denoiser(schedule), noise()
    ref = converged(schedule, x_T)
    errs = [rmse(sample_dpmpp_2m(den, x_T, build_grid(schedule, n, "log-snr", trailing=True)), ref) for n in STEPS[1:]]
    assert errs == sorted(errs, reverse=True) and 1.8 < -slope(STEPS[1:], errs) < 2.6, errs


def test_sigma_grids_are_fractional_and_may_exceed_T(schedule):
    g = make_grid(schedule, SamplerConfig(sampler="dpmpp-2m", steps=1500, grid="karras"))
    assert len(g) == 1500 and bool((g.t != g.t.round()).any())
    with pytest.raises(ConfigError, match="exceeds"):
        make_grid(schedule, SamplerConfig(sampler="dpmpp-2m", steps=1500, grid="uniform"))


def test_phi_series_matches_the_closed_forms():
    for h in [1e-4, 0.1, 0.49, 0.5, 2.0]:
        closed = [-math.expm1(-h), h + math.expm1(-h), h * h / 2 - h - math.expm1(-h)]
        for k in range(3):
            assert phi(k, h) == pytest.approx(closed[k], rel=1e-6 if h > 0.01 else 1e-3)
        assert phi(2, h) == pytest.approx(math.fsum(h ** (3 + j) * (-1) ** j / math.factorial(3 + j) for j in range(30)), rel=1e-9)


def test_config_choices_defaults_and_round_trip():
    with pytest.raises(ConfigError, match="'euler', 'heun', 'dpmpp-2m', 'dpmpp-2m-sde', 'dpmpp-3m'"):
        SamplerConfig(sampler="plms")
    with pytest.raises(ConfigError, match="grid kind 'cosine'.*'uniform', 'quadratic', 'log-snr', 'karras'"):
        SamplerConfig(grid="cosine")
    with pytest.raises(ConfigError, match="churn"):
        SamplerConfig(sampler="dpmpp-2m", churn=1.0)
    with pytest.raises(ConfigError, match="contradicts"):
        SamplerConfig(spacing="quadratic", grid="karras")
    assert SamplerConfig().grid_kind is GridKind.UNIFORM and SamplerConfig(spacing="quadratic").grid_kind is GridKind.QUADRATIC
    assert SamplerConfig(sampler="heun").grid_kind is GridKind.KARRAS
    assert SamplerConfig(sampler="dpmpp-2m").grid_kind is GridKind.LOG_SNR
    for cfg in [SamplerConfig(), SamplerConfig(sampler="heun", steps=18, grid="karras", churn=2.5),
                SamplerConfig(sampler="dpmpp-2m", steps=10, trailing=True)]:
        assert from_dict(SamplerConfig, to_dict(cfg)) == cfg


def test_cli_sample_with_the_new_samplers(tmp_path, capsys):
    import json

    from PIL import Image

    from difflab.cli import main

    folder = tmp_path / "faces"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(8):
        Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(folder / f"{k}.png")
    run = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--out", str(run), "--max-steps", "1", "--preset", "tiny",
                 "--image-size", "16", "--batch-size", "4", "--no-progress", "train.precision=fp32"]) == 0
    for sampler, extra, nfe_expected, grid in [("heun", ["--churn", "1"], 5, "karras"),
                                               ("dpmpp-2m-sde", ["--grid-kind", "quadratic"], 3, "quadratic"),
                                               ("dpmpp-2m", ["--trailing"], 3, "log-snr")]:
        out = tmp_path / sampler
        argv = ["sample", "--run", run, "-n", 2, "--sampler", sampler, "--steps", 3, "--out", out, "--no-progress", *extra]
        assert main([str(a) for a in argv]) == 0
        meta = json.loads((tmp_path / f"{sampler}.sampling.json").read_text())
        assert meta["nfe_per_image"] == nfe_expected and meta["grid_kind"] == grid and (out / "2.jpg").is_file()
        assert meta["sampler"]["trailing"] == ("--trailing" in extra)
    capsys.readouterr()
    for bad, message in [(["--grid-kind", "cosine"], "invalid choice"), (["--sampler", "dpmpp-2m", "--churn", "1"], "churn"),
                         (["--sampler", "ddpm", "--trailing"], "trailing")]:
        assert main(["sample", "--run", str(run), *bad]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("difflab: error:") and message in err[0], err
