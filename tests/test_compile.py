"""--compile (models.fractalgen.compile_blocks): compiled training computes what eager training computes."""
import pytest
import torch

from helpers import random_images
from models.fractalgen import build_model, compile_blocks


def training_steps(name, steps, compile_backend=None, **kwargs):
    """Loss and gradients of `steps` seeded training steps of a fresh tiny model (same weights each call)."""
    torch.manual_seed(0)
    model = build_model(name, num_conds=5 if "mar" in name else 1, class_num=10, **kwargs).train()
    if compile_backend:
        compile_blocks(model, backend=compile_backend)
    images, labels = random_images(4, 16, torch.Generator().manual_seed(1)), torch.arange(4)
    results = []
    for step in range(steps):
        torch.manual_seed(100 + step)
        loss = model(images, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    return model, results


def assert_same_training(eager, compiled):
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled):
        torch.testing.assert_close(loss_c, loss_e, atol=1e-6, rtol=1e-5)
        assert grads_c.keys() == grads_e.keys() and len(grads_e) > 50
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-6, rtol=1e-4, msg=name)


def test_compiled_blocks_train_as_eager():
    """The graphs dynamo and AOTAutograd capture (backend aot_eager: no code generation, which takes
    minutes on the CPU; the inductor run is the slow test below) give eager's loss and gradients.
    Eval mode stays eager, and the state dict keeps its keys."""
    _, eager = training_steps("fractalmar_tiny_in16", 1, attn_dropout=0.0, proj_dropout=0.0)
    model, compiled = training_steps("fractalmar_tiny_in16", 1, "aot_eager", attn_dropout=0.0, proj_dropout=0.0)
    assert_same_training(eager, compiled)
    assert not any(k.startswith("_orig_mod") or "._orig_mod" in k for k in model.state_dict())
    frames = dict(torch._dynamo.utils.counters["frames"])
    with torch.no_grad():
        nll = model.eval()(random_images(2, 16, torch.Generator().manual_seed(2)), torch.arange(2))
    assert torch.isfinite(nll) and dict(torch._dynamo.utils.counters["frames"]) == frames


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fractalmar_tiny_in16", "fractalar_tiny_in16"])
def test_inductor_compiled_blocks_train_as_eager(name, monkeypatch):
    """Inductor's code, with the released dropouts and gradient checkpointing, over two steps. Inductor
    draws its own random numbers unless told to use torch's (fallback_random), so that is set here."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    _, eager = training_steps(name, 2, grad_checkpointing=True)
    _, compiled = training_steps(name, 2, "inductor", grad_checkpointing=True)
    assert_same_training(eager, compiled)
