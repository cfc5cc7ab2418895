"""The fast sampling paths give the eager path's samples: no host syncs in the sampling loops, and
torch.compile of the innermost levels (util.sampling.compile_sampling) with the same draws."""
import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode

from models import pixelloss
from models.fractalgen import build_model
from util.sampling import compile_sampling, sample_classes

# Tensor methods that wait for the device (on CUDA) to hand a value to Python
HOST_SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero"}


class CountHostSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_SYNCS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def tiny(name):
    torch.manual_seed(0)
    mar = name.startswith("fractalmar")
    return build_model(name, class_num=10, num_conds=5 if mar else 1, guiding_pixel=mar).eval()


def draw(model, num_iter_list=(4, 4), cfg=2.0, seed=3):
    torch.manual_seed(seed)
    return sample_classes(model, [0, 1, 2, 3], list(num_iter_list), cfg=cfg, cfg_schedule="linear")


@pytest.mark.parametrize("name", ["fractalmar_tiny_in16", "fractalar_tiny_in16"])
def test_sampling_loops_have_no_host_syncs(name, monkeypatch):
    """Off the CPU the categorical draws are torch.multinomial's (no sync since torch 2.4, its check is
    asynchronous); the CPU's own draw checks values on the host, so it is replaced here. What is
    left are sample_classes' label checks, once per call, whatever the number of steps."""
    monkeypatch.setattr(pixelloss, "draw_categorical", lambda probs: torch.argmax(probs, -1, keepdim=True))
    model = tiny(name)
    counts = []
    for num_iter_list in ([2, 2], [8, 4]):
        with CountHostSyncs() as counter:
            draw(model, num_iter_list)
        counts.append(sum(counter.counts.values()))
    assert counts[0] == counts[1] <= 2, counts


class GraphCounter:
    """A torch.compile backend that runs the captured graphs as they are and counts them."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compiled_heads_draw_the_same_samples_in_one_graph_each():
    """The heads' sampling is captured whole (no graph breaks) and draws exactly what the eager heads
    draw; after the first few calls the batch size and guidance's cfg, which change with every step,
    are inputs of the graphs, so more steps compile nothing more."""
    model = tiny("fractalmar_tiny_in16")
    eager, longer = draw(model), draw(model, (8, 4))
    counter = GraphCounter()
    compile_sampling(model, "head", backend=counter)
    assert torch.equal(draw(model), eager)
    graphs = counter.graphs
    assert graphs <= 8, graphs  # pixel and guiding-pixel heads: a few each, below torch's recompile limit
    assert torch.equal(draw(model, (8, 4)), longer) and counter.graphs == graphs
    assert not torch.equal(draw(model, seed=4), eager)


@pytest.mark.parametrize("name", ["fractalmar_tiny_in16", pytest.param("fractalar_tiny_in16", marks=pytest.mark.slow)])
def test_compiled_inner_level_draws_the_same_samples_in_one_graph(name):
    """The whole last level in one graph: its schedule is plain Python ints (numpy in the loop would
    break the graph at every step)."""
    model = tiny(name)
    eager = draw(model)
    counter = GraphCounter()
    compile_sampling(model, "inner", backend=counter)
    assert torch.equal(draw(model), eager)
    assert torch.equal(draw(model), eager) and counter.graphs <= 2


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["head", "inner"])
def test_inductor_compiled_sampling_gives_the_same_images_on_the_cpu(scope):
    """Inductor's fused CPU kernels with torch's random draws: the same images for a fixed seed."""
    model = tiny("fractalmar_tiny_in16")
    eager = draw(model, (2, 2))
    compile_sampling(model, scope)
    assert torch.equal(draw(model, (2, 2)), eager)


def test_compile_sampling_scope_is_checked_and_none_leaves_the_model_alone():
    model = tiny("fractalmar_tiny_in16")
    assert compile_sampling(model, "none") is model and "sample" not in vars(model.next_fractal.next_fractal)
    with pytest.raises(ValueError, match="scope must be one of"):
        compile_sampling(model, "everything")
