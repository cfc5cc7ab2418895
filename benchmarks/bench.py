"""Time FractalGen implementations side by side: sampling, training and NLL speed, FLOPs, utilization,
peak training memory.

    python benchmarks/bench.py --model fractalmar_small_in32 --threads 2 --repeats 5
    python benchmarks/bench.py ... --compare ../shared/upstream/fractalgen   # the release itself (release.py)
    python benchmarks/bench.py ... --compare PATH        # another checkout with the same models/ layout
    python benchmarks/bench.py ... --release_like PATH   # that checkout with the release's pixel head work
    python benchmarks/bench.py ... --compile             # ours with compiled transformer blocks in training
    python benchmarks/bench.py ... --tasks sample --sample_compile head,inner   # eager vs compiled sampling
    python benchmarks/bench.py ... --json benchmarks/results/NAME.json          # the results, stamped

Every implementation runs in its own worker process (benchmarks/worker.py) with the same architecture,
random weights and batch (benchmarks/workload.py). The parent asks the workers for one timing at a
time, task by task and implementation by implementation, alternating the order, so a busy machine
slows all of them alike; it reports medians over the repeats with min and max, and ratios to ours.
Utilization is FLOPs (torch.utils.flop_counter) over time and over a matmul peak measured in the same
run. Where the time goes inside one implementation: benchmarks/breakdown.py.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import measure, release, workload  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    workload.add_workload_flags(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min_time", type=float, default=0.5,
                   help="seconds: each measurement of a shorter task averages that many calls (set from ours' first call)")
    p.add_argument("--warmup_calls", type=int, default=1,
                   help="untimed calls per task first; 0 (with --min_time 0) times the first call of a long task, lazy "
                        "initialisation included; compiled samplers always make one (compiling, recording CUDA graphs)")
    p.add_argument("--compare", default=None, metavar="PATH",
                   help="another FractalGen checkout (same models/ layout) or the release, timed interleaved with ours")
    p.add_argument("--release_like", default=None, metavar="PATH",
                   help="also time the checkout at PATH with the release's per-pixel head work "
                        "(benchmarks/release_like.py)")
    p.add_argument("--compile", action="store_true",
                   help="also time ours with torch.compile'd transformer blocks in training (main_fractalgen.py "
                        "--compile), as implementation ours-compiled")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend for --compile")
    p.add_argument("--sample_compile", default=None, metavar="SCOPES",
                   help="also time this checkout sampling through util.sampling.compile_sampling, one worker "
                        "per comma-separated scope (head, inner)")
    p.add_argument("--sample_compile_mode", default=None,
                   help="torch.compile mode for --sample_compile (default: reduce-overhead on CUDA, else default)")
    p.add_argument("--sample_compile_backend", default="inductor",
                   help="torch.compile backend for --sample_compile (aot_eager: capture only, to check the script)")
    p.add_argument("--loss_seeds", type=int, default=8,
                   help="with several implementations: compare mean training losses over this many seeds (0: skip)")
    p.add_argument("--level_flops", action="store_true",
                   help="sampling FLOPs from benchmarks/scaling.py (meta device, seconds) instead of counting a "
                        "real call (minutes for a 256×256 model)")
    p.add_argument("--no_same_samples", dest="same_samples", action="store_false",
                   help="skip the check that all implementations draw the same samples (one more call each)")
    p.add_argument("--no_memory", dest="memory", action="store_false",
                   help="skip the peak training memory (one slow tracked step per setting on CPU)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here (measure.write_results)")
    args = p.parse_args(argv)
    if args.mask_ratio is None and args.compare and release.is_release(args.compare):
        args.mask_ratio = 0.8  # the release draws its masks with numpy: fixed counts make calls do the same work
    return args


def implementations(args):
    """(name, checkout, spec options, environment) of every implementation to time, ours first."""
    impls = [("ours", REPO, {}, None)]
    if args.compile:
        impls.append(("ours-compiled", REPO, {"compile": True, "compile_backend": args.compile_backend}, None))
    if args.compare:
        root = os.path.abspath(args.compare)
        if release.is_release(root):
            impls.append(("release", root, {}, release.release_env(root, torch.device(args.device).type)))
        else:
            impls.append(("other", root, {}, None))
    if args.release_like:
        impls.append(("release-like", os.path.abspath(args.release_like), {"release_head": True}, None))
    for scope in filter(None, (args.sample_compile or "").split(",")):
        impls.append((f"compiled-{scope}", REPO, {"compile_scope": scope, "sample_compile_mode": args.sample_compile_mode,
                                                  "sample_compile_backend": args.sample_compile_backend}, None))
    return impls


class Worker:
    """A benchmarks/worker.py process for the checkout at `root`."""

    def __init__(self, name, root, spec, env=None):
        self.name, self.root = name, root
        self.proc = subprocess.Popen([sys.executable, os.path.join(REPO, "benchmarks", "worker.py"), root,
                                      json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=root, env=env)
        self.info = None

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker for {self.name} ({self.root}) died (exit code {self.proc.wait()})")
        return json.loads(line)

    def ask(self, job, **kwargs):
        self.proc.stdin.write(json.dumps({"job": job, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"job": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait()


def log(msg):
    """A measurement as it is taken (stderr): what a run cut short by a time limit still leaves."""
    print(msg, file=sys.stderr, flush=True)


def warm_up(workers, tasks, args):
    """First calls of every task (lazy initialisation, allocator growth, compilation): seconds per worker."""
    seconds = {}
    for w in workers:
        seconds[w.name] = {}
        for t in tasks:
            calls = max(args.warmup_calls, int(w.name.startswith("compiled-")))  # compiling needs a call
            seconds[w.name][t] = w.ask("warm_up", task=t, calls=calls)["seconds"]
            log(f"warm-up {w.name} {t}: {seconds[w.name][t]:.3f} s for {calls} call(s)")
    return seconds


def time_interleaved(workers, tasks, calls, repeats):
    """Seconds and CPU seconds per call, summarized per worker and task, and the matmul peak of each repeat."""
    times = {w.name: {t: [] for t in tasks} for w in workers}
    cpu = {w.name: {t: [] for t in tasks} for w in workers}
    peaks = []
    for rep in range(repeats):
        order = workers if rep % 2 == 0 else workers[::-1]  # neither goes first every time
        peaks.append(workers[0].ask("matmul_peak")["flops_per_s"])
        for task in tasks:
            for w in order:
                answer = w.ask("time_task", task=task, calls=calls[task])
                times[w.name][task].append(answer["seconds"])
                cpu[w.name][task].append(answer["cpu_seconds"])
                log(f"repeat {rep + 1} {w.name} {task}: {answer['seconds']:.4f} s per call")
    summary = {name: {t: measure.summarize(v) | {"cpu_median": statistics.median(cpu[name][t])} for t, v in per.items()}
               for name, per in times.items()}
    return summary, measure.summarize(peaks)


def count_all_flops(workers, tasks, args, steps):
    """FLOPs per task and implementation; a compiled sampler does ours' work (counting would trace its
    graphs again), so it gets ours' count. --level_flops counts sampling on the meta device instead."""
    def count(w, task):
        if task == "sample" and args.level_flops:
            from benchmarks.scaling import level_flops
            per_image = sum(f for _, f in level_flops(args.model, args.cfg, steps)[1])
            return per_image * args.batch
        return w.ask("count_flops", task=task)["flops"]
    flops = {w.name: {t: count(w, t) for t in tasks} for w in workers if not w.name.startswith("compiled-")}
    for w in workers:
        flops.setdefault(w.name, flops["ours"])
    log(f"FLOPs: {flops}")
    return flops


