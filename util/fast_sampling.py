"""Faster sampling with the same samples: torch.compile of the innermost sampling levels.

At the released schedules the innermost loops run tens of thousands of times per sampling call, each
step a few dozen small kernels, so on a GPU the time goes to Python and kernel launches. Compiling
those levels fuses their kernels, and on CUDA mode "reduce-overhead" replays them as CUDA graphs (the
number of patches each step predicts is fixed by the schedule, so each step's shapes recur).

The random draws are torch's own (inductor's `fallback_random`), in the same order, so on the CPU
the samples are those of the eager path; where fused kernels round differently a draw can change
(tests/test_cuda.py measures it). benchmarks/README.md has the measurements.
"""
import functools

import torch

SCOPES = ("none", "head", "inner")


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


def default_mode(device):
    """CUDA graphs on CUDA; plain inductor kernels elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def compile_sampling(model, scope="head", mode=None, backend="inductor", dynamic=None):
    """Compile the sampling of the innermost levels of `model` (a level-0 FractalGen), in place.

    scope: "head" compiles the per-pixel heads' sampling (one token at a time, three channels); "inner"
    the whole last generator level (its steps, with the heads inside), one graph per call of the level
    above: fewer launches, a longer compilation. mode: torch.compile's (default: default_mode()).
    Returns the model. Calling it again does nothing; training and the NLL are not affected.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "none" or getattr(model, "sampling_compiled", None):
        return model
    device = next(model.parameters()).device
    mode = mode or default_mode(device)
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
