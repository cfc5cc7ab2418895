"""The release's per-pixel head work, for timing our code against what the release computes.

The release draws a pixel's R, G and B by running the head's whole 4-token sequence
[condition, r, g, b] again for each channel (no KV cache), with the channels not drawn yet set to
intensity 0. Causal attention makes each channel's logits the same as with one token at a time and a
cache; only the amount of work differs (3 passes over 4 tokens instead of 3 passes over 1 token).

In training and the NLL the release runs the head on the 4-token sequence [condition, r, g, b]
(SPEC.md, PixelLoss) and reads the logits of the first three positions; the b token's output is
never used, and causal attention keeps it out of the others, so a 3-token sequence gives the same
loss with a quarter less head work.

`use_release_head(model)` puts both into every pixel head of a FractalGen model, so that a checkout
which otherwise computes what the release computes (every MAR output at every step, the AR level
with a KV cache) does the release's head work. bench.py's `--release_like PATH` uses it.
"""
import types

import torch


def release_guidance(cond, uncond, cfg, filter_threshold):
    """Classifier-free guidance as SPEC.md states the release's (checkouts differ in how they call theirs)."""
    shifted = cond - cond.max(dim=-1, keepdim=True)[0] + uncond.max(dim=-1, keepdim=True)[0]
    uncond = torch.where(torch.softmax(cond, dim=-1) < filter_threshold, torch.maximum(uncond, shifted), uncond)
    return uncond + cfg * (cond - uncond)


@torch.no_grad()
def release_schedule_sample(head, cond_list, temperature, cfg, filter_threshold=0):
    """PixelLoss.sample with the release's schedule; same arguments and result as the original."""
    from models.layers import guidance_batch, imagenet_stats  # the checkout's own modules
    cond = cond_list[0]
    guided, bsz = guidance_batch(cond, cfg)
    mean, std = imagenet_stats(cond.device)
    codebooks, heads = head.codebooks(), head.heads()
    drawn = torch.zeros(cond.size(0), 3, dtype=torch.long, device=cond.device)
    pixels = torch.empty(bsz, 3, device=cond.device)
    for c in range(3):
        x = torch.stack([head.cond_proj(cond)] + [codebook(drawn[:, i]) for i, codebook in enumerate(codebooks)],
                        dim=1)
        x = head.ln(x)
        for block in head.blocks:
            x = block(x)
        logits = heads[c](head.norm(x[:, c]), codebooks[c].weight) * temperature
        if guided:
            logits = release_guidance(logits[:bsz], logits[bsz:], cfg, filter_threshold)
        ids = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).reshape(-1)
        pixels[:, c] = (ids.float() / 255 - mean[c]) / std[c]
        drawn[:, c] = torch.cat([ids, ids]) if guided else ids
    return pixels


def release_teacher_forced_predict(head, target, cond_list):
    """PixelLoss.predict on the release's 4-token sequence; same arguments and result as the original."""
    target = head.to_intensities(target.reshape(target.size(0), 3))
    x = torch.stack([head.cond_proj(cond_list[0])] + [codebook(target[:, i]) for i, codebook in
                                                      enumerate(head.codebooks())], dim=1)
    x = head.ln(x)
    for block in head.blocks:
        x = block(x)
    x = head.norm(x)
    logits = torch.stack([mlm(x[:, c], codebook.weight) for c, (mlm, codebook) in
                          enumerate(zip(head.heads(), head.codebooks()))], dim=1)
    return logits, target


def use_release_head(model):
    """Give every per-pixel head (class PixelLoss) of `model` the release's sampling schedule and its
    4-token teacher-forced sequence."""
    heads = [m for m in model.modules() if type(m).__name__ == "PixelLoss"]
    if not heads:
        raise ValueError("no PixelLoss module in this model: is it a FractalGen?")
    for head in heads:
        head.sample = types.MethodType(release_schedule_sample, head)
        head.predict = types.MethodType(release_teacher_forced_predict, head)
    return model
