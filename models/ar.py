"""Autoregressive generator: patches in raster order, a LLaMA-style causal transformer with 2-D
rotary embeddings, and KV-cached sampling (one patch per step)."""
import functools

import torch
import torch.nn as nn

from models.layers import Dropout, KVCache, PatchGenerator, attend, guidance_batch, sampling_steps, split_heads


@functools.lru_cache(maxsize=None)
def rope_table(grid, head_dim, device):
    """2-D rotary angles as a (1 + grid², head_dim/2, 2) table of (cos, sin).

    Patch (i, j) gets head_dim/4 row angles i·f_k followed by head_dim/4 column angles j·f_k with
    f_k = 10000^(−2k/(head_dim/2)). Row 0 (the condition token) is all zeros: its q and k vanish.
    """
    half = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles_1d = torch.outer(torch.arange(grid).float(), freqs)                  # (grid, hd/4)
    angles = torch.cat([angles_1d[:, None].expand(-1, grid, -1),                  # row angle
                        angles_1d[None, :].expand(grid, -1, -1)], dim=-1)         # column angle
    table = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(0, 1)       # (grid², hd/2, 2)
    return torch.cat([torch.zeros(1, half, 2), table]).to(device)


def apply_rope(x, table):
    """Rotate adjacent pairs of x (b, t, heads, head_dim) by the angles of `table` (t, head_dim/2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(3).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back, then scaled (LLaMA's order)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class RotaryAttention(nn.Module):
    """Causal attention without biases, rotary q and k, residual dropout after the output projection."""

    def __init__(self, dim, num_heads, resid_dropout=0.1):
        super().__init__()
        self.num_heads = num_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = Dropout(resid_dropout)

    def forward(self, x, rope, cache=None):
        q, k, v = split_heads(self.wqkv(x), self.num_heads)
        x = attend(apply_rope(q, rope), apply_rope(k, rope), v, causal=True, cache=cache)
        return self.resid_dropout(self.wo(x))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x), hidden size 8/3·dim rounded up to a multiple of 256."""

    def __init__(self, dim, dropout=0.1, multiple_of=256):
        super().__init__()
        hidden = int(2 * 4 * dim / 3)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = Dropout(dropout)

    def forward(self, x):
        return self.ffn_dropout(self.w2(nn.functional.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    """LLaMA-style block. Its dropout is a fixed 0.1, as released (attn/proj dropout do not apply)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.attention = RotaryAttention(dim, num_heads)
        self.feed_forward = FeedForward(dim)
        self.attention_norm = RMSNorm(dim)
        self.ffn_norm = RMSNorm(dim)

    def forward(self, x, rope, cache=None):
        x = x + self.attention(self.attention_norm(x), rope, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class AR(PatchGenerator):
    """An autoregressive generator level: a causal transformer reads [condition, patch_0 .. patch_{L-1}]
    in raster order, and its output at position t is the one condition it hands the next level for
    patch t (sampling makes one patch per step with a KV cache)."""

    def __init__(self, seq_len, patch_size, cond_embed_dim, embed_dim, num_blocks, num_heads,
                 grad_checkpointing=False, **unused):
        super().__init__(seq_len, patch_size, cond_embed_dim, embed_dim, num_prefix=1,
                         grad_checkpointing=grad_checkpointing)
        head_dim = embed_dim // num_heads
        if embed_dim % num_heads or head_dim % 4:
            raise ValueError(f"AR needs embed_dim divisible by num_heads with a head dim divisible by 4 "
                             f"(rotary pairs on rows and columns), got embed_dim {embed_dim}, heads {num_heads}")
        self.head_dim = head_dim
        self.blocks = nn.ModuleList([TransformerBlock(embed_dim, num_heads) for _ in range(num_blocks)])
        self.initialize_weights()

    def rope(self, device):
        return rope_table(self.grid, self.head_dim, device)

    def predict(self, x, cond_list):
        """Teacher-forced conditions: [cond, patch_0 .. patch_{L-1}] in, the output at position t
        conditions patch t. x: (n, seq_len, 3p²) patches. Returns [(n, seq_len, D)]."""
        x = torch.cat([self.cond_emb(cond_list[0]).unsqueeze(1), self.patch_emb(x)], dim=1)
        x = self.patch_emb_ln(x + self.pos_embed_learned)
        x = self.norm(self.run_blocks(x, self.rope(x.device)))
        return [x[:, :-1]]

    def forward(self, imgs, cond_list):
        """Returns every patch (n·seq_len, 3, p, p), its condition, and no guiding-pixel loss."""
        patches = self.patchify(imgs)
        cond = self.predict(patches, cond_list)[0]
        p = self.patch_size
        return patches.reshape(-1, 3, p, p), [cond.reshape(-1, cond.size(-1))], 0

    def sample(self, cond_list, num_iter, cfg, cfg_schedule, temperature, filter_threshold,
               next_level_sample_function, visualize=False, known=None):
        """Raster order, one patch per step (num_iter is ignored, as released). With cfg != 1 the
        conditions are [conditional; unconditional] and both halves share the sampled patches.

        known: (pixels (bsz, 3, S, S), unknown (bsz, S, S) bool, true where a pixel is to be made) to
        generate only the unknown pixels. A fully known patch is taken as given (teacher-forced into
        the KV cache), a partly known one goes down with its known pixels. Raster order cannot look
        ahead: a patch is drawn given the known pixels before it, not those after it, so the draw is
        exact for known pixels earlier in the order and approximate for later ones; either way known
        pixels come out as given.
        """
        cond = cond_list[0]
        guided, bsz = guidance_batch(cond, cfg)
        rope = self.rope(cond.device)
        caches = [KVCache(self.seq_len) for _ in self.blocks]
        patches = torch.zeros(bsz, self.seq_len, 3 * self.patch_size ** 2, device=cond.device,
                              dtype=self.pixel_dtype())
        if known is not None:
            known = (self.patchify(known[0]).to(patches.dtype), self.pixel_mask(known[1]))
        token = self.cond_emb(cond)
        for step in sampling_steps(self.seq_len, visualize, "AR steps"):
            x = self.patch_emb_ln(token.unsqueeze(1) + self.pos_embed_learned[:, step:step + 1])
            for block, cache in zip(self.blocks, caches):
                x = block(x, rope[step:step + 1], cache)
            cfg_iter = 1 + (cfg - 1) * (step + 1) / self.seq_len if cfg_schedule == "linear" else cfg
            settings = dict(cfg=cfg_iter, temperature=temperature, filter_threshold=filter_threshold)
            if known is None:
                patch = next_level_sample_function(cond_list=[self.norm(x)[:, 0]], **settings)
                patches[:, step] = patch.reshape(bsz, -1)
            else:
                patches[:, step] = self.patch_around_known(self.norm(x)[:, 0], known[0][:, step], known[1][:, step],
                                                           next_level_sample_function, guided, settings)
            if callable(visualize):
                visualize(self.unpatchify(patches))
            if step + 1 < self.seq_len:
                token = self.patch_emb(torch.cat([patches[:, step]] * 2) if guided else patches[:, step])
        return self.unpatchify(patches)

    def patch_around_known(self, cond, pixels, unknown, next_level_sample_function, guided, settings):
        """One patch of each image (bsz, 3p²): the known pixels `pixels` where `unknown` (bsz, p²) is
        false; the next level draws the rest, from the conditions `cond` of the images that have some."""
        p = self.patch_size
        todo = unknown.any(dim=1)
        patch = pixels.clone()
        if bool(todo.any()):
            given = {} if bool(unknown[todo].all()) else \
                {"known": (pixels[todo].reshape(-1, 3, p, p), unknown[todo].reshape(-1, p, p))}
            drawn = next_level_sample_function(cond_list=[cond[torch.cat([todo, todo]) if guided else todo]],
                                               **settings, **given)
            patch[todo] = drawn.reshape(-1, patch.size(1)).to(patch.dtype)
        return patch
