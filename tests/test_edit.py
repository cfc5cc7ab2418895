"""Image editing: only the unknown pixels are generated, from the model's conditional distribution,
and the known ones come back exactly (models/*.sample(known=...), FractalGen.generate, util/edit.py)."""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import models.pixelloss as pixelloss
import util.edit as edit
from util.sampling import edit_images
from helpers import ROOT, random_images
from models.fractalgen import FractalGen, build_model
from models.layers import patchify
from models.pixelloss import PixelLoss


def mixed_model(types, sizes=(16, 4, 1), guiding_pixel=False):
    """A small model of any AR/MAR mix (MAR under AR takes one condition)."""
    dims = {3: (64, 32, 16), 4: (64, 32, 32, 16)}[len(sizes)]
    num_conds = 1 if "ar" in types[:-2] else 5
    return FractalGen(sizes, dims, (1,) * len(sizes), (4,) + (2,) * (len(sizes) - 1), types, class_num=10,
                      num_conds=num_conds, guiding_pixel=guiding_pixel)


MODELS = {
    "ar": lambda: build_model("fractalar_tiny_in16", class_num=10),
    "mar": lambda: build_model("fractalmar_tiny_in16", class_num=10, num_conds=5),
    "mar_gp": lambda: build_model("fractalmar_tiny_in16", class_num=10, num_conds=5, guiding_pixel=True),
    "mar_ar_gp": lambda: mixed_model(("mar", "ar", "ar"), guiding_pixel=True),
    "ar_mar": lambda: mixed_model(("ar", "mar", "ar")),
    "ar_mar_gp": lambda: mixed_model(("ar", "mar", "ar"), guiding_pixel=True),
    "ar4": lambda: mixed_model(("ar", "ar", "ar", "ar"), sizes=(16, 4, 2, 1)),
    "mar4_gp": lambda: mixed_model(("mar", "mar", "mar", "ar"), sizes=(16, 4, 2, 1), guiding_pixel=True),
    "mar_ar_mar4_gp": lambda: mixed_model(("mar", "ar", "mar", "ar"), sizes=(16, 4, 2, 1), guiding_pixel=True),
    "ar_mar_mar4": lambda: mixed_model(("ar", "mar", "mar", "ar"), sizes=(16, 4, 2, 1)),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def steps(model):
    return [4] * (model.num_fractal_levels - 1)


def conditions(model, labels, cfg):
    cond = model.class_emb(labels)
    return [torch.cat([cond, model.fake_latent.repeat(len(labels), 1)]) if cfg != 1.0 else cond] * 5


def masks(kind, n=3, size=16):
    """`same`: one unaligned box for every image; `mixed`: a different mask per image (random pixels,
    a box across patch borders, a single pixel), so samples have different numbers of unknown patches."""
    g = torch.Generator().manual_seed(1)
    unknown = torch.zeros(n, size, size, dtype=torch.bool)
    if kind == "same":
        unknown[:, 5:13, 3:11] = True
        return unknown
    unknown[0] = torch.rand(size, size, generator=g) < 0.5
    unknown[1, 5:13, 3:11] = True
    unknown[2, 7, 9] = True
    return unknown


# ----------------------------------------------------------------------------- known pixels kept
@pytest.mark.parametrize("kind", ["same", "mixed"])
@pytest.mark.parametrize("name", MODELS)
def test_known_pixels_come_out_identical(name, kind):
    model = make(name)
    imgs, unknown = random_images(3, 16, torch.Generator().manual_seed(2)), masks(kind)
    labels = torch.tensor([1, 2, 3])
    with torch.no_grad():
        out = model.sample(conditions(model, labels, 2.0), steps(model), 2.0, "linear", 1.0, 1e-4, 0,
                           known=(imgs, unknown))
    known = ~unknown[:, None].expand_as(imgs)
    assert torch.equal(out[known], imgs[known])  # sample() itself, without generate()'s copy back
    assert (out[~known] != imgs[~known]).float().mean() > 0.9  # the unknown ones were generated
    # what a user gets: generated pixels are 8-bit intensities like the known ones
    edits = edit_images(model, torch.rand(3, 16, 16), unknown[1], [4], steps(model), cfg=2.0)
    assert edits.shape == (1, 3, 16, 16)


def test_mar_spends_its_steps_on_the_unknown_patches_only(monkeypatch):
    """Right half unknown: 8 of the 16 level-0 patches go down, in at most 8 steps, none with known pixels;
    an unaligned box sends its partly known patches down with their known pixels."""
    model = make("mar_gp")
    calls = []
    real = model.next_fractal.sample

    def recording(cond_list, known=None, **kwargs):
        calls.append((cond_list[0].size(0), None if known is None else (~known[1]).flatten(1).any(1).sum().item()))
        return real(cond_list=cond_list, known=known, **kwargs)
    monkeypatch.setattr(model.next_fractal, "sample", recording)
    imgs, labels = random_images(2, 16), torch.tensor([0, 1])
    unknown = torch.zeros(2, 16, 16, dtype=torch.bool)
    unknown[:, :, 8:] = True
    model.generate(labels, [16, 4], images=imgs, unknown=unknown)
    assert len(calls) == 8 and sum(rows for rows, _ in calls) == 2 * 8 and all(k is None for _, k in calls)
    calls.clear()
    unknown[:] = False
    unknown[:, 2:6, 2:6] = True  # across four patches, each partly known
    model.generate(labels, [16, 4], images=imgs, unknown=unknown)
    assert sum(rows for rows, _ in calls) == 2 * 4 and sum(k for _, k in calls) == 2 * 4


# ----------------------------------------------------------------------------- nothing / everything unknown
@pytest.mark.parametrize("name", ["ar", "mar_gp", "mar4_gp"])
def test_nothing_unknown_returns_the_input_without_running_the_generator(name, monkeypatch):
    model = make(name)

    def fail(*args, **kwargs):
        raise AssertionError("the generator ran")
    monkeypatch.setattr(model.generator, "sample", fail)
    imgs = random_images(2, 16)
    nothing = torch.zeros(2, 16, 16, dtype=torch.bool)
    out = model.generate(torch.tensor([0, 1]), steps(model), images=imgs, unknown=nothing)
    assert torch.equal(out, imgs)


def test_edit_checks_labels_and_pixels_once():
    model, imgs = make("ar"), random_images(2, 16)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        model.generate(torch.tensor([0, 10]), steps(model), images=imgs, unknown=masks("same", n=2))
    with pytest.raises(ValueError, match="images must be pixels in"):
        model.generate(torch.tensor([0, 1]), steps(model), images=imgs * 10, unknown=masks("same", n=2))


@pytest.mark.parametrize("name", ["ar", "mar_gp", "ar_mar_gp", "mar4_gp"])
def test_everything_unknown_gives_exactly_the_samples(name):
    model = make(name)
    labels = torch.tensor([3, 5])
    settings = dict(cfg=2.0, cfg_schedule="linear", temperature=1.5, filter_threshold=1e-2)
    imgs, unknown = random_images(2, 16), torch.ones(2, 16, 16, dtype=torch.bool)
    torch.manual_seed(7)
    sampled = model.generate(labels, steps(model), **settings)
    torch.manual_seed(7)
    edited = model.generate(labels, steps(model), images=imgs, unknown=unknown, **settings)
    assert torch.equal(sampled, edited)


# ----------------------------------------------------------------------------- the conditional distribution
def pixel_log_probs(level, imgs, cond):
    """Teacher-forced log-probability of each pixel (R, G, B summed) of an AR-only model, (n, S²) in
    the model's generation order."""
    if isinstance(level, PixelLoss):
        logits, target = level.predict(imgs.reshape(-1, 3), [cond])
        return logits.double().log_softmax(-1).gather(-1, target[..., None]).sum(dim=(1, 2))[:, None]
    gen, p = level.generator, level.generator.patch_size
    patches = gen.patchify(imgs)
    conds = gen.predict(patches, [cond])[0]
    inner = pixel_log_probs(level.next_fractal, patches.reshape(-1, 3, p, p), conds.reshape(-1, conds.size(-1)))
    return inner.reshape(imgs.size(0), -1)


def in_generation_order(model, mask):
    """(n, S, S) -> (n, S²) in the order pixel_log_probs gives."""
    x, level = mask[:, None].expand(-1, 3, -1, -1).float(), model
    while hasattr(level, "generator"):
        p = level.generator.patch_size
        x, level = patchify(x, p).reshape(-1, 3, p, p), level.next_fractal
    return x[:, 0, 0, 0].reshape(mask.size(0), -1) > 0


def sharpened(model, scale=6.0):
    """Larger weights, so the model's distributions depend strongly on what it is conditioned on."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return model


def test_ar_edit_draws_from_the_conditional_distribution(monkeypatch):
    """fractalar_tiny_in16, cfg 1, temperature 1: the teacher-forced log-probability of the filled-in
    pixels, given the known ones before them in raster order, is the sum of the log-probabilities of
    the draws that made them (one per channel of each unknown pixel, none for the known ones)."""
    model = sharpened(make("ar"))
    draws = []
    real_draw = pixelloss.draw_categorical

    def recording(probs):
        ids = real_draw(probs)
        draws.append(probs.double().gather(-1, ids).log())
        return ids
    monkeypatch.setattr(pixelloss, "draw_categorical", recording)
    imgs, unknown, labels = random_images(3, 16), masks("mixed"), torch.tensor([2, 5, 7])
    torch.manual_seed(3)
    with torch.no_grad():
        cond = model.class_emb(labels)
        out = model.generate(labels, [16, 16], cfg=1.0, temperature=1.0, images=imgs, unknown=unknown)
        assert sum(len(d) for d in draws) == 3 * int(unknown.sum())  # one draw per channel of each pixel made
        log_probs = pixel_log_probs(model, out, cond)
        drawn = log_probs[in_generation_order(model, unknown)].sum()
        # the same pixels would be less likely without the known ones they were drawn after
        other = pixel_log_probs(model, torch.where(unknown[:, None], out, random_images(3, 16)), cond)
    assert float(drawn) == pytest.approx(float(torch.cat(draws).sum()), rel=1e-5)
    assert abs(float(other[in_generation_order(model, unknown)].sum() - drawn)) > 1e-3 * abs(float(drawn))


def test_mar_conditions_an_unknown_patch_on_all_the_known_ones(monkeypatch):
    """fractalmar_tiny_in16, one unknown patch per image: the five conditions the MAR level hands down
    for it are its teacher-forced outputs with every other patch visible (MAR.predict)."""
    model = make("mar")
    handed_down = []
    real = model.next_fractal.sample

    def recording(cond_list, **kwargs):
        handed_down.append([c.clone() for c in cond_list])
        return real(cond_list=cond_list, **kwargs)
    monkeypatch.setattr(model.next_fractal, "sample", recording)
    imgs, labels = random_images(2, 16), torch.tensor([4, 6])
    unknown = torch.zeros(2, 16, 16, dtype=torch.bool)
    unknown[0, 4:8, 8:12] = True  # patch 6
    unknown[1, 12:16, 0:4] = True  # patch 12
    with torch.no_grad():
        model.generate(labels, [8, 4], images=imgs, unknown=unknown)
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[0, 6] = mask[1, 12] = True
        expected = model.generator.predict(model.generator.patchify(imgs), mask, [model.class_emb(labels)] * 5)
    assert len(handed_down) == 1 and len(handed_down[0]) == 5
    for ours, teacher_forced in zip(handed_down[0], expected):
        torch.testing.assert_close(ours, teacher_forced[mask], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- masks
def test_named_masks_and_boxes():
    left = edit.make_mask("left", 16)
    assert left[:, :8].all() and not left[:, 8:].any()
    assert torch.equal(edit.make_mask("right", 16), ~left)
    top = edit.make_mask("top", 16)
    assert top[:8].all() and not top[8:].any() and torch.equal(edit.make_mask("bottom", 16), ~top)
    center = edit.make_mask("center", 16)
    assert center.sum() == 64 and center[4:12, 4:12].all()
    assert torch.equal(edit.make_mask("border", 16), ~center)
    box = edit.make_mask("2,3,10,5", 16)
    assert box.sum() == 8 * 2 and box[3:5, 2:10].all()
    for bad in ("2,3,20,5", "5,3,2,8", "middle"):
        with pytest.raises(edit.misc.UserError):
            edit.make_mask(bad, 16)


def test_mask_images_are_cropped_like_the_image(tmp_path):
    """A 32×20 image and its mask are center-cropped as the data is; a known part cropped away is an error."""
    Image.fromarray(np.zeros((20, 32, 3), np.uint8)).save(tmp_path / "wide.png")
    mask = np.full((20, 32), 255, np.uint8)
    mask[:, 12:20] = 0  # a known band in the middle
    Image.fromarray(mask).save(tmp_path / "mask.png")
    unknown = edit.make_mask(str(tmp_path / "mask.png"), 16, str(tmp_path / "wide.png"))
    assert unknown.shape == (16, 16) and 0 < (~unknown).sum() < 16 * 16 and unknown[:, 0].all()
    mask[:] = 255
    mask[:, :3] = 0  # known only at the left edge, which the crop removes
    Image.fromarray(mask).save(tmp_path / "edge.png")
    with pytest.raises(edit.misc.UserError, match="outside the 16x16 center crop"):
        edit.make_mask(str(tmp_path / "edge.png"), 16, str(tmp_path / "wide.png"))


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from test_notebook import tiny_checkpoint  # (skips the command's tests where nbformat is missing)
    root = tmp_path_factory.mktemp("edit")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "image.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "all_known.png")
    Image.fromarray(np.full((20, 20), 255, np.uint8)).save(root / "big_mask.png")
    return dict(root=root, ckpt=tiny_checkpoint(root / "checkpoint-last.pth"), image=str(root / "image.png"))


def run_cli(files, out_dir, *extra):
    out = out_dir / "out" / "edit.png"
    argv = ["--checkpoint", files["ckpt"], "--image", files["image"], "--output", str(out), "--num_iter_list", "2,2",
            *extra]
    return edit.cli(argv), out


def test_cli_writes_the_edits_and_the_side_by_side_picture(files, tmp_path, capsys):
    code, out = run_cli(files, tmp_path, "--mask", "right", "--class", "0,2", "--num_samples", "3", "--cfg", "2.0",
                        "--upscale", "2")
    assert code == 0, capsys.readouterr().err
    edits = np.asarray(Image.open(out))
    assert edits.shape == (2 * 16, 3 * 16, 3)  # one row per class, 3 samples each
    image = np.asarray(Image.open(files["image"]))
    for r in range(2):
        for c in range(3):
            tile = edits[16 * r:16 * (r + 1), 16 * c:16 * (c + 1)]
            assert np.array_equal(tile[:, :8], image[:, :8]) and not np.array_equal(tile[:, 8:], image[:, 8:])
    pair = np.asarray(Image.open(out.parent / "edit_side_by_side.png"))
    assert pair.shape == (2 + 2 * 34, 2 + 5 * 34, 3)  # input, mask, 3 samples; 16×16 enlarged ×2, padded


@pytest.mark.parametrize("args, message", [
    (("--mask", "big_mask.png", "--class", "0"), "is 20x20 but the image is 16x16"),
    (("--mask", "all_known.png", "--class", "0"), "leaves no pixel unknown"),
    (("--mask", "0,0,3,3", "--class", "7"), "unknown class 7: this model has classes 0..2"),
    (("--mask", "left", "--class", "0", "--image", "missing.png"), "no file .*missing.png"),
    (("--mask", "left", "--class", "0", "--device", "tpu"), "--device 'tpu' is not a device name"),
])
def test_cli_rejects_bad_input_with_one_line(files, args, message, tmp_path, capsys):
    args = [str(files["root"] / a) if a.endswith(".png") else a for a in args]
    code, out = run_cli(files, tmp_path, *args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not out.parent.exists()  # nothing written


def test_cli_as_a_command_exits_2_on_bad_input(files, tmp_path):
    out = tmp_path / "x.png"
    result = subprocess.run([sys.executable, "-m", "util.edit", "--checkpoint", files["ckpt"], "--image",
                             files["image"], "--mask", "left", "--class", "9", "--output", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "unknown class 9" in result.stderr
    assert not out.exists()
