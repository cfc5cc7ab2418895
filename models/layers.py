"""Pieces shared by the AR and MAR generators and the per-pixel head.

Patchify, weight initialisation, float32 self-attention with an optional KV cache, the ViT block,
and the base class that holds what every patch generator owns (embeddings, norms, blocks).
"""
import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def imagenet_stats(device):
    """ImageNet mean and std as float32 (3,) tensors on `device`, made once per device."""
    return (torch.tensor(IMAGENET_MEAN, device=device), torch.tensor(IMAGENET_STD, device=device))


# ----------------------------------------------------------------------------- patches
def patchify(imgs, patch_size):
    """(n, 3, h, w) -> (n, (h/p)(w/p), 3·p·p); patches in raster order, channel-major inside a patch."""
    n, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwcpq", x)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(patches, patch_size):
    """Inverse of `patchify` for a square image."""
    n, seq_len, _ = patches.shape
    p, grid = patch_size, int(round(seq_len ** 0.5))
    x = patches.reshape(n, grid, grid, 3, p, p)
    x = torch.einsum("nhwcpq->nchpwq", x)
    return x.reshape(n, 3, grid * p, grid * p)


# ----------------------------------------------------------------------------- init
def init_weights(module):
    """The release's initialisation: xavier-uniform Linear weights, zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- attention
class KVCache:
    """Keys and values of the tokens seen so far, preallocated for `max_len` tokens.

    Used for incremental decoding: the first call may hold several tokens (a prefix), later calls
    one token each.
    """

    def __init__(self, max_len):
        self.max_len, self.len = max_len, 0
        self.k = self.v = None

    def append(self, k, v):
        """k, v: (b, heads, t, head_dim). Returns the keys and values of all tokens so far."""
        if self.k is None:
            shape = (*k.shape[:2], self.max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        t = k.size(2)
        self.k[:, :, self.len:self.len + t] = k
        self.v[:, :, self.len:self.len + t] = v
        self.len += t
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


def float32_region(device):
    """A region where autocast is off, so matmuls run in float32 (where the device has autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def split_heads(qkv, num_heads):
    """(b, t, 3·d) fused projection -> q, k, v, each (b, t, heads, head_dim)."""
    b, t, _ = qkv.shape
    return qkv.view(b, t, 3, num_heads, -1).unbind(2)


# On the CPU, materializing the attention weights beats SDPA's kernels for the MAR levels' short
# sequences and for any length with dropout; SDPA stays faster for causal attention, single-query
# (KV-cached) steps and long sequences without dropout (benchmarks/attention.py measures the crossover).
CPU_EXPLICIT_MAX_KEYS = 128


def explicit_is_faster(q, k, causal, dropout_p):
    """Whether explicit_attention beats SDPA for these (b, heads, t, d) inputs (see above)."""
    return (q.device.type == "cpu" and not causal and q.size(2) > 1
            and (dropout_p > 0 or k.size(2) <= CPU_EXPLICIT_MAX_KEYS))


def attend(q, k, v, causal=False, dropout_p=0.0, cache=None):
    """Multi-head attention with float32 logits (as released, also under autocast).

    q, k, v: (b, t, heads, head_dim). With a cache, tokens after the first call come one at a time,
    so the newest token attends to every cached one and needs no mask. Returns (b, t, heads·head_dim).
    """
    b, t = q.shape[:2]
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    if cache is not None:
        k, v = cache.append(k, v)
    out_dtype = v.dtype
    causal = causal and t > 1
    with float32_region(q.device):
        q, k, v = q.float(), k.float(), v.float()
        if explicit_is_faster(q, k, causal, dropout_p):
            out = explicit_attention(q, k, v, causal, dropout_p)
        else:
            out = sdpa_in_chunks(q, k, v, causal, dropout_p)
    return out.to(out_dtype).transpose(1, 2).reshape(b, t, -1)


# SDPA's memory-efficient CUDA kernel refuses dropout for a batch above this (its dropout seeds and
# offsets are per batch entry, which is a grid dimension: "cannot produce valid seed and offset
# outputs"); deep MAR levels see images × kept patches as their batch.
SDPA_MAX_BATCH = 65535


def sdpa_in_chunks(q, k, v, causal=False, dropout_p=0.0):
    """F.scaled_dot_product_attention on (b, heads, t, d) inputs, split along the batch so that no call
    sees more than SDPA_MAX_BATCH samples; each chunk draws its own dropout mask."""
    if q.size(0) <= SDPA_MAX_BATCH:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    return torch.cat([F.scaled_dot_product_attention(*qkv, dropout_p=dropout_p, is_causal=causal)
                      for qkv in zip(*(z.split(SDPA_MAX_BATCH) for z in (q, k, v)))])


def explicit_attention(q, k, v, causal=False, dropout_p=0.0):
    """softmax(q·kᵀ / √d)·v with the weights materialized (float32 logits, a max-subtracted softmax and
    dropout on the weights, as the release computes it); q, k, v: (b, heads, t, d). Causal means
    query i sees keys up to i + (keys − queries)."""
    weights = (q @ k.transpose(-2, -1)).mul_(q.size(-1) ** -0.5)
    if causal:
        t, s = weights.shape[-2:]
        future = torch.ones(t, s, dtype=torch.bool, device=q.device).triu_(s - t + 1)
        weights = weights.masked_fill_(future, float("-inf"))
    weights = weights.softmax(dim=-1)
    if dropout_p:
        weights = dropout(weights, dropout_p)
    return weights @ v


def dropout(x, p):
    """Training-mode dropout. On the CPU the mask comes from a uniform draw and a comparison, the same
    distribution as torch's bernoulli_ at about half its cost (benchmarks/README.md); other devices
    keep torch's fused kernel."""
    if p == 0 or p == 1 or x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    keep = torch.rand(x.shape, device=x.device).ge_(p).mul_(1 / (1 - p))
    return x * keep.to(x.dtype)


class Dropout(nn.Dropout):
    """nn.Dropout with `dropout`'s faster mask on the CPU."""

    def forward(self, x):
        return dropout(x, self.p) if self.training else x


class Attention(nn.Module):
    """ViT-style attention (fused qkv with bias, output projection), optionally causal."""

    def __init__(self, dim, num_heads, causal=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.causal, self.attn_drop = num_heads, causal, attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)

    def forward(self, x, cache=None, rows=None):
        """`rows` (see take_rows): the tokens whose outputs are wanted (non-causal attention only);
        index rows also leave out the other queries, a mask selects after attention."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        if rows is not None and not is_mask(rows):
            q = take_rows(q, rows)
        x = attend(q, k, v, self.causal, self.attn_drop if self.training else 0.0, cache)
        if rows is not None and is_mask(rows):
            x = take_rows(x, rows)
        return self.proj_drop(self.proj(x))


# `rows` picks the tokens whose outputs are wanted, in one of four forms:
#   None            every token;
#   a slice         the same tokens of every sequence, kept as (b, r, ...);
#   a (b, t) mask   bool, true where wanted; the result is flattened to (m, ...), row-major;
#   (b, r) indices  per sequence (repeats allowed), gathered to (b, r, ...).
def is_mask(rows):
    return isinstance(rows, torch.Tensor) and rows.dtype == torch.bool


def take_rows(x, rows):
    """Tokens `rows` of x (b, t, ...), in any form but None (see above)."""
    if isinstance(rows, slice):
        return x[:, rows]
    if is_mask(rows):
        return x[rows]
    index = rows.reshape(*rows.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


class Block(nn.Module):
    """Pre-norm ViT block (LayerNorm eps 1e-6, exact GELU MLP of ratio 4), used by MAR and PixelLoss."""

    def __init__(self, dim, num_heads, causal=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, causal, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=4 * dim, act_layer=nn.GELU, drop=proj_drop)
        self.mlp.drop1, self.mlp.drop2 = Dropout(proj_drop), Dropout(proj_drop)

    def forward(self, x, cache=None, rows=None):
        """With `rows` (see take_rows), only those tokens' outputs are computed; every token still
        serves as key and value. The last block of a level uses this when only some outputs are read:
        the output projection and the MLP, 3/4 of a block's matmuls, and (for index rows) the
        attention of the other queries are skipped."""
        h = self.attn(self.norm1(x), cache, rows)
        if rows is not None:
            x = take_rows(x, rows)
        x = x + h
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- generators
class PatchGenerator(nn.Module):
    """What every generator level owns: it cuts its image into `seq_len` patches of `patch_size`,
    embeds them and `num_prefix` condition tokens, runs transformer blocks, and hands one
    condition per patch to the next level.

    Subclasses (AR, MAR) add `self.blocks` and their own predict / forward / sample.
    """

    def __init__(self, seq_len, patch_size, cond_embed_dim, embed_dim, num_prefix, grad_checkpointing):
        super().__init__()
        grid = int(round(seq_len ** 0.5))
        if grid * grid != seq_len:
            raise ValueError(f"seq_len must be a square number of patches, got {seq_len}")
        self.seq_len, self.patch_size, self.grid = seq_len, patch_size, grid
        self.grad_checkpointing = grad_checkpointing
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + num_prefix, embed_dim))
        self.patch_emb = nn.Linear(3 * patch_size ** 2, embed_dim, bias=True)
        self.patch_emb_ln = nn.LayerNorm(embed_dim, eps=1e-6)
        self.cond_emb = nn.Linear(cond_embed_dim, embed_dim, bias=True)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def initialize_weights(self):
        nn.init.normal_(self.pos_embed_learned, std=0.02)
        self.apply(init_weights)

    def patchify(self, imgs):
        return patchify(imgs, self.patch_size)

    def unpatchify(self, patches):
        return unpatchify(patches, self.patch_size)

    def pixel_mask(self, unknown):
        """(bsz, S, S) per-pixel mask -> (bsz, seq_len, p²), patch by patch as patchify lays them out."""
        return patchify(unknown[:, None].float(), self.patch_size) > 0

    def run_blocks(self, x, *args, rows=None):
        """The transformer blocks, with activation checkpointing in training when asked for.
        `rows`: the tokens whose outputs are wanted from the last block (Block.forward); None for all."""
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            kwargs = {"rows": rows} if rows is not None and i == last else {}
            if use_ckpt:
                x = checkpoint(block, x, *args, use_reentrant=False, **kwargs)
            else:
                x = block(x, *args, **kwargs)
        return x

    def pixel_dtype(self):
        """Sampled pixels are kept in the model's parameter precision (float32 unless converted)."""
        return self.patch_emb.weight.dtype


def guidance_batch(cond, cfg):
    """With cfg != 1 the conditions are [conditional; unconditional]: (guided, images to make)."""
    guided = cfg != 1.0
    return guided, cond.size(0) // 2 if guided else cond.size(0)


def sampling_steps(num_steps, visualize, desc):
    """The outer sampling loop's steps; `visualize=True` shows a progress bar (no IPython needed)."""
    steps = range(num_steps)
    return tqdm(steps, desc=desc, leave=False) if visualize is True else steps

