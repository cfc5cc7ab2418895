"""Distributed set-up, progress logging, atomic writes, the output folder's lock and results files."""
import atexit
import contextlib
import ctypes
import datetime
import errno
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
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
        leave_process_groups()


# ----------------------------------------------------------------------------- distributed
DIST_TIMEOUT_MINUTES = 30.0  # --dist_timeout's default (gloo's own default; NCCL's is 10 minutes)
# How long the other ranks wait for work that rank 0 does alone (a checkpoint written to a busy shared disk,
# a generation folder cleaned): they wait on a gloo group of their own, not under --dist_timeout.
RANK0_WAIT = datetime.timedelta(hours=4)
_rank0_group = None


def init_distributed_mode(device_name, dist_on_itp=False, dist_url="env://", timeout_minutes=DIST_TIMEOUT_MINUTES):
    """Join the process group that torchrun, OpenMPI (--dist_on_itp) or SLURM's srun started, and return this
    process's device (on CUDA, its local GPU); a plain `python main_fractalgen.py` runs as one process.
    NCCL on CUDA, gloo on CPU; a collective that waits longer than `timeout_minutes` for a rank fails."""
    env = os.environ
    if dist_on_itp:
        rank, world_size = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local_rank = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        dist_url = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        env.update(LOCAL_RANK=str(local_rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    elif "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world_size, local_rank = slurm_ranks(env)
    else:
        return torch.device(device_name)
    use_cuda = device_name.startswith("cuda")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device(device_name)
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # torchrun keeps one key-value store across the restarts of --max-restarts; keys of the attempt
    # that died (such as a dead worker's address) would be read as current, so each attempt gets its own
    store, _, _ = next(dist.rendezvous(dist_url, rank=rank, world_size=world_size))
    store = dist.PrefixStore(f"fractalgen/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=store, world_size=world_size, rank=rank,
                            timeout=timeout)
    global _rank0_group
    _rank0_group = dist.new_group(backend="gloo", timeout=max(RANK0_WAIT, timeout))
    dist.barrier()
    return device


def slurm_ranks(env):
    """(rank, world size, local rank) of a process that `srun` started, with RANK, WORLD_SIZE and LOCAL_RANK
    exported, and MASTER_ADDR (the job's first host) and MASTER_PORT (from the job id) unless already set."""
    rank, world_size, local_rank = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    if "MASTER_ADDR" not in env:
        host = first_slurm_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        if host is None:
            raise UserError("cannot tell the first host of this SLURM job (no SLURM_JOB_NODELIST): set MASTER_ADDR "
                            "and MASTER_PORT (e.g. export MASTER_ADDR=$(hostname) MASTER_PORT=29500 before srun)")
        env["MASTER_ADDR"] = host
    if "MASTER_PORT" not in env:
        if not env.get("SLURM_JOB_ID", "").isdigit():
            raise UserError("cannot derive a port from this SLURM job (no SLURM_JOB_ID): set MASTER_ADDR and "
                            "MASTER_PORT (e.g. export MASTER_PORT=29500 before srun)")
        env["MASTER_PORT"] = str(slurm_port(int(env["SLURM_JOB_ID"])))
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    return rank, world_size, local_rank


def slurm_port(job_id):
    """The job's port: the same on every node of a job, different for jobs that may share a node."""
    return 15000 + job_id % 20000


def first_slurm_host(nodelist):
    """The first host of a SLURM node list: `scontrol show hostnames` where it exists, otherwise parsed
    (forms like `node[01-04,07],gpu3`, `a-[1-2]-x`); None for an empty list."""
    if not nodelist:
        return None
    if shutil.which("scontrol"):
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                   timeout=30, check=True).stdout.split()
            if hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError):
            pass
    first = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist)
    prefix, ranges, suffix = first.groups()
    if ranges is None:
        return prefix or None
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


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


def leave_process_groups():
    """Destroy every process group and drop our reference to the rank-0 group, so that their gloo worker
    threads are joined now: a group still alive at interpreter shutdown aborts the process there
    ("terminate called without an active exception") when a worker thread is releasing the tensors of its
    last operation and cannot take the GIL."""
    global _rank0_group
    if is_dist():
        dist.destroy_process_group()
    _rank0_group = None
    gc.collect()


def share_from_rank0(value):
    """Rank 0's `value` on every rank. The others wait for it on a group of their own with a long timeout
    (RANK0_WAIT): call it after work that rank 0 does alone, so that their wait is not bounded by --dist_timeout."""
    if not is_dist():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_rank0_group)
    return box[0]


def stop_unless_all(error):
    """Each rank passes its error message or None; if any rank has one, every rank raises a UserError with
    the first one (so that no rank goes on alone into a collective that would wait for the others)."""
    if not is_dist():
        errors = [error]
    else:
        errors = [None] * get_world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise UserError(first)


