"""ImageFolder data with a training order that can be resumed mid-epoch.

The order of an epoch and each image's horizontal flip are drawn from (seed, epoch) alone, not from a
global random state or the data-loader workers, so a run restarted at step s of an epoch sees exactly
the images, flipped exactly as, an uninterrupted run would have.
"""
import os
import warnings

import torch
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from models.layers import IMAGENET_MEAN, IMAGENET_STD
from util.crop import center_crop_arr
from util.misc import UserError
from util.stop import ignore_in_worker


def image_folder(data_path, split, img_size, class_num):
    """The `split` ImageFolder under data_path, ADM-center-cropped and normalized (no random flip:
    training flips come from the sampler)."""
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise UserError(f"no {split}/ folder in --data_path {data_path}: expected an ImageFolder tree "
                        f"{data_path}/{split}/<class>/<image>")
    transform = transforms.Compose([transforms.Lambda(lambda img: center_crop_arr(img, img_size)),
                                    transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        dataset = SkipCorruptImages(root, transform=transform)
    except FileNotFoundError as e:
        raise UserError(f"{e}; every class folder in {root} needs at least one image") from None
    if len(dataset.classes) != class_num:
        raise UserError(f"{root} has {len(dataset.classes)} classes but --class_num is {class_num}; "
                        "set --class_num to match the data")
    return dataset


class SkipCorruptImages(datasets.ImageFolder):
    """An ImageFolder that warns about an unreadable image (naming the file) and serves the next
    readable one in its place, so one bad file among a million does not stop a run of days."""

    def __getitem__(self, index):
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            path, label = self.samples[i]
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
            except Exception as e:  # noqa: BLE001 - truncated, not an image, a decompression bomb (also as a
                # warning turned error): whatever stops it decoding as RGB, the file is the problem
                warnings.warn(f"skipping image {path} that does not decode as RGB ({type(e).__name__}: {e})",
                              stacklevel=1)
                continue
            return self.transform(img), label
        raise UserError(f"no readable image in {self.root}")


class EpochSampler(Sampler):
    """Yields (index, flip) pairs of one rank's share of an epoch.

    Every rank draws the same permutation and flips from (seed, epoch); the first `consumed` entries
    (the images all ranks already trained on, when resuming mid-epoch) are skipped, and what remains
    is dealt out rank by rank. With `consumed` = step × batch × ranks this continues an interrupted
    epoch exactly, also with another number of ranks (then every remaining image is still seen once)."""

    def __init__(self, num_samples, num_replicas=1, rank=0, seed=0, flip=True):
        self.num_samples, self.num_replicas, self.rank, self.seed = num_samples, num_replicas, rank, seed
        self.flip = flip
        self.epoch, self.consumed = 0, 0

    def set_epoch(self, epoch, consumed=0):
        self.epoch, self.consumed = epoch, consumed

    def __len__(self):
        return max(self.num_samples - self.consumed, 0) // self.num_replicas

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        flips = (torch.rand(self.num_samples, generator=g) < 0.5) & self.flip
        keep = order[self.consumed:self.consumed + len(self) * self.num_replicas][self.rank::self.num_replicas]
        return iter(zip(keep.tolist(), flips[keep].tolist()))


class FlippedImages(Dataset):
    """Indexed by (index, flip): the image, mirrored left-right when flip is True."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, flip = key
        image, label = self.dataset[index]
        return (image.flip(-1) if flip else image), label


def train_loader(dataset, batch_size, num_workers, pin_memory, num_replicas, rank, seed, flip=True):
    """Full batches of (image, label), each image mirrored with probability 1/2 when `flip`;
    `loader.sampler.set_epoch(epoch, consumed)` picks the epoch."""
    sampler = EpochSampler(len(dataset), num_replicas, rank, seed, flip)
    # its own generator: starting an epoch's iterator must not draw from the model's random state,
    # or a run resumed mid-epoch would see other dropout and masks than one that was never stopped
    return DataLoader(FlippedImages(dataset), sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=ignore_in_worker)


def eval_loader(dataset, batch_size, num_workers, pin_memory, num_replicas, rank):
    """Every image once, rank-strided, no padding: sums over ranks are exact."""
    return DataLoader(dataset, sampler=list(range(rank, len(dataset), num_replicas)), batch_size=batch_size,
                      num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=ignore_in_worker)
