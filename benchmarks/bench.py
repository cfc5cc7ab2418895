"""Benchmark a FractalGen implementation: sampling, training and NLL speed, FLOPs, utilization, memory.

    python benchmarks/bench.py --model fractalmar_small_in32 --device cpu --threads 2 --repeats 5
    python benchmarks/bench.py ... --compare /tmp/fg_base      # another checkout, timed interleaved
    python benchmarks/bench.py ... --compare ../shared/upstream/fractalgen  # the release itself (release.py)
    python benchmarks/bench.py ... --compile                   # ours with compiled transformer blocks
    python benchmarks/bench.py ... --release_like /tmp/fg_base # that checkout with the release's pixel head
    python benchmarks/bench.py ... --profile                   # where sampling time goes, per level
    python benchmarks/bench.py ... --tasks sample --sample_compile head,inner  # eager vs compiled sampling

Every implementation runs in its own worker process (`--compare` checkouts have the same `models/`
package name, so they cannot share one interpreter). The parent asks the workers for one timing at a
time, task by task and implementation by implementation, so a busy machine slows all of them alike;
it reports medians over the repeats with min and max. Both workers build the same architecture (the
constructor arguments of `models.fractalgen.MODELS[name].config`) and load the same random weights, so
their samples can be compared too ("same samples": identical images for the same seed).

Utilization is FLOPs (torch.utils.flop_counter, with the CPU flash-attention kernels added) divided by
time and by a matmul peak measured in the same run, on the same device, dtype and thread count.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.utils._python_dispatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("sample", "train", "train_ckpt", "nll")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- measuring
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


def matmul_peak(device, dtype, repeats=5):
    """Best-of-`repeats` FLOP/s of a square matmul: the reference for utilization.

    Size 1024 on CPU (large enough for MKL/OpenBLAS to reach its best, small enough to be quick),
    8192 on accelerators.
    """
    n = 1024 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up (thread pool, kernels)
    best = min(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n ** 3 / best


def sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs):
    """FLOPs of the CPU flash-attention kernel, counted as flop_counter counts the CUDA ones (the two
    matmuls, causal or not). flop_counter hands formulas the shapes of the arguments."""
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs):
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


class FlopCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Total FLOPs of the ops run inside it, by flop_counter's formulas (matmuls, convolutions,
    attention; elementwise work is not counted), plus the CPU flash-attention kernels.

    A plain dispatch mode rather than FlopCounterMode, whose module tracker fails on parameters passed
    as module arguments under no_grad (the tied logits of the pixel head).
    """

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry, shape_wrapper
        self.formulas = dict(flop_registry)
        for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", sdpa_cpu_flops),
                              ("_scaled_dot_product_flash_attention_for_cpu_backward", sdpa_cpu_backward_flops)):
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


def peak_train_memory(workload, ckpt):
    """Peak memory of one training step (weights, gradients, optimizer state, activations), bytes.

    CUDA: torch.cuda.max_memory_allocated. CPU: the peak of live tensors that torch's MemTracker sees
    (a private but device-agnostic API; slow, so it runs once); where that is missing, the growth of
    the process's peak RSS, which only shows the first (highest) step measured in a process.
    """
    device = workload.device
    workload.train_step(ckpt)  # optimizer state exists from here on
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        workload.train_step(ckpt)
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        workload.train_step(ckpt)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, "ru_maxrss growth"
    tracker = MemTracker()
    tracker.track_external(workload.train_model, workload.optimizer)
    with tracker:
        workload.train_step(ckpt)
    return tracker.get_tracker_snapshot("peak")[device]["Total"], "MemTracker peak of live tensors"


# ----------------------------------------------------------------------------- the workload
def set_up_allocator(args):
    """With --allocator own, malloc is set up as the implementation's own CLI does on the CPU: ours
    keeps freed memory (util.misc.keep_freed_memory); a checkout without that function keeps glibc's
    defaults. Call with the checkout first on sys.path. Returns what was done."""
    if args.allocator != "own" or torch.device(args.device).type != "cpu":
        return "default"
    try:
        from util.misc import keep_freed_memory
    except ImportError:
        return "default"
    return "keeps freed memory" if keep_freed_memory() else "default"


