"""Timing the release itself (`bench.py --compare ../shared/upstream/fractalgen`).

The release's code runs unchanged in its own worker process; this module only (1) says how to start
that worker (on the CPU, the release's `.cuda()` calls need `cpu_shim`, found next to the release,
on PYTHONPATH) and (2) fixes the MAR mask ratios in both implementations, so that a training step or
an NLL call does the same amount of work in each.

Why (2): a MAR level masks a random share of its patches per call, the release with numpy
(`mask_ratio_generator.rvs`, `np.random.randint`) and ours with torch, so two calls with the same
torch seed do different amounts of work, and deeper levels see more or fewer patches. With the ratio
fixed, every sample masks ceil(seq_len · r) patches in training and the NLL masks ceil(seq_len · r_nll)
in both implementations. Which patches stay random (torch's orders); r defaults to 0.8, about the
mean of the release's truncated normal N(1, 0.25) on [0, 1] (1 - 0.25·√(2/π) = 0.80), and r_nll to
0.5, about the mean of its uniform count 1..seq_len.
"""
import math
import os
import sys
import types

import numpy as np


def is_release(root):
    """The release has no models/layers.py (ours and its descendants do)."""
    return not os.path.exists(os.path.join(root, "models", "layers.py"))


def release_env(root, device_type):
    """Environment for a worker that runs the release at `root`: on the CPU, cpu_shim on PYTHONPATH."""
    env = dict(os.environ)
    if device_type == "cpu":
        shim = os.path.join(os.path.dirname(os.path.abspath(root)), "cpu_shim")
        if not os.path.isdir(shim):
            raise SystemExit(f"the release calls .cuda(); on the CPU it needs {shim} (a sitecustomize.py that makes "
                             ".cuda() a no-op) next to the release's folder")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (shim, env.get("PYTHONPATH")) if p)
    return env


class FixedRatio:
    """Stands in for the release's scipy truncnorm: every sample gets ratio r."""

    def __init__(self, ratio):
        self.ratio = ratio

    def rvs(self, size):
        return np.full(size, self.ratio)


class NumpyWithFixedCount(types.ModuleType):
    """numpy for the release's models/mar.py, whose only random draw from it is the NLL's
    `np.random.randint(seq_len) + 1` patches to mask: that count becomes ceil(seq_len · ratio)."""

    def __init__(self, ratio):
        super().__init__("numpy")
        self.random = types.SimpleNamespace(randint=lambda high: math.ceil(high * ratio) - 1)

    def __getattr__(self, name):
        return getattr(np, name)


def fix_mask_ratios(model, ratio, nll_ratio):
    """Every MAR level of `model` (ours or the release's) masks ceil(seq_len · ratio) patches per sample
    in training and ceil(seq_len · nll_ratio) in the NLL. Returns how many levels were changed."""
    levels = [m for m in model.modules() if type(m).__name__ == "MAR"]
    for mar in levels:
        if hasattr(mar, "mask_ratio_generator"):  # the release
            mar.mask_ratio_generator = FixedRatio(ratio)
            sys.modules[type(mar).__module__].np = NumpyWithFixedCount(nll_ratio)
        elif hasattr(mar, "training_mask") and hasattr(mar, "nll_mask"):  # ours
            mar.training_mask = fixed_count_mask(mar.seq_len, ratio)
            mar.nll_mask = fixed_count_mask(mar.seq_len, nll_ratio)
        else:
            raise SystemExit(f"cannot fix the mask ratio of {type(mar).__module__}.MAR: neither the release's "
                             "mask_ratio_generator nor our training_mask / nll_mask")
    return len(levels)


def fixed_count_mask(seq_len, ratio):
    """Our MAR's training_mask / nll_mask with ceil(seq_len · ratio) masked positions in every sample."""
    count = math.ceil(seq_len * ratio)
    return lambda ranks: ranks < count
