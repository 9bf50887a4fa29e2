"""Evaluation speed and accuracy: the FID Inception forward, and FID/KID/detection end to end.

Part ``forward`` (default): images/s of the Inception forward in five variants, run side by
side (A B C D, A B C D, ...) on the same batch, with the features' relative change against the
archive's own fp32 forward (max over images of |f - f_ref| / |f_ref|):

    script    the TorchScript archive as shipped (NCHW fp32)
    eager     difflab's eager copy, batch norm folded (NCHW fp32)
    eager_cl  the same in channels_last
    fused_cl  eager_cl with oneDNN conv+relu on prepacked weights (what difflab runs)
    bf16_cl   eager_cl under torch.autocast(bfloat16)

Part ``eval``: the floor and ceiling table of BENCHMARKS.md and the end-to-end time. The first
``--fake-count`` files of ../shared/data/anime-faces (sorted) play the generated set, the rest
are the real set (both as symlink folders in ``cache_dir("bench-eval")``: nothing is copied);
then ``--fake-count`` Fashion-MNIST test images (written there as PNG) are scored against the
same real set. The real set's statistics are computed once, in resumable chunks of 1000, and
put in the stats cache where ``difflab fid-stats`` would put them; the timed runs are
``difflab eval`` with those cached reference stats.

    python bench/eval_speed.py --part forward [--batch 25] [--rounds 3]
    python bench/eval_speed.py --part eval [--fake-count 1000] [--real-limit N]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from difflab.data.decode import open_image
from difflab.data.images import find_images
from difflab.metrics.detect import DetectProtocol
from difflab.metrics.evaluate import EvalConfig, evaluate
from difflab.io import atomic_path, cache_dir
from difflab.metrics.features import (
    FolderScan, ReferenceStats, folder_digest, folder_features, save_stats, stats_cache_path,
)
from difflab.metrics.fid import gaussian_stats
from difflab.metrics.inception import FIDInceptionV3, InceptionFeatures, preprocess_image
from difflab.precision import torch_threads

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FACES = SHARED / "anime-faces"


def _inputs(n: int) -> torch.Tensor:
    """``n`` real faces as network input (or a fixed pattern when the shared data is missing)."""
    if FACES.is_dir():
        files = find_images(FACES)[:n]
        pix = np.stack([preprocess_image(open_image(p)) for p in files])
    else:
        print(f"note: {FACES} missing, timing on a synthetic pattern", file=sys.stderr)
        g = np.random.default_rng(0)
        pix = g.integers(0, 256, size=(n, 3, 299, 299)).astype(np.float32)
    return (torch.from_numpy(pix) - 128.0) / 128.0


def part_forward(args: argparse.Namespace) -> None:
    ext = InceptionFeatures(args.fid_weights, threads=args.threads)
    if not ext.fused:
        print("note: the fused oneDNN path is not available here; 'fused_cl' = 'eager_cl'", file=sys.stderr)
    script = ext.script
    eager = FIDInceptionV3(script)
    eager_cl = FIDInceptionV3(script).to(memory_format=torch.channels_last)
    fused_cl = ext.net  # what difflab runs
    x = _inputs(args.batch)
    xcl = x.contiguous(memory_format=torch.channels_last)

    def bf16() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return eager_cl(xcl)

    variants = {
        "script": lambda: script(x),
        "eager": lambda: eager(x),
        "eager_cl": lambda: eager_cl(xcl),
        "fused_cl": lambda: fused_cl(xcl),
        "bf16_cl": bf16,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    errs: dict[str, tuple[float, float]] = {}
    with torch.inference_mode(), torch_threads(args.threads):
        ref = script(x).double()
        for name, f in variants.items():  # warm-up, and the accuracy check
            y = f().double()
            rel = ((y - ref).norm(dim=1) / ref.norm(dim=1))
            errs[name] = (float(rel.max()), float(rel.mean()))
        for r in range(args.rounds):
            for name, f in variants.items():
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v[-1] / args.batch * 1e3:.0f} ms/img" for k, v in times.items()), file=sys.stderr)
    base = statistics.median(times["script"])
    print(f"\nInception forward, batch {args.batch} real faces, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads() if args.threads is None else args.threads} threads")
    print(f"{'variant':<10} {'ms/img':>8} {'img/s':>7} {'speedup':>8} {'max rel err':>12} {'mean rel err':>13}")
    for name in variants:
        med = statistics.median(times[name])
        print(f"{name:<10} {med / args.batch * 1e3:>8.1f} {args.batch / med:>7.2f} {base / med:>7.2f}x "
              f"{errs[name][0]:>12.2e} {errs[name][1]:>13.2e}")
    chosen = statistics.median(times["fused_cl"])
    print(f"ratio fused_cl/script time: {chosen / base:.3f} (1000 images: {chosen / args.batch * 1000:.0f} s forward)")


def _fmnist_folder(dest: Path, n: int) -> Path:
    from PIL import Image

    from difflab.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist(SHARED / "fashion-mnist", split="test", progress=False)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(images[i, 0].numpy()).save(tmp / f"{i:05d}.png")
    tmp.rename(dest)
    return dest


def _row(name: str, r: dict) -> str:
    kid = f"{r['kid_mean']:.4f} +- {r['kid_std']:.4f}" if r.get("kid_mean") is not None else "-"
    fid = f"{r['fid']:.2f}" if r.get("fid") is not None else "-"
    det = "  ".join(f"{r[k]:.3f}" for k in ("detect_rate_lbp", "detect_rate_animeface") if k in r) or "-"
    return f"{name:<34} {r['n_fake']:>6} {r['n_real'] or 0:>6} {fid:>8} {kid:>18}  {det:<14} {r['timings']['total_s']:>7.1f}"


def _reference(real_dir: Path, ext: InceptionFeatures, work: Path, chunk: int = 1000) -> None:
    """Put the real folder's statistics into the stats cache, computing features in resumable
    chunks (each chunk's features are kept in ``work`` until the whole folder is done)."""
    scan = FolderScan(real_dir)
    protocol = ext.protocol()
    digest = folder_digest(scan.root, scan.files)
    target = stats_cache_path(digest, protocol)
    if target.is_file():
        return
    all_files = list(scan.files)
    feats, paths, skipped = [], [], []
    for i in range(0, len(all_files), chunk):
        part = work / f"chunk-{digest[:16]}-{i // chunk:04d}.npz"
        if not part.is_file():
            sub = FolderScan(real_dir)
            sub.files = all_files[i:i + chunk]
            f = folder_features(sub, ext, desc=f"reference {i // chunk + 1}/{-(-len(all_files) // chunk)}")
            with atomic_path(part) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, features=f, paths=np.array(sub.paths), skipped=np.array([f"{a}\t{b}" for a, b in sub.skipped]))
        with np.load(part, allow_pickle=False) as z:
            feats.append(z["features"])
            paths += [str(p) for p in z["paths"]]
            skipped += [tuple(str(s).split("\t", 1)) for s in z["skipped"]]
    features = np.concatenate(feats)
    ref = ReferenceStats(features, gaussian_stats(features), tuple(paths), tuple(skipped), protocol, digest,
                         str(real_dir.resolve()))
    save_stats(target, ref)
    for part in work.glob(f"chunk-{digest[:16]}-*.npz"):
        part.unlink()


