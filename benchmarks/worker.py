"""A benchmark worker: one implementation's Workload in its own process, doing the jobs bench.py sends.

    python benchmarks/worker.py ROOT SPEC_JSON      # started by bench.py, one per implementation

ROOT is the checkout whose `models` and `util` are measured (checkouts share package names, so each
needs its own interpreter); SPEC_JSON is the workload (benchmarks/workload.py). The worker prints one
JSON line when the model is built, then answers each JSON line on stdin, {"job": NAME, ...arguments},
with one JSON line from the function JOBS[NAME]; {"job": "quit"} ends it.
"""
import contextlib
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import measure, release, release_like, workload  # noqa: E402,F401  (all before REPO leaves)

# The measured checkout's `models` and `util` must come from ROOT alone: the release's are namespace
# packages (no __init__.py), which a regular package of ours anywhere on sys.path would win over.
sys.path.remove(REPO)


def eager_if(compiled):
    """Compiled code run eagerly: dispatch modes (the FLOP counter, the CPU memory tracker) would make
    dynamo compile again; the FLOPs are the same."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


def time_task(w, task, calls=1):
    """Seconds and process CPU seconds per call, over `calls` calls."""
    cpu = time.process_time()
    seconds = measure.timed(w.task(task), w.device, calls)
    return {"seconds": seconds, "cpu_seconds": (time.process_time() - cpu) / calls}


def warm_up(w, task, calls=1):
    """Untimed first calls (lazy initialisation, allocator growth, compilation); their seconds."""
    start = time.perf_counter()
    for _ in range(calls):
        w.task(task)()
    return {"seconds": time.perf_counter() - start}


def count_flops(w, task):
    with eager_if(w.compiled):
        return {"flops": measure.count_flops(w.task(task))}


def matmul_peak(w):
    return {"flops_per_s": measure.matmul_peak(w.device, w.amp or torch.float32)}


def train_memory(w, task):
    """Peak memory of one training step (weights, gradients, optimizer state, activations), after a step
    that creates the optimizer state."""
    step = w.task(task)
    step()
    with eager_if(w.compiled and w.device.type == "cpu"):
        peak, method = measure.peak_memory(step, w.device, track=(w.train_model, w.optimizer))
    return {"bytes": peak, "method": method}


def save_sample(w, path):
    torch.save(w.sample().cpu(), path)
    return {}


def train_losses(w, count):
    """Training-mode losses (no step) for `count` seeds: implementations whose dropout and mask draws
    differ are compared by their mean and its standard error."""
    with torch.no_grad():
        return {"losses": [float(w.train_loss(seed)) for seed in range(w.spec.seed, w.spec.seed + count)]}


def nll_value(w):
    return {"nll": float(w.nll())}


JOBS = {f.__name__: f for f in (time_task, warm_up, count_flops, matmul_peak, train_memory, save_sample,
                                train_losses, nll_value)}


def main(root, spec_json):
    w = workload.Workload(root, json.loads(spec_json))
    out, sys.stdout = sys.stdout, sys.stderr  # stray prints (progress bars, warnings) must not break the protocol
    print(json.dumps({"params": w.params, "allocator": w.allocator, "fixed_mask_levels": w.fixed_mask_levels,
                      "compiled": w.compiled}), file=out, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        name = job.pop("job")
        if name == "quit":
            break
        print(json.dumps(JOBS[name](w, **job)), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
