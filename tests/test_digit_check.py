"""The demo's digit check: a classifier fitted to the real digits, read through the grid the demo writes."""
import torch
import torchvision.utils as vutils

from util.digit_check import png_bits_per_dim, read_grid, real_digits, recognised_share
from util.sampling import class_grid


def test_real_digits_are_recognised_and_noise_is_not(tmp_path):
    train, (val_x, val_y) = real_digits()
    picks = torch.cat([torch.nonzero(val_y == c)[:8, 0] for c in range(10)])  # 8 of each class, in class order
    path = str(tmp_path / "grid.png")
    vutils.save_image(class_grid(val_x[picks], 8, upscale=4), path)  # laid out as the demo's samples.png
    shown = read_grid(path, 10, 8, 16, upscale=4)
    assert torch.equal(shown, val_x[picks])
    labels = torch.arange(10).repeat_interleave(8)
    share, real = recognised_share(shown, labels, train, (val_x, val_y))
    assert 0.85 < real < 1 and share > 0.8
    noise = (torch.rand(80, 3, 16, 16) < 0.3).float()
    assert recognised_share(noise, labels, train, (val_x, val_y))[0] < 0.3
    recoloured = shown.roll(1, dims=1)  # colour does not matter, only the ink
    assert recognised_share(recoloured, labels, train, (val_x, val_y))[0] == share


def test_png_cost():
    black, noise = torch.zeros(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    assert png_bits_per_dim(black) < 1 < png_bits_per_dim(noise) < 12  # 12: noise plus the files' headers
