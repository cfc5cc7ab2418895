"""Small things several test files need."""
import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from models.layers import IMAGENET_MEAN, IMAGENET_STD

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def normalize_u8(images_u8):
    return (images_u8.float() / 255.0 - MEAN) / STD


def random_images(n, size, generator=None):
    """Normalized images of uniformly random 8-bit pixels."""
    return normalize_u8(torch.randint(0, 256, (n, 3, size, size), generator=generator))


def load_fixture(name):
    """The reference model (eval mode, no dropout) and the numbers the release computed with it."""
    from models.fractalgen import FractalGen
    rec = torch.load(os.path.join(FIXTURES, name + ".expected.pth"), weights_only=False)
    sd = torch.load(os.path.join(FIXTURES, name + ".state_dict.pth"), weights_only=True)
    model = FractalGen(label_drop_prob=0.0, attn_dropout=0.0, proj_dropout=0.0, fractal_level=0, **rec["config"])
    model.load_state_dict(sd, strict=True)
    return model.eval(), rec


def pixel_head(model):
    head = model
    while not hasattr(head, "r_codebook"):
        head = head.next_fractal
    return head


# ----------------------------------------------------------------------------- runs of main_fractalgen.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_ARGS = ["--model", "fractalmar_tiny_in16", "--img_size", "16", "--num_conds", "5", "--guiding_pixel",
              "--class_num", "3", "--num_workers", "0", "--print_freq", "1"]


def write_image_folder(root, per_class=(8, 2), size=20, classes=3):
    """A tiny ImageFolder: class c is a noisy image dominated by colour channel c."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                a[..., c % 3] += 180
                Image.fromarray(a).save(os.path.join(root, split, f"class{c}", f"{i}.png"))
    return root


def run(args, nproc=1, timeout=180):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable]) + ["main_fractalgen.py"] + args
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def save_random_checkpoint(folder):
    """A checkpoint of fractalmar_tiny_in16 (3 classes, guiding pixel) with random weights in `folder`."""
    import argparse
    import util.checkpoint as checkpoint
    from models.fractalgen import build_model
    torch.manual_seed(0)
    model = build_model("fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True)
    checkpoint.atomic_save({"model": model.state_dict(), "args": argparse.Namespace(model="fractalmar_tiny_in16")},
                           checkpoint.path_in(folder))
    return folder


def generate_pngs(checkpoint_dir, out, *extra):
    """main_fractalgen.py --evaluate_gen of 6 images of the tiny model (num_iter 2,2, no scoring) from the
    checkpoint in `checkpoint_dir`, `extra` flags last: (the PNGs' bytes by file name, the args after the run)."""
    import main_fractalgen
    from util import png_folder
    args = main_fractalgen.parse_args(
        MODEL_ARGS + ["--resume", checkpoint_dir, "--output_dir", out, "--evaluate_gen", "--num_images", "6",
                      "--num_iter_list", "2,2", "--fid_stats", "none", *extra])
    main_fractalgen.main(args)
    folder = png_folder.folder_of(args)
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".png")}, args


def kill_a_worker_once_checkpointed(cmd, ckpt_path, log_path, timeout=240):
    """Run torchrun `cmd` (--nproc_per_node=2, --max-restarts=1), SIGKILL its second worker once
    `ckpt_path` exists, and let torchrun restart the group: (torchrun's exit code, its output)."""
    import signal
    import time
    log = open(log_path, "w+")
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not os.path.exists(ckpt_path) and time.time() < deadline and agent.poll() is None:
            time.sleep(0.1)
        assert os.path.exists(ckpt_path), "no step checkpoint appeared"
        workers = open(f"/proc/{agent.pid}/task/{agent.pid}/children").read().split()
        assert len(workers) == 2
        os.kill(int(workers[1]), signal.SIGKILL)
        returncode = agent.wait(timeout=2 * timeout)
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)  # torchrun and any worker left behind
        except ProcessLookupError:
            pass
        agent.wait()
        log.seek(0)
        output = log.read()
    return returncode, output


@contextlib.contextmanager
def small_disk(folder, size="3m"):
    """`folder` as a real tmpfs of `size` (root only: skipped where mounting is refused)."""
    os.makedirs(folder, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'not root'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], check=True)
