"""The cost of classifier-free guidance (issue 14): images/s of one trained conditional run sampled
three ways on the same seeds and conditions, interleaved A B C, A B C, ... in one process:

    unconditional   no condition given: one network call per step
    conditional     the condition given, w = 1: one network call per step (guidance changes nothing)
    guided          the condition given, w = ``--guidance``: the batch doubled (conditional and
                    unconditional halves in one network call), then eps_u + w (eps_c - eps_u)

    python bench/guidance_cost.py --run runs/fm-cond [--batch 100] [--rounds 5] [--guidance 3]

Last line: ``cfg_slowdown=X`` (median seconds of guided over conditional) and the same over
unconditional.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave  # noqa: E402

from difflab.captions import condition_rows, requests
from difflab.runs import load_run
from difflab.samplers import sample
from difflab.visualize.compare import parse_sampler_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--sampler", default="dpmpp-2m-sde-20")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args()

    run = load_run(args.run)
    spec = parse_sampler_spec(args.sampler, run.schedule.num_timesteps)
    schema = run.config.cond.schema
    if schema is None:
        raise SystemExit(f"--run {args.run}: trained without labels; this bench needs a conditional run")
    # the batch spread over every class of the first attribute, as `sample --class all` does
    names = schema.classes[0]
    reqs = requests(run.config.cond, labels=[f"{schema.attributes[0]}={c}" for c in names])
    per = -(-args.batch // len(reqs))
    cond = {k: v[: args.batch] for k, v in condition_rows(run.config.cond, reqs, per).items()}
    base = run.denoiser("clip", "auto")
    guided = base.guided(args.guidance)
    shape = run.image_shape

    def go(den, **kw):
        return lambda: sample(den, args.batch, shape, spec.config, seed=0, batch_size=args.batch, progress=False, **kw)

    with torch.no_grad():
        times = interleave({"unconditional": go(base), "conditional": go(base, **cond),
                            f"guided_w{args.guidance:g}": go(guided, **cond)}, rounds=args.rounds, per_round=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nrun {args.run} (step {run.step}), {args.sampler}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds")
    print("| variant | s per batch | images/s |\n|---|---:|---:|")
    for k, s in med.items():
        print(f"| {k} | {s:.2f} | {args.batch / s:.1f} |")
    g = med[f"guided_w{args.guidance:g}"]
    print(f"cfg_slowdown={g / med['conditional']:.2f} cfg_slowdown_vs_unconditional={g / med['unconditional']:.2f}")


if __name__ == "__main__":
    main()
