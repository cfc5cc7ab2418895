"""Load a checkpoint, sample chosen classes and lay the samples out as a picture (one row per class):
what the demo and demo/run_fractalgen.ipynb share."""
import os

import torch
import torchvision.utils as vutils

import util.checkpoint as checkpoint
import util.misc as misc
from util.misc import autocast
from models.fractalgen import RELEASED, build_model
from models.layers import imagenet_stats


def load_model(checkpoint_path, device="cpu", model_name=None):
    """(model in eval mode on `device`, its settings) from a checkpoint written by main_fractalgen.py
    or released with the paper.

    The settings (model, class_num, num_conds, guiding_pixel, img_size, and the sampling settings
    num_iter_list, cfg, cfg_schedule, temperature) come from the checkpoint's `args`; a checkpoint
    without them needs `model_name`, one of the released models, whose released settings are used.
    """
    ckpt = checkpoint.load(checkpoint_path)
    args = ckpt.get("args")
    if args is not None:
        settings = dict(model=args.model, class_num=args.class_num, num_conds=args.num_conds,
                        guiding_pixel=args.guiding_pixel, num_iter_list=args.num_iter_list, cfg=args.cfg,
                        cfg_schedule=args.cfg_schedule, temperature=args.temperature)
    elif model_name in RELEASED:
        settings = dict(model=model_name, class_num=1000, **{k: RELEASED[model_name][k] for k in (
            "num_conds", "guiding_pixel", "num_iter_list", "cfg", "cfg_schedule", "temperature")})
    else:
        raise misc.UserError(f"{checkpoint_path} does not say which model it holds (no 'args'); pass model_name, "
                             f"one of {', '.join(RELEASED)}")
    model = build_model(settings["model"], class_num=settings["class_num"], num_conds=settings["num_conds"],
                        guiding_pixel=settings["guiding_pixel"])
    checkpoint.load_model_state(model, ckpt["model"], checkpoint_path)
    settings["img_size"] = model.img_size
    return model.to(device).eval(), settings


@torch.no_grad()
def sample_classes(model, labels, num_iter_list, cfg=1.0, cfg_schedule="linear", temperature=1.0,
                   filter_threshold=1e-4, precision="fp32", visualize=False):
    """Images in [0, 1], (n, 3, S, S), one per entry of `labels`, on the model's device, under the
    autocast of `precision`. visualize=True shows a progress bar over the outer steps; a callable
    is given the partial images (model space, see `to_pixels`) after each outer step."""
    model.eval()
    device = next(model.parameters()).device
    with autocast(device, precision):
        images = model.generate(labels, num_iter_list, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
                                filter_threshold=filter_threshold, visualize=visualize)
    return to_pixels(images)


def to_pixels(images):
    """Model-space (ImageNet-normalized) images -> [0, 1] floats, e.g. for the partial images that
    `visualize` callbacks receive."""
    mean, std = imagenet_stats(images.device)
    return (images.float() * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)).clamp(0, 1)


def grid_upscale(img_size):
    """How much a grid enlarges samples by default: small images are shown at 64 pixels or more."""
    return max(1, 64 // img_size)


def class_grid(images, per_row, upscale=1):
    """A (3, H, W) grid of `images` ((n, 3, S, S) in [0, 1]), `per_row` to a row, each image
    enlarged `upscale` times with nearest neighbours so small samples stay crisp on screen."""
    if upscale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    return vutils.make_grid(images.cpu(), nrow=per_row, padding=max(upscale, 2), pad_value=1.0)


def save_sample_grid(model, path, num_iter_list, classes=None, per_class=8, cfg=1.0, cfg_schedule="linear",
                     temperature=1.0, filter_threshold=1e-4, precision="fp32", seed=0, upscale=1, batch_size=None):
    """Sample `per_class` images of each class in `classes` (default: every class) and write
    them to `path` as a PNG with one row per class; returns the (3, H, W) grid.

    `seed` fixes the samples, so a rerun of the demo gives the same picture; `batch_size` images at
    most per sampling call (default: all in one)."""
    classes = list(range(model.num_classes)) if classes is None else list(classes)
    labels = torch.tensor(classes).repeat_interleave(per_class)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        device = next(model.parameters()).device
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        images = torch.cat([sample_classes(model, batch, num_iter_list, cfg, cfg_schedule, temperature,
                                           filter_threshold, precision)
                            for batch in labels.split(batch_size or len(labels))])
    grid = class_grid(images, per_class, upscale)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    vutils.save_image(grid, path)
    return grid