def check_shared_folder(folder, what="--output_dir"):
    """Every rank sees the `folder` that rank 0 sees, and can write in it; otherwise every rank stops with
    one line naming the host and the folder (a node whose --output_dir is a disk of its own would write
    its files where rank 0 never sees them)."""
    path = None
    if is_main_process():  # written before its name is shared, so that it exists when the others look
        path = os.path.join(folder, f".fractalgen-shared-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}")
        with open(path, "w") as f:
            f.write("written by rank 0 to check that every rank sees this folder\n")
    path = os.path.join(folder, os.path.basename(share_from_rank0(path)))
    error = None
    deadline = time.time() + 3  # a new name is looked up afresh even on NFS; a little grace for slower ones
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.2)
    if not os.path.exists(path):
        error = "it does not see a file that rank 0 has just written there"
    else:
        probe = os.path.join(folder, f".fractalgen-write-{socket.gethostname()}-{os.getpid()}")
        try:
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            error = f"it cannot write there ({e.strerror or e})"
    if error:
        error = (f"{socket.gethostname()} (rank {get_rank()}) does not share {what} {folder} with rank 0: {error}; "
                 "--output_dir must be on a disk every node shares")
    try:
        stop_unless_all(error)
    finally:
        if is_main_process():
            os.remove(path)


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
# Where flock does not work (Lustre or NFS mounted without it: ENOLCK, ENOSYS, EOPNOTSUPP), the lock is
# this file's existence instead (made with O_EXCL, which NFS keeps atomic), holding host, pid and start time.
LOCK_FILE_NAME = ".fractalgen.lockfile"
_held_locks = {}  # folder -> the open flock file, or the path and text of the lock file we made
atexit.register(lambda: [release_output_dir(folder) for folder in list(_held_locks)])


def lock_output_dir(folder):
    """One run per output folder: an fcntl lock on a file in it, held until release_output_dir or the
    process's end (the OS drops it when the process dies, also by SIGKILL); calling it again in the same
    process keeps it. Where flock is not supported, a lock file (LOCK_FILE_NAME) instead. Rank 0 takes it;
    every rank learns whether it succeeded. A second run gets a UserError naming the folder and the holder."""
    error = share_from_rank0(_take_lock(folder) if is_main_process() else None)
    if error:
        raise UserError(error)


def _open_nofollow(path, flags):
    """os.open that refuses a symbolic link (a lock must never write through one to another file)."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)


def _symlink_error(path):
    return f"{path} is a symbolic link; remove it (the lock is a plain file there) and run the same command again"


def _held_message(holder, folder):
    return (f"another run (pid {holder}) is using --output_dir {folder}; wait for it to end, stop it, or "
            "choose another --output_dir")


def _take_lock(folder):
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return None
    path = os.path.join(folder, LOCK_NAME)
    held = _held_locks.get(os.path.abspath(folder))
    if held is not None:  # main() called again in this process: keep the lock if its file is still there
        if _still_held(held, path):
            return None
        release_output_dir(folder)
    try:
        fd = _open_nofollow(path, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return _symlink_error(path)
        raise
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # held by another process
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            return _held_message(holder, folder)
        f.close()  # ENOLCK, ENOSYS, EOPNOTSUPP, ...: this file system does not lock; never a false refusal
        return _take_lock_file(folder)
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} on {socket.gethostname()}\n")
        f.flush()
    except OSError as e:
        os.remove(path)  # ours while we hold it: no empty lock file stays behind
        with contextlib.suppress(OSError):  # closing flushes the line that did not fit again
            f.close()
        if disk_full(e):
            return f"disk full in --output_dir {folder}: free space there and run the same command again"
        raise
    _held_locks[os.path.abspath(folder)] = f
    return None


def _still_held(held, path):
    if isinstance(held, tuple):  # our lock file: still there with our text
        return _read_lock_file(held[0]) == held[1]
    return os.path.exists(path) and os.path.samestat(os.fstat(held.fileno()), os.stat(path))


def _process_start(pid):
    """When process `pid` started, in clock ticks since boot (None where /proc does not say): tells a live
    holder from a new process that got a dead holder's pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid, start):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _read_lock_file(path):
    try:
        fd = _open_nofollow(path, os.O_RDONLY)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    with os.fdopen(fd) as f:
        return f.read()


def _take_lock_file(folder, attempts=3):
    """The lock as a file made with O_EXCL. One of a dead process on this host (or one left empty by a
    writer killed at once) is taken over with a line saying so; one of another host is respected."""
    path, host = os.path.join(folder, LOCK_FILE_NAME), socket.gethostname()
    for _ in range(attempts):
        text = json.dumps({"host": host, "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        try:
            fd = _open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno == errno.ELOOP:
                return _symlink_error(path)
            raise
        else:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            _held_locks[os.path.abspath(folder)] = (path, text)
            return None
        try:
            old = _read_lock_file(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return _symlink_error(path)
            raise
        if old is None:  # released meanwhile
            continue
        try:
            holder = json.loads(old)
            stale = holder["host"] == host and (holder["pid"] == os.getpid() or
                                                not _alive(holder["pid"], holder.get("process_start")))
            who = f"{holder['pid']} on {holder['host']}, since {holder.get('since', '?')}"
        except (ValueError, KeyError, TypeError):  # empty or cut short: its writer died at once, or is writing now
            stale = time.time() - os.stat(path, follow_symlinks=False).st_mtime > 60
            who = "unknown"
        if not stale:
            return _held_message(who, folder) + f" (if that run is gone, remove {path})"
        try:  # renamed away first: of two processes taking it over, one wins the O_EXCL create
            os.rename(path, f"{path}.stale.{os.getpid()}")
        except FileNotFoundError:
            continue
        os.remove(f"{path}.stale.{os.getpid()}")
        print(f"Took over the lock {path} of pid {who}: that process is gone", flush=True)
    return _held_message("unknown", folder) + f" (the lock file {path} keeps changing)"


def release_output_dir(folder):
    held = _held_locks.pop(os.path.abspath(folder), None)
    if isinstance(held, tuple):  # our lock file: removed if it is still ours
        path, text = held
        try:
            if _read_lock_file(path) == text:
                os.remove(path)
        except OSError:
            pass
    elif held is not None:
        held.close()  # closing the file drops the lock


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
