"""How far each sampler lands from the converged probability-flow ODE solution, against NFE.

On a trained run, every sampler starts from the same noise (image k from seed (seed, k)) and
solves the same ODE; the reference is that ODE solved very finely (DPM-Solver++(2M) with
``--ref-steps`` log-SNR steps, checked against DDIM on every training timestep: their distance is
printed as the reference's own error). The measure is the RMSE over all pixels (data range
[-1, 1]) between a sampler's images and the reference's, at NFE in ``--nfe``.

The network runs in fp32 and without x0 clipping, so the ODE is the smooth one whose error the
solvers' orders describe (bf16 rounding alone would put a floor of ~1e-2 under every number).

    python bench/sampler_error.py --run runs/anime25 -n 32 --nfe 5,10,20,50 --out bench/results/sampler-error

The last line prints ``rmse_ratio_ddim_over_dpmpp2m_nfe10=X`` (the issue's goal: >= 3).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from difflab.io import atomic_write_json
from difflab.runs import load_run
from difflab.samplers import SamplerConfig, build_grid, run_sampler
from difflab.samplers.grid import Grid, karras_sigmas, sigma_grid
from difflab.samplers.noise import image_generators, randn
from difflab.schedule import NoiseSchedule

# name -> (sampler config for `steps`, NFE -> steps, the grid builder or None for the sampler's default)
GridFn = Callable[[NoiseSchedule, int], Grid]


def karras_capped(sigma_max: float) -> GridFn:
    """Karras et al.'s rho=7 grid from min(sigma_max, the schedule's) instead of the schedule's
    sigma_max (157 for DDPM's linear schedule; EDM uses 80). The first point keeps t = T - 1's
    input x_T ~ N(0, I): at sigma >= 80 the VP state is noise to within data_std / sigma."""
    def build(schedule: NoiseSchedule, steps: int) -> Grid:
        hi = min(sigma_max, schedule.sigma_max)
        return sigma_grid(schedule, karras_sigmas(steps, schedule.sigma_min, hi))
    return build


def trailing(kind: str) -> GridFn:
    """The ``kind`` grid with N + 1 points minus its last (t = 0): no network call at sigma_min."""
    return lambda schedule, steps: build_grid(schedule, steps, kind, trailing=True)


# name -> (sampler, NFE -> steps, grid builder or None for the sampler's default grid, grid label or None)
VARIANTS: dict[str, tuple[str, Callable[[int], int], GridFn | None, str | None]] = {
    "ddim": ("ddim", lambda nfe: nfe, None, None),  # uniform integer timesteps
    "ddim-trailing": ("ddim", lambda nfe: nfe, trailing("uniform"), "uniform trailing"),
    "euler": ("euler", lambda nfe: nfe, None, None),  # karras
    "heun": ("heun", lambda nfe: (nfe + 1) // 2, None, None),  # karras; 2N - 1 evaluations
    "heun-sigmamax80": ("heun", lambda nfe: (nfe + 1) // 2, karras_capped(80.0), "karras sigma_max 80"),
    "dpmpp-2m": ("dpmpp-2m", lambda nfe: nfe, None, None),  # log-snr
    "dpmpp-2m-trailing": ("dpmpp-2m", lambda nfe: nfe, trailing("log-snr"), "log-snr trailing"),
    "dpmpp-2m-karras": ("dpmpp-2m", lambda nfe: nfe, lambda s, n: build_grid(s, n, "karras"), "karras"),
    "dpmpp-3m": ("dpmpp-3m", lambda nfe: nfe, None, None),
    "dpmpp-3m-trailing": ("dpmpp-3m", lambda nfe: nfe, trailing("log-snr"), "log-snr trailing"),
}


def solve(denoiser, noise: torch.Tensor, cfg: SamplerConfig, grid: Grid, gens, batch: int) -> torch.Tensor:
    out = []
    for lo in range(0, len(noise), batch):
        out.append(run_sampler(denoiser, noise[lo : lo + batch].clone(), grid, cfg,
                               generator=gens[lo : lo + batch]))
    return torch.cat(out).double()


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("-n", type=int, default=32, help="images (default 32)")
    p.add_argument("--nfe", default="5,10,20,50")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ref-steps", type=int, default=500, help="DPM-Solver++(2M) steps of the reference")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/sampler-error")
    p.add_argument("--replot", action="store_true", help="redraw the figure from OUT/sampler-error.json")
    args = p.parse_args()
    if args.replot:
        r = json.loads((Path(args.out) / "sampler-error.json").read_text())
        names = list(dict.fromkeys(x["variant"] for x in r["rows"]))
        _plot(r["rows"], names, r["reference_rmse_vs_ddim_all_steps"], Path(args.out) / "sampler-error.png",
              Path(r["run"]).name, r["n"])
        return
    torch.set_num_threads(args.threads)
    nfes = [int(v) for v in args.nfe.split(",")]
    names = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")

    run = load_run(args.run)
    den = run.denoiser(clip="none", precision="fp32")
    sch = run.schedule
    gens = image_generators(args.seed, range(args.n), "cpu")
    noise = randn((args.n, *run.image_shape), gens)
    t0 = time.monotonic()
    ref_cfg = SamplerConfig(sampler="dpmpp-2m", steps=args.ref_steps)
    ref = solve(den, noise, ref_cfg, build_grid(sch, args.ref_steps, ref_cfg.grid_kind), gens, args.batch)
    check_cfg = SamplerConfig(sampler="ddim", steps=None)
    check = solve(den, noise, check_cfg, build_grid(sch, None, "uniform"), gens, args.batch)
    floor = rmse(ref, check)
    print(f"reference: dpmpp-2m {args.ref_steps} log-snr steps vs ddim on all {sch.num_timesteps} timesteps: "
          f"RMSE {floor:.2e} ({time.monotonic() - t0:.0f} s)")

    rows = []
    for name in names:
        kind, steps_for, grid_fn, label = VARIANTS[name]
        for nfe in nfes:
            steps = steps_for(nfe)
            cfg = SamplerConfig(sampler=kind, steps=steps)
            grid = grid_fn(sch, steps) if grid_fn else build_grid(sch, steps, cfg.grid_kind)
            t1 = time.monotonic()
            x = solve(den, noise, cfg, grid, gens, args.batch)
            rows.append({"variant": name, "sampler": kind, "grid": label or cfg.grid_kind.value, "steps": steps,
                         "nfe": cfg.nfe(sch.num_timesteps), "rmse": rmse(x, ref), "seconds": time.monotonic() - t1})
            print(f"{name:18s} steps {steps:3d} nfe {rows[-1]['nfe']:3d}  rmse {rows[-1]['rmse']:.4f}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"run": str(run.path), "step": run.step, "n": args.n, "seed": args.seed, "reference": f"dpmpp-2m-{args.ref_steps}",
              "reference_rmse_vs_ddim_all_steps": floor, "threads": args.threads, "rows": rows}
    atomic_write_json(out / "sampler-error.json", result)
    table = ["| sampler | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---:|" * len(nfes)]
    for name in names:
        r = [x for x in rows if x["variant"] == name]
        cells = [f"{x['rmse']:.4f} ({x['nfe']})" if x["nfe"] != n else f"{x['rmse']:.4f}" for x, n in zip(r, nfes)]
        table.append(f"| `{name}` | {r[0]['grid']} | " + " | ".join(cells) + " |")
    (out / "sampler-error.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    _plot(rows, names, floor, out / "sampler-error.png", run.path.name, args.n)

    def at(name: str, nfe: int) -> float:
        return next(x["rmse"] for x in rows if x["variant"] == name and x["nfe"] == nfe)

    if {"ddim", "dpmpp-2m"} <= set(names) and 10 in nfes:
        print(f"rmse_ratio_ddim_over_dpmpp2m_nfe10={at('ddim', 10) / at('dpmpp-2m', 10):.2f}")


def _plot(rows, names, floor, path: Path, run_name: str, n: int) -> None:
    from difflab.visualize.figure import new_figure, save_figure

    fig = new_figure(6.4, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    for name in names:
        r = [x for x in rows if x["variant"] == name]
        ax.plot([x["nfe"] for x in r], [x["rmse"] for x in r], marker="o", label=name)
    ax.axhline(floor, color="grey", lw=0.8, ls=":", label="reference's own error")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ticks = sorted({x["nfe"] for x in rows if x["sampler"] != "heun"} or {x["nfe"] for x in rows})  # heun: 2N - 1
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel("RMSE to converged ODE solution (data range [-1, 1])")
    ax.set_title(f"Sampler error vs cost: {run_name}, {n} images, fp32, no clipping")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
