"""The training, NLL and generation loops."""
import json
import math
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import util.checkpoint as checkpoint
import util.lr_sched as lr_sched
import util.misc as misc
import util.stop as stop
from util.misc import autocast
from util.fast_sampling import compile_sampling
from util.sampling import sample_classes


def train_one_epoch(model, model_without_ddp, data_loader, optimizer, scaler, device, epoch, log_writer, args,
                    steps_per_epoch, consumed=0):
    """One epoch, or its rest when resumed mid-epoch after `consumed` images (over all ranks). With --save_every_steps N,
    the checkpoint is refreshed every N steps with what is needed to continue from the next step; after a
    stop signal, at the next step boundary, and then `stop.Stopped` is raised."""
    model.train()
    world = misc.get_world_size()
    first_step = consumed // (args.batch_size * world)
    logger = misc.ProgressLogger(steps_per_epoch, f"Epoch [{epoch}]", args.print_freq, args.batch_size * world,
                                 first_step)
    for i, (samples, labels) in enumerate(data_loader):
        step = first_step + i
        lr = lr_sched.adjust_learning_rate(optimizer, step / steps_per_epoch + epoch, args)
        with autocast(device, args.precision):
            loss = model(samples.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        loss_value = loss.item()
        if not misc.all_ranks_ok(math.isfinite(loss_value), device):  # all ranks stop before any update
            raise misc.UserError(f"the loss is {loss_value} at epoch {epoch}, step {step}; training stopped "
                                 f"({checkpoint.previous(args.output_dir)}). Lower --blr, "
                                 "raise --warmup_epochs, or use --precision bf16/fp32")
        apply_gradients(loss, model, optimizer, scaler, args.grad_clip)
        logger.update(step, device, loss=loss_value, lr=lr)
        if log_writer is not None:
            epoch_1000x = int((step / steps_per_epoch + epoch) * 1000)
            log_writer.add_scalar("train_loss", loss_value, epoch_1000x)
            log_writer.add_scalar("lr", lr, epoch_1000x)
        done = step + 1
        weights_ok, signum = step_boundary(model_without_ddp, device)
        if not weights_ok:
            raise misc.UserError(f"the weights are not finite after the update of epoch {epoch}, step {step} (the "
                                 f"loss was {loss_value:.4g}); training stopped without saving them "
                                 f"({checkpoint.previous(args.output_dir)}). Lower --blr (or --lr), raise "
                                 "--warmup_epochs, or use --precision bf16/fp32")
        periodic = args.save_every_steps and done % args.save_every_steps == 0
        if done < steps_per_epoch and (periodic or signum):
            checkpoint.save(args, model_without_ddp, optimizer, scaler, epoch, device, step=done,
                            consumed=consumed + (i + 1) * args.batch_size * world)
        elif signum:  # the epoch's last step
            checkpoint.save(args, model_without_ddp, optimizer, scaler, epoch, device)
        if signum:
            raise stop.Stopped(signum, f"stopped by {stop.name(signum)} in epoch {epoch} after {done} of "
                                       f"{steps_per_epoch} steps: saved {checkpoint.path_in(args.output_dir)}; "
                                       f"run the same command with --resume {args.output_dir} to continue")
    return logger.averages()


def step_boundary(model_without_ddp, device):
    """(all weights finite on every rank, stop signal received by any rank or 0): one all-reduce per step,
    so that all ranks stop at the same step, and a finite loss whose update overflowed is never saved.
    The 2-norm (one fused kernel) is not finite when a weight is not, or is beyond 1e19: diverged too."""
    weights = torch.nn.utils.get_total_norm(list(model_without_ddp.parameters()))
    flags = torch.stack([(~torch.isfinite(weights)).float(), torch.tensor(float(stop.requested()), device=device)])
    bad, signum = misc.all_reduce_max(flags).tolist()
    return bad == 0, int(signum)


def apply_gradients(loss, model, optimizer, scaler, grad_clip):
    """Backward through the (scaled) loss, clip the gradient norm, step the optimizer."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


@torch.no_grad()
def evaluate_nll(model, data_loader, device, args):
    """Unconditional NLL in bits/dim over the whole loader, each batch averaged over
    `nll_forward_number` passes (MAR's NLL mask is random); summed exactly across ranks."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # sum of bits/dim · images, images
    logger = misc.ProgressLogger(len(data_loader), "NLL", args.print_freq, args.nll_bsz * misc.get_world_size())
    for step, (samples, labels) in enumerate(data_loader):
        samples, labels = samples.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = 0.0
        for _ in range(args.nll_forward_number):
            with autocast(device, args.precision):
                loss += model(samples, labels).double() / args.nll_forward_number
        bpd = loss / math.log(2)
        totals += torch.stack([bpd * samples.size(0), torch.tensor(float(samples.size(0)), device=device).double()])
        logger.update(step, device, bpd=bpd.item())
    misc.all_reduce_sum(totals)
    return (totals[0] / totals[1]).item()


def generation_labels(num_images, class_num):
    """Class of each image: num_images split equally over the classes, in order."""
    if num_images % class_num:
        raise misc.UserError(f"--num_images {num_images} must be divisible by --class_num {class_num} "
                             "(images are split equally over classes)")
    return torch.arange(num_images) // (num_images // class_num)


def generation_folder(args):
    return os.path.join(args.output_dir, f"ariter{args.num_iter_list.replace(',', '-')}-temp{args.temperature}-"
                                         f"{args.cfg_schedule}cfg{args.cfg}-filter{args.filter_threshold}-"
                                         f"image{args.num_images}-res{args.img_size}")


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


def prepare_generation_folder(folder, model_without_ddp, args):
    """Rank 0: make the folder, drop half-written files, and if its images came from other weights
    (an earlier checkpoint, e.g. the previous --online_eval), remove them; record these weights."""
    if not misc.is_main_process():
        return
    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, "generation.json")
    manifest = {"model": args.model, "weights": weights_fingerprint(model_without_ddp)}
    old = json.load(open(manifest_path)) if os.path.exists(manifest_path) else None
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


@torch.no_grad()
def generate(model_without_ddp, args, device):
    """Make sure the folder holds num_images class-balanced PNGs: images already there and valid are
    kept, the batches with missing or broken ones are generated again (with their own seeds, so the
    same images come out). Returns the folder and seconds per generated image."""
    model_without_ddp.eval()
    compile_sampling(model_without_ddp, args.compile_sampling)
    folder = generation_folder(args)
    prepare_generation_folder(folder, model_without_ddp, args)
    misc.barrier()
    labels = generation_labels(args.num_images, args.class_num)
    valid = {}  # image index -> whether a good PNG is there, checked once
    auto = args.gen_bsz == "auto"
    bsz = first_auto_gen_bsz(args, device) if auto else args.gen_bsz
    todo, kept = pending_batches(folder, args, bsz, valid)
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
            return sample_batch(model_without_ddp, labels[idx].to(device), args.num_iter, args, device,
                                batch_seed(args.seed, first))
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
            if stop.requested():  # per rank: ranks may have different numbers of batches left
                raise stop.Stopped(stop.requested(), f"stopped by {stop.name(stop.requested())}: the images "
                                   f"written so far are kept in {folder}; run the same command to continue")
            write(first, missing, make(first, bsz))
            made += len(missing)
    except BaseException:
        bar.close()  # a stopped or failed run leaves its bar where it stood, not at interpreter exit
        raise
    misc.barrier()
    seconds = time.time() - start
    report_generation_speed(bar, kept, made, seconds, device)
    return folder, seconds / max(made, 1)


def pending_batches(folder, args, bsz, valid):
    """This rank's batches of `bsz` images (every world_size-th) that miss a valid PNG, as
    (first index, set of missing indices), and how many of its images are there already."""
    todo, kept = [], 0
    for first in list(range(0, args.num_images, bsz))[misc.get_rank()::misc.get_world_size()]:
        indices = range(first, min(first + bsz, args.num_images))
        for i in indices:
            if i not in valid:
                valid[i] = is_valid_png(os.path.join(folder, f"{i:05d}.png"), args.img_size)
        missing = {i for i in indices if not valid[i]}
        kept += len(indices) - len(missing)
        if missing:
            todo.append((first, missing))
    return todo, kept


# --gen_bsz auto starts here, capped by the images per process, and halves on out-of-memory; on the
# CPU (where running out of memory is not an exception) it stays at 256.
AUTO_GEN_BSZ, AUTO_GEN_BSZ_CPU = 1024, 256


def first_auto_gen_bsz(args, device):
    """The first batch size --gen_bsz auto tries: a power of two, no more than a process's images."""
    start = AUTO_GEN_BSZ_CPU if device.type == "cpu" else AUTO_GEN_BSZ
    per_process = -(-args.num_images // misc.get_world_size())
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
        todo = pending_batches(folder, args, bsz, valid)[0]
    if misc.is_main_process():
        print(f"Generation: --gen_bsz auto chose {bsz} images per batch and process (these images; "
              f"--gen_bsz {bsz} gives the same ones)", flush=True)
    args.gen_bsz = bsz  # later evaluations (--online_eval) keep it
    if not todo:
        return bsz, todo, 0
    first, missing = todo[0]
    write(first, missing, images)
    return bsz, todo[1:], len(missing)


def report_generation_speed(bar, kept, made, seconds, device):
    """Close the progress bar at the exact count and print images/s over all processes and per process."""
    made_all = int(misc.all_reduce_sum(torch.tensor([made], device=device)).item())
    bar.n = kept + made_all
    bar.refresh()
    bar.close()
    if misc.is_main_process() and made_all:
        world = misc.get_world_size()
        print(f"Generation: {made_all} images in {seconds:.1f} s: {made_all / seconds:.3f} images/s, "
              f"{made_all / seconds / world:.3f} images/s per process ({world} process(es))", flush=True)


def sample_batch(model_without_ddp, labels, num_iter_list, args, device, seed):
    """uint8 (n, h, w, 3) images of the given classes, drawn from `seed` without touching the
    training random state."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        images = sample_classes(model_without_ddp, labels, num_iter_list, args.cfg, args.cfg_schedule,
                                args.temperature, args.filter_threshold, args.precision)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_png(pixels, path):
    """Save through a temporary name, so a killed process never leaves a half-written image (not fsynced:
    a rerun checks every image anyway)."""
    with misc.write_atomically(path, sync=False) as f:
        Image.fromarray(pixels).save(f, format="PNG")


def evaluate_gen(model_without_ddp, args, device, epoch, log_writer):
    """Generate, then (rank 0) FID and Inception Score against --fid_stats; returns the results."""
    folder, seconds_per_image = generate(model_without_ddp, args, device)
    results = {"images": folder, "num_images": args.num_images, "seconds_per_image": seconds_per_image,
               "epoch": epoch}
    if misc.is_main_process():
        print(f"{args.num_images} images in {folder} ({seconds_per_image:.3f} s per generated image and rank)")
        if args.fid_stats != "none":
            from util.fid import compute_fid_is
            scores = compute_fid_is(folder, args.fid_stats, device, inception_weights=args.fid_inception_weights)
            results.update(fid=scores["fid"], inception_score=scores["inception_score"])
            print(f"FID: {scores['fid']:.4f}, Inception Score: {scores['inception_score']:.4f}")
            if log_writer is not None:
                log_writer.add_scalar("fid", scores["fid"], epoch)
                log_writer.add_scalar("is", scores["inception_score"], epoch)
        if log_writer is not None:
            log_writer.add_image("samples", folder_grid(folder, args.num_images), epoch)
        misc.update_results(args.output_dir, generation=results)
    misc.barrier()
    return results


def folder_grid(folder, num_images, show=64):
    """A (3, H, W) grid of the first `show` generated images spread over the classes (for TensorBoard)."""
    import torchvision.utils as vutils
    picks = np.linspace(0, num_images - 1, min(show, num_images)).round().astype(int)
    images = [torch.from_numpy(np.asarray(Image.open(os.path.join(folder, f"{i:05d}.png")).convert("RGB")).copy())
              for i in picks]
    return vutils.make_grid(torch.stack(images).permute(0, 3, 1, 2), nrow=8, padding=2)
