"""What the EMA of the weights (--ema_rate) costs per training step: main_fractalgen.py's step (forward,
backward, clip, AdamW) timed with and without the EMA update (timm's ModelEmaV3, as main_fractalgen.py
keeps it) that follows it, and the update alone.

    python benchmarks/ema_cost.py --threads 2 --steps 60     # the demo's model and batch, then the CPU benchmark model

Steps with and without the update alternate, so a busy machine slows both alike; medians over the
steps, and the median of the paired ratios (each step with the update against the one before it
without). Writes benchmarks/results/ema_cost_cpu_<threads>threads.json (with commit and versions).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from engine_fractalgen import apply_gradients  # noqa: E402
from main_fractalgen import param_groups  # noqa: E402
from models.fractalgen import build_model  # noqa: E402
from models.layers import imagenet_stats  # noqa: E402

# (model, build arguments, images per step): the Quick start's, and benchmarks/bench.py's CPU model
CASES = [("fractalar_tiny_in16", dict(class_num=10, num_conds=1, attn_dropout=0.0, proj_dropout=0.0), 32),
         ("fractalmar_small_in32", dict(class_num=10, num_conds=5), 16)]


def measure(name, kwargs, batch_size, steps, rate, seed=0):
    from timm.utils import ModelEmaV3
    torch.manual_seed(seed)
    model = build_model(name, **kwargs).train()
    ema = ModelEmaV3(model, decay=rate)
    ema.module.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    size = model.img_size
    mean, std = (t.view(1, 3, 1, 1) for t in imagenet_stats(torch.device("cpu")))
    images = (torch.randint(0, 256, (batch_size, 3, size, size)) / 255 - mean) / std  # random 8-bit pixels
    labels = torch.randint(0, kwargs["class_num"], (batch_size,))

    def step():
        apply_gradients(model(images, labels), model, optimizer, scaler, 3.0)

    for _ in range(3):  # warm-up: thread pool, allocator, AdamW state
        step()
        ema.update(model)
    plain, with_ema, update_alone = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        step()
        middle = time.perf_counter()
        ema.update(model)
        end = time.perf_counter()
        with_ema.append(end - start)
        update_alone.append(end - middle)
    paired = [w / p for w, p in zip(with_ema, plain)]
    return {"model": name, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "batch_size": batch_size, "steps": steps, "ema_rate": rate,
            "step_s_median": statistics.median(plain), "step_with_ema_s_median": statistics.median(with_ema),
            "ema_update_s_median": statistics.median(update_alone),
            "update_over_step": statistics.median(update_alone) / statistics.median(plain),
            "with_over_without_medians": statistics.median(with_ema) / statistics.median(plain),
            "with_over_without_paired_median": statistics.median(paired)}


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=60, help="steps with and steps without the update, alternating")
    p.add_argument("--ema_rate", type=float, default=0.9999)
    p.add_argument("--output", default=None, help="default benchmarks/results/ema_cost_cpu_<threads>threads.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {"commit": commit(), "torch": torch.__version__, "python": platform.python_version(),
               "threads": args.threads, "device": "cpu", "processor": platform.processor() or platform.machine(),
               "load_average_before": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "cases": []}
    import timm
    results["timm"] = timm.__version__
    for name, kwargs, batch_size in CASES:
        case = measure(name, kwargs, batch_size, args.steps, args.ema_rate)
        results["cases"].append(case)
        print(f"{name} batch {batch_size}: step {case['step_s_median'] * 1e3:.1f} ms, with the EMA update "
              f"{case['step_with_ema_s_median'] * 1e3:.1f} ms (paired ratio "
              f"{case['with_over_without_paired_median']:.3f}); "
              f"the update alone {case['ema_update_s_median'] * 1e3:.2f} ms = {case['update_over_step']:.2%} of a step",
              flush=True)
    results["load_average_after"] = os.getloadavg()
    path = args.output or os.path.join(REPO, "benchmarks", "results", f"ema_cost_cpu_{args.threads}threads.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
