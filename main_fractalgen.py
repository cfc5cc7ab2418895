"""FractalGen: train, evaluate NLL (--evaluate_nll) or generate and score (--evaluate_gen).

Demo:          python main_fractalgen.py --demo    (small model, bundled digits, CPU is fine)

One process:   python main_fractalgen.py --model fractalmar_tiny_in16 --img_size 16 ...
Many:          torchrun --nproc_per_node=8 main_fractalgen.py ...   (also SLURM, or OpenMPI with --dist_on_itp)
"""
import argparse
import copy
import math
import os
import sys
import time

# oneDNN keeps a compiled kernel for every tensor shape it meets (1024 by default), and random MAR masks
# make new shapes at every step: a small cache bounds CPU memory at the same speed (benchmarks/README.md).
# Set before torch loads oneDNN; an explicit setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import util.checkpoint as checkpoint  # noqa: E402
import util.fsdp as fsdp  # noqa: E402
import util.misc as misc  # noqa: E402
import util.stop as stop  # noqa: E402
from engine_fractalgen import evaluate_gen, evaluate_nll, train_one_epoch  # noqa: E402
from models.fractalgen import MODELS, RELEASED, build_model, compile_blocks  # noqa: E402
from util import demo_data  # noqa: E402
from util.data import eval_loader, image_folder, train_loader  # noqa: E402
from util.flags import (WEIGHT_NAMES, Parser, add_device_flags, add_sampling_flags, add_weights_flag,  # noqa: E402
                        check_precision, check_writable_folder, count, default_precision, number, parse_num_iter)
from util.sampling import COMPILE_SCOPES  # noqa: E402


def gen_bsz(text):
    """--gen_bsz: images per batch and process, or auto."""
    if text == "auto":
        return text
    try:
        return count(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text!r}") from None