def _links(dest: Path, files: list[Path]) -> Path:
    if dest.is_dir() and sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in files):
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for p in files:
        (dest / p.name).symlink_to(p)
    return dest


def part_eval(args: argparse.Namespace) -> None:
    if not FACES.is_dir():
        sys.exit(f"{FACES} is missing: the eval part needs the shared data")
    files = find_images(FACES)
    fake_files = files[:args.fake_count]
    real_files = files[args.fake_count:]
    if args.real_limit:
        real_files = real_files[:args.real_limit]
    results = {}
    work = cache_dir("bench-eval")  # symlink folders (nothing copied) and resumable reference chunks
    with torch_threads(args.threads):
        real_dir = _links(work / f"real-{args.fake_count}-{len(real_files)}", real_files)
        fake_dir = _links(work / f"fake-{args.fake_count}", fake_files)
        fm_dir = work / f"fmnist-{args.fake_count}"
        if not fm_dir.is_dir():
            _fmnist_folder(fm_dir, args.fake_count)

        t = time.perf_counter()
        ext = InceptionFeatures(args.fid_weights)
        _reference(real_dir, ext, work)
        print(f"reference: {len(real_files)} real faces ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if args.reference_only:
            return
        common = dict(real=str(real_dir), threads=args.threads, fid_weights=args.fid_weights, progress=True,
                      detect=DetectProtocol())
        for rep in range(args.repeats):  # the timed end-to-end runs: A B A B ...
            results[f"fid only #{rep + 1}"] = evaluate(EvalConfig(fake=str(fake_dir), metrics="fid", **common))
            results[f"fid,kid,detect #{rep + 1}"] = evaluate(EvalConfig(fake=str(fake_dir), **common))
        results["fmnist fid,kid,detect"] = evaluate(EvalConfig(fake=str(fm_dir), **common))
    print(f"\nreal = anime faces after the first {args.fake_count} (n below), threads "
          f"{torch.get_num_threads() if args.threads is None else args.threads}")
    print(f"{'generated set, metrics':<34} {'n_fake':>6} {'n_real':>6} {'FID':>8} {'KID':>18}  "
          f"{'det lbp  anim':<14} {'time s':>7}")
    for name, r in results.items():
        label = name.replace("fid only", f"faces[:{args.fake_count}] fid").replace(
            "fid,kid,detect #", f"faces[:{args.fake_count}] all #") if "fmnist" not in name else \
            f"fmnist test[:{args.fake_count}] all"
        print(_row(label, r))
    fid_times = [r["timings"]["total_s"] for n, r in results.items() if n.startswith("fid only")]
    all_times = [r["timings"]["total_s"] for n, r in results.items() if n.startswith("fid,kid,detect")]
    for n, r in results.items():
        print(f"timings {n}: " + json.dumps({k: round(v, 1) for k, v in r["timings"].items()}))
    print(f"ratio eval time / 90 s budget: fid only {statistics.median(fid_times) / 90:.2f}, "
          f"fid+kid+detect {statistics.median(all_times) / 90:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["forward", "eval"], default="forward")
    p.add_argument("--batch", type=int, default=25, help="forward: images per timed batch")
    p.add_argument("--rounds", type=int, default=3, help="forward: interleaved rounds")
    p.add_argument("--fake-count", type=int, default=1000, help="eval: size of the generated set")
    p.add_argument("--real-limit", type=int, default=0, help="eval: cap the real set (0 = all the rest)")
    p.add_argument("--repeats", type=int, default=2, help="eval: timed repeats")
    p.add_argument("--reference-only", action="store_true", help="eval: only prepare the cached reference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fid-weights", default=None)
    args = p.parse_args()
    (part_forward if args.part == "forward" else part_eval)(args)


if __name__ == "__main__":
    main()
