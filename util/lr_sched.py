"""Learning-rate schedule, set every iteration: linear warmup, then half-cycle cosine or constant."""
import math


def lr_at(epoch, args):
    """Learning rate at a fractional epoch."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    if args.lr_schedule == "constant":
        return args.lr
    if args.lr_schedule == "cosine":
        progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
        return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"--lr_schedule must be 'constant' or 'cosine', got {args.lr_schedule!r}")


def adjust_learning_rate(optimizer, epoch, args):
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