def get_args_parser():
    p = Parser("FractalGen", add_help=True, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               epilog=f"models: {', '.join(MODELS)} (released: {', '.join(RELEASED)})")
    p.add_argument("--batch_size", default=64, type=count(1), help="images per process and step; the effective "
                   "batch is batch_size × number of processes")
    p.add_argument("--epochs", default=400, type=count(0), help="training epochs in all (a resumed run stops there too)")
    p.add_argument("--model", default="fractalmar_in64", choices=list(MODELS), metavar="MODEL",
                   help="configuration to build (names below)")
    p.add_argument("--img_size", default=64, type=count(1), help="image side in pixels; must be the model's")
    # generation
    add_sampling_flags(p)
    p.add_argument("--num_images", default=50000, type=count(1),
                   help="images to generate for FID/IS, split equally over the classes")
    p.add_argument("--label_drop_prob", default=0.1, type=number(0, 1, high_ok=True),
                   help="share of training images whose class is replaced by the 'no class' embedding (for cfg)")
    p.add_argument("--eval_freq", type=count(1), default=40, help="with --online_eval, generate and score every N epochs")
    p.add_argument("--save_last_freq", type=count(1), default=5,
                   help="write checkpoint-last.pth every N epochs (and at the end)")
    p.add_argument("--save_every_steps", type=count(0), default=0,
                   help="also refresh checkpoint-last.pth every N steps inside an epoch (0 = off); resuming "
                        "continues from the step after it")
    p.add_argument("--online_eval", action="store_true", help="generate and compute FID/IS during training")
    p.add_argument("--evaluate_gen", action="store_true",
                   help="no training: generate --num_images from the --resume checkpoint and score them")
    p.add_argument("--evaluate_nll", action="store_true",
                   help="no training: the unconditional NLL (bits/dim) of the validation images")
    p.add_argument("--gen_bsz", type=gen_bsz, default=1024,
                   help="images per sampling batch and process, or auto: the largest that fits in memory, "
                        "measured on the first batch (the images depend on it; the choice is printed)")
    p.add_argument("--compile_sampling", default="none", choices=COMPILE_SCOPES,
                   help="torch.compile the per-pixel heads' sampling (head) or the whole last generator level "
                        "(inner; longer to compile), as CUDA graphs on CUDA: the same draws, fewer kernel launches")
    p.add_argument("--save_npz", action="store_true",
                   help="with --evaluate_gen (or --online_eval): also write the images as one .npz beside their folder "
                        "(arr_0, uint8, N×H×W×3, in image order), the samples file of the ADM evaluator")
    p.add_argument("--nll_bsz", type=count(1), default=128, help="images per NLL batch and process")
    p.add_argument("--nll_forward_number", type=count(1), default=1,
                   help="passes averaged per image for the NLL: MAR's random order makes one pass noisy; no "
                        "effect on AR")
    # optimization
    p.add_argument("--weight_decay", type=number(0), default=0.05,
                   help="AdamW weight decay (not on norms and biases)")
    p.add_argument("--ema_rate", type=number(0, 1), default=0.0,
                   help="keep an exponential moving average of the weights, after every optimizer step ema = R·ema + "
                        "(1−R)·weights (0 = off; MAR uses 0.9999); saved as model_ema, and what evaluations use "
                        "(--eval_weights)")
    add_weights_flag(p, both=True)
    p.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, more time")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard the weights, gradients and optimizer state over the processes (FSDP2: "
                        "each transformer block and the root) instead of a full copy on each (DDP): for a model "
                        "whose training state does not fit on one GPU; slower than DDP where that fits. Checkpoints "
                        "keep the one format (a run can switch between the two). Evaluations use a full copy on "
                        "each process, so --evaluate_nll/--evaluate_gen run as without it. One process: nothing "
                        "to shard")
    p.add_argument("--sharded_checkpoint", action="store_true",
                   help="with --fsdp: each process writes its own shards (torch.distributed.checkpoint) into "
                        "output_dir/checkpoint-last.dcp instead of rank 0 gathering checkpoint-last.pth, for a training "
                        "state larger than rank 0's memory; resumes with any number of processes; "
                        "python -m util.checkpoint consolidate makes the one file from it")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block for training (sampling and the NLL stay eager); "
                        "compiling takes a minute or more at the start")
    p.add_argument("--lr", type=number(0, low_ok=False), default=None,
                   help="absolute learning rate; default blr × effective batch / 256")
    p.add_argument("--blr", type=number(0, low_ok=False), default=5e-5,
                   help="base learning rate, scaled by effective batch / 256")
    p.add_argument("--min_lr", type=number(0), default=0.0, help="where the cosine schedule ends")
    p.add_argument("--lr_schedule", type=str, default="cosine", choices=["constant", "cosine"],
                   help="after the warm-up: stay at lr, or decay to min_lr by the last epoch")
    p.add_argument("--warmup_epochs", type=count(0), default=40, help="epochs of linear warm-up from 0 to lr")
    # FractalGen
    p.add_argument("--guiding_pixel", action="store_true",
                   help="each patch first predicts its mean colour, which conditions its pixels (the 256×256 models)")
    p.add_argument("--num_conds", type=count(1, 5), default=1,
                   help="conditions each MAR level passes down (the released MAR models use 5, AR 1)")
    p.add_argument("--r_weight", type=number(0), default=5.0, help="weight of the red channel's loss (drawn first)")
    p.add_argument("--grad_clip", type=number(0), default=3.0, help="clip the gradient norm to this (0 = off)")
    p.add_argument("--attn_dropout", type=number(0, 1), default=0.1, help="dropout on attention weights")
    p.add_argument("--proj_dropout", type=number(0, 1), default=0.1,
                   help="dropout after attention and MLP projections")
    # data, outputs, evaluation files
    p.add_argument("--data_path", default="./data/imagenet", type=str, help="ImageFolder root with train/ and val/")
    p.add_argument("--class_num", default=1000, type=count(1), help="number of classes (folders in train/)")
    p.add_argument("--output_dir", default="./output_dir", help="checkpoints, results.json and generated images")
    p.add_argument("--log_dir", default=None, help="TensorBoard folder; default output_dir")
    p.add_argument("--fid_stats", default=None,
                   help="npz with mu and sigma; default fid_stats/adm_in{img_size}_stats.npz; 'none' = generate only")
    p.add_argument("--fid_inception_weights", default=None, help="local copy of torch-fidelity's InceptionV3 weights")
    p.add_argument("--print_freq", default=20, type=count(1), help="log a line every N steps")
    # system
    add_device_flags(p)
    p.add_argument("--resume", default="", help="folder holding checkpoint-last.pth to continue or evaluate")
    p.add_argument("--start_epoch", default=0, type=count(0), help="first epoch of a run that does not resume")
    p.add_argument("--num_workers", default=10, type=count(0), help="data loader processes per process")
    p.add_argument("--pin_mem", action="store_true", help="pin data loader memory for faster copies to the GPU")
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin memory")
    p.set_defaults(pin_mem=True)
    p.add_argument("--world_size", default=1, type=int, help="number of processes (torchrun sets it)")
    p.add_argument("--local_rank", default=-1, type=int, help="set by the launcher")
    p.add_argument("--dist_on_itp", action="store_true", help="take ranks from OpenMPI's environment")
    p.add_argument("--dist_url", default="env://", help="how processes find each other")
    p.add_argument("--dist_timeout", type=number(0, low_ok=False), default=misc.DIST_TIMEOUT_MINUTES,
                   help="minutes a collective waits for the slowest process before the run fails (work rank 0 "
                        "does alone, such as writing a checkpoint, is waited for without this bound)")
    p.add_argument("--no_flip", action="store_true",
                   help="train without random horizontal flips (for images that are not mirror-symmetric, such as "
                        "digits; the demo sets it)")
    # after training (the demo sets both)
    p.add_argument("--final_nll", action="store_true",
                   help="after the last epoch: the NLL (bits/dim) of the validation images, as --evaluate_nll "
                        "gives it")
    p.add_argument("--final_samples", default=0, type=count(0), metavar="N",
                   help="after the last epoch: N samples of each of the first 10 classes in output_dir/samples.png "
                        "(0 = none), with --num_iter_list, --cfg, --cfg_schedule, --temperature, --filter_threshold, "
                        "--seed and --precision, in batches of --gen_bsz; on the bundled digits also the share "
                        "that a digit classifier reads as their digit")
    p.add_argument("--demo", action="store_true",
                   help="the demo preset: train a small model on the bundled digits (written to data/demo; CPU is "
                        "fine), then its NLL and a sample grid in output_demo/; flags given as well override it")
    return p


