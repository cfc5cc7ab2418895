"""The models compute what the released implementation computes (fixtures in tests/fixtures)."""
import glob
import math
import os

import pytest
import torch

from helpers import FIXTURES, load_fixture, normalize_u8, pixel_head, random_images
from models.fractalgen import MODELS, RELEASED, FractalGen, build_model
import models.layers as layers
from models.layers import Dropout, attend, explicit_attention, patchify, unpatchify
from models import pixelloss
from models.pixelloss import draw_categorical, guided_logits

@pytest.mark.parametrize("name", RELEASED)
def test_released_models_have_the_released_keys_and_sizes(name):
    released = RELEASED[name]
    with torch.device("meta"):
        model = build_model(name, num_conds=released["num_conds"], guiding_pixel=released["guiding_pixel"])
    assert released["config"] is MODELS[name] and model.img_size == released["img_size"]
    assert len(released["num_iter_list"].split(",")) == model.num_fractal_levels - 1
    ours = sorted((k, "x".join(map(str, v.shape))) for k, v in model.state_dict().items())
    with open(os.path.join(FIXTURES, "keys", name + ".txt")) as f:
        ref = sorted(tuple(line.split()) for line in f if line.strip())
    assert ours == ref
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == released["params"]


def test_small_configs_and_lookup():
    ar = build_model("fractalar_tiny_in16")
    assert [g.generator.__class__.__name__ for g in (ar, ar.next_fractal)] == ["AR", "AR"]
    assert ar.generator.seq_len == 16 and ar.generator.patch_size == 4 and len(ar.generator.blocks) == 2
    assert ar.class_emb.weight.shape == (1000, 128) and ar.next_fractal.generator.cond_emb.weight.shape == (64, 128)
    head = ar.next_fractal.next_fractal
    assert head.cond_proj.weight.shape == (32, 64) and len(head.blocks) == 1 and head.blocks[0].attn.num_heads == 2
    mar = build_model("fractalmar_tiny_in16")
    assert [g.generator.__class__.__name__ for g in (mar, mar.next_fractal)] == ["MAR", "MAR"]
    with pytest.raises(ValueError, match="valid names: .*fractalmar_in64"):
        build_model("fractalmar_in65")


def test_patchify_layout_and_inverse():
    imgs = torch.randn(2, 3, 8, 8)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 4, 48)
    # patch 1 is the top-right block; inside it index c·p·p + i·p + j
    assert torch.equal(patches[1, 1, 2 * 16 + 3 * 4 + 1], imgs[1, 2, 3, 5])
    assert torch.equal(unpatchify(patches, 4), imgs)


@pytest.fixture(scope="module")
def tiny_ar():
    return load_fixture("tiny_ar")


@pytest.fixture(scope="module")
def tiny_mar_gp():
    return load_fixture("tiny_mar_gp")


def fixture_inputs(rec):
    return normalize_u8(rec["images_u8"]), rec["labels"]


def test_ar_losses_equal_reference(tiny_ar):
    model, rec = tiny_ar
    x, labels = fixture_inputs(rec)
    with torch.no_grad():
        assert model(x, labels).item() == pytest.approx(rec["eval_loss"], abs=1e-4)
        head = pixel_head(model)
        head.train()
        try:
            assert model(x, labels).item() == pytest.approx(rec["train_head_loss"], abs=1e-4)
        finally:
            head.eval()


def test_mar_nll_matches_reference_in_distribution(tiny_mar_gp):
    model, rec = tiny_mar_gp
    x, labels = fixture_inputs(rec)
    torch.manual_seed(0)
    with torch.no_grad():
        vals = torch.tensor([model(x, labels).item() for _ in range(300)], dtype=torch.float64)
    sem = vals.std() / math.sqrt(len(vals))
    z = abs(vals.mean() - rec["eval_loss_mean"]) / math.sqrt(sem ** 2 + rec["eval_loss_sem"] ** 2)
    assert z < 5, f"mean {vals.mean():.5f} vs {rec['eval_loss_mean']:.5f}, z = {z:.2f}"


@pytest.mark.parametrize("name", ["tiny_ar", "tiny_mar_gp"])
def test_level0_conditions_and_head_logits_equal_reference(name, request):
    model, rec = request.getfixturevalue(name)
    x, labels = fixture_inputs(rec)
    gen = model.generator
    conds = [model.class_emb(labels)] * 5
    with torch.no_grad():
        patches = gen.patchify(x)
        outs = gen.predict(patches, rec["l0_mask"], conds) if "l0_mask" in rec else gen.predict(patches, conds)
        assert len(outs) == len(rec["l0_predict"])
        for ours, ref in zip(outs, rec["l0_predict"]):
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        target = normalize_u8(rec["head_target_u8"][:, :, None, None])[:, :, 0, 0]
        logits, _ = pixel_head(model).predict(target, [rec["head_cond"]])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, rec["head_logits"], atol=1e-4, rtol=1e-4)


