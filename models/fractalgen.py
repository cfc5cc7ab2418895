"""Fractal Generative Models (Li, Sun, Fan, He 2025): a generator built recursively from generators.

Level l cuts its image into patches of the next level's size and, with an AR or MAR transformer,
produces one condition per patch; level l+1 generates each patch from its condition; the last level
is the per-pixel head. Level 0 also owns the class embedding and `fake_latent`, the "no class"
embedding used for classifier-free guidance and for the (unconditional) NLL.
"""
from functools import partial

import torch
import torch.nn as nn

from models.ar import AR
from models.layers import imagenet_stats
from models.mar import CONDITIONS, MAR
from models.pixelloss import PixelLoss

GENERATORS = {"ar": AR, "mar": MAR}
CFG_SCHEDULES = ("linear", "constant")


def check_config(img_size_list, embed_dim_list, num_blocks_list, num_heads_list, generator_type_list, num_conds):
    lists = dict(img_size_list=img_size_list, embed_dim_list=embed_dim_list, num_blocks_list=num_blocks_list,
                 num_heads_list=num_heads_list, generator_type_list=generator_type_list)
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the per-level lists must have one entry per level, got lengths {lengths}")
    if len(img_size_list) < 2 or img_size_list[-1] != 1:
        raise ValueError(f"img_size_list must go down to 1 (the per-pixel level), got {list(img_size_list)}")
    for size, next_size in zip(img_size_list, img_size_list[1:]):
        if size % next_size:
            raise ValueError(f"each image size must be a multiple of the next, got {list(img_size_list)}")
    unknown = [t for t in generator_type_list[:-1] if t not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown generator type(s) {unknown}; valid types: {sorted(GENERATORS)}")
    if not 1 <= num_conds <= 5:
        raise ValueError(f"num_conds must be 1..5 (the number of conditions a level passes down), got {num_conds}")
    for level in range(1, len(img_size_list) - 1):
        if generator_type_list[level] == "mar" and generator_type_list[level - 1] == "ar" and num_conds > 1:
            raise ValueError(f"level {level} is MAR with num_conds={num_conds}, but the AR level above it "
                             "gives one condition per patch; use num_conds=1")


class FractalGen(nn.Module):
    """Level `fractal_level` of a fractal generator and, recursively, every level below it.

    Its generator (AR or MAR) cuts an image of img_size_list[level] into patches of the next size and
    gives each patch its conditions; `next_fractal` (the next FractalGen, or the PixelLoss head at
    the last level) models the patches given those conditions. Level 0 also turns class labels into
    the first conditions (`class_emb`, with `fake_latent` for "no class").
    """

    def __init__(self, img_size_list, embed_dim_list, num_blocks_list, num_heads_list, generator_type_list,
                 label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1, guiding_pixel=False,
                 num_conds=1, r_weight=1.0, grad_checkpointing=False, fractal_level=0):
        super().__init__()
        check_config(img_size_list, embed_dim_list, num_blocks_list, num_heads_list, generator_type_list, num_conds)
        self.fractal_level = fractal_level
        self.num_fractal_levels = len(img_size_list)
        self.img_size = img_size_list[fractal_level]
        level = fractal_level
        if level == 0:
            self.num_classes = class_num
            self.label_drop_prob = label_drop_prob
            self.class_emb = nn.Embedding(class_num, embed_dim_list[0])
            self.fake_latent = nn.Parameter(torch.zeros(1, embed_dim_list[0]))
            nn.init.normal_(self.class_emb.weight, std=0.02)
            nn.init.normal_(self.fake_latent, std=0.02)

        # an inner MAR level reads num_conds conditions per patch; an AR level or the pixel head reads one
        next_is_mar = level + 1 < self.num_fractal_levels - 1 and generator_type_list[level + 1] == "mar"
        generator_kwargs = dict(
            seq_len=(img_size_list[level] // img_size_list[level + 1]) ** 2, patch_size=img_size_list[level + 1],
            cond_embed_dim=embed_dim_list[level - 1] if level > 0 else embed_dim_list[0],
            embed_dim=embed_dim_list[level], num_blocks=num_blocks_list[level], num_heads=num_heads_list[level],
            attn_dropout=attn_dropout, proj_dropout=proj_dropout, num_conds=num_conds,
            guiding_pixel=guiding_pixel if level > 0 else False, grad_checkpointing=grad_checkpointing)
        if generator_type_list[level] == "mar":
            generator_kwargs["num_conds_out"] = num_conds if next_is_mar else 1
        self.generator = GENERATORS[generator_type_list[level]](**generator_kwargs)

        if level < self.num_fractal_levels - 2:
            self.next_fractal = FractalGen(
                img_size_list, embed_dim_list, num_blocks_list, num_heads_list, generator_type_list,
                label_drop_prob=label_drop_prob, class_num=class_num, attn_dropout=attn_dropout,
                proj_dropout=proj_dropout, guiding_pixel=guiding_pixel, num_conds=num_conds, r_weight=r_weight,
                grad_checkpointing=grad_checkpointing, fractal_level=level + 1)
        else:
            self.next_fractal = PixelLoss(c_channels=embed_dim_list[level], width=embed_dim_list[level + 1],
                                          depth=num_blocks_list[level + 1], num_heads=num_heads_list[level + 1],
                                          r_weight=r_weight)

    def check_inputs(self, imgs, labels):
        """Shapes, pixel range and label range; the value checks cost one host sync per call."""
        size = self.img_size
        if imgs.dim() != 4 or imgs.shape[1:] != (3, size, size):
            raise ValueError(f"this model takes images of shape (n, 3, {size}, {size}), got {tuple(imgs.shape)}; "
                             f"pass --img_size {size} or pick a model made for your image size")
        if labels.shape != imgs.shape[:1]:
            raise ValueError(f"expected one label per image ({imgs.size(0)}), got labels of shape {tuple(labels.shape)}")
        if not imgs.numel():
            return
        mean, std = imagenet_stats(imgs.device)
        lo, hi = imgs.detach().float().amin(dim=(0, 2, 3)), imgs.detach().float().amax(dim=(0, 2, 3))
        bad_pixels = (lo < (0 - mean) / std - 1e-3).any() | (hi > (1 - mean) / std + 1e-3).any()
        bad_labels = (labels.min() < 0) | (labels.max() >= self.num_classes)
        bad_pixels, bad_labels = torch.stack([bad_pixels, bad_labels]).tolist()
        if bad_pixels:
            raise ValueError("images must be pixels in [0, 1] normalized with the ImageNet mean and std "
                             f"(per-channel range found: {lo.tolist()} to {hi.tolist()})")
        if bad_labels:
            raise ValueError(f"labels must lie in [0, {self.num_classes}) (class_num={self.num_classes}), "
                             f"got labels from {int(labels.min())} to {int(labels.max())}")

    def forward(self, imgs, cond_list):
        """Loss (nats per dim) of images `imgs`; at level 0 `cond_list` is the class labels.

        In training each label is dropped to `fake_latent` with probability label_drop_prob; in eval
        mode all are, so the eval loss is the unconditional NLL.
        """
        if self.fractal_level == 0:
            self.check_inputs(imgs, cond_list)
            class_embedding = self.class_emb(cond_list)
            if self.training:
                drop = torch.rand(imgs.size(0), 1, device=imgs.device) < self.label_drop_prob
                class_embedding = torch.where(drop, self.fake_latent.to(class_embedding.dtype), class_embedding)
            else:
                class_embedding = self.fake_latent.expand(imgs.size(0), -1)
            cond_list = [class_embedding] * len(CONDITIONS)
        patches, cond_list, guiding_pixel_loss = self.generator(imgs, cond_list)
        return self.next_fractal(patches, cond_list) + guiding_pixel_loss

    def check_sample_args(self, cond_list, num_iter_list, cfg, cfg_schedule):
        if len(num_iter_list) != self.num_fractal_levels - 1:
            raise ValueError(f"num_iter_list needs one entry per generator level ({self.num_fractal_levels - 1}), "
                             f"got {list(num_iter_list)}")
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
        if cfg != 1.0 and cond_list[0].size(0) % 2:
            raise ValueError("with cfg != 1 the conditions must be [class embeddings; fake_latent copies] "
                             f"(an even number of rows), got {cond_list[0].size(0)} rows")
        num_conds = getattr(self.generator, "num_conds", 1)
        if len(cond_list) < num_conds:
            raise ValueError(f"cond_list needs at least {num_conds} conditions, got {len(cond_list)}")

    def sample(self, cond_list, num_iter_list, cfg, cfg_schedule, temperature, filter_threshold, fractal_level,
               visualize=False, known=None):
        """Generate images, normalized, (n, 3, S, S), from level-0 conditions (release-compatible;
        `generate` builds the conditions from class labels).

        cond_list: class embeddings (with cfg != 1: [class embeddings; fake_latent copies]).
        num_iter_list: steps per generator level (AR levels always take seq_len steps).
        Inner levels use a constant schedule with the cfg the outer level passes for that step.
        visualize: a callable given the partially generated image after each outer step, or True
        for a progress bar.
        known: (pixels (n, 3, S, S) normalized, unknown (n, S, S) bool): make only the unknown pixels
        and keep the others exactly (see AR.sample and MAR.sample for what each level does).
        """
        if fractal_level == 0:
            self.check_sample_args(cond_list, num_iter_list, cfg, cfg_schedule)
        if fractal_level < self.num_fractal_levels - 2:
            next_level_sample_function = partial(self.next_fractal.sample, num_iter_list=num_iter_list,
                                                 cfg_schedule="constant", fractal_level=fractal_level + 1)
        else:
            next_level_sample_function = self.next_fractal.sample
        return self.generator.sample(cond_list, num_iter_list[fractal_level], cfg, cfg_schedule, temperature,
                                     filter_threshold, next_level_sample_function, visualize, known=known)

    @torch.no_grad()
    def generate(self, labels, num_iter_list, cfg=1.0, cfg_schedule="linear", temperature=1.0, filter_threshold=1e-4,
                 visualize=False, images=None, unknown=None):
        """Images (n, 3, S, S), normalized, one per class label (n,): sampled, or with `images`
        (n, 3, S, S) normalized and `unknown` (n, S, S) bool, edited: the pixels where `unknown` is
        true are generated given the others, which come back exactly as given.

        Builds the level-0 conditions: the class embeddings, with cfg != 1 followed by as many
        `fake_latent` rows (the unconditional half of classifier-free guidance)."""
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.fake_latent.device)
        if labels.dim() != 1 or not len(labels):
            raise ValueError(f"labels must be a non-empty list of class indices, got {labels.tolist()}")
        known = None
        if images is None:
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"class labels must lie in [0, {self.num_classes}) for this model, got "
                                 f"{labels.tolist()}")
        else:
            self.check_inputs(images, labels)  # the labels' range too
            if unknown is None or unknown.shape != (images.size(0), *images.shape[2:]):
                raise ValueError(f"unknown must be a bool mask of shape {(images.size(0), *images.shape[2:])}, "
                                 f"one per image, got {None if unknown is None else tuple(unknown.shape)}")
            unknown = unknown.bool()
            if not bool(unknown.any()):  # nothing to make
                return images.clone()
            known = (images, unknown)
        cond = self.class_emb(labels)
        if cfg != 1.0:
            cond = torch.cat([cond, self.fake_latent.repeat(len(labels), 1)])
        out = self.sample([cond] * len(CONDITIONS), list(num_iter_list), cfg, cfg_schedule, temperature,
                          filter_threshold, fractal_level=0, visualize=visualize, known=known)
        if known is None:
            return out
        return torch.where(unknown[:, None], out.to(images.dtype), images)  # known pixels exactly as given


