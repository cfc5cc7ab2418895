"""Do the demo's samples read as their digits? A nearest-neighbour classifier fitted to the real
training digits judges the samples' shapes (ink only: colour would give the class away), and the same
classifier's accuracy on the real held-out digits says what a perfect generator would score.

    python -m util.digit_check output_demo/samples.png      # a grid written by the demo (one row per class)
"""
import io
import sys

import numpy as np
import torch
from PIL import Image

from util.demo_data import colourise, load_digits, split_indices
from util.flags import Parser, count
from util.misc import UserError, run_command


def ink(images):
    """(n, S*S) ink masks in {0, 1} of RGB images (n, 3, S, S) in [0, 1]: a pixel is ink when its
    brightest channel passes half, whatever its colour."""
    images = torch.as_tensor(images, dtype=torch.float32)
    return (images.amax(dim=1) >= 0.5).flatten(1).float()


def real_digits(img_size=16, val_per_class=50, binary=True):
    """((train images, labels), (val images, labels)) as the demo trains on them, (n, 3, S, S) in [0, 1]."""
    images, labels, _ = load_digits()
    splits = []
    for idx in split_indices(labels, val_per_class):
        rgb = np.stack([np.asarray(colourise(images[i], labels[i], img_size, binary)) for i in idx])
        splits.append((torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels[idx])))
    return splits


class DigitClassifier:
    """k nearest neighbours (Hamming distance between ink masks) among the real training digits."""

    def __init__(self, images, labels, k=5):
        self.masks, self.labels, self.k = ink(images), torch.as_tensor(labels), k

    def predict(self, images):
        distances = torch.cdist(ink(images), self.masks)
        nearest = self.labels[distances.topk(self.k, largest=False).indices]
        return torch.mode(nearest, dim=1).values

    def accuracy(self, images, labels):
        return (self.predict(images) == torch.as_tensor(labels)).float().mean().item()


def recognised_share(images, labels, train, val):
    """(share of `images` classified as their `labels`, the classifier's accuracy on real held-out
    digits), with the classifier fitted to `train` and checked on `val` ((images, labels) each)."""
    (train_x, train_y), (val_x, val_y) = train, val
    classifier = DigitClassifier(train_x, train_y)
    return classifier.accuracy(images, labels), classifier.accuracy(val_x, val_y)


def png_bits_per_dim(images):
    """What lossless PNG compression costs on `images` ((n, 3, S, S) in [0, 1]), in bits per
    sub-pixel, whole files (headers included) as a newcomer would save them."""
    images = torch.as_tensor(images)
    total = 0
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(img.mul(255).round().byte().permute(1, 2, 0).numpy()).save(buffer, "PNG", optimize=True)
        total += buffer.tell()
    return 8 * total / images.numel()


def read_grid(path, rows, per_row, img_size, upscale):
    """The images of a grid written by util.sampling.save_sample_grid, (rows*per_row, 3, S, S)."""
    try:
        with Image.open(path) as picture:
            grid = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1).float() / 255
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as an image ({type(e).__name__}: {e})") from None
    pad, tile = max(upscale, 2), img_size * upscale
    size = (pad + rows * (tile + pad), pad + per_row * (tile + pad))
    if tuple(grid.shape[1:]) != size:
        raise UserError(f"{path} is {grid.shape[2]}x{grid.shape[1]} pixels, not a grid of {rows} rows of {per_row} "
                        f"{img_size}-pixel samples upscaled {upscale}x ({size[1]}x{size[0]}); check --per_row, "
                        "--img_size and --upscale")
    starts = [pad + i * (tile + pad) for i in range(max(rows, per_row))]
    tiles = [grid[:, starts[r]:starts[r] + tile, starts[c]:starts[c] + tile] for r in range(rows) for c in range(per_row)]
    return torch.stack(tiles)[:, :, ::upscale, ::upscale]


def judge_grid(path, tree, per_class, upscale):
    """What the digit check says of a grid of samples (one row per digit) of a model trained on the digits
    tree with settings `tree` (util.demo_data.tree_settings): PNG's bits/dim on the real held-out digits,
    the share of samples recognised as their digit, and the classifier's accuracy on the real ones."""
    train, (val_x, val_y) = real_digits(tree["img_size"], tree["val_per_class"], tree["binary"])
    samples = read_grid(path, 10, per_class, tree["img_size"], upscale)
    share, real = recognised_share(samples, torch.arange(10).repeat_interleave(per_class), train, (val_x, val_y))
    return {"png_bpd": png_bits_per_dim(val_x), "held_out_digits": len(val_x), "recognised_share": share,
            "real_digits_accuracy": real}


def main(argv=None):
    p = Parser(prog="python -m util.digit_check", description=__doc__.split("\n\n")[0])
    p.add_argument("grid", help="a PNG grid, one row per class 0..9")
    p.add_argument("--per_row", type=count(1), default=8, help="samples per row")
    p.add_argument("--img_size", type=count(1), default=16, help="side of one sample in pixels")
    p.add_argument("--upscale", type=count(1), default=4, help="how much the grid enlarged each sample")

    def work():
        args = p.parse_args(argv)
        images = read_grid(args.grid, 10, args.per_row, args.img_size, args.upscale)
        labels = torch.arange(10).repeat_interleave(args.per_row)
        share, real = recognised_share(images, labels, *real_digits(args.img_size))
        print(f"recognised as their digit: {share:.0%} of samples (real held-out digits: {real:.0%})")
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
