"""Small things several test files need."""
import os

import torch

from models.layers import IMAGENET_MEAN, IMAGENET_STD

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def normalize_u8(images_u8):
    return (images_u8.float() / 255.0 - MEAN) / STD


def random_images(n, size, generator=None):
    """Normalized images of uniformly random 8-bit pixels."""
    return normalize_u8(torch.randint(0, 256, (n, 3, size, size), generator=generator))


def load_fixture(name):
    """The reference model (eval mode, no dropout) and the numbers the release computed with it."""
    from models.fractalgen import FractalGen
    rec = torch.load(os.path.join(FIXTURES, name + ".expected.pth"), weights_only=False)
    sd = torch.load(os.path.join(FIXTURES, name + ".state_dict.pth"), weights_only=True)
    model = FractalGen(label_drop_prob=0.0, attn_dropout=0.0, proj_dropout=0.0, fractal_level=0, **rec["config"])
    model.load_state_dict(sd, strict=True)
    return model.eval(), rec


def pixel_head(model):
    head = model
    while not hasattr(head, "r_codebook"):
        head = head.next_fractal
    return head