def same_samples(workers):
    """Whether every implementation draws the same images for the same seed and weights."""
    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for w in workers:
            path = os.path.join(tmp, w.name + ".pt")
            w.ask("save_sample", path=path)
            images.append(torch.load(path))
    diff = max(float((img - images[0]).abs().max()) for img in images[1:])
    return {"identical": diff == 0.0, "max_abs_diff": diff}


def same_nll(workers):
    """Whether every implementation computes the same NLL (nats per dim) for the same batch and seed."""
    values = {w.name: w.ask("nll_value")["nll"] for w in workers}
    diff = max(abs(v - values["ours"]) for v in values.values())
    return {"values": values, "max_abs_diff": diff, "agree": diff < 1e-5}


def mean_train_losses(workers, count):
    """Mean training loss (no step) over `count` seeds per implementation, with its standard error."""
    out = {}
    for w in workers:
        losses = w.ask("train_losses", count=count)["losses"]
        out[w.name] = {"mean": statistics.mean(losses),
                       "sem": statistics.stdev(losses) / math.sqrt(len(losses)) if len(losses) > 1 else 0.0}
    return out


def run(args, spec):
    """Start the workers, time every task interleaved, then check that they compute the same things."""
    tasks = [t for t in args.tasks.split(",") if t]
    workers = []
    try:
        for name, root, options, env in implementations(args):  # they start side by side
            workers.append(Worker(name, root, spec | options, env))
        for w in workers:
            w.info = w.read()
        result = {"config": {k: v for k, v in vars(args).items()
                             if k not in ("compare", "release_like", "json", "markdown")}
                  | {"threads": torch.get_num_threads(), "model_kwargs": spec["model_kwargs"]},
                  "params": workers[0].info["params"],
                  "impls": {w.name: measure.checkout_commit(w.root) or "not a git checkout" for w in workers}}
        for key in ("allocator", "fixed_mask_levels", "compiled"):
            result[key] = {w.name: w.info[key] for w in workers}
        result["warmup_s"] = warm_up(workers, tasks, args)
        # a short task is timed over several calls per measurement, the same number for every implementation
        calls = {t: max(1, math.ceil(args.min_time / max(result["warmup_s"]["ours"][t], 1e-6))) for t in tasks}
        result["calls_per_measurement"] = calls
        result["times"], result["matmul_peak_flops_per_s"] = time_interleaved(workers, tasks, calls, args.repeats)
        result["flops"] = count_all_flops(workers, tasks, args, spec["num_iter_list"])
        training = [t for t in tasks if t.startswith("train")]
        if args.memory and training:
            result["memory"] = {w.name: {t: w.ask("train_memory", task=t) for t in training} for w in workers}
        if len(workers) > 1 and "sample" in tasks and args.same_samples:
            result["same_samples"] = same_samples(workers)
        if len(workers) > 1 and "nll" in tasks:
            result["same_nll"] = same_nll(workers)
        if len(workers) > 1 and args.loss_seeds and training:
            result["train_loss"] = mean_train_losses(workers, args.loss_seeds)
    finally:
        for w in workers:
            w.close()
    return result


