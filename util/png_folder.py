"""The folder of generated PNGs that FID/IS are computed on: class-balanced, resumable, shared by ranks.

Image i is `{i:05d}.png`, of class i // (num_images / class_num). A batch's images depend only on
(seed, its first index, batch size, device), so a rerun after a crash keeps the valid PNGs already there
and regenerates exactly the missing ones; `generation.json` records which weights made the folder,
and images of other weights (an earlier --online_eval) are replaced.
"""
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import util.misc as misc
import util.stop as stop
from util.sampling import compile_sampling, sample_classes, to_uint8

MANIFEST = "generation.json"
# --gen_bsz auto starts here, capped by the images per process, and halves on out-of-memory; on the
# CPU (where running out of memory is not an exception) it stays at 256.
AUTO_GEN_BSZ, AUTO_GEN_BSZ_CPU = 1024, 256


def labels_of(num_images, class_num):
    """Class of each image: num_images split equally over the classes, in order."""
    return torch.arange(num_images) // (num_images // class_num)


def folder_of(args, weights="raw"):
    """The folder's name says how its images were made (the release's naming; -ema for EMA weights)."""
    return os.path.join(args.output_dir, f"ariter{args.num_iter_list.replace(',', '-')}-temp{args.temperature}-"
                                         f"{args.cfg_schedule}cfg{args.cfg}-filter{args.filter_threshold}-"
                                         f"image{args.num_images}-res{args.img_size}" + ("-ema" if weights == "ema"
                                                                                         else ""))


def weights_fingerprint(model):
    """A number that changes with any weight: tells whether a folder's images came from this model."""
    sums = [(i + 1) * t.detach().double().sum() for i, t in enumerate(model.state_dict().values())]
    return f"{torch.stack(sums).sum().item():.12e}"


