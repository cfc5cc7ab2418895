"""Image editing: regenerate the unknown part of an image (inpainting, outpainting, uncropping) under a
class of your choice, keeping the known pixels exactly.

    python -m util.edit --checkpoint output_demo/checkpoint-last.pth --image data/demo/val/3/04101.png \
        --mask right --class 3,8 --num_samples 4 --output edit.png

writes edit.png (the edits at the model's size, --num_samples to a row, one row per class, known
pixels exactly as in the input) and edit_side_by_side.png (input, mask, edits; enlarged).
--model NAME uses a released model's checkpoint, fetched into pretrained_models/ by util.download.

Masks (white = unknown, to be generated): a mask image, or a shape on the model's image:
center (the middle half of each side), left/right/top/bottom (that half), border (all but the
center: outpainting), or a box x0,y0,x1,y1 in pixels (x1, y1 excluded). An image of another size is
center-cropped and resized as the training data is; a mask image must have the image's size (or the
model's) and is cropped with it.
"""
import os
import sys

import numpy as np
import torch
import torchvision.utils as vutils
from PIL import Image

import util.misc as misc
from models.fractalgen import RELEASED
from util.crop import center_crop_arr
from util.download import download_pretrained
from util.flags import (WEIGHT_NAMES, Parser, add_device_flags, add_sampling_flags, add_weights_flag, check_output_png,
                        count, int_list)
from util.sampling import edit_images, load_model, precision_for, sampling_for, save_png

SHAPES = ("center", "left", "right", "top", "bottom", "border")


# ----------------------------------------------------------------------------- images and masks
def load_image(path, img_size):
    """(3, S, S) floats in [0, 1] (8-bit values / 255), center-cropped and resized as util/data.py does."""
    image = open_image(path).convert("RGB")
    return torch.from_numpy(np.array(center_crop_arr(image, img_size))).permute(2, 0, 1).float() / 255