# ----------------------------------------------------------------------------- report
def paired_speedup(theirs, ours):
    """Median over repeats of their time / ours, each pair measured back to back: steadier than the
    ratio of medians when the machine's speed drifts during the run."""
    return statistics.median(t / o for t, o in zip(theirs, ours))


def task_rows(result):
    """Column names and one row of strings per task and implementation."""
    c, times, flops = result["config"], result["times"], result["flops"]
    peak = result["matmul_peak_flops_per_s"]["median"]
    batches = {"sample": c["batch"], "nll": c["nll_batch"], "train": c["train_batch"], "train_ckpt": c["train_batch"]}
    columns = ["task", "impl", "median s", "min s", "max s", "cpu s", "img/s", "GFLOP", "GFLOP/s", "util",
               "speedup", "paired", "peak MiB"]
    rows = []
    for task in times["ours"]:
        ours = times["ours"][task]
        for impl, per in times.items():
            t, rate = per[task], flops[impl][task] / per[task]["median"]
            memory = result.get("memory", {}).get(impl, {}).get(task)
            rows.append([task, impl, f"{t['median']:.4f}", f"{t['min']:.4f}", f"{t['max']:.4f}",
                         f"{t['cpu_median']:.3f}", f"{batches[task] / t['median']:.2f}",
                         f"{flops[impl][task] / 1e9:.2f}", f"{rate / 1e9:.1f}", f"{rate / peak:.1%}",
                         "" if impl == "ours" else f"{t['median'] / ours['median']:.2f}x",
                         "" if impl == "ours" else f"{paired_speedup(t['all'], ours['all']):.2f}x",
                         f"{memory['bytes'] / 2 ** 20:.1f}" if memory else ""])
    return columns, rows


