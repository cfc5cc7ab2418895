"""Sample a grid of images (one row per class) from a released model or any checkpoint, in one command.

    python -m util.sample --model fractalmar_in64 --classes 207,360,388 --per_class 4 --output grid.png
    python -m util.sample --checkpoint output_demo/checkpoint-last.pth --output digits.png

A released model's checkpoint is downloaded once into pretrained_models/ (util.download). Unless given,
the sampling settings (--num_iter_list, --cfg, --cfg_schedule, --temperature) are the released ones
(models.fractalgen.RELEASED) or, for a checkpoint of main_fractalgen.py, those it was trained with.
"""
import argparse
import sys

import util.misc as misc
from models.fractalgen import RELEASED
from util.checks import check_device, default_device, default_precision, parse_num_iter
from util.download import DownloadError, download_pretrained
from util.sampling import grid_upscale, load_model, save_sample_grid


def get_args_parser():
    p = argparse.ArgumentParser(prog="python -m util.sample", description=__doc__.split("\n\n")[0],
                                epilog=f"released models: {', '.join(RELEASED)}")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=list(RELEASED), help="a released model (downloaded on first use)")
    source.add_argument("--checkpoint", help="a checkpoint file written by main_fractalgen.py (or a released one, "
                                             "with --model_name)")
    p.add_argument("--model_name", default=None, help="which released model a --checkpoint without args holds")
    p.add_argument("--classes", default=None,
                   help="comma-separated class indices, one row each; default every class of a model with up to "
                        "20 classes (e.g. the demo digits)")
    p.add_argument("--per_class", type=int, default=4, help="samples per class (the columns)")
    p.add_argument("--num_iter_list", default=None, help="sampling steps per generator level, e.g. 64,16")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1.0 = none)")
    p.add_argument("--cfg_schedule", default=None, choices=["constant", "linear"], help="guidance over the steps")
    p.add_argument("--temperature", type=float, default=None, help="multiplies the logits: above 1 sharpens")
    p.add_argument("--filter_threshold", type=float, default=1e-4, help="with guidance, drop values this unlikely")
    p.add_argument("--seed", type=int, default=0, help="the same seed and device give the same grid")
    p.add_argument("--device", default=default_device(), help="cuda, cuda:N or cpu")
    p.add_argument("--precision", default=None, choices=["fp16", "bf16", "fp32"],
                   help="default fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--upscale", type=int, default=None, help="enlarge each sample (nearest); default up to 64 px")
    p.add_argument("--download_dir", default="pretrained_models", help="where released checkpoints are kept")
    p.add_argument("--output", default="samples.png", help="the PNG to write")
    return p


def sample(args):
    """Write the grid; returns (path, the settings used)."""
    check_device(args.device)
    try:
        path = args.checkpoint or download_pretrained(args.model, args.download_dir)
    except DownloadError as e:
        raise misc.UserError(str(e)) from None
    model, settings = load_model(path, args.device, model_name=args.model or args.model_name)
    for name in ("num_iter_list", "cfg", "cfg_schedule", "temperature"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.classes:
        try:
            classes = [int(c) for c in args.classes.split(",")]
        except ValueError:
            raise misc.UserError(f"--classes must be comma-separated integers, got {args.classes!r}") from None
    elif model.num_classes <= 20:
        classes = list(range(model.num_classes))
    else:
        raise misc.UserError(f"{settings['model']} has {model.num_classes} classes: choose some with --classes, "
                             "e.g. --classes 207,360,388")
    if min(classes) < 0 or max(classes) >= model.num_classes:
        raise misc.UserError(f"--classes must lie in [0, {model.num_classes}) for this model, got {args.classes}")
    num_iter = parse_num_iter(str(settings["num_iter_list"]), model.num_fractal_levels - 1, settings["model"])
    precision = args.precision or default_precision(args.device)
    upscale = args.upscale or grid_upscale(model.img_size)
    save_sample_grid(model, args.output, num_iter, classes, args.per_class, settings["cfg"], settings["cfg_schedule"],
                     settings["temperature"], args.filter_threshold, precision, args.seed, upscale)
    return args.output, settings


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        path, s = sample(args)
    except misc.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: {s['model']}, num_iter_list {s['num_iter_list']}, cfg {s['cfg']} ({s['cfg_schedule']}), "
          f"temperature {s['temperature']}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