# The demo preset: a small FractalAR on the bundled MNIST digits (16×16, one colour per class, written to
# data/demo on first use), sized for a few minutes on a CPU, then its NLL and a sample grid
# (--final_nll, --final_samples). AR rather than MAR: in the same time its raster order draws whole
# strokes where MAR's parallel draws leave fragments; no flips, since a mirrored 3 is no 3. It resumes
# its own --output_dir (parse_args). --temperature multiplies the logits (as released), so 2.0
# sharpens them: it removes the speckle an undertrained pixel head leaves.
DEMO_DEFAULTS = dict(
    model="fractalar_tiny_in16", img_size=16, num_conds=1, class_num=10, data_path=demo_data.FOLDER,
    output_dir="output_demo", epochs=5, warmup_epochs=1, batch_size=32, lr=2e-3,
    seed=1, no_flip=True, lr_schedule="cosine", attn_dropout=0.0, proj_dropout=0.0, num_workers=1,
    save_last_freq=1, print_freq=50, num_iter_list="16,16", cfg=3.0, cfg_schedule="linear", temperature=2.0,
    nll_bsz=100, nll_forward_number=4, final_nll=True, final_samples=8)


def parse_args(argv=None):
    """The command line. With --demo the preset's values are the defaults. Defaults that follow other flags
    (--precision from --device, --fid_stats from --img_size, --log_dir from --output_dir, and the demo's
    --resume, its own --output_dir) are set by a last pass, so that args holds the run's settings and
    nothing rewrites them later."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:  # parsed again over the preset's defaults (also when --demo was abbreviated)
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    parser.set_defaults(precision=default_precision(args.device), fid_stats=f"fid_stats/adm_in{args.img_size}_stats.npz",
                        log_dir=args.output_dir, **({"resume": args.output_dir} if args.demo else {}))
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- checks
def check_args(args):
    """What no single flag's type can check: flags that depend on each other, and files and folders."""
    training = not (args.evaluate_gen or args.evaluate_nll)
    if args.epochs == 0 and not (args.evaluate_gen or args.evaluate_nll or args.final_nll or args.final_samples):
        raise misc.UserError("--epochs 0 trains nothing; pass the number of epochs to train to (or --evaluate_nll / "
                             "--evaluate_gen to evaluate a checkpoint)")
    if training and args.epochs and args.start_epoch >= args.epochs:
        raise misc.UserError(f"--start_epoch {args.start_epoch} is not below --epochs {args.epochs}: nothing to "
                             "train")
    check_precision(args.precision, args.device)
    if training and args.eval_weights == "both" and not args.ema_rate:
        raise misc.UserError("--eval_weights both evaluates the EMA weights next to the raw ones: pass --ema_rate "
                             "too (e.g. 0.9999)")
    if args.save_npz and not (args.evaluate_gen or args.online_eval):
        raise misc.UserError("--save_npz writes the images of --evaluate_gen (or --online_eval): add one of them")
    if args.sharded_checkpoint and not args.fsdp:
        raise misc.UserError("--sharded_checkpoint saves the shards of --fsdp: add --fsdp (under DDP every process "
                             "holds the full state, and rank 0 saves checkpoint-last.pth)")
    for flag in ("output_dir", "log_dir"):
        check_writable_folder(flag, getattr(args, flag))
    if args.fid_inception_weights and not os.path.isfile(args.fid_inception_weights):
        raise misc.UserError(f"--fid_inception_weights {args.fid_inception_weights} does not exist")
    if args.evaluate_gen or args.online_eval:
        if args.num_images % args.class_num:
            raise misc.UserError(f"--num_images {args.num_images} must be divisible by --class_num {args.class_num} "
                                 "(images are split equally over classes)")
        if args.fid_stats != "none":
            if args.num_images < 10:
                raise misc.UserError(f"the Inception Score uses 10 splits: scoring needs --num_images >= 10, got "
                                     f"{args.num_images} (or pass --fid_stats none to generate without scoring)")
            from util.fid import check_scoring
            try:
                check_scoring(args.fid_stats, torch.device("cpu"), args.fid_inception_weights)
            except ValueError as e:
                raise misc.UserError(f"{e} (or pass --fid_stats none to generate without scoring)") from None


