"""Distributed set-up, progress logging, atomic writes, the output folder's lock and results files."""
import atexit
import contextlib
import ctypes
import datetime
import errno
import json
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

import util.stop as stop


def keep_freed_memory(mmap_threshold=256 << 20, trim_threshold=256 << 20):
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    Eager PyTorch on the CPU allocates and frees tensors of megabytes at every op; with glibc's defaults
    each such block goes back to the OS and page-faults back in at the next allocation (measured in
    benchmarks/README.md). Here blocks up to `mmap_threshold` come from the heap and up to
    `trim_threshold` of free heap top is kept. Does nothing outside glibc; returns whether it applied.
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


def run_command(work):
    """Run a command's `work()` and return its exit code: 0, or 2 after a UserError printed as one line,
    or 143/130 after a stop signal (SIGTERM, Ctrl-C) with its line. Every command's __main__ calls it."""
    previous = signal.getsignal(signal.SIGTERM)
    stop.install()
    try:
        work()
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except stop.Stopped as e:
        if is_main_process():
            print(e, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("stopped by Ctrl-C", file=sys.stderr)
        return stop.EXIT_CODES[signal.SIGINT]
    finally:
        signal.signal(signal.SIGTERM, previous)
        if is_dist():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- distributed
def init_distributed_mode(device_name, dist_on_itp=False, dist_url="env://"):
    """Join the process group that torchrun, OpenMPI (--dist_on_itp) or SLURM started, and return this
    process's device (on CUDA, its local GPU); a plain `python main_fractalgen.py` runs as one process.
    NCCL on CUDA, gloo on CPU."""
    env = os.environ
    if dist_on_itp:
        rank, world_size = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local_rank = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        dist_url = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        env.update(LOCAL_RANK=str(local_rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    elif "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = rank % max(torch.cuda.device_count(), 1)
    else:
        return torch.device(device_name)
    use_cuda = device_name.startswith("cuda")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device(device_name)
    if use_cuda:
        torch.cuda.set_device(device)
    # torchrun keeps one key-value store across the restarts of --max-restarts; keys of the attempt
    # that died (such as a dead worker's address) would be read as current, so each attempt gets its own
    store, _, _ = next(dist.rendezvous(dist_url, rank=rank, world_size=world_size))
    store = dist.PrefixStore(f"fractalgen/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=store, world_size=world_size, rank=rank)
    dist.barrier()
    return device


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


def all_reduce_max(tensor):
    """Maximum over ranks (in place), returning the tensor."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_ranks_ok(ok, device):
    """True only if `ok` holds on every rank (so that all ranks stop together)."""
    return all_reduce_max(torch.tensor([0.0 if ok else 1.0], device=device)).item() == 0


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
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # no space, or over quota


@contextlib.contextmanager
def write_atomically(path, sync=True):
    """Yield a binary file that replaces `path` only once completely written (fsynced first when `sync`,
    so a power loss cannot leave an empty file behind the new name). On any failure this writer's
    temporary file is removed and `path` is left as it was; a full disk is a UserError naming the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        # never through a symlink planted at the temporary name: the new file replaces `path` itself
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o644), "wb") as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if disk_full(e):
            raise UserError(f"disk full while writing {path}: free space in {folder} and run the same command "
                            f"again (the file it replaces, if any, is unchanged)") from None
        raise
    if sync:
        sync_folder(folder)


def disk_full(error):
    """Whether `error`, or an error it was raised from, is a full disk: libraries wrap the OSError (torch.save
    raises RuntimeError "unexpected pos" from its zip writer, with the OSError as its context)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return True
        error = error.__cause__ or error.__context__
    return False


def sync_folder(folder):
    """fsync a folder, so that a rename in it survives a power loss (a no-op where folders can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder, names):
    """Remove `name.tmp.<pid>` files left in `folder` by a killed writer; call it only while holding the
    folder's lock, so that no live writer's file is among them."""
    for f in os.listdir(folder):
        if any(f.startswith(f"{name}.tmp.") for name in names):
            os.remove(os.path.join(folder, f))


LOCK_NAME = ".fractalgen.lock"
_held_locks = {}
atexit.register(lambda: [release_output_dir(folder) for folder in list(_held_locks)])


def lock_output_dir(folder):
    """One run per output folder: an fcntl lock on a file in it, held until release_output_dir or the
    process's end (the OS drops it when the process dies, also by SIGKILL); calling it again in the same
    process keeps it. Rank 0 takes it; every rank learns whether it succeeded. A second run gets a
    UserError naming the folder and the holder's pid."""
    error = None
    if is_main_process():
        error = _take_lock(folder)
    if is_dist():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)


def _take_lock(folder):
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return None
    path = os.path.join(folder, LOCK_NAME)
    held = _held_locks.get(os.path.abspath(folder))
    if held is not None:  # main() called again in this process: keep the lock if its file is still there
        if os.path.exists(path) and os.path.samestat(os.fstat(held.fileno()), os.stat(path)):
            return None
        release_output_dir(folder)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        return (f"another run (pid {holder}) is using --output_dir {folder}; wait for it to end, stop it, or "
                "choose another --output_dir")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held_locks[os.path.abspath(folder)] = f
    return None


def release_output_dir(folder):
    f = _held_locks.pop(os.path.abspath(folder), None)
    if f is not None:
        f.close()  # closing the file drops the lock


def update_results(output_dir, **results):
    """Merge `results` into output_dir/results.json (rank 0, written atomically)."""
    if not is_main_process():
        return
    path = os.path.join(output_dir, "results.json")
    data = read_json(path) or {}
    data.update(results)
    with write_atomically(path) as f:
        f.write(json.dumps(data, indent=2).encode())


def read_json(path):
    """The dict in the JSON file `path` that this code wrote, or None where there is none. A damaged file (cut
    short, empty, not a dict, a symlink: never read through) is renamed aside, with a line saying so, so that
    the result about to be written is not lost to it and the old bytes are kept."""
    if not os.path.lexists(path):
        return None
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | NOFOLLOW)) as f:
            data = json.load(f)
        if isinstance(data, dict):
            return data
        problem = f"holds a {type(data).__name__}, not a dict"
    except (OSError, ValueError) as e:
        problem = "is a symlink" if os.path.islink(path) else f"does not read as JSON ({e})"
    aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, aside)
    print(f"{path} {problem}: moved it to {aside} and writing a new one", flush=True)
    return None
