"""Where the time goes in this checkout: self time per level of one sampling call, and the top ops of
sampling and of a training step under torch.profiler.

    python benchmarks/breakdown.py --model fractalmar_small_in32 --threads 2 --json benchmarks/results/breakdown_cpu.json
    python benchmarks/breakdown.py --model fractalmar_in64 --device cuda --amp fp16 --tasks train --train_batch 64

The workload flags are bench.py's (benchmarks/workload.py); --tasks is sample, train or both. Each level's `sample` is wrapped (numerics
unchanged) to time it less the levels inside it; on CUDA the clock synchronizes, which only the
breakdown pays. On CUDA the training profile is sorted by device time and counts host syncs.
"""
import argparse
import contextlib
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import measure, workload  # noqa: E402


def level_modules(model):
    """(label, module whose .sample to time) for each level, outer first, then the heads."""
    out, level, index = [], model, 0
    while hasattr(level, "generator"):
        gen = level.generator
        out.append((f"level {index}: {type(gen).__name__} ({gen.seq_len} patches)", gen))
        if hasattr(gen, "guiding_pixel_loss"):
            out.append((f"level {index}: guiding-pixel head", gen.guiding_pixel_loss))
        level, index = level.next_fractal, index + 1
    out.append((f"level {index}: pixel head", level))
    return out


@contextlib.contextmanager
def per_level(model, clock):
    """Wraps each level's `sample` so that stats[label] = [self seconds, calls] gathers the time spent
    inside it less the levels inside it; each level is also a torch.profiler.record_function range."""
    stats, stack = {}, []

    def wrap(label, fn):
        def timed_sample(*args, **kwargs):
            start = clock()
            stack.append(0.0)
            with torch.profiler.record_function(label):
                result = fn(*args, **kwargs)
            total, children = clock() - start, stack.pop()
            if stack:
                stack[-1] += total
            entry = stats.setdefault(label, [0.0, 0])
            entry[0] += total - children
            entry[1] += 1
            return result
        return timed_sample

    modules = level_modules(model)
    for label, module in modules:
        module.sample = wrap(label, module.sample)
    try:
        yield [label for label, _ in modules], stats
    finally:
        for _, module in modules:
            del module.sample  # back to the class's method


def sampling_breakdown(w):
    """Self time per level of one sampling call after a warm-up, then the top ops of another call."""
    def clock():
        measure.synchronize(w.device)
        return time.perf_counter()

    with per_level(w.model, clock) as (labels, stats):
        w.sample()
        stats.clear()
        total = measure.timed(w.sample, w.device)
        levels = [{"level": label, "seconds": stats.get(label, [0.0, 0])[0], "calls": stats.get(label, [0.0, 0])[1]}
                  for label in labels]
        with torch.profiler.profile() as prof:
            w.sample()
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50)
    return {"total_s": total, "levels": levels, "ops": ops}


def training_breakdown(w, ckpt=False):
    """The top ops of one training step after a warm-up step, with the calls that wait for the device."""
    w.train_step(ckpt)
    cuda = w.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * cuda
    with torch.profiler.profile(activities=activities) as prof:
        w.train_step(ckpt)
        measure.synchronize(w.device)
    events = prof.key_averages()
    syncs = {name: sum(e.count for e in events if e.key == name)
             for name in ("aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize")}
    ops = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25,
                       max_name_column_width=60)
    return {"host_syncs": syncs, "ops": ops}


def report(result):
    lines = []
    if "sample" in result:
        s = result["sample"]
        lines.append(f"sampling: {s['total_s']:.3f} s per call; self time per level")
        for row in s["levels"]:
            share = row["seconds"] / s["total_s"] if s["total_s"] else 0.0
            lines.append(f"  {row['level']:<45} {row['seconds']:8.3f} s {share:6.1%} {row['calls']:7d} calls")
        lines += ["", s["ops"]]
    if "train" in result:
        t = result["train"]
        lines += ["training step; calls that wait for the device on a GPU: "
                  + ", ".join(f"{k} {v}" for k, v in t["host_syncs"].items()), t["ops"]]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    workload.add_workload_flags(p)
    p.set_defaults(tasks="sample")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the breakdown here (measure.write_results)")
    args = p.parse_args(argv)
    tasks = args.tasks.split(",")
    if not set(tasks) <= {"sample", "train"}:
        p.error(f"--tasks takes sample, train or both, not {args.tasks}")
    with tempfile.TemporaryDirectory() as tmp:
        w = workload.Workload(REPO, workload.make_spec(args, tmp))
        result = {"config": vars(args)}
        if "sample" in tasks:
            result["sample"] = sampling_breakdown(w)
        if "train" in tasks:
            result["train"] = training_breakdown(w)
    print(report(result))
    if args.json:
        measure.write_results(args.json, result, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
