"""The training, NLL and generation loops."""
import math
import os
import time

import torch
from PIL import Image

import util.lr_sched as lr_sched
import util.misc as misc
from models.layers import imagenet_stats


def autocast(device, precision):
    """Mixed precision for the forward pass: fp16 or bf16 autocast, or none for fp32."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def train_one_epoch(model, model_without_ddp, data_loader, optimizer, scaler, device, epoch, log_writer, args):
    model.train()
    steps = len(data_loader)
    logger = misc.ProgressLogger(steps, f"Epoch [{epoch}]", args.print_freq, args.batch_size * misc.get_world_size())
    for step, (samples, labels) in enumerate(data_loader):
        lr = lr_sched.adjust_learning_rate(optimizer, step / steps + epoch, args)
        samples = samples.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, args.precision):
            loss = model(samples, labels)
        loss_value = loss.item()
        if not misc.all_ranks_ok(math.isfinite(loss_value), device):
            raise misc.UserError(f"the loss is {loss_value} at epoch {epoch}, step {step}; training stopped and "
                                 f"the last good checkpoint in {args.output_dir} is unchanged. Lower --blr, "
                                 "raise --warmup_epochs, or use --precision bf16/fp32")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        logger.update(step, device, loss=loss_value, lr=lr)
        if log_writer is not None:
            epoch_1000x = int((step / steps + epoch) * 1000)
            log_writer.add_scalar("train_loss", loss_value, epoch_1000x)
            log_writer.add_scalar("lr", lr, epoch_1000x)
    return logger.averages()


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


def to_uint8(images):
    """Normalized (n, 3, h, w) images -> uint8 (n, h, w, 3) arrays."""
    mean, std = imagenet_stats(images.device)
    pixels = ((images.float() * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def generation_folder(args):
    return os.path.join(args.output_dir, f"ariter{args.num_iter_list.replace(',', '-')}-temp{args.temperature}-"
                                         f"{args.cfg_schedule}cfg{args.cfg}-filter{args.filter_threshold}-"
                                         f"image{args.num_images}-res{args.img_size}")


@torch.no_grad()
def generate(model_without_ddp, args, device):
    """Write num_images class-balanced PNGs (batches of gen_bsz shared out over ranks); returns the
    folder and seconds per image."""
    model_without_ddp.eval()
    folder = generation_folder(args)
    os.makedirs(folder, exist_ok=True)
    labels = generation_labels(args.num_images, args.class_num)
    num_iter_list = [int(n) for n in args.num_iter_list.split(",")]
    batches = list(range(0, args.num_images, args.gen_bsz))[misc.get_rank()::misc.get_world_size()]
    start = time.time()
    for i, first in enumerate(batches):
        idx = torch.arange(first, min(first + args.gen_bsz, args.num_images))
        y = labels[idx].to(device)
        emb = model_without_ddp.class_emb(y)
        if args.cfg != 1.0:
            emb = torch.cat([emb, model_without_ddp.fake_latent.repeat(y.size(0), 1)])
        with autocast(device, args.precision):
            images = model_without_ddp.sample(cond_list=[emb] * 5, num_iter_list=num_iter_list, cfg=args.cfg,
                                              cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                                              filter_threshold=args.filter_threshold, fractal_level=0)
        for index, img in zip(idx.tolist(), to_uint8(images)):
            Image.fromarray(img).save(os.path.join(folder, f"{index:05d}.png"))
        if misc.is_main_process():
            print(f"Generation: batch {i + 1}/{len(batches)} on this rank, "
                  f"{(time.time() - start) / (i + 1) / len(idx):.3f} s/image", flush=True)
    misc.barrier()
    seconds_per_image = (time.time() - start) / max(args.num_images / misc.get_world_size(), 1)
    return folder, seconds_per_image


def evaluate_gen(model_without_ddp, args, device, epoch, log_writer):
    """Generate, then (rank 0) FID and Inception Score against --fid_stats; returns the results."""
    folder, seconds_per_image = generate(model_without_ddp, args, device)
    results = {"images": folder, "num_images": args.num_images, "seconds_per_image": seconds_per_image,
               "epoch": epoch}
    if misc.is_main_process():
        print(f"Generated {args.num_images} images in {folder} ({seconds_per_image:.3f} s/image per rank)")
        if args.fid_stats != "none":
            from util.fid import compute_fid_is
            scores = compute_fid_is(folder, args.fid_stats, device, inception_weights=args.fid_inception_weights)
            results.update(fid=scores["fid"], inception_score=scores["inception_score"])
            print(f"FID: {scores['fid']:.4f}, Inception Score: {scores['inception_score']:.4f}")
            if log_writer is not None:
                log_writer.add_scalar("fid", scores["fid"], epoch)
                log_writer.add_scalar("is", scores["inception_score"], epoch)
        misc.update_results(args.output_dir, generation=results)
    misc.barrier()
    return results
