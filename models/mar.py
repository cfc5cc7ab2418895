"""Masked autoregressive generator: a bidirectional transformer predicts the conditions of masked
patches; sampling unmasks them in a random order on a cosine schedule."""
import functools
import math

import numpy as np
import torch
import torch.nn as nn

from models.layers import Block, PatchGenerator, guidance_batch, is_mask, sampling_steps, take_rows
from models.pixelloss import PixelLoss


# what a MAR level hands down per patch: its own output and those of its four neighbours (level 0
# gets the class embedding in all five places)
CONDITIONS = ("middle", "top", "right", "bottom", "left")


@functools.lru_cache(maxsize=None)
def neighbour_table(grid, device):
    """(5, grid²) positions of each patch itself and of the patch above, to the right, below, to the
    left; grid² (a zero row appended to the outputs) where there is none."""
    i, j = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    none = grid * grid
    table = [i * grid + j,
             torch.where(i > 0, (i - 1) * grid + j, none), torch.where(j < grid - 1, i * grid + j + 1, none),
             torch.where(i < grid - 1, (i + 1) * grid + j, none), torch.where(j > 0, i * grid + j - 1, none)]
    return torch.stack(table).reshape(5, -1).to(device)


class MAR(PatchGenerator):
    """A masked generator level: a bidirectional transformer reads [guiding pixel], `num_conds`
    condition tokens and the patches, some replaced by a mask token, and outputs one vector per patch.
    It hands the next level, for each patch it generates, the first `num_conds_out` of CONDITIONS:
    that patch's output and those of its four neighbours (zeros at the border)."""

    def __init__(self, seq_len, patch_size, cond_embed_dim, embed_dim, num_blocks, num_heads,
                 attn_dropout, proj_dropout, num_conds=1, guiding_pixel=False, grad_checkpointing=False,
                 num_conds_out=len(CONDITIONS)):
        self.num_conds, self.guiding_pixel = num_conds, bool(guiding_pixel)
        self.num_conds_out = num_conds_out  # what the next level reads: only those are computed
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
    def prefix_tokens(self, cond_list):
        """The condition tokens in front of the patches: [guiding pixel], cond_{k-1} .. cond_0.
        They do not change while sampling, so the sampler embeds them once."""
        prefix = [self.cond_emb(cond_list[i]) for i in reversed(range(self.num_conds))]
        if self.guiding_pixel:
            prefix.insert(0, self.pix_proj(cond_list[-1]))
        return torch.stack(prefix, dim=1)

    def encode(self, x, mask, prefix, rows=None):
        """Transformer outputs of the patch positions. x: (n, seq_len, 3p²) patches, mask: (n, seq_len),
        true where a patch is hidden, prefix: prefix_tokens(). `rows` (patch positions, see take_rows)
        limits the last block to the outputs that are read. Returns (n, seq_len, D) or those rows."""
        x = self.patch_emb(x)
        x = torch.where(mask.bool()[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([prefix.to(x.dtype), x], dim=1)
        x = self.patch_emb_ln(x + self.pos_embed_learned)
        if rows is None:
            rows = slice(self.num_prefix, None)
        elif is_mask(rows):
            rows = torch.cat([rows.new_zeros(rows.size(0), self.num_prefix), rows], dim=1)
        else:
            rows = rows + self.num_prefix
        return self.norm(self.run_blocks(x, rows=rows))

    def padded_outputs(self, out, rows=None):
        """Outputs of patch positions `rows` (None: all; see take_rows) put back in place in an
        (n, seq_len + 1, D) tensor, zeros elsewhere; the extra last row is "no neighbour"."""
        n, d = (out.size(0), out.size(-1)) if rows is None else (rows.size(0), out.size(-1))
        if rows is None:
            return torch.cat([out, out.new_zeros(n, 1, d)], dim=1)
        full = out.new_zeros(n, self.seq_len + 1, d)
        if is_mask(rows):
            return full.index_put((torch.cat([rows, rows.new_zeros(n, 1)], dim=1),), out)
        return full.scatter(1, rows[..., None].expand(-1, -1, d), out)

    def conditions_at(self, padded, pos, num_conds=5):
        """The first `num_conds` of [middle, top, right, bottom, left] for patch positions `pos`, from
        padded_outputs(): a patch's own output and those of the patch above, to the right, below, to
        the left (zeros at the border). pos: (n, r) indices, giving (n, r, D) each, or an (n, seq_len)
        mask, giving (m, D) each in row-major order."""
        table = neighbour_table(self.grid, padded.device)
        if is_mask(pos):
            b, p = pos.nonzero(as_tuple=True)
            return [padded[b, table[k][p]] for k in range(num_conds)]
        return [take_rows(padded, table[k][pos]) for k in range(num_conds)]

    def conditions_from(self, out, rows, pos):
        """The conditions for positions `pos` from encode()'s outputs `out` of `rows`. When the next
        level reads only a patch's own output, `rows` are the positions themselves and `out` already
        holds those conditions in order."""
        if self.num_conds_out == 1 and rows is not None:
            return [out]
        return self.conditions_at(self.padded_outputs(out, rows), pos, self.num_conds_out)

    def neighbour_conditions(self, middle):
        """The outputs of the patch above, to the right, below and to the left (zeros at the border)."""
        pos = torch.arange(self.seq_len, device=middle.device).expand(middle.size(0), -1)
        return self.conditions_at(self.padded_outputs(middle), pos)[1:]

    def predict(self, x, mask, cond_list):
        """Conditions for every patch. x: (n, seq_len, 3p²) patches, mask: (n, seq_len), true where a
        patch is hidden. The sequence is [guiding pixel], cond_{k-1} .. cond_0, patches.
        Returns [middle, top, right, bottom, left], each (n, seq_len, D)."""
        middle = self.encode(x, mask, self.prefix_tokens(cond_list))
        return [middle] + self.neighbour_conditions(middle)

    def needed_positions(self, mask):
        """The outputs the next level reads when it gets the masked patches: the masked ones and, when
        it takes neighbour conditions, their four neighbours. (n, seq_len) bool."""
        if self.num_conds_out == 1:
            return mask
        grid = mask.reshape(-1, self.grid, self.grid)
        needed = grid.clone()
        needed[:, 1:] |= grid[:, :-1]
        needed[:, :-1] |= grid[:, 1:]
        needed[:, :, 1:] |= grid[:, :, :-1]
        needed[:, :, :-1] |= grid[:, :, 1:]
        return needed.reshape(mask.shape)

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
        needed = self.needed_positions(mask)
        out = self.encode(patches, mask, self.prefix_tokens(cond_list), rows=needed)
        conds = self.conditions_from(out, needed, mask)
        p = self.patch_size
        return patches[mask].reshape(-1, 3, p, p), conds, guiding_pixel_loss

    # ------------------------------------------------------------------ sampling
    def sample(self, cond_list, num_iter, cfg, cfg_schedule, temperature, filter_threshold,
               next_level_sample_function, visualize=False, known=None):
        """Start fully masked; at each of min(seq_len, num_iter) steps predict the masked patches that
        the cosine schedule unmasks, in each sample's random order. With cfg != 1 the conditions are
        [conditional; unconditional] and both halves share patches and masks.

        known: (pixels (bsz, 3, S, S), unknown (bsz, S, S) bool, true where a pixel is to be made) to
        generate only the unknown pixels. Fully known patches start unmasked, as if already predicted,
        and the schedule runs over the others (steps: at most their number); partly known patches go
        down with their known pixels. A guiding pixel is drawn as usual (it does not see the known
        pixels), except that a fully known image's is its mean colour.
        """
        guided, bsz = guidance_batch(cond_list[0], cfg)
        double = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
        device = cond_list[0].device
        cond_list = list(cond_list)
        if self.guiding_pixel:
            guiding_pixel = self.guiding_pixel_loss.sample(cond_list, temperature, cfg, filter_threshold)
            if known is not None:
                some_unknown, mean_colour = known[1].flatten(1).any(dim=1, keepdim=True), known[0].mean(dim=(2, 3))
                guiding_pixel = torch.where(some_unknown, guiding_pixel, mean_colour.to(guiding_pixel.dtype))
            cond_list.append(double(guiding_pixel))
        patches = torch.zeros(bsz, self.seq_len, 3 * self.patch_size ** 2, device=device, dtype=self.pixel_dtype())
        orders = self.sample_orders(bsz).to(device)
        num_unknown = self.seq_len
        if known is not None:
            known_patches, unknown_pixels = self.patchify(known[0]).to(patches.dtype), self.pixel_mask(known[1])
            patches, orders, num_unknown = self.start_from_known(known_patches, unknown_pixels, orders)
        ranks = torch.argsort(orders, dim=1)
        prefix = self.prefix_tokens(cond_list)
        num_iter = min(int(np.max(num_unknown)) if per_sample(num_unknown) else num_unknown, num_iter)
        num_masked = num_unknown
        for step in sampling_steps(num_iter, visualize, "MAR steps"):
            still_masked = masked_after(step, num_iter, num_unknown, num_masked)
            first = 0 if step == num_iter - 1 else still_masked  # the last step predicts all that remain
            if not per_sample(num_masked):
                # positions predicted now, in increasing position order within each sample
                pos = double(orders[:, first:num_masked].sort(dim=1).values)
                rows = self.rows_read(pos)
            else:  # samples with different numbers of unknown patches: a mask of the positions
                pos = double(ranks_below(ranks, num_masked) & ~ranks_below(ranks, first))
                rows = self.needed_positions(pos)
            out = self.encode(double(patches), double(ranks_below(ranks, num_masked)), prefix, rows)
            conds = [c.reshape(-1, c.size(-1)) for c in self.conditions_from(out, rows, pos)]
            if cfg_schedule == "linear":  # known patches count as done; several masks in a batch: their mean
                done = self.seq_len - (float(np.mean(still_masked)) if per_sample(still_masked) else still_masked)
                cfg_iter = 1 + (cfg - 1) * done / self.seq_len
            else:
                cfg_iter = cfg
            given = {} if known is None else self.known_rows(known_patches, unknown_pixels, pos[:bsz])
            sampled = next_level_sample_function(cond_list=conds, cfg=cfg_iter, temperature=temperature,
                                                 filter_threshold=filter_threshold, **given)
            put_rows(patches, pos[:bsz], sampled.to(patches.dtype))
            num_masked = still_masked
            if callable(visualize):
                visualize(self.unpatchify(patches))
        return self.unpatchify(patches)

    # ------------------------------------------------------------------ sampling around known pixels
    def start_from_known(self, known_patches, unknown_pixels, orders):
        """The fully known patches in place (copied exactly) and moved to the end of each order, so
        that they are never masked. Returns (patches, orders, unknown patches per sample: an int
        when all samples have the same number, else a numpy array)."""
        unknown = unknown_pixels.any(dim=-1)  # (bsz, seq_len): patches with something to make
        patches = torch.where(unknown[..., None], torch.zeros_like(known_patches), known_patches)
        orders = orders.gather(1, torch.argsort((~unknown).gather(1, orders).int(), dim=1, stable=True))
        counts = unknown.sum(dim=1).cpu().numpy()
        return patches, orders, int(counts[0]) if (counts == counts[0]).all() else counts

    def known_rows(self, known_patches, unknown_pixels, pos):
        """What the next level needs to keep the known pixels of patches `pos` (see take_rows): its
        `known` argument, or nothing when those patches have no known pixel (then it samples as usual)."""
        p = self.patch_size
        unknown = take_rows(unknown_pixels, pos).reshape(-1, p, p)
        if bool(unknown.all()):
            return {}
        return {"known": (take_rows(known_patches, pos).reshape(-1, 3, p, p), unknown)}

    def rows_read(self, pos):
        """The patch outputs that conditions for positions `pos` (n, r) read, as (n, k·r) indices
        (repeats allowed), or None when that is not fewer than all of them. Fixed-size indices keep
        the sampler free of host syncs."""
        if self.num_conds_out == 1:
            return pos
        if self.num_conds_out * pos.size(1) >= self.seq_len:
            return None
        table = neighbour_table(self.grid, pos.device)[:self.num_conds_out]  # (k, seq_len)
        rows = table[:, pos].permute(1, 0, 2).reshape(pos.size(0), -1)
        return torch.where(rows == self.seq_len, pos.repeat(1, self.num_conds_out), rows)  # border: any valid row


def masked_after(step, num_iter, num_unknown, num_masked):
    """How many positions stay masked after `step`: the cosine schedule over the `num_unknown` ones,
    at least one fewer than the `num_masked` now and at least one until the last step, at most
    `num_masked` (ints, or per-sample numpy arrays)."""
    fraction = math.cos(math.pi / 2 * (step + 1) / num_iter)
    if per_sample(num_unknown):
        still_masked = np.floor(num_unknown * fraction).astype(int)
        return np.minimum(num_masked, np.maximum(1, np.minimum(num_masked - 1, still_masked)))
    return min(num_masked, max(1, min(num_masked - 1, math.floor(num_unknown * fraction))))


def per_sample(count):
    """Whether a count is per sample (a numpy array: editing with masks that differ between images)
    rather than one int; plain Python ints keep the sampling loop traceable by torch.compile."""
    return isinstance(count, np.ndarray)


def ranks_below(ranks, count):
    """(n, seq_len) mask of the first `count` positions of each order (an int, or a per-sample array)."""
    if not per_sample(count):
        return ranks < count
    return ranks < torch.as_tensor(count, device=ranks.device)[:, None]


def put_rows(x, rows, values):
    """Write `values` into rows `rows` of x (n, t, d): a (n, t) bool mask, or (n, r) indices."""
    if is_mask(rows):
        x[rows] = values.reshape(-1, x.size(-1))
    else:
        x.scatter_(1, rows[..., None].expand(-1, -1, x.size(-1)), values.reshape(*rows.shape, -1))
