"""The one way from class labels to pixels, under the model's `generate`: load a checkpoint with its
sampling settings, draw seeded images (CPU and CUDA random state forked together) under autocast,
edit images, compile the innermost sampling levels, and lay samples out as a grid.

Used by util.sample, util.edit, util.png_folder (--evaluate_gen), main_fractalgen.py's --final_samples
and demo/run_fractalgen.ipynb.
"""
import contextlib
import functools
import os

import torch
import torchvision.utils as vutils

import util.checkpoint as checkpoint
import util.misc as misc
from models.fractalgen import RELEASED, build_model
from models.layers import imagenet_stats
from util.flags import SAMPLING_DEFAULTS, SAMPLING_FLAGS, check_precision, default_precision, parse_num_iter


def load_model(checkpoint_path, device="cpu", model_name=None, weights="ema"):
    """(model in eval mode on `device`, its settings) from a checkpoint written by main_fractalgen.py
    or released with the paper.

    weights: "ema" loads the moving average of the weights (`model_ema`, training with --ema_rate)
    where the checkpoint has one, else its raw weights; "raw" the raw weights. settings["weights"] says
    which ("ema" or "raw").

    The settings (model, class_num, num_conds, guiding_pixel, img_size, and the sampling settings
    num_iter_list, cfg, cfg_schedule, temperature, filter_threshold, seed) come from the checkpoint's
    `args`; a checkpoint without them needs `model_name`, one of the released models, whose released
    settings are used.
    """
    ckpt = checkpoint.load(checkpoint_path)
    args = ckpt.get("args")
    if args is not None and getattr(args, "model", None) is not None:
        built = {k: getattr(args, k) for k in ("class_num", "num_conds", "guiding_pixel") if hasattr(args, k)}
        settings = {"model": args.model, **built, **{k: getattr(args, k, v) for k, v in SAMPLING_DEFAULTS.items()}}
    elif model_name in RELEASED:
        released = RELEASED[model_name]
        settings = dict(SAMPLING_DEFAULTS, model=model_name, class_num=1000, **{k: released[k] for k in (
            "num_conds", "guiding_pixel", "num_iter_list", "cfg", "cfg_schedule", "temperature")})
    else:
        raise misc.UserError(f"{checkpoint_path} does not say which model it holds (no 'args'); pass model_name, "
                             f"one of {', '.join(RELEASED)}")
    model = build_model(settings["model"], **{k: settings[k] for k in ("class_num", "num_conds", "guiding_pixel")
                                              if k in settings})
    settings["weights"], state = checkpoint.weights_for(ckpt, weights)
    checkpoint.load_model_state(model, state, checkpoint_path)
    settings.update(img_size=model.img_size, class_num=model.num_classes)
    return model.to(device).eval(), settings


def precision_for(args):
    """A command's autocast precision: --precision, else the device's default (fp16 is for CUDA only)."""
    precision = args.precision or default_precision(args.device)
    check_precision(precision, args.device)
    return precision


def sampling_for(settings, args, model, precision):
    """(sample_classes' settings, seed, the settings used) for util.sample and util.edit: each sampling flag
    given on the command line, else the checkpoint's own (`settings`, from load_model)."""
    chosen = {**settings, **{k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}}
    num_iter = parse_num_iter(str(chosen["num_iter_list"]), model.num_fractal_levels - 1, chosen["model"])
    sampling = dict(num_iter_list=num_iter, cfg=chosen["cfg"], cfg_schedule=chosen["cfg_schedule"],
                    temperature=chosen["temperature"], filter_threshold=chosen["filter_threshold"], precision=precision)
    return sampling, chosen["seed"], chosen


@contextlib.contextmanager
def seeded(seed, device):
    """Draws from `seed` inside, the caller's random state (CPU and `device`'s) untouched outside."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # every device's generator
        yield


@torch.no_grad()
def sample_classes(model, labels, num_iter_list, cfg=1.0, cfg_schedule="linear", temperature=1.0,
                   filter_threshold=1e-4, precision="fp32", seed=None, images=None, unknown=None, visualize=False):
    """Images in [0, 1], (n, 3, S, S), one per entry of `labels`, on the model's device, under the
    autocast of `precision`; with `seed`, drawn from it (see `seeded`).

    images, unknown: edit instead of sampling: `images` (n, 3, S, S) in [0, 1], `unknown` (n, S, S)
    bool; the unknown pixels are generated, the others come back exactly as given.
    visualize=True shows a progress bar over the outer steps; a callable is given the partial images
    (model space, see `to_pixels`) after each outer step."""
    model.eval()
    device = next(model.parameters()).device
    if images is not None:
        mean, std = (t.view(1, 3, 1, 1) for t in imagenet_stats(device))
        images, unknown = (images.to(device) - mean) / std, unknown.to(device)
    with seeded(seed, device) if seed is not None else contextlib.nullcontext():
        with misc.autocast(device, precision):
            out = model.generate(labels, num_iter_list, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
                                 filter_threshold=filter_threshold, visualize=visualize, images=images,
                                 unknown=unknown)
    return to_pixels(out)


def edit_images(model, image, unknown, labels, num_iter_list, seed=0, **sampling):
    """One edit of `image` ((3, S, S) in [0, 1]) per entry of `labels`: the pixels where `unknown`
    (S, S) is true regenerated under that class, the others exactly as given. Returns (n, 3, S, S)
    in [0, 1] on the CPU, in 8-bit steps like the input. `sampling`: sample_classes' settings."""
    n = len(labels)
    out = sample_classes(model, labels, num_iter_list, seed=seed, images=image[None].expand(n, -1, -1, -1),
                         unknown=unknown[None].expand(n, -1, -1), **sampling).cpu()
    out = (out * 255).round() / 255  # 8-bit values, as the input
    return torch.where(unknown[None, None], out, image[None])


