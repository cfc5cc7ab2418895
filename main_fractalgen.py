"""FractalGen: train, evaluate NLL (--evaluate_nll) or generate and score (--evaluate_gen).

Demo:          python main_fractalgen.py --demo    (small model, bundled digits, CPU is fine)

One process:   python main_fractalgen.py --model fractalmar_tiny_in16 --img_size 16 ...
Many:          torchrun --nproc_per_node=8 main_fractalgen.py ...   (also SLURM, or OpenMPI with --dist_on_itp)
"""
import argparse
import os
import sys
import time

# oneDNN keeps a compiled kernel for every tensor shape it meets (1024 by default). Random MAR masks
# give new shapes at every step, so on the CPU that cache alone grew the demo run to 3 GB; 64 keeps it
# near 1.3 GB at the same speed. Set before torch loads oneDNN; an explicit setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import util.misc as misc  # noqa: E402
from engine_fractalgen import evaluate_gen, evaluate_nll, generation_labels, train_one_epoch  # noqa: E402
from models.fractalgen import build_model, compile_blocks  # noqa: E402
from util.data import eval_loader, image_folder, train_loader  # noqa: E402


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
    p.add_argument("--save_every_steps", type=int, default=0,
                   help="also refresh checkpoint-last.pth every N steps inside an epoch (0 = off); resuming "
                        "continues from the step after it")
    p.add_argument("--online_eval", action="store_true")
    p.add_argument("--evaluate_gen", action="store_true")
    p.add_argument("--evaluate_nll", action="store_true")
    p.add_argument("--gen_bsz", type=int, default=256)
    p.add_argument("--nll_bsz", type=int, default=128)
    p.add_argument("--nll_forward_number", type=int, default=1)
    # optimization
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block for training (sampling and the NLL stay eager); "
                        "compiling takes a minute or more at the start")
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
    p.add_argument("--demo", action="store_true",
                   help="train a small model on the bundled digits (data/demo; CPU is fine), then write its NLL and "
                        "a sample grid to output_demo/; any flag given as well overrides the demo's setting")
    return p


# The embedded default: a small FractalMAR on the bundled MNIST digits (16×16, one colour per class),
# sized to run in about 7 minutes on 2 CPU cores and give recognisable digits. --temperature multiplies
# the logits (as released), so 2.0 sharpens them: it removes the speckle an undertrained pixel head leaves.
DEMO_DEFAULTS = dict(
    model="fractalmar_tiny_in16", img_size=16, num_conds=5, class_num=10, data_path="data/demo",
    output_dir="output_demo", resume="output_demo", epochs=7, warmup_epochs=1, batch_size=32, lr=2e-3,
    lr_schedule="cosine", attn_dropout=0.0, proj_dropout=0.0, num_workers=1, save_last_freq=1, print_freq=50,
    num_iter_list="16,8", cfg=3.0, cfg_schedule="linear", temperature=2.0, nll_bsz=100, nll_forward_number=4)


def parse_args(argv=None):
    """The command line; with --demo, the demo's settings replace the defaults."""
    parser = get_args_parser()
    if "--demo" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**DEMO_DEFAULTS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- checks
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


def checkpoint_to_resume(args, training):
    """The checkpoint in --resume (None for a fresh run), read and checked before anything is written.
    A fresh training run never overwrites a checkpoint already in --output_dir."""
    path = os.path.join(args.resume, "checkpoint-last.pth") if args.resume else ""
    found = bool(path) and os.path.exists(path)
    if not found and not training:
        raise misc.UserError(f"evaluation needs a trained model: no checkpoint-last.pth in --resume {args.resume!r}")
    ours = os.path.join(args.output_dir, "checkpoint-last.pth")
    if training and os.path.exists(ours) and not (found and os.path.samefile(path, ours)):
        raise misc.UserError(f"{ours} exists from an earlier run; pass --resume {args.output_dir} to continue "
                             "it, or choose another --output_dir")
    return (path, misc.load_checkpoint(path)) if found else (None, None)


def restore_training_state(ckpt, optimizer, scaler, device):
    """Optimizer, scaler and random state from a checkpoint; returns (epoch to run, images of that
    epoch already trained on). A release checkpoint holding only `model` starts at epoch 0."""
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        return 0, 0
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if not misc.restore_rng_states(ckpt.get("rng"), device) and "rng" in ckpt:
        print_rank0("The number of processes changed since the checkpoint: random state not restored")
    if "resume_at" in ckpt:
        return ckpt["resume_at"]["epoch"], ckpt["resume_at"]["consumed"]
    return ckpt["epoch"] + 1, 0