def open_image(path):
    if not os.path.isfile(path):
        raise misc.UserError(f"no file {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # not an image, truncated, a decompression bomb
        raise misc.UserError(f"cannot read {path} as an image ({type(e).__name__}: {e})") from None


def shape_mask(shape, img_size):
    """(S, S) bool, true where unknown, for a named shape or a box "x0,y0,x1,y1"."""
    s, q = img_size, img_size // 4
    unknown = torch.zeros(s, s, dtype=torch.bool)
    if shape in ("center", "border"):
        unknown[q:s - q, q:s - q] = True
        return unknown if shape == "center" else ~unknown
    halves = {"left": (slice(None), slice(0, s // 2)), "right": (slice(None), slice(s // 2, s)),
              "top": (slice(0, s // 2), slice(None)), "bottom": (slice(s // 2, s), slice(None))}
    if shape in halves:
        unknown[halves[shape]] = True
        return unknown
    try:
        x0, y0, x1, y1 = (int(v) for v in shape.split(","))
    except ValueError:
        raise misc.UserError(f"--mask must be one of {', '.join(SHAPES)}, a box x0,y0,x1,y1 or a mask image file; "
                             f"got {shape!r}") from None
    if not (0 <= x0 < x1 <= s and 0 <= y0 < y1 <= s):
        raise misc.UserError(f"the box {shape} must lie inside the {s}x{s} image with x0 < x1 and y0 < y1 "
                             "(pixels; x1, y1 excluded)")
    unknown[y0:y1, x0:x1] = True
    return unknown


def image_mask(path, image_size, img_size):
    """(S, S) bool from a mask image (white = unknown): at the model's size as it is, at the input
    image's size `image_size` (w, h) cropped and resized as the image is."""
    mask = open_image(path).convert("L")
    if mask.size == (img_size, img_size):
        return torch.from_numpy(np.array(mask) >= 128)
    if mask.size != image_size:
        raise misc.UserError(f"the mask {path} is {mask.size[0]}x{mask.size[1]} but the image is "
                             f"{image_size[0]}x{image_size[1]}: give a mask of the image's size (or the model's, "
                             f"{img_size}x{img_size})")
    unknown = torch.from_numpy(np.array(center_crop_arr(mask, img_size)) >= 128)
    if (np.array(mask) < 128).any() and unknown.all():
        raise misc.UserError(f"the known part of {path} lies outside the {img_size}x{img_size} center crop the model "
                             "sees: move it towards the center, or crop the image yourself")
    return unknown


def make_mask(mask, img_size, image_path=None):
    """A mask as the command line gives it (a shape, a box or a file) as (S, S) bool, true = unknown.
    A mask image may have the size of the image at `image_path` (None: the model's size only)."""
    if mask in SHAPES or (mask.count(",") == 3 and not os.path.exists(mask)):
        return shape_mask(mask, img_size)
    if not os.path.exists(mask):
        raise misc.UserError(f"--mask must be one of {', '.join(SHAPES)}, a box x0,y0,x1,y1 or a mask image file; "
                             f"no file {mask}")
    image_size = open_image(image_path).size if image_path else (img_size, img_size)
    return image_mask(mask, image_size, img_size)


# ----------------------------------------------------------------------------- pictures
def side_by_side(image, unknown, edits, per_row, upscale=4):
    """A (3, H, W) picture: each row is the input, the mask (white = unknown) and `per_row` edits."""
    rows = len(edits) // per_row
    mask = unknown.float()[None].expand(3, -1, -1)
    tiles = []
    for r in range(rows):
        tiles += [image, mask, *edits[r * per_row:(r + 1) * per_row]]
    tiles = torch.stack(tiles)
    if upscale > 1:
        tiles = torch.nn.functional.interpolate(tiles, scale_factor=upscale, mode="nearest")
    return vutils.make_grid(tiles, nrow=per_row + 2, padding=max(upscale, 2), pad_value=0.5)  # grey: the mask's white shows




# ----------------------------------------------------------------------------- command line
def get_args_parser():
    p = Parser("python -m util.edit", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a checkpoint written by main_fractalgen.py (its args name the model), or "
                                        "a released one given with --model")
    p.add_argument("--model", choices=list(RELEASED),
                   help="a released model: alone, its checkpoint as util.download fetches it into "
                        "<download_dir>/<model>/checkpoint-last.pth")
    p.add_argument("--download_dir", default="pretrained_models")
    p.add_argument("--url", default=None, help="with --model: where to download its checkpoint (release README)")
    p.add_argument("--image", required=True, help="the image to edit (any size: center-cropped and resized)")
    p.add_argument("--mask", required=True, help=f"{', '.join(SHAPES)}, a box x0,y0,x1,y1 or a mask image "
                                                 "(white = unknown)")
    p.add_argument("--class", dest="classes", required=True, type=int_list,
                   help="class index, or several: 3,8 (one row each)")
    p.add_argument("--num_samples", type=count(1), default=4, help="edits per class")
    add_sampling_flags(p, defaults=None)
    add_device_flags(p)
    add_weights_flag(p)
    p.add_argument("--upscale", type=count(1), default=4, help="enlargement of the side-by-side picture")
    p.add_argument("--output", required=True, help="PNG of the edits; <name>_side_by_side.png is written beside it")
    return p


def main(args):
    precision = precision_for(args)
    check_output_png("output", args.output)
    for path in (args.image, *([args.mask] if args.mask not in SHAPES and args.mask.count(",") != 3 else [])):
        open_image(path)  # a missing or unreadable file stops us before the model loads
    if not (args.checkpoint or args.model):
        raise misc.UserError("give --checkpoint PATH, or --model NAME for a released model")
    checkpoint = args.checkpoint or download_pretrained(args.model, args.download_dir, url=args.url)
    if not os.path.isfile(checkpoint):
        raise misc.UserError(f"no checkpoint at {checkpoint}")
    model, settings = load_model(checkpoint, torch.device(args.device), model_name=args.model, weights=args.eval_weights)
    size = settings["img_size"]
    bad = [c for c in args.classes if not 0 <= c < settings["class_num"]]
    if bad:
        raise misc.UserError(f"unknown class {bad[0]}: this model has classes 0..{settings['class_num'] - 1}")
    sampling, seed, _ = sampling_for(settings, args, model, precision)
    image = load_image(args.image, size)
    unknown = make_mask(args.mask, size, args.image)
    if not unknown.any():
        raise misc.UserError(f"the mask {args.mask} leaves no pixel unknown: nothing to edit (white = unknown)")
    labels = torch.tensor(args.classes).repeat_interleave(args.num_samples)
    edits = edit_images(model, image, unknown, labels, seed=seed, **sampling)
    save_png(vutils.make_grid(edits, nrow=args.num_samples, padding=0), args.output)
    pair = args.output[:-4] + "_side_by_side.png"
    save_png(side_by_side(image, unknown, edits, args.num_samples, args.upscale), pair)
    print(f"{settings['model']} ({WEIGHT_NAMES[settings['weights']]}): {len(edits)} edits of {args.image} (mask {args.mask}, classes "
          f"{','.join(map(str, args.classes))}) -> {args.output}, {pair}")


def cli(argv=None):
    """Run the command; a bad input prints one line and returns 2, having written nothing."""
    return misc.run_command(lambda: main(get_args_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli())
