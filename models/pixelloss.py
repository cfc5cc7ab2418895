"""The per-pixel head: models a pixel's R, G, B as three 256-way categoricals, one after another.

A tiny causal transformer reads [condition, r, g] and predicts r, g, b; the output layers are tied to
the input codebooks (logits = h · codebookᵀ + bias), computed in float32.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import Block, KVCache, float32_region, guidance_batch, imagenet_stats, init_weights


def draw_categorical(probs):
    """One index per row of `probs` (n, k): the index torch.multinomial(probs, 1) draws, from the same
    generator state, leaving the generator where it leaves it.

    torch.multinomial takes argmax(p / E), E = -log1p(-U) from float64 uniforms U; its CPU loop is
    serial, so on the CPU the same E come from a vectorized log1p. Other devices and dtypes use
    torch.multinomial itself. Under torch.compile the value check, a host sync, is left out.
    """
    compiling = torch.compiler.is_compiling()
    if probs.device.type != "cpu" and compiling:  # torch.multinomial's own steps, in one graph
        return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1, keepdim=True)
    if probs.device.type != "cpu" or probs.dtype not in (torch.float32, torch.float64):
        return torch.multinomial(probs, num_samples=1)
    lowest, highest = torch.aminmax(probs) if probs.numel() and not compiling else (0, 0)
    if not (float(lowest) >= 0 and float(highest) < float("inf")):  # NaN fails both
        raise ValueError("the pixel head's probabilities contain NaN, inf or negative values: the model "
                         "weights or its conditions are not finite (check the checkpoint and --temperature)")
    exponentials = torch.rand(probs.shape, dtype=torch.float64).neg_().log1p_().neg_().to(probs.dtype)
    return (probs / exponentials).argmax(dim=-1, keepdim=True)


class TiedLogits(nn.Module):
    """Logits over the 256 intensities from a hidden state and the (tied) codebook."""

    def __init__(self, vocab_size=256):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, vocab_size))

    def forward(self, h, codebook_weight):
        with float32_region(h.device):
            return h.float() @ codebook_weight.float().t() + self.bias.float()


def guided_logits(logits, cfg, filter_threshold):
    """Classifier-free guidance on logits [conditional; unconditional] (2n, 256), as released.

    Where the conditional probability is below `filter_threshold`, the unconditional logit is raised
    to at least the conditional one (shifted to the same maximum), so guidance cannot promote
    intensities the conditional model finds very unlikely. No probability is below a threshold of 0,
    so then that step is skipped.
    """
    cond, uncond = logits.chunk(2)
    if filter_threshold > 0:
        cond_max, uncond_max = logits.view(2, -1, logits.size(-1)).amax(dim=-1, keepdim=True)
        unlikely = torch.softmax(cond, dim=-1) < filter_threshold
        uncond = torch.where(unlikely, torch.maximum(uncond, cond - cond_max + uncond_max), uncond)
    return uncond + cfg * (cond - uncond)


class PixelLoss(nn.Module):
    """The last level: models one pixel given its condition as R, then G given R, then B given R and G,
    each a 256-way categorical. It returns the loss (training, NLL) or the pixels (sampling); nothing
    is handed further down."""

    def __init__(self, c_channels, width, depth, num_heads, r_weight=1.0):
        super().__init__()
        self.r_weight = r_weight
        self.cond_proj = nn.Linear(c_channels, width)
        self.r_codebook = nn.Embedding(256, width)
        self.g_codebook = nn.Embedding(256, width)
        self.b_codebook = nn.Embedding(256, width)
        self.ln = nn.LayerNorm(width, eps=1e-6)
        self.blocks = nn.ModuleList([Block(width, num_heads, causal=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.r_mlm = TiedLogits(256)
        self.g_mlm = TiedLogits(256)
        self.b_mlm = TiedLogits(256)
        for codebook in self.codebooks():
            nn.init.normal_(codebook.weight, std=0.02)
        self.apply(init_weights)

    def codebooks(self):
        return self.r_codebook, self.g_codebook, self.b_codebook

    def heads(self):
        return self.r_mlm, self.g_mlm, self.b_mlm

    def to_intensities(self, pixels):
        """Normalized (n, 3) pixels -> integer intensities 0..255. A little noise before rounding
        keeps banker's rounding from skewing the distribution (as released)."""
        mean, std = imagenet_stats(pixels.device)
        x = (pixels.float() * std + mean) * 255
        return (x + 1e-2 * torch.randn_like(x)).round().long()

    def predict(self, target, cond_list):
        """Teacher-forced logits (n, 3, 256) for normalized pixels `target` and the middle condition.

        Returns (logits, integer targets). The b token is never an input: causal attention means
        nothing it would produce is used.
        """
        target = self.to_intensities(target.reshape(target.size(0), 3))
        x = torch.stack([self.cond_proj(cond_list[0]),
                         self.r_codebook(target[:, 0]),
                         self.g_codebook(target[:, 1])], dim=1)
        x = self.ln(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        logits = torch.stack([head(x[:, c], codebook.weight)
                              for c, (head, codebook) in enumerate(zip(self.heads(), self.codebooks()))], dim=1)
        return logits, target

    def forward(self, target, cond_list):
        logits, target = self.predict(target, cond_list)
        loss = F.cross_entropy(logits.reshape(-1, 256), target.reshape(-1), reduction="none").view(-1, 3)
        if self.training:
            loss = (self.r_weight * loss[:, 0] + loss[:, 1] + loss[:, 2]) / (self.r_weight + 2)
        else:  # the NLL: every channel counts the same
            loss = loss.mean(dim=1)
        return loss.mean()

    def sample(self, cond_list, temperature, cfg, filter_threshold=0):
        """Draw R, then G, then B for each condition; returns normalized (n, 3) pixels.

        With cfg != 1 the conditions are [conditional; unconditional] and n is half their number.
        Logits are multiplied by `temperature`, as released. One token at a time with a KV cache.
        """
        cond = cond_list[0]
        guided = guidance_batch(cond, cfg)[0]
        caches = [KVCache(3) for _ in self.blocks]
        intensities = []
        token = self.cond_proj(cond)
        for c, (head, codebook) in enumerate(zip(self.heads(), self.codebooks())):
            h = self.ln(token).unsqueeze(1)
            for block, cache in zip(self.blocks, caches):
                h = block(h, cache)
            logits = head(self.norm(h[:, 0]), codebook.weight)
            if temperature != 1.0:  # multiplying by 1.0 changes nothing
                logits = logits * temperature
            if guided:
                logits = guided_logits(logits, cfg, filter_threshold)
            ids = draw_categorical(torch.softmax(logits, dim=-1)).reshape(-1)
            intensities.append(ids)
            if c < 2:
                token = codebook(torch.cat([ids, ids]) if guided else ids)
        mean, std = imagenet_stats(cond.device)
        return (torch.stack(intensities, dim=1).float() / 255 - mean) / std