def table(columns, rows, markdown=False):
    """Rows as aligned text (the first two columns left-aligned), or as a markdown table."""
    if markdown:
        return ["| " + " | ".join(row) + " |" for row in [columns, ["---"] * len(columns)] + rows]
    widths = [max(len(x) for x in col) for col in zip(columns, *rows)]

    def line(row):
        return "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths)))
    return [line(columns), "-" * len(line(columns))] + [line(r) for r in rows]


def report(result, markdown=False):
    c, peak = result["config"], result["matmul_peak_flops_per_s"]
    masks = ("MAR masks: each implementation's own random ratio per call" if c["mask_ratio"] is None else
             f"MAR masks fixed: ceil(seq_len × {c['mask_ratio']}) per sample in training, "
             f"ceil(seq_len × {c['nll_mask_ratio']}) in the NLL (levels fixed: "
             + ", ".join(f"{k} {v}" for k, v in result["fixed_mask_levels"].items()) + ")")
    lines = [f"model {c['model']} ({result['params'] / 1e6:.2f}M params, {c['model_kwargs']}), device {c['device']}, "
             f"threads {c['threads']}, {c['amp']}; implementations "
             + ", ".join(f"{name} ({commit})" for name, commit in result["impls"].items()),
             f"sample: batch {c['batch']}, cfg {c['cfg']} {c['cfg_schedule']}, num_iter_list {c['num_iter_list']}, "
             f"temperature {c['temperature']}; train batch {c['train_batch']}; nll batch {c['nll_batch']}; "
             f"{c['repeats']} interleaved repeats; calls per measurement "
             + ", ".join(f"{t} {n}" for t, n in result["calls_per_measurement"].items()),
             f"matmul peak ({c['amp']}, measured each repeat): median {peak['median'] / 1e9:.1f} GFLOP/s "
             f"[{peak['min'] / 1e9:.1f}, {peak['max'] / 1e9:.1f}]",
             f"malloc (--allocator {c['allocator']}): " + ", ".join(f"{k} {v}" for k, v in result["allocator"].items()),
             masks, ""]
    lines += table(*task_rows(result), markdown) + [""]
    if len(result["times"]) > 1:
        lines.append("speedup = that implementation's median time / ours (above 1: ours is faster); "
                     "paired = the median of the per-repeat ratios")
    lines.append("util = GFLOP/s over the median matmul peak; cpu s = process CPU time (all threads)")
    if "memory" in result:
        method = next(iter(next(iter(result["memory"].values())).values()))["method"]
        lines.append(f"peak MiB: one training step, {method}")
    if "same_samples" in result:
        s = result["same_samples"]
        lines.append(f"\nsame samples for the same seed and weights: {s['identical']} (max abs diff {s['max_abs_diff']:.3g})")
    if "train_loss" in result:
        lines.append(f"training loss (no step), mean over {c['loss_seeds']} seeds ± standard error: " + ", ".join(
            f"{name} {v['mean']:.5f} ± {v['sem']:.5f}" for name, v in result["train_loss"].items()))
    if "same_nll" in result:
        s = result["same_nll"]
        lines.append(f"same NLL for the same batch and seed: {s['agree']} (" + ", ".join(
            f"{name} {v:.6f}" for name, v in s["values"].items()) + f"; max abs diff {s['max_abs_diff']:.2g})")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, workload.make_spec(args, tmp))
    print(report(result, args.markdown))
    if args.json:
        measure.write_results(args.json, result, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
