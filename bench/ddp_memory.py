"""Memory of a 2-rank CPU training job (torchrun, gloo) on a cached image folder, for two checkouts of
difflab side by side (issue 17, item 5: the decoded cache memory-mapped and shared by the ranks,
against each rank reading its own copy).

For every rank, sampled every 0.2 s from /proc/PID/smaps_rollup: the peak of ``Rss`` (what `top`
shows: it counts shared file pages in every process that touched them), ``Pss`` (shared pages split
between the processes that map them: the sum over ranks is the job's true footprint) and
``Anonymous`` (private memory). The folder is decoded into difflab's cache before the first variant
runs, so both variants read the same cache file; each variant runs ``--rounds`` times, interleaved.

    python bench/ddp_memory.py --data ../shared/data/anime-faces --image-size 64 \
        --before /tmp/difflab-before/src --after src --rounds 2

Last line: ``pss_ratio_before_over_after=...`` (the medians of the summed peak Pss).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RANK_SCRIPT = """
import sys
from difflab.config import resolve_config
from difflab.train import Trainer
cfg = resolve_config(preset="tiny", flags={"data.source": sys.argv[1], "data.image_size": int(sys.argv[2]),
                                           "train.batch_size": 16, "train.max_steps": int(sys.argv[4])},
                     overrides=["train.sample_every=0", "train.checkpoint_every=100000", "train.precision=fp32"])
Trainer(cfg, sys.argv[3], progress=False).run()
"""


def rollup(pid: int) -> dict[str, int]:
    """kB figures of /proc/PID/smaps_rollup (empty if the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0].rstrip(":")] = int(parts[1])
    return out


def children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids] + [g for k in kids for g in children(int(k))]


def run_variant(src: str, data: str, size: int, steps: int, out: Path, port: int) -> dict[str, float]:
    script = out / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), data, str(size), str(out / "run"), str(steps)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, dict[str, int]] = {}

    def watch() -> None:
        while proc.poll() is None:
            for pid in children(proc.pid):
                r = rollup(pid)
                if "Rss" in r and r["Rss"] > 200_000:  # the two ranks (the launcher stays small)
                    p = peaks.setdefault(pid, {})
                    for k in ("Rss", "Pss", "Anonymous"):
                        p[k] = max(p.get(k, 0), r.get(k, 0))
            time.sleep(0.2)

    t = threading.Thread(target=watch)
    t.start()
    _, err = proc.communicate()
    t.join()
    if proc.returncode:
        raise SystemExit(f"{src}: torchrun failed:\n{err[-2000:]}")
    ranks = sorted(peaks.values(), key=lambda p: -p["Rss"])[:2]
    return {k: sum(p[k] for p in ranks) / 1024 for k in ("Rss", "Pss", "Anonymous")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--before", required=True, help="src/ folder of the checkout without the mapped cache")
    p.add_argument("--after", default="src")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="/tmp/ddp-memory")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(args.after).resolve())}
    subprocess.run([sys.executable, "-c", "import sys; from difflab.data.dataset import load_dataset; "
                    "d = load_dataset(sys.argv[1], int(sys.argv[2]), 3); print(tuple(d.images.shape))",
                    args.data, str(args.image_size)], env=env, check=True)  # fill the cache once
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    port = 29620
    for r in range(args.rounds):
        for name in ("before", "after"):
            work = out / f"{name}-{r}"
            subprocess.run(["rm", "-rf", str(work)], check=True)
            work.mkdir(parents=True)
            port += 1
            res = run_variant(getattr(args, name), args.data, args.image_size, args.steps, work, port)
            results[name].append(res)
            print(f"round {r} {name}: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in res.items()), flush=True)
    print("\n| variant | peak Rss, both ranks (MiB) | peak Pss, both ranks (MiB) | peak anonymous, both ranks (MiB) |")
    print("|---|---:|---:|---:|")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("Rss", "Pss", "Anonymous")} for name, rs in results.items()}
    for name, m in med.items():
        print(f"| {name} | {m['Rss']:.0f} | {m['Pss']:.0f} | {m['Anonymous']:.0f} |")
    print(f"pss_ratio_before_over_after={med['before']['Pss'] / med['after']['Pss']:.2f}")


if __name__ == "__main__":
    main()
