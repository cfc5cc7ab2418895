"""The training, NLL and generation loops."""
import math

import torch

import util.checkpoint as checkpoint
import util.lr_sched as lr_sched
import util.misc as misc
import util.png_folder as png_folder
import util.stop as stop
from util.flags import WEIGHT_NAMES
from util.fsdp import local
from util.misc import autocast


def train_one_epoch(model, model_without_ddp, data_loader, optimizer, scaler, device, epoch, log_writer, args,
                    steps_per_epoch, consumed=0, ema=None):
    """One epoch, or its rest when resumed mid-epoch after `consumed` images (over all ranks). With --save_every_steps N,
    the checkpoint is refreshed every N steps with what is needed to continue from the next step; after a
    stop signal, at the next step boundary, and then `stop.Stopped` is raised. `ema` (timm's ModelEmaV3, or
    None) averages the weights after each update that passed the finite-weights check."""
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
        if ema is not None:
            ema.update(model_without_ddp)
        model_ema = ema.module if ema is not None else None
        periodic = args.save_every_steps and done % args.save_every_steps == 0
        if done < steps_per_epoch and (periodic or signum):
            checkpoint.save(args, model_without_ddp, optimizer, scaler, epoch, device, step=done,
                            consumed=consumed + (i + 1) * args.batch_size * world, model_ema=model_ema)
        elif signum:  # the epoch's last step
            checkpoint.save(args, model_without_ddp, optimizer, scaler, epoch, device, model_ema=model_ema)
        if signum:
            raise stop.Stopped(signum, f"stopped by {stop.name(signum)} in epoch {epoch} after {done} of "
                                       f"{steps_per_epoch} steps: saved {checkpoint.path_in(args.output_dir)}; "
                                       f"run the same command with --resume {args.output_dir} to continue")
    return logger.averages()


def step_boundary(model_without_ddp, device):
    """(all weights finite on every rank, stop signal received by any rank or 0): one all-reduce per step,
    so that all ranks stop at the same step, and a finite loss whose update overflowed is never saved.
    The 2-norm (one fused kernel) is not finite when a weight is not, or is beyond 1e19: diverged too.
    Under FSDP each rank checks its own shards, and the all-reduce combines them."""
    weights = torch.nn.utils.get_total_norm([local(p) for p in model_without_ddp.parameters()])
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


def evaluate_gen(model_without_ddp, args, device, epoch, log_writer, sampling, gen_bsz, weights="raw"):
    """Generate args.num_images into their PNG folder (util.png_folder), then FID and Inception Score
    against --fid_stats (every rank scores a share of the images, rank 0 combines them), and with --save_npz
    the images as one .npz; returns the results, with the batch size used ("auto" resolved). `weights`:
    "raw", or "ema" for EMA weights (their folder, results and TensorBoard tags end in -ema / _ema)."""
    folder, gen_bsz, seconds_per_image = png_folder.generate(model_without_ddp, args, device, sampling, gen_bsz,
                                                             weights)
    results = {"images": folder, "num_images": args.num_images, "seconds_per_image": seconds_per_image,
               "epoch": epoch, "weights": weights}
    said, tag = WEIGHT_NAMES[weights], "_ema" if weights == "ema" else ""
    scores = None
    if args.fid_stats != "none":
        from util.fid import compute_fid_is
        scores = compute_fid_is(folder, args.fid_stats, device, inception_weights=args.fid_inception_weights)
    if misc.is_main_process():
        print(f"{args.num_images} images of the {said} in {folder} ({seconds_per_image:.3f} s per generated image "
              "and rank)")
        if args.save_npz:
            results["npz"] = png_folder.save_npz(folder, args.num_images, args.img_size)
            print(f"ADM evaluator samples: {results['npz']}")
        if scores is not None:
            results.update(fid=scores["fid"], inception_score=scores["inception_score"])
            print(f"FID: {scores['fid']:.4f}, Inception Score: {scores['inception_score']:.4f} ({said})")
            if log_writer is not None:
                log_writer.add_scalar("fid" + tag, scores["fid"], epoch)
                log_writer.add_scalar("is" + tag, scores["inception_score"], epoch)
        if log_writer is not None:
            log_writer.add_image("samples" + tag, png_folder.grid_of(folder, args.num_images), epoch)
        misc.update_results(args.output_dir, **{"generation" + tag: results})
    misc.share_from_rank0(None)  # the others wait for rank 0's report (and npz) without --dist_timeout's bound
    return dict(results, gen_bsz=gen_bsz)