# ----------------------------------------------------------------------------- configurations
def _config(img_size_list, embed_dim_list, num_blocks_list, num_heads_list, generator_type_list):
    config = dict(img_size_list=img_size_list, embed_dim_list=embed_dim_list, num_blocks_list=num_blocks_list,
                  num_heads_list=num_heads_list, generator_type_list=generator_type_list)

    def build(**kwargs):
        return FractalGen(**config, **kwargs)
    build.config = config  # the architecture as constructor arguments (benchmarks rebuild it in other checkouts)
    return build


# the five released models
fractalar_in64 = _config((64, 4, 1), (1024, 512, 128), (32, 8, 3), (16, 8, 4), ("ar", "ar", "ar"))
fractalmar_in64 = _config((64, 4, 1), (1024, 512, 128), (32, 8, 3), (16, 8, 4), ("mar", "mar", "ar"))
fractalmar_base_in256 = _config((256, 16, 4, 1), (768, 384, 192, 64), (24, 6, 3, 1), (12, 6, 3, 4),
                                ("mar", "mar", "mar", "ar"))
fractalmar_large_in256 = _config((256, 16, 4, 1), (1024, 512, 256, 64), (32, 8, 4, 1), (16, 8, 4, 4),
                                 ("mar", "mar", "mar", "ar"))
