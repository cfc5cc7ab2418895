"""FractalGen: train, evaluate NLL (--evaluate_nll) or generate and score (--evaluate_gen).

One process:   python main_fractalgen.py --model fractalmar_tiny_in16 --img_size 16 ...
Many:          torchrun --nproc_per_node=8 main_fractalgen.py ...   (also SLURM, or OpenMPI with --dist_on_itp)
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from torch.utils.data import DataLoader, DistributedSampler

import util.misc as misc
from engine_fractalgen import evaluate_gen, evaluate_nll, generation_labels, train_one_epoch
from models.fractalgen import build_model
from models.layers import IMAGENET_MEAN, IMAGENET_STD
from util.crop import center_crop_arr


def get_args_parser():
    p = argparse.ArgumentParser("FractalGen", add_help=True)
    p.add_argument("--batch_size", default=64, type=int, help="per process; effective = batch_size × world size")
    p.add_argument("--epochs", default=400, type=int)
    p.add_argument("--model", default="fractalmar_in64", type=str)
    p.add_argument("--img_size", default=64, type=int)
    # generation
    p.add_argument("--num_iter_list", default="64,16", type=str, help="steps per generator level, comma-separated")
    p.add_argument("--num_images", default=50000, type=int)
    p.add_argument("--cfg", default=1.0, type=float)
    p.add_argument("--cfg_schedule", default="constant", type=str, choices=["constant", "linear"])
    p.add_argument("--temperature", default=1.0, type=float)
    p.add_argument("--filter_threshold", default=1e-4, type=float)
    p.add_argument("--label_drop_prob", default=0.1, type=float)
    p.add_argument("--eval_freq", type=int, default=40)
    p.add_argument("--save_last_freq", type=int, default=5)
    p.add_argument("--online_eval", action="store_true")
    p.add_argument("--evaluate_gen", action="store_true")
    p.add_argument("--evaluate_nll", action="store_true")
    p.add_argument("--gen_bsz", type=int, default=256)
    p.add_argument("--nll_bsz", type=int, default=128)
    p.add_argument("--nll_forward_number", type=int, default=1)
    # optimization
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--lr", type=float, default=None, help="absolute lr; default blr × effective batch / 256")
    p.add_argument("--blr", type=float, default=5e-5)
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--lr_schedule", type=str, default="constant", choices=["constant", "cosine"])
    p.add_argument("--warmup_epochs", type=int, default=40)
    p.add_argument("--precision", default=None, choices=["fp16", "bf16", "fp32"],
                   help="autocast precision; default fp16 with a gradient scaler on CUDA (as released), fp32 on CPU")
    # FractalGen
    p.add_argument("--guiding_pixel", action="store_true")
    p.add_argument("--num_conds", type=int, default=1)
    p.add_argument("--r_weight", type=float, default=5.0)
    p.add_argument("--grad_clip", type=float, default=3.0)
    p.add_argument("--attn_dropout", type=float, default=0.1)
    p.add_argument("--proj_dropout", type=float, default=0.1)
    # data, outputs, evaluation files
    p.add_argument("--data_path", default="./data/imagenet", type=str, help="ImageFolder root with train/ and val/")
    p.add_argument("--class_num", default=1000, type=int)
    p.add_argument("--output_dir", default="./output_dir")
    p.add_argument("--log_dir", default=None, help="TensorBoard folder; default output_dir")
    p.add_argument("--fid_stats", default=None,
                   help="npz with mu and sigma; default fid_stats/adm_in{img_size}_stats.npz; 'none' = generate only")
    p.add_argument("--fid_inception_weights", default=None, help="local copy of torch-fidelity's InceptionV3 weights")
    p.add_argument("--print_freq", default=20, type=int)
    # system
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", default=1, type=int)
    p.add_argument("--resume", default="", help="folder holding checkpoint-last.pth")
    p.add_argument("--start_epoch", default=0, type=int)
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--pin_mem", action="store_true")
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    p.set_defaults(pin_mem=True)
    p.add_argument("--world_size", default=1, type=int)
    p.add_argument("--local_rank", default=-1, type=int)
    p.add_argument("--dist_on_itp", action="store_true")
    p.add_argument("--dist_url", default="env://")
    return p


# ----------------------------------------------------------------------------- checks and data
def check_args(args):
    """Everything that can be checked before long work starts."""
    if args.precision is None:
        args.precision = "fp16" if args.device.startswith("cuda") else "fp32"
    args.fid_stats = args.fid_stats or f"fid_stats/adm_in{args.img_size}_stats.npz"
    args.log_dir = args.log_dir or args.output_dir
    try:
        args.num_iter = [int(n) for n in args.num_iter_list.split(",")]
    except ValueError:
        raise misc.UserError(f"--num_iter_list must be comma-separated integers, got {args.num_iter_list!r}") from None
    if args.evaluate_gen or args.online_eval:
        generation_labels(args.num_images, args.class_num)
        if args.fid_stats != "none":
            if args.num_images < 10:
                raise misc.UserError(f"the Inception Score uses 10 splits: scoring needs --num_images >= 10, got "
                                     f"{args.num_images} (or pass --fid_stats none to generate without scoring)")
            from util.fid import load_fid_stats
            try:
                load_fid_stats(args.fid_stats)
            except ValueError as e:
                raise misc.UserError(f"{e} (or pass --fid_stats none to generate without scoring)") from None


def image_folder(args, split, train):
    root = os.path.join(args.data_path, split)
    if not os.path.isdir(root):
        raise misc.UserError(f"no {split}/ folder in --data_path {args.data_path}: expected an ImageFolder tree "
                             f"{args.data_path}/{split}/<class>/<image>")
    steps = [transforms.Lambda(lambda img: center_crop_arr(img, args.img_size))]
    steps += [transforms.RandomHorizontalFlip()] if train else []
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    try:
        dataset = datasets.ImageFolder(root, transform=transforms.Compose(steps))
    except FileNotFoundError as e:
        raise misc.UserError(f"{e}; every class folder in {root} needs at least one image") from None
    if len(dataset.classes) != args.class_num:
        raise misc.UserError(f"{root} has {len(dataset.classes)} classes but --class_num is {args.class_num}; "
                             "set --class_num to match the data")
    return dataset


def data_loader(dataset, args, batch_size, train):
    if args.distributed and train:
        sampler = DistributedSampler(dataset, num_replicas=misc.get_world_size(), rank=misc.get_rank(), shuffle=True)
    elif args.distributed:  # evaluation: every image once, no padding, so sums over ranks are exact
        sampler = list(range(misc.get_rank(), len(dataset), misc.get_world_size()))
    else:
        sampler = torch.utils.data.RandomSampler(dataset) if train else None
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=args.num_workers,
                      pin_memory=args.pin_mem and args.device.startswith("cuda"), drop_last=train)


def build(args):
    try:
        model = build_model(
            args.model, label_drop_prob=args.label_drop_prob, class_num=args.class_num,
            attn_dropout=args.attn_dropout, proj_dropout=args.proj_dropout, guiding_pixel=args.guiding_pixel,
            num_conds=args.num_conds, r_weight=args.r_weight, grad_checkpointing=args.grad_checkpointing)
    except ValueError as e:
        raise misc.UserError(str(e)) from None
    if model.img_size != args.img_size:
        raise misc.UserError(f"--model {args.model} makes {model.img_size}×{model.img_size} images but --img_size is "
                             f"{args.img_size}; pass --img_size {model.img_size}")
    if len(args.num_iter) != model.num_fractal_levels - 1:
        raise misc.UserError(f"--num_iter_list needs {model.num_fractal_levels - 1} values for {args.model}, "
                             f"got {args.num_iter_list!r}")
    return model


def param_groups(model, weight_decay):
    """AdamW groups as released: no weight decay on 1-D tensors (norms, biases) and on *.bias."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


