"""Command-line flags shared by every command: value types that check a flag's range where the flag is
defined, the sampling and device flags of main_fractalgen.py, util.sample and util.edit (defined once
here), and a parser whose errors are UserErrors, so that each command reports every bad input as one line."""
import argparse
import math
import os
import re

import torch

from util.misc import UserError

MAX_SEED = 2 ** 32 - 1 - 1024  # numpy seeds must be < 2**32, and each rank adds its rank


class Parser(argparse.ArgumentParser):
    """argparse, with its errors (a bad value, an unknown flag) raised as UserError: the command prints
    them as one line and exits with code 2, like every other bad input."""

    def error(self, message):
        flag = re.match(r"argument ([^ :]+): (.*)", message, flags=re.S)  # "argument --x: msg" -> "--x msg"
        raise UserError(f"{' '.join(flag.groups()) if flag else message} (see --help)")


# ----------------------------------------------------------------------------- value types
def count(low=1, high=None):
    """An integer of at least `low` (1: a number of things; 0: zero means off or none), at most `high`."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {'at least 1' if low else 'zero or more'}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value
    parse.__name__ = "count"  # argparse names the type in its messages
    return parse


def number(low, high=None, low_ok=True, high_ok=False):
    """A finite float in the range from `low` to `high` (None: unbounded), each end included or not."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        inside = math.isfinite(value) and (value >= low if low_ok else value > low) and (
            high is None or (value <= high if high_ok else value < high))
        if not inside:
            where = (f"a finite number {'>=' if low_ok else '>'} {low}" if high is None else
                     f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}")
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def seed(text):
    """A random seed: 0 or more and small enough that every rank's (seed + rank) is a numpy seed."""
    value = count(0)(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be below {MAX_SEED}, got {value}")
    return value


def int_list(text):
    """Comma-separated integers, e.g. class indices."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None


def num_iter_list(text):
    """--num_iter_list as the text it was given, once every entry is an integer of at least 1 (the
    number of entries depends on the model: see parse_num_iter)."""
    steps = int_list(text)
    if min(steps) < 1:
        raise argparse.ArgumentTypeError(f"must have every entry at least 1 (a level with no steps generates "
                                         f"nothing), got {text!r}")
    return text


def parse_num_iter(text, levels, model):
    """--num_iter_list as a list of step counts, one per generator level of `model` (`levels` of them)."""
    steps = int_list(num_iter_list(text))
    if len(steps) != levels:
        raise UserError(f"--num_iter_list needs {levels} values for {model}, got {text!r}")
    return steps


def device(name):
    """A device this machine has: 'cpu', 'cuda', 'cuda:1', 'mps', ..."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return name
    backend = getattr(torch.backends, "mps", None) if dev.type == "mps" else getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise argparse.ArgumentTypeError(f"{name}: no {dev.type} device on this machine (is PyTorch built with it "
                                         "and the driver installed?); use --device cpu")
    available = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= available:
        raise argparse.ArgumentTypeError(f"{name}: this machine has {available} {dev.type} device(s), numbered "
                                         "from 0")
    return name


def default_device():
    """--device's default: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_precision(device_name):
    """--precision's default: fp16 on CUDA (with a gradient scaler in training, as released), fp32 elsewhere."""
    return "fp16" if str(device_name).startswith("cuda") else "fp32"


def check_precision(precision, device_name):
    """fp16 autocast is for CUDA; on the CPU it is slower and less accurate than bf16 or fp32."""
    if precision == "fp16" and not str(device_name).startswith("cuda"):
        raise UserError("--precision fp16 is for CUDA (with a gradient scaler); on the CPU it is slower and "
                        "less accurate: use bf16 or fp32")


# ----------------------------------------------------------------------------- flags several commands define
# The release's sampling defaults (its main_fractalgen.py); util.sample and util.edit default to the
# checkpoint's own settings instead.
SAMPLING_DEFAULTS = dict(num_iter_list="64,16", cfg=1.0, cfg_schedule="linear", temperature=1.0,
                         filter_threshold=1e-4, seed=0)
SAMPLING_FLAGS = tuple(SAMPLING_DEFAULTS)


def add_sampling_flags(p, defaults=SAMPLING_DEFAULTS):
    """--num_iter_list, --cfg, --cfg_schedule, --temperature, --filter_threshold and --seed, with `defaults`
    (None: the flags default to None, meaning the checkpoint's own settings)."""
    d = defaults or dict.fromkeys(SAMPLING_FLAGS)
    p.add_argument("--num_iter_list", default=d["num_iter_list"], type=num_iter_list,
                   help="sampling steps of each generator level, outermost first, comma-separated")
    p.add_argument("--cfg", default=d["cfg"], type=number(0),
                   help="classifier-free guidance scale (1.0 = no guidance)")
    p.add_argument("--cfg_schedule", default=d["cfg_schedule"], choices=["constant", "linear"],
                   help="guidance over the outer steps: grows from 1 to --cfg (linear) or stays at --cfg")
    p.add_argument("--temperature", default=d["temperature"], type=number(0, low_ok=False),
                   help="multiplies the pixel logits when sampling (as released): above 1 sharpens")
    p.add_argument("--filter_threshold", default=d["filter_threshold"], type=number(0, 1, high_ok=True),
                   help="with guidance, pixel values less likely than this under the class are never drawn")
    p.add_argument("--seed", default=d["seed"], type=seed,
                   help="random seed: the same seed and device give the same samples (in training each process "
                        "adds its rank)")
    if defaults is None:
        for action in p._actions[-len(SAMPLING_FLAGS):]:
            action.help += "; default: the checkpoint's (a released model's: as released)"


def add_device_flags(p, precision=True):
    """--device, and --precision (autocast) unless `precision` is False."""
    p.add_argument("--device", default=default_device(), type=device,
                   help="cuda, cuda:N or cpu; default cuda when there is one")
    if precision:
        p.add_argument("--precision", default=None, choices=["fp16", "bf16", "fp32"],
                       help="autocast precision; default fp16 on CUDA (with a gradient scaler in training, as "
                            "released), fp32 on the CPU, where fp16 is refused")


WEIGHT_NAMES = {"ema": "EMA weights", "raw": "raw weights"}  # how outputs name the weights they used


def add_weights_flag(p, both=False):
    """--eval_weights: the EMA of the weights (--ema_rate) where there is one, or the raw weights; with
    `both` (main_fractalgen.py), every evaluation with each."""
    p.add_argument("--eval_weights", default="ema", choices=["ema", "raw"] + (["both"] if both else []),
                   help="which weights to use: ema, the moving average of the weights (--ema_rate) where the "
                        "checkpoint has one (model_ema), else the raw weights; raw, the optimizer's weights"
                        + ("; both: every evaluation with each (the EMA's results, files and TensorBoard tags "
                           "end in _ema)" if both else ""))


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
        if os.path.islink(existing):
            raise UserError(f"--{flag} {folder}: {existing} is a symlink to {os.readlink(existing)}, which does not "
                            f"exist; make its target or choose another --{flag}")
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--{flag} {folder}: {existing} is a file, so the folder cannot be made; choose another "
                        f"--{flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--{flag} {folder}: no permission to write in {existing}; choose another --{flag}")


def check_output_png(flag, path):
    """A .png file that can be written: checked before the work that makes it."""
    if not path.lower().endswith(".png"):
        raise UserError(f"--{flag} must name a .png file, got {path}")
    if os.path.isdir(path):
        raise UserError(f"--{flag} {path} is a folder; name a .png file in it")
    check_writable_folder(flag, os.path.dirname(os.path.abspath(path)))