def greedy(monkeypatch, model):
    """The fixtures' protocol: argmax instead of draws, and a fixed order per sequence length."""
    monkeypatch.setattr(pixelloss, "draw_categorical", lambda probs: probs.argmax(-1, keepdim=True))

    def fixed_orders(seq_len):
        def orders(bsz):
            g = torch.Generator().manual_seed(1000 + seq_len)
            return torch.argsort(torch.rand(1, seq_len, generator=g), dim=1).repeat(bsz, 1)
        return orders
    for mod in model.modules():
        if hasattr(mod, "sample_orders"):
            monkeypatch.setattr(mod, "sample_orders", fixed_orders(mod.seq_len))


def class_conditions(model, labels, cfg):
    emb = model.class_emb(labels)
    if cfg != 1.0:
        emb = torch.cat([emb, model.fake_latent.repeat(labels.size(0), 1)])
    return [emb] * 5


@pytest.mark.parametrize("name", ["tiny_ar", "tiny_mar_gp"])
@pytest.mark.parametrize("key,cfg,schedule,temperature", [("greedy_cfg1", 1.0, "constant", 1.0),
                                                          ("greedy_cfg3_linear", 3.0, "linear", 1.5)])
def test_greedy_samples_equal_reference(name, key, cfg, schedule, temperature, request, monkeypatch):
    model, rec = request.getfixturevalue(name)
    greedy(monkeypatch, model)
    labels = rec["labels"][:2]
    with torch.no_grad():
        out = model.sample(class_conditions(model, labels, cfg), rec["greedy_iters"], cfg, schedule, temperature,
                           1e-2, fractal_level=0)
    assert out.shape == rec[key].shape
    torch.testing.assert_close(out, rec[key], atol=1e-3, rtol=0)


def test_sample_draws_from_the_model_distribution(tiny_ar, monkeypatch):
    """An AR-only model at cfg 1, temperature 1: the teacher-forced log-likelihood of a sample equals
    the sum of the log-probabilities of the draws made while sampling it."""
    model, _ = tiny_ar
    draws = []
    real_draw = pixelloss.draw_categorical

    def recording(probs):
        ids = real_draw(probs)
        draws.append(probs.double().gather(-1, ids).log().sum())
        return ids
    monkeypatch.setattr(pixelloss, "draw_categorical", recording)
    torch.manual_seed(3)
    with torch.no_grad():
        uncond = model.fake_latent.repeat(3, 1)
        imgs = model.sample([uncond] * 5, [4, 4], 1.0, "constant", 1.0, 0.0, fractal_level=0)
        nll = model(imgs, torch.zeros(3, dtype=torch.long)).item() * imgs.numel()
    assert len(draws) == 8 * 8 * 3
    assert -float(sum(draws)) == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("name", ["fractalar_tiny_in16", "fractalmar_tiny_in16"])
def test_grad_checkpointing_gives_same_loss_and_gradients(name):
    torch.manual_seed(0)
    kwargs = dict(class_num=10, guiding_pixel=name.startswith("fractalmar"), num_conds=5 if "mar" in name else 1)
    plain = build_model(name, **kwargs)
    ckpt = build_model(name, grad_checkpointing=True, **kwargs)
    ckpt.load_state_dict(plain.state_dict())
    x, labels = random_images(4, 16), torch.tensor([1, 2, 3, 4])
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(1)
        loss = model.train()(x, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5, msg=n)


def test_no_hard_coded_cuda():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = glob.glob(os.path.join(root, "models", "*.py")) + glob.glob(os.path.join(root, "util", "*.py")) + \
        glob.glob(os.path.join(root, "*.py"))
    offenders = [f for f in files if ".cuda(" in open(f).read()]
    assert not offenders


@pytest.mark.parametrize("name", ["tiny_ar", "tiny_mar_gp"])
def test_sampling_makes_nothing_off_the_input_device(name, request):
    """On the meta device any tensor created elsewhere (CPU masks, caches, noise) fails to combine."""
    rec = request.getfixturevalue(name)[1]
    meta_model = load_fixture(name)[0].to("meta")
    with torch.no_grad():
        out = meta_model.sample(class_conditions(meta_model, rec["labels"][:2].to("meta"), 2.0), [4, 4], 2.0,
                                "linear", 1.0, 1e-2, fractal_level=0)
    assert out.device.type == "meta" and out.shape == rec["greedy_cfg1"].shape


