"""Masked autoregressive generator: a bidirectional transformer predicts the conditions of masked
patches; sampling unmasks them in a random order on a cosine schedule."""
import math

import numpy as np
import torch
import torch.nn as nn

from models.layers import Block, PatchGenerator, guidance_batch, sampling_steps
from models.pixelloss import PixelLoss


class MAR(PatchGenerator):
    def __init__(self, seq_len, patch_size, cond_embed_dim, embed_dim, num_blocks, num_heads,
                 attn_dropout, proj_dropout, num_conds=1, guiding_pixel=False, grad_checkpointing=False):
        self.num_conds, self.guiding_pixel = num_conds, bool(guiding_pixel)
        self.num_prefix = num_conds + self.guiding_pixel
        super().__init__(seq_len, patch_size, cond_embed_dim, embed_dim, num_prefix=self.num_prefix,
                         grad_checkpointing=grad_checkpointing)
        if embed_dim % num_heads:
            raise ValueError(f"MAR needs embed_dim divisible by num_heads, got {embed_dim} and {num_heads}")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if self.guiding_pixel:
            self.pix_proj = nn.Linear(3, embed_dim, bias=True)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, attn_drop=attn_dropout, proj_drop=proj_dropout)
                                     for _ in range(num_blocks)])
        nn.init.normal_(self.mask_token, std=0.02)
        self.initialize_weights()
        if self.guiding_pixel:  # the patch's mean colour, generated first, conditions the whole patch
            self.guiding_pixel_loss = PixelLoss(c_channels=cond_embed_dim, width=128, depth=3, num_heads=4,
                                                r_weight=5.0)

    # ------------------------------------------------------------------ orders and masks
    def sample_orders(self, bsz):
        """A uniformly random permutation of the positions for each sample: (bsz, seq_len)."""
        noise = torch.rand(bsz, self.seq_len, device=self.mask_token.device)
        return torch.argsort(noise, dim=1)

    def training_mask(self, ranks):
        """Per sample, a ratio r ~ N(1, 0.25) truncated to [0, 1]; the first ceil(seq_len·r) positions
        of its order are masked. `ranks[b, i]` is position i's place in sample b's order."""
        ratio = nn.init.trunc_normal_(torch.empty(ranks.size(0), device=ranks.device), 1.0, 0.25, 0.0, 1.0)
        num_masked = torch.ceil(self.seq_len * ratio)
        return ranks < num_masked[:, None]

    def nll_mask(self, ranks):
        """For the NLL: one count n uniform in 1..seq_len for the batch, the first n of each order."""
        num_masked = int(torch.randint(1, self.seq_len + 1, ()))
        return ranks < num_masked

    # ------------------------------------------------------------------ network
    def neighbour_conditions(self, middle):
        """The outputs of the patch above, to the right, below and to the left (zeros at the border)."""
        b, _, c = middle.shape
        grid = middle.reshape(b, self.grid, self.grid, c)
        top, right, bottom, left = (torch.zeros_like(grid) for _ in range(4))
        top[:, 1:] = grid[:, :-1]
        right[:, :, :-1] = grid[:, :, 1:]
        bottom[:, :-1] = grid[:, 1:]
        left[:, :, 1:] = grid[:, :, :-1]
        return [t.reshape(b, -1, c) for t in (top, right, bottom, left)]

    def predict(self, x, mask, cond_list):
        """Conditions for every patch. x: (n, seq_len, 3p²) patches, mask: (n, seq_len), true where a
        patch is hidden. The sequence is [guiding pixel], cond_{k-1} .. cond_0, patches.
        Returns [middle, top, right, bottom, left], each (n, seq_len, D)."""
        x = self.patch_emb(x)
        x = torch.where(mask.bool()[..., None], self.mask_token.to(x.dtype), x)
        prefix = [self.cond_emb(cond_list[i]) for i in reversed(range(self.num_conds))]
        if self.guiding_pixel:
            prefix.insert(0, self.pix_proj(cond_list[-1]))
        x = torch.cat([torch.stack(prefix, dim=1).to(x.dtype), x], dim=1)
        x = self.patch_emb_ln(x + self.pos_embed_learned)
        x = self.norm(self.run_blocks(x))
        middle = x[:, self.num_prefix:]
        return [middle] + self.neighbour_conditions(middle)

    def forward(self, imgs, cond_list):
        """Training (random ratio) or NLL (uniform count) masking; only masked patches and their
        conditions go to the next level. Returns (patches, conditions, guiding-pixel loss)."""
        patches = self.patchify(imgs)
        ranks = torch.argsort(self.sample_orders(patches.size(0)).to(imgs.device), dim=1)
        mask = self.training_mask(ranks) if self.training else self.nll_mask(ranks)
        cond_list = list(cond_list)
        guiding_pixel_loss = 0
        if self.guiding_pixel:
            guiding_pixel = imgs.mean(dim=(2, 3))
            guiding_pixel_loss = self.guiding_pixel_loss(guiding_pixel, cond_list)
            cond_list.append(guiding_pixel)
        conds = [c[mask] for c in self.predict(patches, mask, cond_list)]
        p = self.patch_size
        return patches[mask].reshape(-1, 3, p, p), conds, guiding_pixel_loss

    # ------------------------------------------------------------------ sampling
    def sample(self, cond_list, num_iter, cfg, cfg_schedule, temperature, filter_threshold,
               next_level_sample_function, visualize=False):
        """Start fully masked; at each of min(seq_len, num_iter) steps predict the masked patches that
        the cosine schedule unmasks, in each sample's random order. With cfg != 1 the conditions are
        [conditional; unconditional] and both halves share patches and masks."""
        guided, bsz = guidance_batch(cond_list[0], cfg)
        double = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
        device = cond_list[0].device
        cond_list = list(cond_list)
        if self.guiding_pixel:
            cond_list.append(double(self.guiding_pixel_loss.sample(cond_list, temperature, cfg, filter_threshold)))
        patches = torch.zeros(bsz, self.seq_len, 3 * self.patch_size ** 2, device=device, dtype=self.pixel_dtype())
        orders = self.sample_orders(bsz).to(device)
        ranks = torch.argsort(orders, dim=1)
        rows = torch.arange(bsz, device=device)[:, None]
        all_rows = torch.arange(cond_list[0].size(0), device=device)[:, None]  # [conditional; unconditional]
        num_iter = min(self.seq_len, num_iter)
        num_masked = self.seq_len
        for step in sampling_steps(num_iter, visualize, "MAR steps"):
            conds = self.predict(double(patches), double(ranks < num_masked), cond_list)
            # how many stay masked after this step: at least one, at least one fewer than now
            still_masked = int(np.floor(self.seq_len * np.cos(math.pi / 2 * (step + 1) / num_iter)))
            still_masked = max(1, min(num_masked - 1, still_masked))
            first = 0 if step == num_iter - 1 else still_masked  # the last step predicts all that remain
            # positions predicted now, in increasing position order within each sample
            pos = orders[:, first:num_masked].sort(dim=1).values
            conds = [c[all_rows, double(pos)].reshape(-1, c.size(-1)) for c in conds]
            cfg_iter = 1 + (cfg - 1) * (self.seq_len - still_masked) / self.seq_len if cfg_schedule == "linear" else cfg
            sampled = next_level_sample_function(cond_list=conds, cfg=cfg_iter, temperature=temperature,
                                                 filter_threshold=filter_threshold)
            patches[rows, pos] = sampled.reshape(bsz, pos.size(1), -1).to(patches.dtype)
            num_masked = still_masked
            if callable(visualize):
                visualize(self.unpatchify(patches))
        return self.unpatchify(patches)
