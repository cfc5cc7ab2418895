"""Measurement primitives shared by the benchmark scripts: timing, FLOPs, peak memory, results files.

Nothing here imports the models, so a worker can import it before putting another checkout first on
sys.path.
"""
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import time

import torch
import torch.utils._python_dispatch
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- time
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, calls=1):
    """Wall-clock seconds per call of `calls` calls of fn(), the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def summarize(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "all": list(values)}


def interleaved(fns, device, repeats, warmup=1):
    """{name: summarize(seconds)} of each fn in `fns` after `warmup` untimed calls each, called in turns
    so that a busy machine slows all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: summarize(t) for name, t in times.items()}


def matmul_peak(device, dtype=torch.float32, repeats=5):
    """Best-of-`repeats` FLOP/s of a square matmul, the reference for utilization: size 1024 on the CPU
    (where MKL/OpenBLAS reach their best), 8192 on accelerators."""
    n = 1024 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up (thread pool, kernels)
    return 2 * n ** 3 / min(timed(lambda: a @ b, device) for _ in range(repeats))


# ----------------------------------------------------------------------------- FLOPs
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


class FlopCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Total FLOPs of the ops run inside it, by torch.utils.flop_counter's formulas (matmuls,
    convolutions, attention; elementwise work is not counted), the CPU flash-attention kernels counted
    as the CUDA ones.

    A plain dispatch mode rather than FlopCounterMode, whose module tracker fails on parameters passed
    as module arguments under no_grad (the tied logits of the pixel head).
    """

    def __init__(self):
        super().__init__()
        self.formulas = dict(flop_registry)
        for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
                              ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flops)):
            if hasattr(torch.ops.aten, name):
                self.formulas[getattr(torch.ops.aten, name)] = shape_wrapper(formula)
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn):
    """FLOPs of one call of fn()."""
    with FlopCounter() as counter:
        fn()
    return counter.total


# ----------------------------------------------------------------------------- memory
def peak_memory(fn, device, track=()):
    """(peak bytes, method) of one call of fn().

    CUDA: torch.cuda.max_memory_allocated. CPU: the peak of live tensors that torch's MemTracker sees,
    with the modules and optimizers in `track` attributed (a private but device-agnostic API; slow);
    where that is missing, the growth of the process's peak RSS, which shows only the highest call
    measured in a process.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, "ru_maxrss growth"
    tracker = MemTracker()
    tracker.track_external(*track)
    with tracker:
        fn()
    return tracker.get_tracker_snapshot("peak")[device]["Total"], "MemTracker peak of live tensors"


# ----------------------------------------------------------------------------- results files
def git(root, *args):
    """Output of a git command in `root`, or None where root is not a git checkout."""
    try:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def checkout_commit(root):
    """The commit of the checkout at `root` (None outside git), "+dirty" where its tracked code differs
    from it (benchmarks/results/ left out: the files a run writes)."""
    commit = git(root, "rev-parse", "--short=12", "HEAD")
    if commit and git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"):
        commit += "+dirty"
    return commit


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def provenance(device):
    """What a result depends on besides its arguments: this checkout's commit, torch, the machine, the date."""
    commit = checkout_commit(REPO)
    return {"commit": commit and commit.removesuffix("+dirty"), "dirty": bool(commit and commit.endswith("+dirty")),
            "torch": torch.__version__, "python": platform.python_version(), "device": device_name(device),
            "machine": platform.node(), "load_average": os.getloadavg(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_results(path, result, device):
    """Write `result` (a JSON-able dict) to `path` with its provenance under "provenance"."""
    with open(path, "w") as f:
        json.dump({"provenance": provenance(torch.device(device)), **result}, f, indent=1)
        f.write("\n")