def test_bf16_autocast_on_cpu(tiny_mar_gp):
    model, rec = tiny_mar_gp
    x, labels = fixture_inputs(rec)
    torch.manual_seed(0)
    with torch.no_grad():
        fp32 = torch.tensor([model(x, labels).item() for _ in range(20)]).mean()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = torch.tensor([model(x, labels).item() for _ in range(20)]).mean()
            logits, _ = pixel_head(model).predict(torch.zeros(2, 3), [torch.randn(2, 32)])
            out = model.sample(class_conditions(model, labels[:2], 2.0), [4, 4], 2.0, "linear", 1.0, 1e-2, 0)
    assert logits.dtype == torch.float32
    assert abs(bf16 - fp32) / fp32 < 0.02
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_attention_logits_stay_float32_under_autocast():
    q, k, v = (torch.randn(2, 5, 2, 8).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(z.float().transpose(1, 2) for z in (q, k, v)), is_causal=True).bfloat16().transpose(1, 2).reshape(2, 5, 16)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("queries, keys, causal", [(5, 5, False), (5, 5, True), (1, 3, False), (2, 6, True)])
def test_explicit_attention_matches_sdpa(queries, keys, causal):
    """Causal with fewer queries than keys: the queries are the last tokens (KV-cached steps)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, queries, 8), torch.randn(3, 2, keys, 8), torch.randn(3, 2, keys, 8)
    visible = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries) if causal else None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    torch.testing.assert_close(explicit_attention(q, k, v, causal), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("max_keys", [0, 128])
def test_attend_gives_the_same_on_either_cpu_path(max_keys, monkeypatch):
    """attend() picks explicit_attention or SDPA by shape; both give the released attention."""
    monkeypatch.setattr(layers, "CPU_EXPLICIT_MAX_KEYS", max_keys)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 8) for _ in range(3))
    assert layers.explicit_is_faster(q.transpose(1, 2), k.transpose(1, 2), False, 0.0) == (max_keys > 0)
    ref = torch.nn.functional.scaled_dot_product_attention(*(z.transpose(1, 2) for z in (q, k, v)))
    torch.testing.assert_close(attend(q, k, v), ref.transpose(1, 2).reshape(2, 7, 24), atol=1e-6, rtol=1e-5)


def test_attention_in_batch_chunks_is_the_ordinary_attention(monkeypatch):
    """Above SDPA_MAX_BATCH (lowered here) attend() calls SDPA on batch chunks: same outputs."""
    monkeypatch.setattr(layers, "SDPA_MAX_BATCH", 2)  # chunks of 2 of the 9 samples
    torch.manual_seed(0)
    q, k, v = (torch.randn(9, 3, 5, 8) for _ in range(3))
    sdpa, batches = torch.nn.functional.scaled_dot_product_attention, []
    refs = [sdpa(q, k, v, is_causal=causal) for causal in (False, True)]
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention",
                        lambda q, *args, **kwargs: batches.append(q.size(0)) or sdpa(q, *args, **kwargs))
    for causal, ref in zip((False, True), refs):
        torch.testing.assert_close(layers.sdpa_in_chunks(q, k, v, causal), ref, atol=1e-6, rtol=1e-5)
    out = attend(*(z.transpose(1, 2) for z in (q, k, v)), causal=True)  # the CPU's path for causal attention
    torch.testing.assert_close(out, refs[1].transpose(1, 2).reshape(9, 5, 24), atol=1e-6, rtol=1e-5)
    assert batches == [2, 2, 2, 2, 1] * 3


def test_attention_in_batch_chunks_keeps_one_minus_p_of_the_weights(monkeypatch):
    """With zero queries every weight is 1/s, and with the identity as values the output is the
    dropped weight matrix itself: each entry is 0 or 1/(s(1 - p)), nonzero with probability 1 - p."""
    monkeypatch.setattr(layers, "SDPA_MAX_BATCH", 4)  # 10 chunks of 4 of the 40 samples
    torch.manual_seed(0)
    b, heads, s, p = 40, 2, 64, 0.1
    q, k = torch.zeros(b, heads, s, 16), torch.randn(b, heads, s, 16)
    v = torch.eye(s).expand(b, heads, s, s)
    out = layers.sdpa_in_chunks(q, k, v, dropout_p=p)
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (s * (1 - p))))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.003  # 327,680 weights: 6 standard deviations
    assert not torch.equal(kept[:4], kept[4:8])  # each chunk draws its own mask


def test_explicit_attention_dropout_keeps_rows_unbiased():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 4000, 4), torch.randn(1, 1, 8, 4), torch.ones(1, 1, 8, 1)
    out = explicit_attention(q, k, v, dropout_p=0.25)  # row sums of the dropped, rescaled weights
    assert abs(out.mean().item() - 1.0) < 0.02  # 1 on average: kept weights are scaled by 1 / 0.75
    assert out.std().item() > 0.1  # without dropout every row sums to exactly 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_categorical_draw_is_torch_multinomial(dtype):
    """draw_categorical gives torch.multinomial's index for the same generator state and leaves the
    generator where torch.multinomial leaves it, so seeds keep giving the same samples."""
    for seed in range(40):
        g = torch.Generator().manual_seed(1000 + seed)
        probs = (torch.randn(33, 256, generator=g, dtype=dtype) * (1 + seed % 9)).softmax(-1)
        torch.manual_seed(seed)
        ref, ref_next = torch.multinomial(probs, 1), torch.rand(4)
        torch.manual_seed(seed)
        ours, ours_next = draw_categorical(probs), torch.rand(4)
        assert torch.equal(ours, ref) and torch.equal(ours_next, ref_next), seed


def test_categorical_draw_rejects_probabilities_that_are_not():
    with pytest.raises(ValueError, match="NaN"):
        draw_categorical(torch.tensor([[0.5, float("nan")]]))
    for bad in ([[0.5, float("inf")]], [[1.5, -0.5]]):
        with pytest.raises(ValueError, match="negative"):
            draw_categorical(torch.tensor(bad))
    assert draw_categorical(torch.empty(0, 256)).shape == (0, 1)


@pytest.mark.parametrize("threshold", [0.0, 1e-4, 0.02])
def test_guided_logits_follow_the_released_rule(threshold):
    """Guidance as SPEC.md states it, written out plainly; a threshold of 0 filters nothing."""
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 7, 256, generator=g) * 3
    shifted = cond - cond.max(dim=-1, keepdim=True).values + uncond.max(dim=-1, keepdim=True).values
    raised = torch.where(cond.softmax(-1) < threshold, torch.maximum(uncond, shifted), uncond)
    expected = raised + 2.5 * (cond - raised)
    assert torch.equal(guided_logits(torch.cat([cond, uncond]), 2.5, threshold), expected)
    if threshold:  # the filter has changed something, or the test would not tell
        assert not torch.equal(raised, uncond)


def test_visualize_callable_sees_each_outer_step():
    model = build_model("fractalmar_tiny_in16", class_num=3, num_conds=5).eval()
    seen = []
    with torch.no_grad():
        out = model.sample(class_conditions(model, torch.tensor([0, 2]), 1.0), [4, 2], 1.0, "constant", 1.0, 0.0, 0,
                           visualize=lambda img: seen.append(img.clone()))
    assert len(seen) == 4 and all(s.shape == out.shape for s in seen)
    assert torch.equal(seen[-1], out)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny_model():
    return build_model("fractalar_tiny_in16", class_num=10).eval()


def test_wrong_image_size(tiny_model):
    with pytest.raises(ValueError, match=r"shape \(n, 3, 16, 16\)"):
        tiny_model(random_images(2, 32), torch.tensor([0, 1]))


def test_unnormalized_images(tiny_model):
    with pytest.raises(ValueError, match="normalized with the ImageNet mean"):
        tiny_model(torch.randint(0, 256, (2, 3, 16, 16)).float(), torch.tensor([0, 1]))


def test_label_out_of_range(tiny_model):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        tiny_model(random_images(2, 16), torch.tensor([0, 10]))


def test_num_iter_list_of_wrong_length(tiny_model):
    with pytest.raises(ValueError, match="num_iter_list needs one entry per generator level"):
        tiny_model.sample([tiny_model.fake_latent] * 5, [4, 4, 4], 1.0, "constant", 1.0, 0.0, 0)


def test_unknown_cfg_schedule(tiny_model):
    with pytest.raises(ValueError, match="cfg_schedule"):
        tiny_model.sample([tiny_model.fake_latent.repeat(2, 1)] * 5, [4, 4], 2.0, "cosine", 1.0, 0.0, 0)


def test_unknown_generator_type():
    with pytest.raises(ValueError, match="unknown generator type"):
        FractalGen((16, 4, 1), (32, 32, 16), (1, 1, 1), (2, 2, 2), ("ar", "diffusion", "ar"))


def test_list_lengths_disagree():
    with pytest.raises(ValueError, match="one entry per level"):
        FractalGen((16, 4, 1), (32, 32), (1, 1, 1), (2, 2, 2), ("ar", "ar", "ar"))


def test_cpu_dropout_keeps_one_minus_p_scaled_and_passes_gradient_through_the_mask():
    torch.manual_seed(0)
    drop = Dropout(0.1)
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x·mask)/dx = mask
    assert torch.equal(drop.eval()(x), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert drop.train()(x.detach().bfloat16()).dtype == torch.bfloat16