class Workload:
    """One implementation's model and the four benchmark tasks, with fixed seeds per call."""

    def __init__(self, root, args):
        sys.path.insert(0, root)
        self.allocator = set_up_allocator(args)
        import models.fractalgen as fractalgen
        self.fractalgen, self.args = fractalgen, args
        self.device = torch.device(args.device)
        self.amp = AMP_DTYPES[args.amp]
        torch.manual_seed(args.seed)
        self.model = fractalgen.FractalGen(**args.config, **args.model_kwargs).to(self.device).eval()
        if args.weights:  # the same random weights in every implementation
            self.model.load_state_dict(torch.load(args.weights, map_location=self.device), strict=True)
        if args.release_head:
            from release_like import use_release_head  # benchmarks/ is this script's directory
            use_release_head(self.model)
        self.train_model = copy.deepcopy(self.model).train()  # training must not change the sampler
        self.fixed_mask_levels = fix_mask_ratios_of(self, args)
        self.compiled = args.compile_worker and compile_for_training(self.train_model, args.compile_backend)
        if args.compile_scope:
            compile_for_sampling(self.model, args)
        self.optimizer = torch.optim.AdamW(self.train_model.parameters(), lr=1e-5, betas=(0.9, 0.95))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)  # as the release trains
        g = torch.Generator().manual_seed(args.seed)
        n, size = max(args.train_batch, args.nll_batch), args.config["img_size_list"][0]
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        images = torch.randint(0, 256, (n, 3, size, size), generator=g) / 255.0
        self.images = ((images - mean[:, None, None]) / std[:, None, None]).to(self.device)
        self.labels = torch.randint(0, args.class_num, (n,), generator=g).to(self.device)

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def sample(self):
        a = self.args
        torch.manual_seed(a.seed)
        labels = torch.arange(a.batch, device=self.device) % a.class_num
        with torch.no_grad(), self.autocast():  # the release-compatible sample(): every checkout has it
            cond = self.model.class_emb(labels)
            if a.cfg != 1.0:
                cond = torch.cat([cond, self.model.fake_latent.repeat(a.batch, 1)])
            return self.model.sample(cond_list=[cond] * 5, num_iter_list=a.num_iter_list, cfg=a.cfg,
                                  cfg_schedule=a.cfg_schedule, temperature=a.temperature,
                                  filter_threshold=a.filter_threshold, fractal_level=0)

    def set_grad_checkpointing(self, flag):
        for module in self.train_model.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = flag

    def train_loss(self, seed):
        """The training-mode loss of the first train_batch images, with dropout and masks seeded."""
        torch.manual_seed(seed)
        n = self.args.train_batch
        with self.autocast():
            return self.train_model(self.images[:n], self.labels[:n])

    def train_step(self, ckpt=False):
        self.set_grad_checkpointing(ckpt)
        loss = self.train_loss(self.args.seed)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def train_losses(self, count):
        """Training-mode losses (no step) for seeds seed .. seed + count - 1: to compare implementations
        whose dropout and mask draws differ, by the mean and its standard error."""
        with torch.no_grad():
            return [float(self.train_loss(seed)) for seed in range(self.args.seed, self.args.seed + count)]

    def nll(self):
        torch.manual_seed(self.args.seed)
        n = self.args.nll_batch
        with torch.no_grad(), self.autocast():
            return self.model(self.images[:n], self.labels[:n])

    def task(self, name):
        return {"sample": self.sample, "train": lambda: self.train_step(False),
                "train_ckpt": lambda: self.train_step(True), "nll": self.nll}[name]

    def batch(self, name):
        return {"sample": self.args.batch, "nll": self.args.nll_batch}.get(name, self.args.train_batch)


def compile_for_sampling(model, args):
    """--sample_compile: this worker samples through util.sampling.compile_sampling."""
    from util.sampling import compile_sampling
    compile_sampling(model, args.compile_scope, mode=args.sample_compile_mode, backend=args.sample_compile_backend)