fractalmar_huge_in256 = _config((256, 16, 4, 1), (1280, 640, 320, 64), (40, 10, 5, 1), (16, 8, 4, 4),
                                ("mar", "mar", "mar", "ar"))

# The released models, one row each (facts from the release's README: its evaluation commands' sampling
# settings, checkpoint URLs and ImageNet FID-50K / Inception Score; `params` counts our model built for
# the released state dict, in millions). The release states only cfg for Base: it samples with the
# 256×256 models' temperature.
DROPBOX = "https://www.dropbox.com/scl/fi"
_IN64 = dict(guiding_pixel=False, img_size=64, num_iter_list="64,16", cfg_schedule="linear")
_IN256 = dict(num_conds=5, guiding_pixel=True, img_size=256, num_iter_list="64,16,16", cfg_schedule="linear",
              temperature=1.1)
RELEASED = {
    "fractalar_in64": dict(
        _IN64, config=fractalar_in64, num_conds=1, cfg=11.0, temperature=1.03, fid=5.30, inception_score=56.8,
        params=442.07, url=f"{DROPBOX}/n25tbij7aqkwo1ypqhz72/checkpoint-last.pth"
            "?rlkey=2czevgex3ocg2ae8zde3xpb3f&st=mj0subup&dl=0"),
    "fractalmar_in64": dict(
        _IN64, config=fractalmar_in64, num_conds=5, cfg=6.5, temperature=1.02, fid=2.72, inception_score=87.9,
        params=432.00, url=f"{DROPBOX}/lh7fmv48pusujd6m4kcdn/checkpoint-last.pth"
            "?rlkey=huihey61ok32h28o3tbbq6ek9&st=fxtoawba&dl=0"),
    "fractalmar_base_in256": dict(
        _IN256, config=fractalmar_base_in256, cfg=29.0, fid=11.80, inception_score=274.3,
        params=186.30, url=f"{DROPBOX}/zrdm7853ih4tcv98wmzhe/checkpoint-last.pth"
            "?rlkey=htq9yuzovet7d6ioa64s1xxd0&st=4c4d93vs&dl=0"),
    "fractalmar_large_in256": dict(
        _IN256, config=fractalmar_large_in256, cfg=21.0, fid=7.30, inception_score=334.9,
        params=437.00, url=f"{DROPBOX}/y1k05xx7ry8521ckxkqgt/checkpoint-last.pth"
            "?rlkey=wolq4krdq7z7eyjnaw5ndhq6k&st=vjeu5uzo&dl=0"),
    "fractalmar_huge_in256": dict(
        _IN256, config=fractalmar_huge_in256, cfg=19.0, fid=6.15, inception_score=348.9,
        params=849.59, url=f"{DROPBOX}/t2rru8xr6wm23yvxskpww/checkpoint-last.pth"
            "?rlkey=dn9ss9zw4zsnckf6bat9hss6h&st=y7w921zo&dl=0"),
}