def to_pixels(images):
    """Model-space (ImageNet-normalized) images -> [0, 1] floats, e.g. for the partial images that
    `visualize` callbacks receive."""
    mean, std = imagenet_stats(images.device)
    return (images.float() * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)).clamp(0, 1)


def to_uint8(images):
    """[0, 1] images (n, 3, S, S) -> uint8 (n, S, S, 3) numpy arrays, as PNG files hold them."""
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------- grids
def grid_upscale(img_size):
    """How much a grid enlarges samples by default: small images are shown at 64 pixels or more."""
    return max(1, 64 // img_size)


def class_grid(images, per_row, upscale=1):
    """A (3, H, W) grid of `images` ((n, 3, S, S) in [0, 1]), `per_row` to a row, each image
    enlarged `upscale` times with nearest neighbours so small samples stay crisp on screen."""
    if upscale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    return vutils.make_grid(images.cpu(), nrow=per_row, padding=max(upscale, 2), pad_value=1.0)


def save_sample_grid(model, path, num_iter_list, classes=None, per_class=8, seed=0, upscale=1, batch_size=None,
                     **sampling):
    """Sample `per_class` images of each class in `classes` (default: every class) and write
    them to `path` as a PNG with one row per class; returns the (3, H, W) grid.

    `seed` fixes the samples, so a rerun of the demo gives the same picture; `batch_size` images at
    most per sampling call (default: all in one); `sampling`: sample_classes' settings."""
    classes = list(range(model.num_classes)) if classes is None else list(classes)
    labels = torch.tensor(classes).repeat_interleave(per_class)
    device = next(model.parameters()).device
    with seeded(seed, device):
        images = torch.cat([sample_classes(model, batch, num_iter_list, **sampling)
                            for batch in labels.split(batch_size or len(labels))])
    grid = class_grid(images, per_class, upscale)
    save_png(grid, path)
    return grid


def save_png(image, path):
    """A (3, H, W) tensor in [0, 1] as an 8-bit PNG, written atomically (a full disk leaves no empty file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with misc.write_atomically(path) as f:
        vutils.save_image(image, f, format="PNG")


# ----------------------------------------------------------------------------- compiled sampling
# At the released schedules the innermost loops run tens of thousands of times per sampling call, each
# step a few dozen small kernels, so on a GPU the time goes to Python and kernel launches. Compiling
# those levels fuses their kernels, and on CUDA mode "reduce-overhead" replays them as CUDA graphs (the
# number of patches each step predicts is fixed by the schedule, so each step's shapes recur). The
# random draws are torch's own (inductor's `fallback_random`), in the same order, so on the CPU the
# samples are those of the eager path; where fused kernels round differently a draw can change.
COMPILE_SCOPES = ("none", "head", "inner")


def innermost_levels(model):
    """The last generator level (a FractalGen whose next level is the per-pixel head) and the
    per-pixel heads: the pixel head and, where the MAR levels have them, the guiding-pixel heads."""
    levels, level = [model], model
    while hasattr(level.next_fractal, "next_fractal"):
        level = level.next_fractal
        levels.append(level)
    heads = [level.next_fractal] + [lv.generator.guiding_pixel_loss for lv in levels
                                    if hasattr(lv.generator, "guiding_pixel_loss")]
    return level, heads


def compile_sampling(model, scope="head", mode=None, backend="inductor", dynamic=None):
    """Compile the sampling of the innermost levels of `model` (a level-0 FractalGen), in place.

    scope: "head" compiles the per-pixel heads' sampling (one token at a time, three channels); "inner"
    the whole last generator level (its steps, with the heads inside), one graph per call of the level
    above: fewer launches, a longer compilation. mode: torch.compile's (default: CUDA graphs on CUDA,
    plain inductor kernels elsewhere). Returns the model. Calling it again does nothing; training and
    the NLL are not affected.
    """
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    if scope == "none" or getattr(model, "sampling_compiled", None):
        return model
    device = next(model.parameters()).device
    mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
    level, heads = innermost_levels(model)
    for module in ([level] if scope == "inner" else heads):
        kwargs = {} if backend != "inductor" else {"mode": mode}
        module.sample = with_sampling_config(torch.compile(module.sample, backend=backend, dynamic=dynamic,
                                                          **kwargs))
    model.sampling_compiled = scope
    return model


def with_sampling_config(compiled):
    """Run `compiled` with the settings that keep its draws and its number of compilations: torch's
    random kernels; cfg (a float that changes with every step of a linear schedule) an input rather
    than a constant; conditions copied out of the larger tensors they are views of (torch.compile
    guards on a view's base, whose shape changes from step to step)."""
    @functools.wraps(compiled)
    def sample(*args, **kwargs):
        args, kwargs = own_storage(args), {k: own_storage(v) for k, v in kwargs.items()}
        with torch._dynamo.config.patch(specialize_float=False), torch._inductor.config.patch(fallback_random=True):
            return compiled(*args, **kwargs)
    return sample


def own_storage(x):
    """x with every tensor in it (also inside lists and tuples) that is a view replaced by a copy."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x._base is not None else x
    if isinstance(x, (list, tuple)):
        return type(x)(own_storage(v) for v in x)
    return x