def compiled_impls(args):
    """(name, checkout, worker arguments, environment) of each --sample_compile scope: this checkout, compiled."""
    scopes = [s for s in (args.sample_compile or "").split(",") if s]
    return [(f"compiled-{scope}", REPO, ["--_compile_scope", scope], None) for scope in scopes]


def log(msg):
    """A measurement as it is taken (stderr): what a run cut short by a time limit still leaves."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- per-level profile
def level_modules(model):
    """(label, module whose .sample to time) for each level, outer first, then the heads."""
    out, level, index = [], model, 0
    while hasattr(level, "generator"):
        gen = level.generator
        seq = getattr(gen, "seq_len", "?")
        out.append((f"level {index}: {type(gen).__name__} ({seq} patches)", gen))
        if hasattr(gen, "guiding_pixel_loss"):
            out.append((f"level {index}: guiding-pixel head", gen.guiding_pixel_loss))
        level, index = level.next_fractal, index + 1
    out.append((f"level {index}: pixel head", level))
    return out


@contextlib.contextmanager
def per_level(model, meter):
    """Wraps each level's `sample` (numerics unchanged) so that stats[label] = [self amount, calls]
    gathers how much `meter()` (a clock, a FLOP count) grows inside it, less the levels inside it.
    Each level is also a torch.profiler.record_function range of that label."""
    stats, stack = {}, []

    def wrap(label, fn):
        def metered_sample(*args, **kwargs):
            start = meter()
            stack.append(0)
            with torch.profiler.record_function(label):
                result = fn(*args, **kwargs)
            total = meter() - start
            children = stack.pop()
            if stack:
                stack[-1] += total
            entry = stats.setdefault(label, [0, 0])
            entry[0] += total - children
            entry[1] += 1
            return result
        return metered_sample

    modules = level_modules(model)
    for label, module in modules:
        module.sample = wrap(label, module.sample)
    try:
        yield [label for label, _ in modules], stats
    finally:
        for _, module in modules:
            del module.sample  # back to the class's method


def profile_levels(workload):
    """Self time per level of one sampling call, then the top ops of another call under
    torch.profiler (a level's "CPU total" there includes the levels inside it)."""
    device = workload.device

    def clock():
        synchronize(device)  # on CUDA this adds syncs, which only the profile pays
        return time.perf_counter()

    with per_level(workload.model, clock) as (labels, stats):
        workload.sample()  # warm-up
        stats.clear()
        total = timed(workload.sample, device)
        rows = [{"level": label, "seconds": stats.get(label, [0.0, 0])[0], "calls": stats.get(label, [0.0, 0])[1]}
                for label in labels]
        with torch.profiler.profile() as prof:
            workload.sample()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50)
    return {"total": total, "levels": rows, "ops": table}


def profile_training(workload, ckpt=False):
    """The top ops of one training step under torch.profiler, after a warm-up step; on CUDA sorted by
    device time, with the number of host syncs (cudaStreamSynchronize and friends) counted."""
    workload.train_step(ckpt)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if workload.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        workload.train_step(ckpt)
        synchronize(workload.device)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if workload.device.type == "cuda" else "self_cpu_time_total"
    counts = {name: sum(e.count for e in events if e.key == name)
              for name in ("aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize")}
    return {"ops": events.table(sort_by=sort, row_limit=25, max_name_column_width=60), "host_syncs": counts}


