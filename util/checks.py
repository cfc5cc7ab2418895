"""Every numeric flag, the device and the output folder, checked before anything is read or written, so that
a bad value is one line (a UserError) instead of a traceback, or a crash after hours of work, or a run
that reports success having done nothing."""
import math
import os

import torch

from util.misc import UserError

# flag: smallest allowed value (counts)
COUNTS = {"batch_size": 1, "epochs": 0, "img_size": 1, "num_images": 1, "eval_freq": 1, "save_last_freq": 1,
          "save_every_steps": 0, "gen_bsz": 1, "nll_bsz": 1, "nll_forward_number": 1, "warmup_epochs": 0,
          "num_conds": 1, "class_num": 1, "print_freq": 1, "seed": 0, "start_epoch": 0, "num_workers": 0,
          "final_samples": 0}
# flag: (low, high, whether low itself is allowed, whether high is); None = unbounded
RANGES = {"blr": (0, None, False, False), "lr": (0, None, False, False), "min_lr": (0, None, True, False),
          "weight_decay": (0, None, True, False), "cfg": (0, None, True, False),
          "temperature": (0, None, False, False), "filter_threshold": (0, 1, True, True),
          "label_drop_prob": (0, 1, True, True), "r_weight": (0, None, True, False),
          "grad_clip": (0, None, True, False), "attn_dropout": (0, 1, True, False),
          "proj_dropout": (0, 1, True, False)}
MAX_SEED = 2 ** 32 - 1 - 1024  # numpy seeds must be < 2**32, and each rank adds its rank


def default_device():
    """--device's default: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_precision(device):
    """--precision's default: fp16 on CUDA (with a gradient scaler in training, as released), fp32 elsewhere."""
    return "fp16" if str(device).startswith("cuda") else "fp32"


def check_flags(args):
    """Counts, rates and scales, --num_iter_list, --device and the output folders."""
    for flag, low in COUNTS.items():
        value = getattr(args, flag, None)
        if isinstance(value, int) and value < low:  # (a non-integer, e.g. "auto", is resolved elsewhere)
            raise UserError(f"--{flag} must be {'at least 1' if low else 'zero or more'}, got {value}")
    evaluates = args.evaluate_gen or args.evaluate_nll or getattr(args, "final_nll", False)
    if args.epochs == 0 and not (evaluates or getattr(args, "final_samples", 0)):
        raise UserError("--epochs 0 trains nothing; pass the number of epochs to train to (or --evaluate_nll / "
                        "--evaluate_gen to evaluate a checkpoint)")
    if args.seed > MAX_SEED:
        raise UserError(f"--seed must be below {MAX_SEED}, got {args.seed}")
    for flag, (low, high, low_ok, high_ok) in RANGES.items():
        value = getattr(args, flag, None)
        if value is not None and not in_range(value, low, high, low_ok, high_ok):
            raise UserError(f"--{flag} must be {describe_range(low, high, low_ok, high_ok)}, got {value}")
    args.num_iter = parse_num_iter(args.num_iter_list)
    check_device(args.device)
    training = not (args.evaluate_gen or args.evaluate_nll)
    if training and args.epochs and args.start_epoch >= args.epochs:
        raise UserError(f"--start_epoch {args.start_epoch} is not below --epochs {args.epochs}: nothing to train")
    for flag in ("output_dir", "log_dir"):
        check_writable_folder(flag, getattr(args, flag, None))
    if args.fid_inception_weights and not os.path.isfile(args.fid_inception_weights):
        raise UserError(f"--fid_inception_weights {args.fid_inception_weights} does not exist")


def check_writable_folder(flag, folder):
    """A folder that exists, or can be made, and can be written in."""
    if folder is None:
        return
    if not folder:
        raise UserError(f"--{flag} is empty; name a folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--{flag} {folder} is a file, not a folder; choose another --{flag}")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--{flag} {folder}: {existing} is a file, so the folder cannot be made; choose another "
                        f"--{flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--{flag} {folder}: no permission to write in {existing}; choose another --{flag}")


def in_range(value, low, high, low_ok, high_ok):
    if not math.isfinite(value):
        return False
    return (value >= low if low_ok else value > low) and (high is None or (value <= high if high_ok else value < high))


def describe_range(low, high, low_ok, high_ok):
    if high is None:
        return f"a finite number {'>=' if low_ok else '>'} {low}"
    return f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"


def parse_num_iter(text, levels=None, model=None):
    """--num_iter_list as a list of step counts, each at least 1; with `levels`, exactly that many (one per
    generator level of `model`, a name for the message)."""
    try:
        steps = [int(n) for n in text.split(",")]
    except ValueError:
        raise UserError(f"--num_iter_list must be comma-separated integers, got {text!r}") from None
    if min(steps) < 1:
        raise UserError(f"every entry of --num_iter_list must be at least 1 (a level with no steps generates "
                        f"nothing), got {text!r}")
    if levels is not None and len(steps) != levels:
        raise UserError(f"--num_iter_list needs {levels} values for {model}, got {text!r}")
    return steps


def check_device(name):
    """A device this machine has: 'cpu', 'cuda', 'cuda:1', 'mps', ..."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise UserError(f"--device {name}: no {device.type} device on this machine (is PyTorch built with it and "
                        "the driver installed?); use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise UserError(f"--device {name}: this machine has {count} {device.type} device(s), numbered from 0")