# ----------------------------------------------------------------------------- main
def main(args):
    misc.init_distributed_mode(args)
    check_args(args)
    device = torch.device(args.device)
    if device.type == "cpu":
        misc.keep_freed_memory()
    torch.manual_seed(args.seed + misc.get_rank())
    np.random.seed(args.seed + misc.get_rank())
    training = not (args.evaluate_gen or args.evaluate_nll)
    if args.demo:
        prepare_demo_data(args)
    model = build(args)
    dataset_train = image_folder(args.data_path, "train", args.img_size, args.class_num) if training else None
    dataset_val = image_folder(args.data_path, "val", args.img_size, args.class_num) if args.evaluate_nll else None
    ckpt_path, ckpt = checkpoint_to_resume(args, training)
    if ckpt is not None:
        misc.load_model_state(model, ckpt["model"], ckpt_path)
    world, rank = misc.get_world_size(), misc.get_rank()
    pin_memory = args.pin_mem and device.type == "cuda"
    if training:
        loader = train_loader(dataset_train, args.batch_size, args.num_workers, pin_memory, world, rank, args.seed)
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise misc.UserError(f"--batch_size {args.batch_size} × {world} process(es) is larger than the "
                                 f"{len(dataset_train)} training images; lower --batch_size")

    # every check has passed: from here on, output_dir is written
    os.makedirs(args.output_dir, exist_ok=True)
    model.to(device)
    if args.compile and training:
        compile_blocks(model)
    model_without_ddp = model
    print_rank0(f"Model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
                f"device {device}, {world} process(es), precision {args.precision}")
    if args.lr is None:
        args.lr = args.blr * args.batch_size * world / 256
    optimizer = torch.optim.AdamW(param_groups(model_without_ddp, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    start_epoch, consumed, ckpt_epoch = args.start_epoch, 0, None
    if ckpt is not None:
        ckpt_epoch = ckpt.get("epoch", 0)
        if training:
            start_epoch, consumed = restore_training_state(ckpt, optimizer, scaler, device)
        where = (f"inside epoch {ckpt['resume_at']['epoch']}, at step {ckpt['resume_at']['step']}"
                 if "resume_at" in ckpt else f"after epoch {ckpt.get('epoch', 'n/a')}")
        print_rank0(f"Resumed from {ckpt_path} ({where})")
        del ckpt

    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    log_writer = None
    if misc.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        log_writer = SummaryWriter(log_dir=args.log_dir)

    if args.evaluate_nll:
        report_nll(model, dataset_val, args, device, world, rank)
    if args.evaluate_gen:
        evaluate_gen(model_without_ddp, args, device, ckpt_epoch, log_writer)
    if not training:
        return

    first_step = f" (step {consumed // (args.batch_size * world)})" if consumed else ""
    print_rank0(f"Training from epoch {start_epoch}{first_step} to {args.epochs}, lr {args.lr:.3g}, "
                f"{steps_per_epoch} steps per epoch")
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        epoch_consumed = consumed if epoch == start_epoch else 0
        loader.sampler.set_epoch(epoch, epoch_consumed)
        train_one_epoch(model, model_without_ddp, loader, optimizer, scaler, device, epoch, log_writer, args,
                        steps_per_epoch, epoch_consumed)
        if epoch % args.save_last_freq == 0 or epoch + 1 == args.epochs or args.save_every_steps:
            misc.save_checkpoint(args, model_without_ddp, optimizer, scaler, epoch, device)
        if args.online_eval and (epoch % args.eval_freq == 0 or epoch + 1 == args.epochs):
            evaluate_gen(model_without_ddp, args, device, epoch, log_writer)
        if log_writer is not None:
            log_writer.flush()
    print_rank0(f"Training time {time.strftime('%H:%M:%S', time.gmtime(time.time() - start))}")
    if args.demo:
        finish_demo(model, model_without_ddp, args, device, world, rank)


def report_nll(model, dataset_val, args, device, world, rank):
    """The NLL in bits/dim over `dataset_val`: printed and recorded in output_dir/results.json."""
    pin_memory = args.pin_mem and device.type == "cuda"
    bpd = evaluate_nll(model, eval_loader(dataset_val, args.nll_bsz, args.num_workers, pin_memory, world, rank),
                       device, args)
    print_rank0(f"BPD: {bpd:.5f}")
    misc.update_results(args.output_dir, nll={"bpd": bpd, "images": len(dataset_val),
                                              "forward_number": args.nll_forward_number})


# ----------------------------------------------------------------------------- the embedded demo
def prepare_demo_data(args):
    """Rank 0 writes the bundled digits as an ImageFolder tree (once), so the demo reads them through
    the same data path as ImageNet."""
    from util.demo_data import write_image_folder
    if misc.is_main_process():
        write_image_folder(args.data_path, img_size=args.img_size)
    misc.barrier()


def finish_demo(model, model_without_ddp, args, device, world, rank):
    """After training: NLL on the held-out digits and a grid of samples, one row per class."""
    from util.sampling import save_sample_grid
    report_nll(model, image_folder(args.data_path, "val", args.img_size, args.class_num), args, device, world, rank)
    if misc.is_main_process():
        path = os.path.join(args.output_dir, "samples.png")
        save_sample_grid(model_without_ddp, path, args.num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                         temperature=args.temperature, precision=args.precision, seed=args.seed, upscale=4)
        print(f"Samples: {path}  (one row per class; checkpoint: {args.output_dir}/checkpoint-last.pth)")
    misc.barrier()


def print_rank0(msg):
    if misc.is_main_process():
        print(msg, flush=True)


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except misc.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if misc.is_dist():
            torch.distributed.destroy_process_group()