def is_valid_png(path, size):
    """An image file that decodes completely to size×size RGB (a killed writer leaves no such file)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.size == (size, size) and img.mode == "RGB"
    except (OSError, ValueError):
        return False


def prepare(folder, model, model_name):
    """Rank 0: make the folder, drop half-written files, and if its images came from other weights,
    remove them; record these weights."""
    if not misc.is_main_process():
        return
    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, MANIFEST)
    manifest = {"model": model_name, "weights": weights_fingerprint(model)}
    old = misc.read_json(manifest_path)  # a damaged one: the images' weights are unknown, so they are made again
    pngs = [f for f in os.listdir(folder) if f.endswith(".png")]
    stale = [f for f in os.listdir(folder) if ".tmp" in f] + (pngs if old != manifest else [])  # only we write here
    if old != manifest and pngs:
        print(f"Removing {len(pngs)} images in {folder}: they came from other weights", flush=True)
    for f in stale:
        os.remove(os.path.join(folder, f))
    with misc.write_atomically(manifest_path) as f:
        f.write(json.dumps(manifest).encode())


def batch_seed(seed, first_index):
    """The random seed of the batch starting at image `first_index`: a batch's images depend only on
    (seed, batch, device), not on the number of ranks or on which batches were generated before."""
    return int(np.random.SeedSequence([seed, first_index]).generate_state(1)[0])


def write_png(pixels, path):
    """Save through a temporary name, so a killed process never leaves a half-written image (not fsynced:
    a rerun checks every image anyway)."""
    with misc.write_atomically(path, sync=False) as f:
        Image.fromarray(pixels).save(f, format="PNG")


@torch.no_grad()
def generate(model, args, device, sampling, gen_bsz, weights="raw"):
    """Make sure the folder holds args.num_images class-balanced PNGs: images already there and valid are
    kept, the batches with missing or broken ones are generated again (with their own seeds, so the same
    images come out). `sampling`: sample_classes' settings; `gen_bsz`: images per batch and process, or
    "auto"; `weights`: "raw" or "ema", which names the folder. Returns the folder, the batch size used and
    seconds per generated image."""
    model.eval()
    compile_sampling(model, args.compile_sampling)
    folder = folder_of(args, weights)
    prepare(folder, model, args.model)
    misc.share_from_rank0(None)  # rank 0 may remove thousands of files: waited for without --dist_timeout
    misc.check_shared_folder(folder, "the generation folder")  # every rank writes its images there
    labels = labels_of(args.num_images, args.class_num)
    valid = {}  # image index -> whether a good PNG is there, checked once
    auto = gen_bsz == "auto"
    bsz = first_auto_gen_bsz(args.num_images, device) if auto else gen_bsz
    todo, kept = pending_batches(folder, args.num_images, args.img_size, bsz, valid)
    kept = int(misc.all_reduce_sum(torch.tensor([kept], device=device)).item())
    if misc.is_main_process():
        print(f"Generation: kept {kept} of {args.num_images} images already in {folder}; "
              f"generating {args.num_images - kept}", flush=True)
    bar = tqdm(total=args.num_images, initial=kept, unit="img", desc="Generation", smoothing=0,
               disable=not misc.is_main_process())

    def make(first, bsz):
        """The images of the batch starting at `first` (uint8, n×h×w×3)."""
        idx = torch.arange(first, min(first + bsz, args.num_images))
        try:
            return to_uint8(sample_classes(model, labels[idx].to(device), seed=batch_seed(args.seed, first),
                                           **sampling))
        except torch.OutOfMemoryError:
            if auto:
                raise
            raise misc.UserError(f"--gen_bsz {bsz} does not fit in the memory of {device}: pass a smaller "
                                 f"--gen_bsz (e.g. {max(bsz // 2, 1)}), or --gen_bsz auto to use the largest "
                                 "that fits") from None

    def write(first, missing, images):
        for index, img in enumerate(images, start=first):
            if index in missing:
                write_png(img, os.path.join(folder, f"{index:05d}.png"))
        bar.update(min(len(missing) * misc.get_world_size(), bar.total - bar.n))  # rank 0's share, times ranks

    start, made = time.time(), 0
    try:
        if auto:
            bsz, todo, made = choose_gen_bsz(bsz, todo, make, write, folder, args, valid, device)
        for first, missing in todo:
            if stop.requested():  # per rank: a signal may reach the ranks at different batches
                raise stop.Stopped(stop.requested(), f"stopped by {stop.name(stop.requested())}: the images "
                                   f"written so far are kept in {folder}; run the same command to continue")
            write(first, missing, make(first, bsz))
            made += len(missing)
    except BaseException:
        bar.close()  # a stopped or failed run leaves its bar where it stood, not at interpreter exit
        raise
    misc.barrier()
    seconds = time.time() - start
    report_speed(bar, kept, made, seconds, device)
    return folder, bsz, seconds / max(made, 1)


def pending_batches(folder, num_images, img_size, bsz, valid):
    """This rank's batches of `bsz` images to make, as (first index, set of missing indices), and how many
    of the images it checked are there already. Each rank checks every world_size-th batch; the batches
    that miss a valid PNG are then dealt out over the ranks in turn, and a rank dealt one fewer makes the
    first batch once more and writes none of it (padding, as the release pads its last batch), so that
    every rank makes the same number of batches and none waits for a batch at the end."""
    rank, world = misc.get_rank(), misc.get_world_size()
    mine, kept = [], 0
    for first in list(range(0, num_images, bsz))[rank::world]:
        indices = range(first, min(first + bsz, num_images))
        for i in indices:
            if i not in valid:
                valid[i] = is_valid_png(os.path.join(folder, f"{i:05d}.png"), img_size)
        missing = {i for i in indices if not valid[i]}
        kept += len(indices) - len(missing)
        if missing:
            mine.append((first, missing))
    if world == 1:
        return mine, kept
    shares = [None] * world
    torch.distributed.all_gather_object(shares, mine)
    pending = sorted(batch for share in shares for batch in share)
    todo = pending[rank::world]
    return todo + [(0, set())] * (-(-len(pending) // world) - len(todo)), kept


def first_auto_gen_bsz(num_images, device):
    """The first batch size --gen_bsz auto tries: a power of two, no more than a process's images."""
    start = AUTO_GEN_BSZ_CPU if device.type == "cpu" else AUTO_GEN_BSZ
    per_process = -(-num_images // misc.get_world_size())
    while start > 1 and start // 2 >= per_process:
        start //= 2
    return start


def choose_gen_bsz(bsz, todo, make, write, folder, args, valid, device):
    """--gen_bsz auto: every process makes its first pending batch at `bsz`; if any runs out of
    memory, all halve and try again. The batch that fitted is written; returns the batch size, the
    batches left to do at it and how many images were written. Batches of another size draw other
    images: the choice is printed."""
    while True:
        images, ok = None, True
        if todo:
            try:
                images = make(todo[0][0], bsz)
            except torch.OutOfMemoryError:
                ok = False
        if misc.all_ranks_ok(ok, device):
            break
        images = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if bsz == 1:
            raise misc.UserError(f"one image at a time does not fit in the memory of {device}: free memory "
                                 "(other processes on this device?) or use a larger device")
        bsz //= 2
        todo = pending_batches(folder, args.num_images, args.img_size, bsz, valid)[0]
    if misc.is_main_process():
        print(f"Generation: --gen_bsz auto chose {bsz} images per batch and process (these images; "
              f"--gen_bsz {bsz} gives the same ones)", flush=True)
    if not todo:
        return bsz, todo, 0
    first, missing = todo[0]
    write(first, missing, images)
    return bsz, todo[1:], len(missing)


def report_speed(bar, kept, made, seconds, device):
    """Close the progress bar at the exact count and print images/s over all processes and per process."""
    made_all = int(misc.all_reduce_sum(torch.tensor([made], device=device)).item())
    bar.n = kept + made_all
    bar.refresh()
    bar.close()
    if misc.is_main_process() and made_all:
        world = misc.get_world_size()
        print(f"Generation: {made_all} images in {seconds:.1f} s: {made_all / seconds:.3f} images/s, "
              f"{made_all / seconds / world:.3f} images/s per process ({world} process(es))", flush=True)


def grid_of(folder, num_images, show=64):
    """A (3, H, W) grid of the first `show` generated images spread over the classes (for TensorBoard)."""
    import torchvision.utils as vutils
    picks = np.linspace(0, num_images - 1, min(show, num_images)).round().astype(int)
    images = [torch.from_numpy(np.asarray(Image.open(os.path.join(folder, f"{i:05d}.png")).convert("RGB")).copy())
              for i in picks]
    return vutils.make_grid(torch.stack(images).permute(0, 3, 1, 2), nrow=8, padding=2)


def save_npz(folder, num_images, img_size):
    """The folder's images as one .npz beside it, as the ADM evaluator (guided-diffusion's
    evaluations/evaluator.py) reads it: `arr_0`, uint8, num_images×S×S×3, in image order. Built from the
    PNGs one at a time (the .npy member is streamed into the zip, so memory stays at one image) and
    written atomically; the same PNGs give the same file. Returns its path."""
    import zipfile
    path = folder.rstrip(os.sep) + ".npz"
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (num_images, img_size, img_size, 3)}
    with misc.write_atomically(path) as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:  # np.savez's layout
            info = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))  # a fixed date: the same bytes
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for i in range(num_images):
                    with Image.open(os.path.join(folder, f"{i:05d}.png")) as img:
                        pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
                    if pixels.shape != (img_size, img_size, 3):
                        raise misc.UserError(f"{folder}/{i:05d}.png is {pixels.shape[1]}x{pixels.shape[0]}, not "
                                             f"{img_size}x{img_size}: generate the folder again")
                    member.write(pixels.tobytes())
    return path
