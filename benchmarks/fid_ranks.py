"""FID/IS scoring of one folder by 1 and by 2 processes (torchrun, gloo, one thread each) on the CPU.

Each process extracts the Inception features of its share of the images and rank 0 combines them
(util.fid.inception_features), so the time should fall about 2x and the score stay the same. Uses
random Inception weights (the numbers mean nothing; only time and equality are measured) and writes
the medians, their ratio, both scores, the commit and the versions to --out.

    python benchmarks/fid_ranks.py [--images 160] [--repeats 3] [--out benchmarks/results/fid_ranks_cpu.json]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(folder, stats, weights):
    """One torchrun process: time compute_fid_is between two barriers; rank 0 prints the result as JSON."""
    import torch
    import util.misc as misc
    from util.fid import compute_fid_is
    device = misc.init_distributed_mode("cpu")
    misc.barrier()
    start = time.perf_counter()
    scores = compute_fid_is(folder, stats, device, inception_weights=weights)
    misc.barrier()
    seconds = time.perf_counter() - start
    if scores is not None:
        print(json.dumps({"seconds": seconds, "fid": scores["fid"], "inception_score": scores["inception_score"],
                          "threads": torch.get_num_threads()}), flush=True)
    torch.distributed.destroy_process_group()


def write_images(folder, n, size=32, seed=0):
    """n PNGs of random coloured rectangles and ellipses."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = rng.integers(0, size // 2, 2)
            w, h = rng.integers(4, size // 2, 2)
            x1, y1 = x0 + w, y0 + h
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([int(x0), int(y0), int(x1), int(y1)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        img.save(os.path.join(folder, f"{i:05d}.png"))


def run(nproc, folder, stats, weights):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), "--worker", folder, stats, weights]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)
    if proc.returncode:
        sys.exit(f"{nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def commit():
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    return head.strip() + ("-dirty" if dirty.strip() else "")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=3, metavar=("FOLDER", "STATS", "WEIGHTS"), help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "fid_ranks_cpu.json"))
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker)
    import torch
    import torch_fidelity
    from util.fid import FEATURE_DIM, make_random_inception_weights, save_fid_stats
    measured_at = commit()  # before the runs: the code they measure
    with tempfile.TemporaryDirectory() as tmp:
        folder, stats = os.path.join(tmp, "images"), os.path.join(tmp, "stats.npz")
        write_images(folder, args.images)
        weights = make_random_inception_weights(os.path.join(tmp, "inception.pth"))
        save_fid_stats(stats, np.zeros(FEATURE_DIM), np.eye(FEATURE_DIM))
        runs = {1: [], 2: []}
        for _ in range(args.repeats):  # interleaved, so that a change in the machine's load hits both alike
            for nproc in runs:
                runs[nproc].append(run(nproc, folder, stats, weights))
                print(f"{nproc} process(es): {runs[nproc][-1]}", flush=True)
    median = {n: statistics.median(r["seconds"] for r in rs) for n, rs in runs.items()}
    results = {
        "what": f"compute_fid_is of {args.images} 32x32 PNGs, random Inception weights, CPU, one thread per process",
        "median_seconds": {f"{n}_process": s for n, s in median.items()},
        "speedup_2_over_1": median[1] / median[2],
        "fid": {f"{n}_process": rs[0]["fid"] for n, rs in runs.items()},
        "inception_score": {f"{n}_process": rs[0]["inception_score"] for n, rs in runs.items()},
        "fid_relative_difference": abs(runs[2][0]["fid"] - runs[1][0]["fid"]) / abs(runs[1][0]["fid"]),
        "runs": {f"{n}_process": rs for n, rs in runs.items()},
        "commit": measured_at, "python": platform.python_version(), "torch": torch.__version__,
        "torch_fidelity": torch_fidelity.__version__, "numpy": np.__version__, "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"median {median[1]:.2f} s with 1 process, {median[2]:.2f} s with 2: {results['speedup_2_over_1']:.2f}x; "
          f"FID {results['fid']['1_process']!r} vs {results['fid']['2_process']!r}; written to {args.out}")


if __name__ == "__main__":
    main()
