"""The same contract on a GPU: fixtures in fp32, mixed-precision training and sampling, the CLI.

Skipped where there is no CUDA device. FRACTALGEN_TEST_DEVICE=cpu runs them on the CPU instead, to
check the tests themselves on a machine without a GPU.
"""
import os

import pytest
import torch

from helpers import MODEL_ARGS, load_fixture, normalize_u8, pixel_head, random_images, run, write_image_folder
from models.fractalgen import build_model
from util.misc import autocast
from util.sampling import sample_classes

DEVICE = torch.device(os.environ.get("FRACTALGEN_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
PRECISIONS = ["fp16", "bf16"] if DEVICE.type == "cuda" else ["bf16"]


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """The fixtures' tolerances hold for IEEE float32 matmuls, not TF32."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("name", ["tiny_ar", "tiny_mar_gp"])
def test_fixture_conditions_logits_and_loss_in_float32(name):
    model, rec = load_fixture(name)
    model.to(DEVICE)
    x, labels = normalize_u8(rec["images_u8"]).to(DEVICE), rec["labels"].to(DEVICE)
    gen = model.generator
    with torch.no_grad():
        patches = gen.patchify(x)
        conds = [model.class_emb(labels)] * 5
        outs = gen.predict(patches, rec["l0_mask"].to(DEVICE), conds) if "l0_mask" in rec else gen.predict(patches, conds)
        for ours, ref in zip(outs, rec["l0_predict"]):
            torch.testing.assert_close(ours.cpu(), ref, atol=1e-4, rtol=1e-4)
        target = normalize_u8(rec["head_target_u8"][:, :, None, None])[:, :, 0, 0].to(DEVICE)
        logits, _ = pixel_head(model).predict(target, [rec["head_cond"].to(DEVICE)])
        torch.testing.assert_close(logits.cpu(), rec["head_logits"], atol=1e-4, rtol=1e-4)
        if name == "tiny_ar":  # the AR loss has no random mask
            assert model(x, labels).item() == pytest.approx(rec["eval_loss"], abs=1e-4)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", ["fractalar_tiny_in16", "fractalmar_tiny_in16"])
def test_mixed_precision_training_step_is_finite_and_logits_stay_float32(name, precision):
    torch.manual_seed(0)
    mar = name.startswith("fractalmar")
    model = build_model(name, class_num=10, num_conds=5 if mar else 1, guiding_pixel=mar,
                        grad_checkpointing=True).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=precision == "fp16")
    x, labels = random_images(8, 16).to(DEVICE), torch.arange(8, device=DEVICE) % 10
    head = pixel_head(model)
    with autocast(DEVICE, precision):
        logits, _ = head.predict(torch.zeros(4, 3, device=DEVICE), [torch.randn(4, head.cond_proj.in_features,
                                                                                device=DEVICE)])
        loss = model(x, labels)
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_attention_with_dropout_beyond_the_sdpa_batch_limit(monkeypatch):
    """Deep MAR levels at the released batches hand attention more than 65,535 sequences; SDPA's
    efficient CUDA kernel with dropout refused them (fractalmar_large_in256, batch 32, crashed).
    On the CPU (checking the test itself) the limit is lowered: the real size takes minutes there."""
    import models.layers as layers
    if DEVICE.type == "cpu":
        monkeypatch.setattr(layers, "SDPA_MAX_BATCH", 200)
    n = layers.SDPA_MAX_BATCH + 100
    torch.manual_seed(0)
    q, k, v = (torch.randn(n, 6, 2, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    out = layers.attend(q, k, v, causal=True, dropout_p=0.1)  # causal: SDPA on the CPU too
    out.sum().backward()
    assert out.shape == (n, 6, 16) and torch.isfinite(q.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(layers.attend(q, k, v, causal=True)[-200:],
                                   layers.attend(q[-200:], k[-200:], v[-200:], causal=True), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("precision", ["fp32"] + PRECISIONS)
def test_sampling_with_guidance_gives_images_on_the_device(precision):
    torch.manual_seed(0)
    model = build_model("fractalmar_tiny_in16", class_num=10, num_conds=5, guiding_pixel=True).to(DEVICE)
    images = sample_classes(model, [0, 3, 9], [4, 2], cfg=3.0, precision=precision)
    assert images.shape == (3, 3, 16, 16) and images.device.type == DEVICE.type
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1


def test_same_seed_same_samples_on_the_device():
    model = build_model("fractalar_tiny_in16", class_num=10, num_conds=1).to(DEVICE)
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append(sample_classes(model, [1, 2], [16, 16], cfg=2.0))
    assert torch.equal(*draws)


def test_cli_trains_evaluates_nll_and_generates_on_the_device(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_image_folder(data, size=16)
    common = MODEL_ARGS + ["--device", str(DEVICE), "--data_path", str(data), "--output_dir", str(out),
                           "--resume", str(out)]
    train = run(common + ["--epochs", "1", "--batch_size", "4"])
    assert train.returncode == 0, train.stderr[-2000:]
    nll = run(common + ["--evaluate_nll", "--nll_bsz", "4"])
    assert nll.returncode == 0 and "BPD:" in nll.stdout, nll.stderr[-2000:]
    gen = run(common + ["--evaluate_gen", "--num_images", "6", "--gen_bsz", "3", "--num_iter_list", "4,2",
                        "--cfg", "2.0", "--fid_stats", "none"])
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert len(list(out.glob("ariter*/*.png"))) == 6


@pytest.mark.parametrize("precision", ["fp32"] + PRECISIONS)
@pytest.mark.parametrize("name", ["fractalar_tiny_in16", "fractalmar_tiny_in16"])
def test_editing_keeps_the_known_pixels_on_the_device(name, precision):
    from util.edit import shape_mask
    from util.sampling import edit_images
    torch.manual_seed(0)
    mar = name.startswith("fractalmar")
    model = build_model(name, class_num=10, num_conds=5 if mar else 1, guiding_pixel=mar).to(DEVICE)
    image, unknown = torch.randint(0, 256, (3, 16, 16)) / 255, shape_mask("3,2,11,13", 16)
    edits = edit_images(model, image, unknown, [1, 7], [4, 2], cfg=3.0, precision=precision, seed=5)
    assert torch.equal(edits[:, :, ~unknown], image[:, ~unknown].expand(2, -1, -1))
    assert (edits[:, :, unknown] != image[:, unknown]).float().mean() > 0.9
    assert torch.equal(edits, edit_images(model, image, unknown, [1, 7], [4, 2], cfg=3.0, precision=precision, seed=5))


def test_sampling_loops_do_not_wait_for_the_device():
    """No host sync inside model.sample (the loops over steps, levels and channels): the GPU is never
    left waiting for Python. CUDA only (torch's sync debug mode)."""
    if DEVICE.type != "cuda":
        pytest.skip("torch.cuda.set_sync_debug_mode needs CUDA")
    torch.manual_seed(0)
    model = build_model("fractalmar_tiny_in16", class_num=10, num_conds=5, guiding_pixel=True).to(DEVICE).eval()
    cond = torch.cat([model.class_emb(torch.arange(4, device=DEVICE)), model.fake_latent.repeat(4, 1)])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad(), autocast(DEVICE, "fp16"):
            model.sample([cond] * 5, [4, 4], 3.0, "linear", 1.0, 1e-4, fractal_level=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def per_image_nll(model, images, labels):
    """Unconditional NLL (nats per dim) of each image under `model`, the same MAR masks for every call."""
    from models.layers import imagenet_stats
    mean, std = imagenet_stats(images.device)
    normalized = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    values = []
    for i in range(len(images)):
        torch.manual_seed(0)
        with torch.no_grad():
            values.append(float(model(normalized[i:i + 1], labels[i:i + 1])))
    return torch.tensor(values)


@pytest.mark.parametrize("scope", ["head", "inner"])
def test_compiled_sampling_gives_the_eager_samples_or_their_nll(scope):
    """util.sampling.compile_sampling on the device (CUDA graphs on CUDA): the eager path's images for the same
    seed; where fused kernels round differently and a draw changes, the samples' NLL under the model
    must agree within noise (3 standard errors of the paired differences). Prints what it measured."""
    from util.sampling import compile_sampling
    torch.manual_seed(0)
    model = build_model("fractalmar_tiny_in16", class_num=10, num_conds=5, guiding_pixel=True).to(DEVICE).eval()
    labels = torch.arange(16, device=DEVICE) % 10

    def draw():
        torch.manual_seed(3)
        if DEVICE.type == "cuda":
            torch.cuda.manual_seed(3)
        return sample_classes(model, labels, [4, 4], cfg=3.0, cfg_schedule="linear", temperature=1.1)
    eager = draw()
    compile_sampling(model, scope)
    draw()  # compiles, records the CUDA graphs
    fast = draw()
    same = (fast == eager).all(dim=1).float().mean().item()
    d = per_image_nll(model, fast, labels) - per_image_nll(model, eager, labels)
    noise = 3 * d.std().item() / len(d) ** 0.5 if len(d) > 1 else 0.0
    print(f"\ncompiled sampling ({scope}) on {DEVICE}: {same:.2%} of pixels identical; NLL difference "
          f"{d.mean().item():+.5f} nats/dim (3 standard errors {noise:.5f})")
    assert same == 1.0 or abs(d.mean().item()) <= noise