# ----------------------------------------------------------------------------- worker process
def serve(root, args):
    """Answer one JSON command per stdin line with one JSON line: the parent runs the show."""
    workload = Workload(root, args)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints (progress bars, warnings) must not break the protocol
    params = sum(p.numel() for p in workload.model.parameters())
    print(json.dumps({"ready": True, "params": params, "allocator": workload.allocator,
                      "fixed_mask_levels": workload.fixed_mask_levels, "compiled": workload.compiled}),
          file=out, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op, result = cmd["op"], {}
        if op == "quit":
            break
        if op == "time":
            cpu, calls = time.process_time(), cmd.get("calls", 1)
            result = {"seconds": timed(workload.task(cmd["task"]), workload.device, calls),
                      "cpu_seconds": (time.process_time() - cpu) / calls}
        elif op == "warmup":
            start = time.perf_counter()
            for _ in range(cmd.get("times", 1)):
                workload.task(cmd["task"])()
            result = {"seconds": time.perf_counter() - start}
        elif op == "flops":
            with eager_if(workload.compiled):
                result = {"flops": count_flops(workload.task(cmd["task"]))}
        elif op == "peak":
            dtype = workload.amp or torch.float32
            result = {"flops_per_s": matmul_peak(workload.device, dtype)}
        elif op == "memory":
            with eager_if(workload.compiled and workload.device.type == "cpu"):
                result = dict(zip(("bytes", "method"), peak_train_memory(workload, cmd["ckpt"])))
        elif op == "save_sample":
            torch.save(workload.sample().cpu(), cmd["path"])
        elif op == "train_losses":
            result = {"losses": workload.train_losses(cmd["count"])}
        elif op == "nll_value":
            result = {"nll": float(workload.nll())}
        elif op == "profile":
            result = profile_levels(workload)
        elif op == "profile_train":
            result = profile_training(workload)
        print(json.dumps(result), file=out, flush=True)


class Worker:
    """A worker process for the checkout at `root`, speaking serve()'s protocol."""

    def __init__(self, name, root, argv, env=None):
        self.name, self.root = name, root
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", root] + argv
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root,
                                     env=env)
        self.info = None

    def wait_ready(self):
        self.info = self.read()

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker for {self.name} ({self.root}) died (exit code {self.proc.wait()})")
        return json.loads(line)

    def ask(self, op, **kwargs):
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait()


