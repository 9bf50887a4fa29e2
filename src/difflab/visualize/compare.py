"""Samplers side by side on one model and the same seeds: speed, and quality through ``difflab eval``.

The question (the homework's Q2): DDPM needs all T = 1000 steps, DDIM gets comparable images in
10-100. Each sampler generates the same ``n`` images (image k from seed (seed, k), the same
initial noise x_T for every sampler); we time the sampling alone (not the writing of files),
count the network evaluations, and score each folder with FID, KID and the detection rate via
:func:`difflab.metrics.evaluate.evaluate`.

Sampler specs are ``KIND[-STEPS][-etaETA]``: ``ddpm`` (every training step), ``ddpm-1000``,
``ddim-50``, ``ddim-50-eta1``. KIND is any :class:`difflab.samplers.SamplerKind` value.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difflab.config import to_dict
from difflab.errors import ConfigError
from difflab.samplers import SamplerConfig, SamplerKind, make_grid, sample_batches
from difflab.samplers.noise import randn

DEFAULT_SAMPLERS = "ddpm,ddim-10,ddim-20,ddim-50,ddim-100,ddim-50-eta1"
_ETA = re.compile(r"^eta(\d+(?:\.\d*)?|\.\d+)$")


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # canonical: kind-steps[-etaX]
    config: SamplerConfig
    steps: int  # resolved number of grid steps


def parse_sampler_spec(text: str, num_timesteps: int) -> SamplerSpec:
    """``ddim-50-eta1`` -> SamplerSpec('ddim-50-eta1', SamplerConfig('ddim', 50, eta=1.0), 50).

    Trailing ``-N`` is the step count, ``-etaX`` the DDIM eta and ``-trailing`` the trailing grid
    (no network call at t = 0); what is left is the sampler kind (which may itself contain dashes).
    Without a step count a sampler takes its registry default (ddpm: every training timestep, others
    50), as ``difflab sample`` does.
    """
    spec = text.strip()
    parts = spec.split("-")
    steps: int | None = None
    eta = 0.0
    trailing = False
    while len(parts) > 1:
        tail = parts[-1]
        if tail == "trailing" and not trailing and steps is None and eta == 0.0:
            trailing = True
        elif tail.isdigit() and steps is None:
            steps = int(tail)
        elif _ETA.match(tail) and eta == 0.0 and steps is None:
            eta = float(_ETA.match(tail).group(1))  # type: ignore[union-attr]
        else:
            break
        parts.pop()
    kind_text = "-".join(parts)
    if not kind_text:
        raise ConfigError(f"--samplers: empty sampler name in {text!r}")
    try:
        cfg = SamplerConfig.default_for(kind_text, steps=steps, eta=eta, trailing=trailing)
        kind, steps = cfg.sampler, cfg.num_steps(num_timesteps)
    except ConfigError as e:
        raise ConfigError(f"--samplers {spec!r}: {e} (a spec is KIND[-STEPS][-etaETA][-trailing], e.g. ddim-50-eta1)") from None
    if steps + trailing > num_timesteps and not cfg.grid_kind.in_sigma:  # integer grids stop at T; sigma grids do not
        raise ConfigError(f"--samplers {spec!r}: {steps} steps exceed the model's {num_timesteps} training timesteps")
    name = f"{kind.value}-{steps}" + (f"-eta{eta:g}" if eta else "") + ("-trailing" if trailing else "")
    return SamplerSpec(name=name, config=cfg, steps=steps)


def parse_sampler_specs(text: str, num_timesteps: int) -> list[SamplerSpec]:
    items = [s for s in (p.strip() for p in text.split(","))]
    if not items or any(not s for s in items):
        raise ConfigError(f"--samplers must be a comma-separated list like {DEFAULT_SAMPLERS}, got {text!r}")
    specs = [parse_sampler_spec(s, num_timesteps) for s in items]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--samplers lists {', '.join(dup)} twice")
    return specs


class _CallCounter:
    """Counts the examples a module's forward calls see (network evaluations per image, once divided
    by the number of images), whatever the sampler does: guidance's doubled batch counts twice."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.examples = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: Any, args: tuple[Any, ...], _out: Any) -> None:
        self.examples += args[0].shape[0]

    def close(self) -> None:
        self._handle.remove()


