"""Step time and peak memory of training one model at its released per-GPU batch, in each precision,
with and without gradient checkpointing: the released-batch table of benchmarks/README.md.

    python benchmarks/train_table.py --model fractalmar_in64 --batch 64 --out table.md
    python benchmarks/train_table.py --model fractalmar_large_in256 --guiding_pixel --batch 32 --out table.md

One process builds the model once (random weights) and runs every setting; a step is forward,
backward and AdamW step, with a GradScaler in fp16 as the release trains: the median of --steps steps
after --warmup ones, and the peak memory of one step more. Each row is appended to
--out as soon as it is measured; a setting that runs out of memory gets a row saying so.
"""
import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import measure  # noqa: E402
from benchmarks.workload import random_batch, set_grad_checkpointing, train_step  # noqa: E402
from models.fractalgen import build_model, compile_blocks  # noqa: E402


def measure_setting(model, optimizer, images, labels, amp_name, ckpt, args, device):
    """Median seconds per step over args.steps steps after args.warmup ones, and the peak memory of one
    more step (measure.peak_memory); step i is seeded with i, so every setting draws the same masks."""
    amp = measure.AMP_DTYPES[amp_name]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    set_grad_checkpointing(model, ckpt)
    seeds = itertools.count()

    def step():
        torch.manual_seed(next(seeds))
        train_step(model, optimizer, scaler, images, labels, amp)
    seconds = measure.interleaved({"step": step}, device, args.steps, warmup=args.warmup)["step"]["median"]
    peak, _ = measure.peak_memory(step, device, track=(model, optimizer))
    return seconds, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--guiding_pixel", action="store_true")
    p.add_argument("--amps", default="fp16,bf16")
    p.add_argument("--ckpt", default="1,0", help="gradient checkpointing settings to run, in order")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="compile_blocks (main_fractalgen.py --compile)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True, help="markdown file the rows are appended to")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    mar_first = args.model.startswith("fractalmar")
    model = build_model(args.model, num_conds=5 if mar_first else 1, guiding_pixel=args.guiding_pixel,
                        class_num=1000).to(device).train()
    if args.compile:
        compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    images, labels = (x.to(device) for x in random_batch(args.batch, model.img_size, 1000))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    for amp_name in args.amps.split(","):
        for ckpt in (bool(int(c)) for c in args.ckpt.split(",")):
            label = (f"| {args.model}{' --guiding_pixel' if args.guiding_pixel else ''} ({params:.0f}M) | {args.batch} | "
                     f"{amp_name} | {'yes' if ckpt else 'no'} | {'yes' if args.compile else 'no'} |")
            try:
                seconds, peak = measure_setting(model, optimizer, images, labels, amp_name, ckpt, args, device)
                row = f"{label} {seconds:.3f} | {args.batch / seconds:.1f} | {peak / 2 ** 30:.2f} |"
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                row = f"{label} out of memory | | |"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            with open(args.out, "a") as f:
                f.write(row + "\n")
            print(row, flush=True)


if __name__ == "__main__":
    main()