# ----------------------------------------------------------------------------- the run
def summarize(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run(args, worker_argv):
    tasks = [t for t in args.tasks.split(",") if t]
    impls = [("ours", REPO, [], None)]
    if args.compile:
        impls.append(("ours-compiled", REPO, ["--_compile"], None))
    if args.compare:
        impls.append(compare_impl(args))
    if args.release_like:
        impls.append(("release-like", os.path.abspath(args.release_like), ["--_release_head"], None))
    impls += compiled_impls(args)
    load_before = os.getloadavg()
    workers = []
    try:
        for name, root, extra_argv, env in impls:  # they start (import torch, build the model) side by side
            workers.append(Worker(name, root, worker_argv + extra_argv, env))
        for w in workers:
            w.wait_ready()
        result = {"config": config_summary(args), "load_before": load_before,
                  "params": workers[0].info["params"], "impls": {w.name: w.root for w in workers},
                  "allocator": {w.name: w.info["allocator"] for w in workers},
                  "fixed_mask_levels": {w.name: w.info.get("fixed_mask_levels", 0) for w in workers},
                  "compiled": {w.name: w.info.get("compiled", False) for w in workers}}
        for w in workers:  # first calls: lazy initialisation, allocator growth, compilation
            result.setdefault("warmup_s", {})[w.name] = {}
            for t in tasks:
                calls = max(args.warmup_calls, int(w.name.startswith("compiled-")))  # compiling needs a call
                seconds = w.ask("warmup", task=t, times=calls)["seconds"]
                result["warmup_s"][w.name][t] = seconds
                log(f"warm-up {w.name} {t}: {seconds:.3f} s for {calls} call(s)")
        # short tasks are timed over several calls per measurement, the same number for every implementation
        calls = {t: max(1, math.ceil(args.min_time / max(result["warmup_s"]["ours"][t], 1e-6))) for t in tasks}
        result["calls_per_measurement"] = calls
        times = {w.name: {t: [] for t in tasks} for w in workers}
        cpu_times = {w.name: {t: [] for t in tasks} for w in workers}
        peaks = []
        for rep in range(args.repeats):
            order = workers if rep % 2 == 0 else workers[::-1]  # neither goes first every time
            peaks.append(workers[0].ask("peak")["flops_per_s"])
            for task in tasks:
                for w in order:
                    answer = w.ask("time", task=task, calls=calls[task])
                    times[w.name][task].append(answer["seconds"])
                    log(f"repeat {rep + 1} {w.name} {task}: {answer['seconds']:.4f} s per call")
                    cpu_times[w.name][task].append(answer["cpu_seconds"])
        result["matmul_peak_flops_per_s"] = summarize(peaks)
        result["times"] = {name: {t: summarize(v) | {"all": v, "cpu_median": statistics.median(cpu_times[name][t])}
                                  for t, v in per.items()} for name, per in times.items()}
        result["flops"] = count_all_flops(workers, tasks, args)
        if args.memory and any(t.startswith("train") for t in tasks):
            result["memory"] = {w.name: {t: w.ask("memory", ckpt=t == "train_ckpt")
                                         for t in tasks if t.startswith("train")} for w in workers}
        if len(workers) > 1 and "sample" in tasks and args.same_samples:
            result["same_samples"] = same_samples(workers)
        if len(workers) > 1 and "nll" in tasks:
            result["same_nll"] = same_nll(workers)
        if len(workers) > 1 and args.loss_seeds and any(t.startswith("train") for t in tasks):
            result["train_loss"] = compare_train_losses(workers, args.loss_seeds)
        if args.profile:
            result["profile"] = {w.name: w.ask("profile") for w in workers if not w.name.startswith("compiled-")}
        if args.profile_train:
            result["profile_train"] = {w.name: w.ask("profile_train") for w in workers}
        result["load_after"] = os.getloadavg()
    finally:
        for w in workers:
            w.close()
    return result


def count_all_flops(workers, tasks, args):
    """FLOPs per task and implementation; a compiled one does ours' work (counting would trace its
    graphs again), so it gets ours' count. --level_flops counts sampling on the meta device instead
    (benchmarks/scaling.py: seconds, where counting a real call of a 256×256 model takes minutes)."""
    def count(w, task):
        if task == "sample" and args.level_flops:
            from benchmarks.scaling import level_flops
            per_image = sum(f for _, f in level_flops(args.model, args.cfg, args.num_iter_list)[1])
            return per_image * args.batch
        return w.ask("flops", task=task)["flops"]
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
    first = next(iter(values.values()))
    diff = max(abs(v - first) for v in values.values())
    return {"values": values, "max_abs_diff": diff, "agree": diff < 1e-5}


def compare_impl(args):
    """(name, root, extra worker arguments, environment) of the --compare checkout; the release (see
    release.py) gets its own environment and, unless --mask_ratio says otherwise, fixed mask ratios."""
    from release import is_release, release_env  # benchmarks/ is this script's directory
    root = os.path.abspath(args.compare)
    if not is_release(root):
        return "other", root, [], None
    return "release", root, [], release_env(root, torch.device(args.device).type)


def release_mask_ratio(args):
    """Against the release, the mask ratios are fixed unless --mask_ratio is given: sets the default
    and returns the worker arguments that pass it on."""
    from release import is_release
    if args.mask_ratio is not None or not args.compare or not is_release(os.path.abspath(args.compare)):
        return []
    args.mask_ratio = 0.8
    return ["--mask_ratio", str(args.mask_ratio)]


def fix_mask_ratios_of(workload, args):
    """--mask_ratio: fix the MAR mask ratios of both of the workload's models (release.py says why).
    Returns the number of MAR levels fixed per model (0: each implementation draws its own)."""
    if args.mask_ratio is None:
        return 0
    from release import fix_mask_ratios
    fix_mask_ratios(workload.model, args.mask_ratio, args.nll_mask_ratio)
    return fix_mask_ratios(workload.train_model, args.mask_ratio, args.nll_mask_ratio)


def compile_for_training(model, backend):
    """--compile: the checkout's compile_blocks (ours: models.fractalgen); False where it has none."""
    try:
        from models.fractalgen import compile_blocks
    except ImportError:
        return False
    compile_blocks(model, backend)
    return True


def eager_if(compiled):
    """Compiled code run eagerly: dispatch modes (the FLOP counter, the CPU memory tracker) would make
    dynamo compile again; the FLOPs are the same."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


def compare_train_losses(workers, count):
    """Mean training loss (no step) over `count` seeds per implementation, with its standard error:
    dropout and mask draws differ between implementations, so losses agree only in distribution."""
    out = {}
    for w in workers:
        losses = w.ask("train_losses", count=count)["losses"]
        out[w.name] = {"mean": statistics.mean(losses),
                       "sem": statistics.stdev(losses) / math.sqrt(len(losses)) if len(losses) > 1 else 0.0}
    return out


def config_summary(args):
    return {"model": args.model, "device": args.device, "threads": torch.get_num_threads(), "amp": args.amp,
            "batch": args.batch, "cfg": args.cfg, "cfg_schedule": args.cfg_schedule,
            "num_iter_list": args.num_iter_list, "temperature": args.temperature,
            "train_batch": args.train_batch, "nll_batch": args.nll_batch, "repeats": args.repeats,
            "allocator": args.allocator, "sample_compile": args.sample_compile,
            "sample_compile_mode": args.sample_compile_mode, "mask_ratio": args.mask_ratio,
            "nll_mask_ratio": args.nll_mask_ratio, "loss_seeds": args.loss_seeds, "compile": args.compile,
            "model_kwargs": args.model_kwargs}


# ----------------------------------------------------------------------------- report
def report(result, markdown=False):
    c = result["config"]
    peak = result["matmul_peak_flops_per_s"]
    lines = [f"model {c['model']} ({result['params'] / 1e6:.2f}M params, {c['model_kwargs']}), device {c['device']}, "
             f"threads {c['threads']}, {c['amp']}",
             f"sample: batch {c['batch']}, cfg {c['cfg']} {c['cfg_schedule']}, num_iter_list {c['num_iter_list']}, "
             f"temperature {c['temperature']}; train batch {c['train_batch']}; nll batch {c['nll_batch']}; "
             f"{c['repeats']} interleaved repeats; calls per measurement "
             + ", ".join(f"{t} {n}" for t, n in result["calls_per_measurement"].items()),
             "load average (1, 5, 15 min): before " + " ".join(f"{x:.2f}" for x in result["load_before"])
             + ", after " + " ".join(f"{x:.2f}" for x in result["load_after"]),
             f"matmul peak ({c['amp']}, measured each repeat): median {peak['median'] / 1e9:.1f} GFLOP/s "
             f"[{peak['min'] / 1e9:.1f}, {peak['max'] / 1e9:.1f}]",
             f"malloc (--allocator {c['allocator']}): " + ", ".join(f"{k} {v}" for k, v in result["allocator"].items()),
             mask_ratio_line(result), ""]
    lines += task_table(result, markdown) + [""]
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
        lines.append(f"training loss (no step), mean over {c.get('loss_seeds', '')} seeds ± standard error: " + ", ".join(
            f"{name} {v['mean']:.5f} ± {v['sem']:.5f}" for name, v in result["train_loss"].items()))
    if "same_nll" in result:
        s = result["same_nll"]
        lines.append(f"same NLL for the same batch and seed: {s['agree']} (" + ", ".join(
            f"{name} {v:.6f}" for name, v in s["values"].items()) + f"; max abs diff {s['max_abs_diff']:.2g})")
    for impl, prof in result.get("profile_train", {}).items():
        lines += ["", f"training step profile ({impl}); calls that wait for the device on a GPU: "
                  + ", ".join(f"{k} {v}" for k, v in prof["host_syncs"].items()), prof["ops"]]
    for impl, prof in result.get("profile", {}).items():
        lines += ["", f"sampling profile ({impl}): {prof['total']:.3f} s per call; self time per level"]
        for row in prof["levels"]:
            share = row["seconds"] / prof["total"] if prof["total"] else 0.0
            lines.append(f"  {row['level']:<45} {row['seconds']:8.3f} s {share:6.1%} {row['calls']:7d} calls")
        lines += ["", prof["ops"]]
    return "\n".join(lines)


def mask_ratio_line(result):
    c = result["config"]
    compiled = [name for name, flag in result.get("compiled", {}).items() if flag]
    line = ("MAR masks: each implementation's own random ratio per call" if c.get("mask_ratio") is None else
            f"MAR masks fixed: ceil(seq_len × {c['mask_ratio']}) per sample in training, ceil(seq_len × "
            f"{c['nll_mask_ratio']}) in the NLL (levels fixed: " + ", ".join(
                f"{k} {v}" for k, v in result.get("fixed_mask_levels", {}).items()) + ")")
    return line + ("; compiled blocks (--compile): " + ", ".join(compiled) if compiled else "")


def task_rows(result):
    """Column names and one row of strings per task and implementation."""
    c, times, flops = result["config"], result["times"], result["flops"]
    peak = result["matmul_peak_flops_per_s"]["median"]
    batches = {"sample": c["batch"], "nll": c["nll_batch"], "train": c["train_batch"], "train_ckpt": c["train_batch"]}
    columns = ["task", "impl", "median s", "min s", "max s", "cpu s", "img/s", "GFLOP", "GFLOP/s", "util",
               "speedup", "paired", "peak MiB"]
    rows = []
    for task in times["ours"]:
        for impl in times:
            t = times[impl][task]
            rate = flops[impl][task] / t["median"]
            memory = result.get("memory", {}).get(impl, {}).get(task)
            rows.append([task, impl, f"{t['median']:.4f}", f"{t['min']:.4f}", f"{t['max']:.4f}",
                         f"{t['cpu_median']:.3f}", f"{batches[task] / t['median']:.2f}",
                         f"{flops[impl][task] / 1e9:.2f}", f"{rate / 1e9:.1f}", f"{rate / peak:.1%}",
                         "" if impl == "ours" else f"{t['median'] / times['ours'][task]['median']:.2f}x",
                         "" if impl == "ours" else f"{paired_speedup(t['all'], times['ours'][task]['all']):.2f}x",
                         f"{memory['bytes'] / 2 ** 20:.1f}" if memory else ""])
    return columns, rows


def paired_speedup(theirs, ours):
    """Median over repeats of their time / ours, each pair measured back to back: steadier than the
    ratio of medians when the machine's speed drifts during the run."""
    return statistics.median(t / o for t, o in zip(theirs, ours))


def task_table(result, markdown=False):
    """The task rows as aligned text, or as a markdown table."""
    columns, rows = task_rows(result)
    if markdown:
        return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
               ["| " + " | ".join(row) + " |" for row in rows]
    widths = [max(len(x) for x in col) for col in zip(columns, *rows)]

    def line(row):
        return "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths)))
    return [line(columns), "-" * len(line(columns))] + [line(r) for r in rows]


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fractalmar_small_in32", help="a name in models.fractalgen.MODELS")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--amp", default="fp32", choices=list(AMP_DTYPES), help="autocast dtype for all tasks")
    p.add_argument("--class_num", type=int, default=10)
    p.add_argument("--num_conds", type=int, default=None, help="default: 5 for MAR-first models, else 1")
    p.add_argument("--guiding_pixel", action="store_true")
    p.add_argument("--batch", type=int, default=8, help="images per sampling call")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--cfg_schedule", default="linear", choices=["linear", "constant"])
    p.add_argument("--num_iter_list", default="16,8")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--filter_threshold", type=float, default=1e-4)
    p.add_argument("--train_batch", type=int, default=16)
    p.add_argument("--nll_batch", type=int, default=16)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min_time", type=float, default=0.5,
                   help="seconds: each measurement of a shorter task averages that many calls (set from ours' first call)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", default=None, metavar="PATH",
                   help="another FractalGen checkout (same models/ layout), timed interleaved with ours")
    p.add_argument("--release_like", default=None, metavar="PATH",
                   help="also time the checkout at PATH with the release's per-pixel head work (the whole head "
                        "sequence again for each channel in sampling, 4 tokens in training and NLL; see "
                        "benchmarks/release_like.py)")
    p.add_argument("--mask_ratio", type=float, default=None,
                   help="fix every MAR level's training mask ratio (and --nll_mask_ratio for the NLL) in every "
                        "implementation, so that calls do the same work (benchmarks/release.py); default 0.8 "
                        "when --compare is the release, else each implementation's own draws")
    p.add_argument("--nll_mask_ratio", type=float, default=0.5)
    p.add_argument("--loss_seeds", type=int, default=8,
                   help="with --compare: compare mean training losses over this many seeds (0: skip)")
    p.add_argument("--compile", action="store_true",
                   help="also time ours with torch.compile'd transformer blocks in training (main_fractalgen.py "
                        "--compile), as implementation ours-compiled")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend for --compile")
    p.add_argument("--allocator", default="own", choices=["own", "default"],
                   help="own: each implementation sets up malloc as its CLI does on the CPU (ours keeps freed memory, "
                        "util.misc.keep_freed_memory); default: glibc's defaults for all, to compare the code alone")
    p.add_argument("--profile", action="store_true", help="per-level sampling time and the top ops")
    p.add_argument("--sample_compile", default=None, metavar="SCOPES",
                   help="also time this checkout sampling through util.sampling.compile_sampling, one worker "
                        "per comma-separated scope (head, inner); `same samples` then compares them with eager")
    p.add_argument("--sample_compile_mode", default=None,
                   help="torch.compile mode for --sample_compile (default: reduce-overhead on CUDA, else default)")
    p.add_argument("--sample_compile_backend", default="inductor",
                   help="torch.compile backend for --sample_compile (aot_eager: capture only, to check the script)")
    p.add_argument("--level_flops", action="store_true",
                   help="sampling FLOPs from benchmarks/scaling.py (meta device, the released models' settings: "
                        "1000 classes, guiding pixel at 256×256) instead of counting a real call")
    p.add_argument("--no_same_samples", dest="same_samples", action="store_false",
                   help="skip the check that all implementations draw the same samples (one more call each)")
    p.add_argument("--warmup_calls", type=int, default=1,
                   help="untimed calls per task first; 0 (with --min_time 0) times the first call of a long "
                        "task, lazy initialisation included; compiled workers always make one (compiling, "
                        "recording CUDA graphs)")
    p.add_argument("--profile_train", action="store_true", help="the top ops of one training step (torch.profiler)")
    p.add_argument("--no_memory", dest="memory", action="store_false",
                   help="skip the peak training memory (one slow tracked step per setting on CPU)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the raw results here")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_weights", dest="weights", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_release_head", dest="release_head", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_compile_scope", dest="compile_scope", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_compile", dest="compile_worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args):
    """Fill in what follows from the model name: its architecture and constructor arguments."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.num_iter_list = [int(x) for x in str(args.num_iter_list).split(",")]
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args._worker:
        args = resolve(args)
        args.config, args.model_kwargs = json.loads(os.environ["FRACTALGEN_BENCH_CONFIG"])
        return serve(args._worker, args)
    args = resolve(args)
    argv = argv + release_mask_ratio(args)
    sys.path.insert(0, REPO)
    from models.fractalgen import MODELS  # ours: the architecture by name
    if args.model not in MODELS:
        raise SystemExit(f"unknown model {args.model!r}; valid names: {', '.join(MODELS)}")
    args.config = {k: list(v) for k, v in MODELS[args.model].config.items()}
    mar_first = args.config["generator_type_list"][0] == "mar"
    args.model_kwargs = dict(class_num=args.class_num, guiding_pixel=args.guiding_pixel,
                             num_conds=args.num_conds or (5 if mar_first else 1))
    os.environ["FRACTALGEN_BENCH_CONFIG"] = json.dumps([args.config, args.model_kwargs])
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.pth")
        torch.manual_seed(args.seed)
        import models.fractalgen as fractalgen
        torch.save(fractalgen.FractalGen(**args.config, **args.model_kwargs).state_dict(), weights)
        result = run(args, argv + ["--_weights", weights])
    print(report(result, args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