def generate(denoiser, spec: SamplerSpec, n: int, shape: Sequence[int], out_dir: Path, *, seed: int,
             batch_size: int, fmt: str = "png", progress: bool = True, cond: dict[str, Any] | None = None,
             decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Sample ``n`` images with ``spec`` into ``out_dir`` (1.png ...); time the sampling alone (with
    ``decode``, a latent run's decoder, applied to each batch and timed with it). ``cond``: per-image
    conditions (:func:`difflab.samplers.sample_batches`)."""
    from difflab.visualize.images import save_numbered

    grid = make_grid(denoiser.schedule, spec.config)  # fail before any work
    if out_dir.is_dir():  # a previous comparison's images (maybe more of them) must not be scored with ours
        for old in out_dir.iterdir():
            if re.fullmatch(rf"\d+\.{fmt}", old.name):
                old.unlink()
    counter = _CallCounter(denoiser.model)
    seconds, first = 0.0, None
    # a bar over sampler steps of every batch: a DDPM batch takes minutes, a per-image bar would sit at 0
    bar = tqdm(total=len(grid) * -(-n // batch_size), desc=f"{spec.name} ({n} images)", unit="step",
               disable=not progress, leave=False)
    try:
        it = sample_batches(denoiser, n, shape, spec.config, seed=seed, batch_size=batch_size, progress=False,
                            device=denoiser.device,
                            callback=lambda _: bar.update(1), **(cond or {}))
        while True:
            t0 = time.perf_counter()
            try:
                idx, imgs = next(it)
                if decode is not None:
                    with torch.no_grad():
                        imgs = decode(imgs)
            except StopIteration:
                break
            seconds += time.perf_counter() - t0
            save_numbered(imgs, out_dir, idx.start, fmt)
            if first is None:
                first = imgs[:8].clone()
    finally:
        counter.close()
        bar.close()
    return {"sampler": spec.name, "kind": spec.config.sampler.value, "steps": spec.steps, "eta": spec.config.eta,
            "config": to_dict(spec.config), "n": n, "seconds": seconds, "images_per_s": n / max(seconds, 1e-12),
            "nfe": counter.examples / n, "folder": str(out_dir),
            "fid": None, "kid_mean": None, "kid_std": None, "detect_rate": None, "_first": first}


def warm_up(denoiser, shape: Sequence[int], batch: int) -> None:
    """One network call at the batch size used, so the first sampler timed does not pay for the
    one-off setup (oneDNN primitive creation, allocator growth) that the others then reuse."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        denoiser(randn((batch, *shape), g, device=denoiser.device), float(denoiser.schedule.num_timesteps - 1))


def run_comparison(run, specs: Sequence[SamplerSpec], *, n: int, out: Path, seed: int = 0, batch_size: int = 64,
                   eval_kwargs: dict[str, Any] | None = None, clip: str = "clip", precision: str = "auto",
                   progress: bool = True, guidance: Sequence[float] = (1.0,), reqs: Sequence[Any] = (),
                   guidance_interval: tuple[float, float] | None = None) -> dict[str, Any]:
    """Generate with every sampler (and every guidance weight), then evaluate each folder; return the
    result dict written as JSON. A latent run's samples are decoded, the decoding timed with the sampling.

    ``eval_kwargs`` are :class:`~difflab.metrics.evaluate.EvalConfig` fields (``real``,
    ``metrics``, ...) or None to measure speed only. ``reqs`` (:func:`difflab.captions.requests`):
    ``n`` images of each condition per row, recorded beside each folder for the accuracy metric.
    """
    from difflab.captions import condition_rows
    from difflab.records import conditions, write_record

    base = run.denoiser(clip, precision)
    cond = condition_rows(run.config.cond, reqs, n)
    total = n * max(len(reqs), 1)
    warm_up(base, run.image_shape, min(total, batch_size))
    decode = None
    if run.codec is not None:  # a latent run: images are the decoded latents; the decoder's setup paid here too
        def decode(x: torch.Tensor) -> torch.Tensor:
            return run.to_pixels(x, precision)

        with torch.no_grad():
            decode(torch.zeros((min(total, batch_size), *run.image_shape), device=base.device))
    sweep = tuple(guidance) != (1.0,)
    rows = []
    jobs = [(spec, w) for spec in specs for w in guidance]
    outer = tqdm(jobs, desc="samplers", unit="sampler", disable=not progress or len(jobs) < 2)
    for spec, w in outer:
        name = f"{spec.name}-w{w:g}" if sweep else spec.name
        outer.set_postfix_str(name)
        den = base if w == 1.0 else base.guided(w, guidance_interval)
        row = generate(den, spec, total, run.image_shape, out / name, seed=seed, batch_size=batch_size, progress=progress,
                       cond=cond, decode=decode)
        row.update(sampler=name, guidance=w, guidance_interval=guidance_interval)
        write_record(out / name, {"run": str(run.path), "step": run.step, "n": total, "seed": seed, "guidance": w,
                                  "sampler": to_dict(spec.config), "conditions": conditions(reqs, n, run.config.cond.schema)})
        rows.append(row)
    outer.close()
    if eval_kwargs:
        from difflab.metrics.evaluate import EvalConfig, evaluate

        for row in rows:
            res = evaluate(EvalConfig(fake=row["folder"], progress=progress, **eval_kwargs))
            row.update({k: res.get(k) for k in ("fid", "kid_mean", "kid_std", "detect_rate", "accuracy")})
            row["eval"] = {k: v for k, v in res.items() if k not in ("config",)}
    base = next((r for r in rows if r["kind"] == SamplerKind.DDPM.value and r["steps"] == run.schedule.num_timesteps), None)
    for row in rows:
        row["speedup_vs_ddpm"] = base["seconds"] / row["seconds"] if base and row["seconds"] > 0 else None
    firsts = [r.pop("_first") for r in rows]
    return {"run": str(run.path), "step": run.step, "n": total, "seed": seed, "batch_size": batch_size, "clip": clip,
            "precision": precision, "guidance": list(guidance), "conditions": [r.description for r in reqs],
            "num_timesteps": run.schedule.num_timesteps, "image_shape": list(run.pixel_shape),
            "threads": torch.get_num_threads(), "metrics": (eval_kwargs or {}).get("metrics", []),
            "real": (eval_kwargs or {}).get("real"), "rows": rows, "_firsts": firsts}


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(result: dict[str, Any]) -> str:
    """The comparison as a markdown table, one row per sampler, in the order they ran."""
    have = {k: any(r.get(k) is not None for r in result["rows"]) for k in ("fid", "kid_mean", "detect_rate", "accuracy")}
    sweep = any(r.get("guidance", 1.0) != 1.0 for r in result["rows"])
    head = ["sampler", "steps", "eta"] + ["guidance"] * sweep
    head += ["network evals / image", "wall time (s)", "images/s", "speed-up vs DDPM"]
    head += ["FID"] * have["fid"] + ["KID (x1000)"] * have["kid_mean"] + ["detection rate"] * have["detect_rate"]
    head += ["accuracy"] * have["accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in result["rows"]:
        eta = f"{r['eta']:g}" if r["kind"] == SamplerKind.DDIM.value else "-"
        cells = [f"`{r['sampler']}`", str(r["steps"]), eta] + [f"{r.get('guidance', 1.0):g}"] * sweep
        cells += [f"{r['nfe']:g}", f"{r['seconds']:.2f}", f"{r['images_per_s']:.2f}",
                  _f(r["speedup_vs_ddpm"], ".1f") + ("x" if r["speedup_vs_ddpm"] else "")]
        if have["fid"]:
            cells.append(_f(r.get("fid"), ".2f"))
        if have["kid_mean"]:
            cells.append("-" if r.get("kid_mean") is None else f"{1000 * r['kid_mean']:.2f} ± {1000 * r['kid_std']:.2f}")
        if have["detect_rate"]:
            cells.append(_f(r.get("detect_rate"), ".3f"))
        if have["accuracy"]:
            acc = r.get("accuracy") or {}
            cells.append(", ".join(f"{k} {v:.3f}" for k, v in acc.items() if v is not None) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    threads = f"{result['threads']} torch thread" + ("s" if result["threads"] != 1 else "")
    note = (f"\n{result['n']} images per sampler, seeds ({result['seed']}, k) for image k (the same initial noise for "
            f"every sampler); run `{result['run']}` at step {result['step']}, T = {result['num_timesteps']}, "
            f"{threads}. Wall time is sampling only (no file writing).")
    if result.get("real"):
        note += f" FID/KID against `{result['real']}`."
    if result.get("conditions"):
        note += f" Conditions: {', '.join(result['conditions'])} ({result['n'] // len(result['conditions'])} images each)."
    return "\n".join(lines) + "\n\n" + note.lstrip("\n") + "\n"


def comparison_figure(result: dict[str, Any]):
    """Left: images/s against network evaluations per image (log-log). Right: FID (or KID, or
    detection rate) against the same, when measured. DDIM eta=0, DDIM with noise and DDPM each have their own marker."""
    from difflab.visualize.figure import new_figure, plain_log_axis

    rows = result["rows"]
    quality = next((k for k in ("fid", "kid_mean", "detect_rate") if any(r.get(k) is not None for r in rows)), None)
    fig = new_figure(11 if quality else 6, 4.2)
    axes = fig.subplots(1, 2 if quality else 1)
    axes = list(axes) if quality else [axes]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = r["kind"].upper() + (f" (eta={r['eta']:g})" if r["kind"] == "ddim" or r["eta"] else "")
        groups.setdefault(key, []).append(r)
    markers = "osD^vP*X"
    labels = {"fid": "FID (lower is better)", "kid_mean": "KID (lower is better)",
              "detect_rate": "detection rate (higher is better)"}
    for g, (key, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["nfe"])
        steps = [r["nfe"] for r in rs]  # the cost axis: network evaluations (Heun: 2 per step)
        style = dict(marker=markers[g % len(markers)], ms=7, lw=1.5, label=key)
        axes[0].plot(steps, [r["images_per_s"] for r in rs], **style)
        if quality:
            ys = [r.get(quality) for r in rs]
            err = [r.get("kid_std") for r in rs] if quality == "kid_mean" else None
            pts = [(s, y, e) for s, y, e in zip(steps, ys, err or [None] * len(ys)) if y is not None]
            if pts:
                axes[1].errorbar([p[0] for p in pts], [p[1] for p in pts],
                                 yerr=[p[2] for p in pts] if err else None, capsize=3, **style)

    same_x: dict[float, list[dict]] = {}
    for r in rows:
        same_x.setdefault(r["nfe"], []).append(r)
    for group in same_x.values():  # names of points at the same cost are stacked, not overprinted
        for rank, r in enumerate(sorted(group, key=lambda r: -r["images_per_s"])):
            axes[0].annotate(r["sampler"], (r["nfe"], r["images_per_s"]), textcoords="offset points",
                             xytext=(6, 4 - 11 * rank), fontsize=7, color="0.3")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    nfes = [float(r["nfe"]) for r in rows]
    rates = [float(r["images_per_s"]) for r in rows]
    plain_log_axis(axes[0].xaxis, min(nfes), max(nfes))
    plain_log_axis(axes[0].yaxis, min(rates), max(rates))
    xlabel = "network evaluations per image (= steps for DDPM, DDIM; log scale)"
    axes[0].set(xlabel=xlabel, ylabel="images per second (log scale)",
                title=f"Speed ({result['n']} images, {result['threads']} CPU thread{'s' if result['threads'] != 1 else ''})")
    if quality:
        axes[1].set_xscale("log")
        plain_log_axis(axes[1].xaxis, min(nfes), max(nfes))
        axes[1].set(xlabel=xlabel, ylabel=labels[quality],
                    title=f"Quality ({labels[quality].split(' (')[0]}, n = {result['n']})")
    for ax in axes:
        ax.margins(x=0.12, y=0.12)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"Samplers on {Path(result['run']).name} (step {result['step']}, T = {result['num_timesteps']})",
                 fontsize=11)
    fig.tight_layout()
    return fig


def samples_figure(result: dict[str, Any], firsts: Sequence[torch.Tensor]):
    """One row per sampler: its first images (same seeds in every row)."""
    from difflab.data.dataset import to_uint8
    from difflab.visualize.figure import image_grid_figure

    k = min(len(f) for f in firsts)
    panel = to_uint8(torch.stack([f[:k] for f in firsts]))
    return image_grid_figure([panel], titles=[f"seed ({result['seed']}, {j})" for j in range(k)],
                             row_titles=[r["sampler"] for r in result["rows"]],
                             panel_titles=[f"Same initial noise, different {_what_varies(result)}"])


def _what_varies(result: dict[str, Any]) -> str:
    samplers = {r["kind"] + str(r["steps"]) for r in result["rows"]}
    weights = {r.get("guidance", 1.0) for r in result["rows"]}
    if len(weights) > 1:
        return "samplers and guidance weights" if len(samplers) > 1 else "guidance weights"
    return "samplers"


def guidance_figure(result: dict[str, Any]):
    """A guidance sweep: quality (FID, else KID) and conditional accuracy against the guidance weight w,
    one line per sampler: the trade-off classifier-free guidance makes."""
    from difflab.visualize.figure import new_figure

    rows = [r for r in result["rows"] if r.get("guidance") is not None]
    quality = next((k for k in ("fid", "kid_mean") if any(r.get(k) is not None for r in rows)), None)
    panels = [p for p in (quality, "accuracy") if p and any(r.get(p) is not None for r in rows)] or ["images_per_s"]
    fig = new_figure(5.5 * len(panels), 4.2)
    axes = fig.subplots(1, len(panels))
    axes = list(axes) if len(panels) > 1 else [axes]
    lines: dict[str, list[dict]] = {}
    for r in rows:
        lines.setdefault(r["sampler"].rsplit("-w", 1)[0], []).append(r)
    labels = {"fid": "FID (lower is better)", "kid_mean": "KID (lower is better)", "images_per_s": "images per second",
              "accuracy": "conditional accuracy (higher is better)"}
    for ax, panel in zip(axes, panels):
        for name, rs in lines.items():
            rs = sorted(rs, key=lambda r: r["guidance"])
            if panel == "accuracy":
                keys = [k for k in (rs[0].get("accuracy") or {}) if (rs[0]["accuracy"] or {}).get(k) is not None]
                for key in keys:
                    ax.plot([r["guidance"] for r in rs], [(r.get("accuracy") or {}).get(key) for r in rs], marker="o",
                            label=f"{name}: {key}")
            else:
                ax.plot([r["guidance"] for r in rs], [r.get(panel) for r in rs], marker="o", label=name)
        ax.set(xlabel="guidance weight w (0 = unconditional, 1 = conditional)", ylabel=labels[panel])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Classifier-free guidance on {Path(result['run']).name} (step {result['step']}, n = {result['n']})",
                 fontsize=11)
    fig.tight_layout()
    return fig