def build(args):
    """The model, and the sampling steps of its levels (--num_iter_list checked against them)."""
    model = build_model(
        args.model, label_drop_prob=args.label_drop_prob, class_num=args.class_num,
        attn_dropout=args.attn_dropout, proj_dropout=args.proj_dropout, guiding_pixel=args.guiding_pixel,
        num_conds=args.num_conds, r_weight=args.r_weight, grad_checkpointing=args.grad_checkpointing)
    if model.img_size != args.img_size:
        raise misc.UserError(f"--model {args.model} makes {model.img_size}×{model.img_size} images but --img_size is "
                             f"{args.img_size}; pass --img_size {model.img_size}")
    return model, parse_num_iter(args.num_iter_list, model.num_fractal_levels - 1, args.model)


def param_groups(model, weight_decay):
    """AdamW groups as released: no weight decay on 1-D tensors (norms, biases) and on *.bias."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


# ----------------------------------------------------------------------------- main
def main(args):
    check_args(args)
    if args.demo:  # the preset's data: the bundled digits, written on first use
        demo_data.prepare(args.data_path, args.img_size)
    device = misc.init_distributed_mode(args.device, args.dist_on_itp, args.dist_url, args.dist_timeout)
    if device.type == "cpu":
        misc.keep_freed_memory()
    torch.manual_seed(args.seed + misc.get_rank())
    np.random.seed(args.seed + misc.get_rank())
    training = not (args.evaluate_gen or args.evaluate_nll)
    model, num_iter = build(args)
    sampling = dict(num_iter_list=num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                    filter_threshold=args.filter_threshold, precision=args.precision)
    dataset_train = image_folder(args.data_path, "train", args.img_size, args.class_num) if training else None
    needs_val = args.evaluate_nll or (training and args.final_nll)  # checked now, not after training
    dataset_val = image_folder(args.data_path, "val", args.img_size, args.class_num) if needs_val else None
    ckpt_path, ckpt = checkpoint.resume_on_every_rank(args, training)
    ema_saved = checkpoint.holds_ema(ckpt)
    model_ema, ema_state = None, None  # the module holding the EMA weights; the checkpoint's EMA weights
    if ckpt is not None and training and "sharded" in ckpt:  # its tensors are read once the model is sharded
        checkpoint.check_shapes(model, ckpt["sharded"]["shapes"]["model"], ckpt_path)
    elif ckpt is not None and training:
        checkpoint.load_model_state(model, ckpt["model"], ckpt_path)
        checkpoint.check_training_state(ckpt, param_groups(model, args.weight_decay), ckpt_path)
        ema_state = ckpt.get("model_ema")
    elif ckpt is not None:  # evaluation: the weights --eval_weights asks for, both in two models
        if args.eval_weights == "both" and "model_ema" not in ckpt:
            raise misc.UserError(f"--eval_weights both: {ckpt_path} holds no EMA weights (model_ema, from training "
                                 "with --ema_rate); use --eval_weights raw")
        chosen, state = checkpoint.weights_for(ckpt, "raw" if args.eval_weights == "raw" else "ema")
        checkpoint.load_model_state(model, state, ckpt_path)
        if chosen == "ema":
            model_ema = model
        if args.eval_weights == "both":
            model_ema = copy.deepcopy(model)
            checkpoint.load_model_state(model, ckpt["model"], ckpt_path)
        if args.eval_weights != "raw" and chosen == "raw":
            print_rank0(f"{ckpt_path} holds no EMA weights (model_ema): evaluating its raw weights")
    ema = None
    if training and args.ema_rate:  # copied before compiling: the EMA's evaluations run eagerly
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=args.ema_rate)
        model_ema = ema.module.requires_grad_(False)
        if ema_state is not None:
            checkpoint.load_model_state(model_ema, ema_state, ckpt_path)
    elif training and ema_saved:
        print_rank0(f"--ema_rate 0: the EMA weights of {ckpt_path} are not continued (the next checkpoint holds "
                    "none)")
    world, rank = misc.get_world_size(), misc.get_rank()
    pin_memory = args.pin_mem and device.type == "cuda"
    if training:
        loader = train_loader(dataset_train, args.batch_size, args.num_workers, pin_memory, world, rank, args.seed,
                              flip=not args.no_flip)
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise misc.UserError(f"--batch_size {args.batch_size} × {world} process(es) is larger than the "
                                 f"{len(dataset_train)} training images; lower --batch_size")

    # every check has passed: from here on, output_dir is written
    os.makedirs(args.output_dir, exist_ok=True)
    misc.lock_output_dir(args.output_dir)
    misc.check_shared_folder(args.output_dir)
    if misc.is_main_process():
        misc.remove_stale_temporaries(args.output_dir, [checkpoint.NAME, "results.json"])
    model.to(device)
    if model_ema is not None:
        model_ema.to(device)
    if args.compile and training:
        compile_blocks(model)
    if args.fsdp and training and misc.is_dist():  # before the optimizer, which holds the sharded parameters
        fsdp.shard(model, args.precision, device, world)
        if ema is not None:  # sharded as the model: each rank averages its own shards
            fsdp.shard(model_ema, "fp32", device, world)
    model_without_ddp = model
    print_rank0(f"Model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
                f"device {device}, {world} process(es), precision {args.precision}")
    lr_given = args.lr is not None
    if not lr_given:
        args.lr = args.blr * args.batch_size * world / 256
    optimizer = torch.optim.AdamW(param_groups(model_without_ddp, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    if fsdp.is_sharded(model):
        scaler = fsdp.grad_scaler(args.precision, device)
    else:
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    start_epoch, consumed, ckpt_epoch = args.start_epoch, 0, None
    if ckpt is not None:
        ckpt_epoch = ckpt.get("epoch", 0)
        if training:
            start_epoch, consumed = checkpoint.restore_training_state(ckpt, optimizer, scaler, device,
                                                                      model=model_without_ddp,
                                                                      model_ema=model_ema if ema is not None else None)
        print_rank0(f"Resumed from {ckpt_path} ({checkpoint.describe(ckpt)})")
        if training:
            print_rank0(checkpoint.what_changed(ckpt, args, world, lr_given))
        del ckpt

    if misc.is_dist() and not fsdp.is_sharded(model):
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if ema is not None and not ema_saved:  # after DDP has broadcast rank 0's weights: the same on every rank
        model_ema.load_state_dict(model_without_ddp.state_dict())
        if ckpt_path is not None:
            print_rank0(f"{ckpt_path} holds no EMA weights (model_ema): the EMA starts from its weights")
    evaluated = evaluated_models(args, model_without_ddp, model_ema)
    log_writer = None
    if misc.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        log_writer = SummaryWriter(log_dir=args.log_dir)

    gen_bsz = args.gen_bsz  # "auto" becomes the batch size it chose, kept for later evaluations
    if args.evaluate_nll:
        for weights, evaluated_model in from_one_random_state(evaluated, device):
            report_nll(evaluated_model, dataset_val, args, device, world, rank, log_writer, ckpt_epoch, weights)
    if args.evaluate_gen:
        with stop.deferred():
            for weights, evaluated_model in evaluated:
                gen_bsz = evaluate_gen(evaluated_model, args, device, ckpt_epoch, log_writer, sampling, gen_bsz,
                                       weights)["gen_bsz"]
    if not training:
        return

    first_step = f" (step {consumed // (args.batch_size * world)})" if consumed else ""
    if start_epoch < args.epochs:
        print_rank0(f"Training from epoch {start_epoch}{first_step} to {args.epochs}, lr {args.lr:.3g}, "
                    f"{steps_per_epoch} steps per epoch")
    else:
        print_rank0(f"Nothing to train: the run is at epoch {start_epoch} and --epochs is {args.epochs}")
    start = time.time()
    with stop.deferred():  # SIGTERM, SIGINT: a step checkpoint at the next step boundary, then Stopped
        for epoch in range(start_epoch, args.epochs):
            epoch_consumed = consumed if epoch == start_epoch else 0
            loader.sampler.set_epoch(epoch, epoch_consumed)
            train_one_epoch(model, model_without_ddp, loader, optimizer, scaler, device, epoch, log_writer, args,
                            steps_per_epoch, epoch_consumed, ema)
            evaluate = args.online_eval and (epoch % args.eval_freq == 0 or epoch + 1 == args.epochs)
            # saved before an evaluation too, which a stop signal may end
            if epoch % args.save_last_freq == 0 or epoch + 1 == args.epochs or args.save_every_steps or evaluate:
                path = checkpoint.save(args, model_without_ddp, optimizer, scaler, epoch, device, model_ema=model_ema)
                print_rank0(f"Saved {path} (epoch {epoch})")
            for weights, evaluated_model in unsharded(evaluated, args, device) if evaluate else []:
                gen_bsz = evaluate_gen(evaluated_model, args, device, epoch, log_writer, sampling, gen_bsz,
                                       weights)["gen_bsz"]
            if log_writer is not None:
                log_writer.flush()
            done, left = epoch + 1 - start_epoch, args.epochs - epoch - 1
            so_far = time.time() - start
            print_rank0(f"Epoch {epoch} done; {hms(so_far)} so far, ETA of the run {hms(so_far / done * left)}")
    print_rank0(f"Training time {hms(time.time() - start)}")
    if args.final_nll or args.final_samples:
        report_after_training(unsharded(evaluated, args, device), dataset_val, args, device, world, rank, log_writer,
                              sampling, gen_bsz)


def evaluated_models(args, model, model_ema):
    """(weights, model) for each evaluation: ("ema", model_ema) where there are EMA weights and
    --eval_weights is ema or both; ("raw", model) where it is raw or both, or where there are none."""
    pairs = []
    if model_ema is not None and args.eval_weights in ("ema", "both"):
        pairs.append(("ema", model_ema))
    if model_ema is None or args.eval_weights in ("raw", "both"):
        pairs.append(("raw", model))
    return pairs


def unsharded(evaluated, args, device):
    """The (weights, model) pairs of `evaluated`, each model sharded by --fsdp replaced by a full copy on
    every rank: evaluations then run as under DDP (sampling calls generate, not forward, and ranks do not
    all make the same calls). Every rank must call it."""
    pairs = []
    for weights, model in evaluated:
        if fsdp.is_sharded(model):
            state = fsdp.full_weights_everywhere(model)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # training's draws stay
                model = build(args)[0]
            model.load_state_dict(state, strict=True)
            model.to(device)
        pairs.append((weights, model))
    return pairs


def from_one_random_state(evaluated, device):
    """The (weights, model) pairs of `evaluated`, each to be evaluated from the random state the first
    starts from (MAR's NLL masks: the same for the EMA and the raw weights); the last leaves it where
    one evaluation alone would."""
    for i, pair in enumerate(evaluated):
        if i + 1 < len(evaluated):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                yield pair
        else:
            yield pair


def hms(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def report_nll(model, dataset_val, args, device, world, rank, log_writer=None, epoch=None, weights="raw"):
    """The NLL in bits/dim over `dataset_val`: printed and recorded in output_dir/results.json (and
    TensorBoard), under names ending in _ema for the EMA weights (`weights` "ema")."""
    pin_memory = args.pin_mem and device.type == "cuda"
    bpd = evaluate_nll(model, eval_loader(dataset_val, args.nll_bsz, args.num_workers, pin_memory, world, rank),
                       device, args)
    if not math.isfinite(bpd):  # never report a number that means nothing
        raise misc.UserError(f"the NLL came out {bpd} with --precision {args.precision}; try --precision fp32, or "
                             "check the checkpoint")
    print_rank0(f"BPD: {bpd:.5f} ({WEIGHT_NAMES[weights]})")
    tag = "_ema" if weights == "ema" else ""
    if log_writer is not None:
        log_writer.add_scalar("val_bpd" + tag, bpd, epoch or 0)
        log_writer.flush()
    misc.update_results(args.output_dir, **{"nll" + tag: {"bpd": bpd, "images": len(dataset_val), "weights": weights,
                                                          "forward_number": args.nll_forward_number}})


# ----------------------------------------------------------------------------- after training
def report_after_training(evaluated, dataset_val, args, device, world, rank, log_writer, sampling, gen_bsz):
    """--final_nll and --final_samples, for each of the `evaluated` (weights, model): the trained model's
    NLL (all processes) and a grid of its samples (rank 0; the others are done and do not wait for it)."""
    for weights, model in from_one_random_state(evaluated, device):
        if args.final_nll:
            report_nll(model, dataset_val, args, device, world, rank, log_writer, args.epochs, weights)
        if args.final_samples and misc.is_main_process():
            report_samples(model, args, log_writer, sampling, None if gen_bsz == "auto" else gen_bsz, weights)


def report_samples(model, args, log_writer, sampling, batch_size, weights="raw"):
    """output_dir/samples.png (samples_ema.png for the EMA weights), one row per class, seeded by --seed; a
    model of the bundled digits also gets the digit check (PNG's bits/dim on the held-out digits, and the
    share of samples recognised)."""
    from util.digit_check import judge_grid
    from util.sampling import grid_upscale, save_sample_grid
    tag, said = "_ema" if weights == "ema" else "", WEIGHT_NAMES[weights]
    path, per_class = os.path.join(args.output_dir, f"samples{tag}.png"), args.final_samples
    upscale = grid_upscale(args.img_size)
    grid = save_sample_grid(model, path, classes=range(min(args.class_num, 10)), per_class=per_class, seed=args.seed,
                            upscale=upscale, batch_size=batch_size, **sampling)
    saved = checkpoint.path_in(args.output_dir)
    print(f"Samples: {path}  (one row per class, {said}" + (f"; checkpoint: {saved})" if os.path.exists(saved) else ")"))
    results = {"samples": path, "weights": weights}
    tree = demo_data.tree_settings(args.data_path)
    if tree is not None and tree["img_size"] == args.img_size:
        results.update(judge_grid(path, tree, per_class, upscale))
        print(f"PNG: {results['png_bpd']:.3f} bits/dim on the same {results['held_out_digits']} digits (lossless "
              "compression, files as saved)")
        print(f"Recognised as their digit: {results['recognised_share']:.0%} of the samples of the {said} (the same "
              f"classifier on real held-out digits: {results['real_digits_accuracy']:.0%})")
    misc.update_results(args.output_dir, **{"final_samples" + tag: results})
    if log_writer is not None:
        log_writer.add_image("samples" + tag, grid, args.epochs)
        if "recognised_share" in results:
            log_writer.add_scalar("recognised_share" + tag, results["recognised_share"], args.epochs)
        log_writer.flush()


def print_rank0(msg):
    if msg is not None and misc.is_main_process():
        print(msg, flush=True)


if __name__ == "__main__":
    sys.exit(misc.run_command(lambda: main(parse_args())))
