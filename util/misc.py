"""Distributed set-up, progress logging, checkpoints and results files."""
import argparse
import ctypes
import datetime
import json
import os
import time

import torch
import torch.distributed as dist


def keep_freed_memory(mmap_threshold=256 << 20, trim_threshold=256 << 20):
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    Eager PyTorch on the CPU allocates and frees tensors of megabytes at every op. By default glibc
    returns such blocks to the OS (fresh mmaps for large ones, trimming the heap's free top), and the
    next allocation page-faults every page back in: 65-95 thousand page faults per sampling call of
    fractalmar_small_in32 on our CPU VMs, about a tenth of its time (benchmarks/README.md). Here
    blocks up to `mmap_threshold` come from the heap and up to `trim_threshold` of free heap top is
    kept; peak memory grows little (the demo's: 1.50 to 1.60 GB). Does nothing outside glibc.
    Returns whether it applied.
    """
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"; absent on macOS, Windows, musl
    except (AttributeError, ValueError, OSError):
        libc = ""
    if not libc.startswith("glibc"):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    mallopt = ctypes.CDLL(None).mallopt
    # setting either one turns off glibc's own threshold tuning, so set the trim threshold only
    # once the mmap threshold is in place (a lone trim threshold would leave every large block mmapped)
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


class UserError(ValueError):
    """A bad input or setting: reported as one line that says what to do, without a traceback."""


# ----------------------------------------------------------------------------- distributed
def init_distributed_mode(args):
    """Set args.rank / world_size / gpu / distributed from torchrun, OpenMPI (--dist_on_itp) or SLURM;
    a plain `python main_fractalgen.py` runs as one process. NCCL on CUDA, gloo on CPU."""
    env = os.environ
    if args.dist_on_itp:
        args.rank, args.world_size = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        args.gpu = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        args.dist_url = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        env.update(LOCAL_RANK=str(args.gpu), RANK=str(args.rank), WORLD_SIZE=str(args.world_size))
    elif "RANK" in env and "WORLD_SIZE" in env:
        args.rank, args.world_size, args.gpu = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        args.rank, args.world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        args.gpu = args.rank % max(torch.cuda.device_count(), 1)
    else:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        return
    args.distributed = True
    use_cuda = args.device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    # torchrun keeps one key-value store across the restarts of --max-restarts; keys of the attempt
    # that died (such as a dead worker's address) would be read as current, so each attempt gets its own
    store, _, _ = next(dist.rendezvous(args.dist_url, rank=args.rank, world_size=args.world_size))
    store = dist.PrefixStore(f"fractalgen/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=store,
                            world_size=args.world_size, rank=args.rank)
    dist.barrier()


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum over ranks (in place), returning the tensor."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_ranks_ok(ok, device):
    """True only if `ok` holds on every rank (so that all ranks stop together)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    return all_reduce_sum(flag).item() == 0


def autocast(device, precision):
    """Mixed precision for the forward pass: fp16 or bf16 autocast, or none for fp32."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


# ----------------------------------------------------------------------------- logging
class ProgressLogger:
    """Prints `header [step/total] eta loss lr img/s mem` every `print_freq` steps (rank 0 only)."""

    def __init__(self, total, header, print_freq=20, batch_size=1, first_step=0):
        self.total, self.header, self.print_freq, self.batch_size = total, header, print_freq, batch_size
        self.first_step = first_step  # a resumed epoch starts here: speed and eta count from it
        self.start = self.last = time.time()
        self.sums, self.count = {}, 0

    def update(self, step, device, **values):
        self.count += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if not is_main_process() or (step % self.print_freq and step != self.total - 1):
            return
        now = time.time()
        per_step = (now - self.start) / (step + 1 - self.first_step)
        eta = datetime.timedelta(seconds=int(per_step * (self.total - step - 1)))
        shown = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        line = f"{self.header} [{step + 1}/{self.total}]  eta {eta}  {shown}  {self.batch_size / per_step:.1f} img/s"
        if device.type == "cuda":
            line += f"  mem {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MB"
        print(line, flush=True)

    def averages(self):
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


# ----------------------------------------------------------------------------- files
def atomic_save(obj, path):
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    folder, name = os.path.split(os.path.abspath(path))
    for stale in os.listdir(folder):  # left by a writer that was killed: the next write replaces them
        if stale.startswith(f"{name}.tmp."):
            os.remove(os.path.join(folder, stale))
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_states(device):
    """This rank's random state (dropout, label drop, MAR masks), gathered from every rank."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if not is_dist():
        return [state]
    states = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(states, device):
    """Put back this rank's random state from a checkpoint; False if the number of ranks changed."""
    if not states or len(states) != get_world_size():
        return False
    state = states[get_rank()]
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    return True


def save_checkpoint(args, model_without_ddp, optimizer, scaler, epoch, device, resume_at=None):
    """output_dir/checkpoint-last.pth, written atomically by rank 0 (every rank must call it).

    The release's keys {model, optimizer, epoch, scaler, args}, with `epoch` the last finished epoch,
    so the release resumes it at the next whole epoch; plus every rank's random state and, for a
    checkpoint taken inside an epoch, `resume_at` = {epoch, step, consumed}: the epoch under way, the
    step to run next and how many of the epoch's images all ranks have trained on."""
    path = os.path.join(args.output_dir, "checkpoint-last.pth")
    rng = rng_states(device)
    if is_main_process():
        ckpt = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "scaler": scaler.state_dict(), "args": args, "rng": rng}
        if resume_at is not None:
            ckpt["resume_at"] = resume_at
        atomic_save(ckpt, path)
    return path


def load_checkpoint(path):
    """Read a checkpoint (ours or the release's); a truncated or foreign file is a UserError."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first, or point --resume (or the path) at the folder "
                        "or file that holds it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "it may be truncated: restore it or point --resume elsewhere") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a FractalGen checkpoint (no 'model' entry)")
    return ckpt


def load_model_state(model, state_dict, path):
    """Strict load with a message naming the keys that differ, for a checkpoint of another model."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    mismatched = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
    if missing or unexpected or mismatched:
        def few(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        parts = [f"{label}: {few(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape differs", mismatched)) if keys]
        raise UserError(f"checkpoint {path} does not match this model ({'; '.join(parts)}); "
                        "check --model, --num_conds, --guiding_pixel and --class_num")
    model.load_state_dict(state_dict, strict=True)


def update_results(output_dir, **results):
    """Merge `results` into output_dir/results.json (rank 0, written atomically)."""
    if not is_main_process():
        return
    path = os.path.join(output_dir, "results.json")
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update(results)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
