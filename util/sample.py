"""Sample a grid of images (one row per class) from a released model or any checkpoint, in one command.

    python -m util.sample --model fractalmar_in64 --classes 207,360,388 --per_class 4 --output grid.png
    python -m util.sample --checkpoint output_demo/checkpoint-last.pth --output digits.png

A released model's checkpoint is downloaded once into pretrained_models/ (util.download). Unless given,
the sampling settings (--num_iter_list, --cfg, --cfg_schedule, --temperature, --filter_threshold, --seed)
are the released ones (models.fractalgen.RELEASED) or, for a checkpoint of main_fractalgen.py, those it
was trained with.
"""
import sys

import torch

import util.misc as misc
from models.fractalgen import RELEASED
from util.download import download_pretrained
from util.flags import (WEIGHT_NAMES, Parser, add_device_flags, add_sampling_flags, add_weights_flag, check_output_png,
                        count, int_list)
from util.sampling import grid_upscale, load_model, precision_for, sampling_for, save_sample_grid


def get_args_parser():
    p = Parser(prog="python -m util.sample", description=__doc__.split("\n\n")[0],
               epilog=f"released models: {', '.join(RELEASED)}")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=list(RELEASED), help="a released model (downloaded on first use)")
    source.add_argument("--checkpoint", help="a checkpoint file written by main_fractalgen.py (or a released one, "
                                             "with --model_name)")
    p.add_argument("--model_name", default=None, choices=list(RELEASED),
                   help="which released model a --checkpoint without args holds")
    p.add_argument("--classes", default=None, type=int_list,
                   help="comma-separated class indices, one row each; default every class of a model with up to "
                        "20 classes (e.g. the demo digits)")
    p.add_argument("--per_class", type=count(1), default=4, help="samples per class (the columns)")
    add_sampling_flags(p, defaults=None)
    add_device_flags(p)
    add_weights_flag(p)
    p.add_argument("--upscale", type=count(1), default=None, help="enlarge each sample (nearest); default up to 64 px")
    p.add_argument("--download_dir", default="pretrained_models", help="where released checkpoints are kept")
    p.add_argument("--output", default="samples.png", help="the PNG to write")
    return p


def sample(args):
    """Write the grid; returns (path, the settings used)."""
    precision = precision_for(args)
    check_output_png("output", args.output)
    path = args.checkpoint or download_pretrained(args.model, args.download_dir)
    model, settings = load_model(path, torch.device(args.device), model_name=args.model or args.model_name,
                                 weights=args.eval_weights)
    if args.classes is not None:
        classes = args.classes
    elif model.num_classes <= 20:
        classes = list(range(model.num_classes))
    else:
        raise misc.UserError(f"{settings['model']} has {model.num_classes} classes: choose some with --classes, "
                             "e.g. --classes 207,360,388")
    if min(classes) < 0 or max(classes) >= model.num_classes:
        raise misc.UserError(f"--classes must lie in [0, {model.num_classes}) for this model, got "
                             f"{','.join(map(str, classes))}")
    sampling, seed, settings = sampling_for(settings, args, model, precision)
    upscale = args.upscale or grid_upscale(model.img_size)
    save_sample_grid(model, args.output, classes=classes, per_class=args.per_class, seed=seed, upscale=upscale,
                     **sampling)
    return args.output, settings


def main(argv=None):
    def work():
        path, s = sample(get_args_parser().parse_args(argv))
        print(f"{path}: {s['model']}, num_iter_list {s['num_iter_list']}, cfg {s['cfg']} ({s['cfg_schedule']}), "
              f"temperature {s['temperature']}, seed {s['seed']}, {WEIGHT_NAMES[s['weights']]}")
    return misc.run_command(work)


if __name__ == "__main__":
    sys.exit(main())