# ----------------------------------------------------------------------------- main
def main(args):
    misc.init_distributed_mode(args)
    check_args(args)
    device = torch.device(args.device)
    torch.manual_seed(args.seed + misc.get_rank())
    np.random.seed(args.seed + misc.get_rank())
    training = not (args.evaluate_gen or args.evaluate_nll)
    model = build(args)
    dataset_train = image_folder(args, "train", train=True) if training else None
    dataset_val = image_folder(args, "val", train=False) if args.evaluate_nll else None
    os.makedirs(args.output_dir, exist_ok=True)
    model.to(device)
    model_without_ddp = model
    if misc.is_main_process():
        print(f"Model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
              f"device {device}, {misc.get_world_size()} process(es), precision {args.precision}")

    eff_batch_size = args.batch_size * misc.get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model_without_ddp, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    checkpoint_path = os.path.join(args.resume, "checkpoint-last.pth") if args.resume else ""
    if checkpoint_path and os.path.exists(checkpoint_path):
        ckpt = misc.load_checkpoint(checkpoint_path)
        misc.load_model_state(model_without_ddp, ckpt["model"], checkpoint_path)
        args.checkpoint_epoch = ckpt.get("epoch", 0)
        if training and "optimizer" in ckpt and "epoch" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            if "scaler" in ckpt and ckpt["scaler"]:
                scaler.load_state_dict(ckpt["scaler"])
            args.start_epoch = ckpt["epoch"] + 1
        if misc.is_main_process():
            print(f"Resumed from {checkpoint_path} (epoch {ckpt.get('epoch', 'n/a')})")
    elif args.evaluate_gen or args.evaluate_nll:
        raise misc.UserError(f"evaluation needs a trained model: no checkpoint-last.pth in --resume {args.resume!r}")

    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    log_writer = None
    if misc.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        log_writer = SummaryWriter(log_dir=args.log_dir)

    if args.evaluate_nll:
        bpd = evaluate_nll(model, data_loader(dataset_val, args, args.nll_bsz, train=False), device, args)
        if misc.is_main_process():
            print(f"BPD: {bpd:.5f}")
        misc.update_results(args.output_dir, nll={"bpd": bpd, "images": len(dataset_val),
                                                  "forward_number": args.nll_forward_number})
    if args.evaluate_gen:
        evaluate_gen(model_without_ddp, args, device, args.checkpoint_epoch, log_writer)
    if not training:
        return

    loader = data_loader(dataset_train, args, args.batch_size, train=True)
    if len(loader) == 0:
        raise misc.UserError(f"--batch_size {args.batch_size} × {misc.get_world_size()} process(es) is larger than "
                             f"the {len(dataset_train)} training images; lower --batch_size")
    print_rank0(f"Training from epoch {args.start_epoch} to {args.epochs}, lr {args.lr:.3g}, "
                f"{len(loader)} steps per epoch")
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            loader.sampler.set_epoch(epoch)
        train_one_epoch(model, model_without_ddp, loader, optimizer, scaler, device, epoch, log_writer, args)
        if epoch % args.save_last_freq == 0 or epoch + 1 == args.epochs:
            misc.save_checkpoint(args, epoch, model_without_ddp, optimizer, scaler)
        if args.online_eval and (epoch % args.eval_freq == 0 or epoch + 1 == args.epochs):
            evaluate_gen(model_without_ddp, args, device, epoch, log_writer)
        if log_writer is not None:
            log_writer.flush()
    print_rank0(f"Training time {time.strftime('%H:%M:%S', time.gmtime(time.time() - start))}")


def print_rank0(msg):
    if misc.is_main_process():
        print(msg, flush=True)


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except misc.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if misc.is_dist():
            torch.distributed.destroy_process_group()