# small ones for CPU work, tests and demos
fractalar_tiny_in16 = _config((16, 4, 1), (128, 64, 32), (2, 2, 1), (4, 4, 2), ("ar", "ar", "ar"))
fractalmar_tiny_in16 = _config((16, 4, 1), (128, 64, 32), (2, 2, 1), (4, 4, 2), ("mar", "mar", "ar"))
fractalmar_small_in32 = _config((32, 4, 1), (256, 128, 64), (4, 2, 1), (4, 4, 4), ("mar", "mar", "ar"))

MODELS = {fn_name: globals()[fn_name] for fn_name in (
    "fractalar_in64", "fractalmar_in64", "fractalmar_base_in256", "fractalmar_large_in256", "fractalmar_huge_in256",
    "fractalar_tiny_in16", "fractalmar_tiny_in16", "fractalmar_small_in32")}


def build_model(name, **kwargs):
    """The model of that name, e.g. build_model("fractalmar_in64", num_conds=5, class_num=1000)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def compile_blocks(model, backend="inductor"):
    """torch.compile each transformer block (regional compilation: one graph per block shape, compiled
    in seconds rather than minutes for a whole level) for training. Sampling and the NLL, where the
    blocks see KV caches and changing row selections, stay eager. Returns the model, changed in place;
    its state dict keeps its keys."""
    from models.ar import TransformerBlock
    from models.layers import Block
    # every level's width, with and without a row selection, static then dynamic shapes: more graphs of
    # Block.forward than dynamo's default limit of 8, above which it would silently run eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in model.modules():
        if isinstance(block, (Block, TransformerBlock)):
            block.forward = training_compiled(block, backend)
    return model


def training_compiled(block, backend):
    """block.forward, run through torch.compile when the block trains with gradients."""
    eager = block.forward
    compiled = torch.compile(eager, backend=backend)

    def forward(*args, **kwargs):
        return (compiled if block.training and torch.is_grad_enabled() else eager)(*args, **kwargs)
    return forward
