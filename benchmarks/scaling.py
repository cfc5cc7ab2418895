"""How sampling work grows with image size and number of levels: FLOPs per image and per level.

    python benchmarks/scaling.py                      # every model in models.fractalgen.MODELS
    python benchmarks/scaling.py --json benchmarks/results/sampling_flops.json   # the README's table
    python benchmarks/scaling.py --models fractalmar_tiny_in16,fractalmar_small_in32 --time --threads 2

FLOPs are counted on the meta device (no memory, no arithmetic: the count depends only on shapes,
and the number of patches predicted per step is fixed by the schedule), level by level (see
level_flops), so even the 256×256 models are counted in seconds. With --time the models are also sampled for real on --device, with
random weights, and the seconds per image are printed next to the count.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.measure import FlopCounter, timed, write_results  # noqa: E402
from models.mar import CONDITIONS  # noqa: E402
from models.fractalgen import MODELS, RELEASED, build_model  # noqa: E402
from util.flags import int_list  # noqa: E402

# the CPU models' steps: the benchmark setting (the released models take theirs from RELEASED)
CPU_NUM_ITER = {"fractalar_tiny_in16": [16, 16], "fractalmar_tiny_in16": [16, 8], "fractalmar_small_in32": [16, 8]}


def num_iter(name):
    return int_list(RELEASED[name]["num_iter_list"]) if name in RELEASED else CPU_NUM_ITER[name]


def model_kwargs(name):
    """As released (RELEASED); the CPU models as MAR-first models with 5 conditions, no guiding pixel."""
    if name in RELEASED:
        return dict(class_num=1000, num_conds=RELEASED[name]["num_conds"],
                    guiding_pixel=RELEASED[name]["guiding_pixel"])
    return dict(class_num=1000, num_conds=5 if MODELS[name].config["generator_type_list"][0] == "mar" else 1,
                guiding_pixel=False)


def sample(model, batch, num_iter_list, cfg):
    """What FractalGen.generate does, without its label checks, which need values: the FLOPs are counted
    on the meta device."""
    with torch.no_grad():
        cond = model.class_emb(torch.arange(batch, device=model.fake_latent.device))
        if cfg != 1.0:
            cond = torch.cat([cond, model.fake_latent.repeat(batch, 1)])
        return model.sample([cond] * len(CONDITIONS), num_iter_list, cfg, "linear", 1.0, 1e-4, fractal_level=0)


def level_flops(name, cfg, steps=None):
    """Sampling FLOPs per image, per level: [(label, FLOPs)], outer level first, the pixel head last.

    Every sequence of a level costs the same, so each level is sampled once, for one image (with
    cfg a [conditional; unconditional] pair), with the next level replaced by a stub that returns
    blank patches; that cost is multiplied by the number of sequences the level sees per image (the
    product of the patch counts of the levels above it). This takes seconds where sampling a whole
    256x256 image on the meta device would run millions of ops. A level's guiding-pixel head counts
    with its level.
    """
    with torch.device("meta"):
        model = build_model(name, **model_kwargs(name)).eval()
    config, steps = MODELS[name].config, steps or num_iter(name)
    pairs = 2 if cfg != 1.0 else 1
    rows, per_image, level, index = [], 1, model, 0
    with torch.no_grad():
        while hasattr(level, "generator"):
            gen, dim = level.generator, config["embed_dim_list"][max(index - 1, 0)]
            cond = torch.zeros(pairs, dim, device="meta")
            patch = gen.patch_size

            def stub(cond_list, cfg, temperature, filter_threshold):
                return torch.zeros(cond_list[0].size(0) // pairs, 3, patch, patch, device="meta")
            with FlopCounter() as counter:
                gen.sample([cond] * len(CONDITIONS), steps[index], cfg, "linear" if index == 0 else "constant", 1.0, 1e-4, stub)
            rows.append((f"level {index} {type(gen).__name__} ({gen.seq_len} patches)", counter.total * per_image))
            per_image *= gen.seq_len
            level, index = level.next_fractal, index + 1
        cond = torch.zeros(pairs, config["embed_dim_list"][index - 1], device="meta")
        with FlopCounter() as counter:
            level.sample([cond], 1.0, cfg, 1e-4)
        rows.append(("pixel head", counter.total * per_image))
    return sum(p.numel() for p in model.parameters()), rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--cfg", type=float, default=4.0, help="guidance doubles every sequence; 1.0 turns it off")
    p.add_argument("--batch", type=int, default=2, help="images per timed sampling call (--time)")
    p.add_argument("--time", action="store_true", help="also sample for real and time it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows here (measure.write_results)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"sampling with cfg {args.cfg} (linear), temperature 1.0; FLOPs per image, self FLOPs per level")
    rows = []
    for name in args.models.split(","):
        config = MODELS[name].config
        params, levels = level_flops(name, args.cfg)
        total = sum(flops for _, flops in levels)
        pixels = config["img_size_list"][0] ** 2
        row = {"model": name, "img_size": config["img_size_list"][0], "levels": len(config["img_size_list"]),
               "params": params, "num_iter_list": num_iter(name), "flops_per_image": total,
               "level_flops": dict(levels)}
        line = (f"{name:<24} {config['img_size_list'][0]:>3}x{config['img_size_list'][0]:<3} "
                f"{len(config['img_size_list']):>1} levels  {params / 1e6:8.2f}M params  "
                f"num_iter {','.join(map(str, num_iter(name))):<9} {total / 1e9:10.1f} GFLOP/image  "
                f"{total / pixels / 1e6:7.2f} MFLOP/pixel")
        if args.time:
            device = torch.device(args.device)
            torch.manual_seed(0)
            model = build_model(name, **model_kwargs(name)).to(device).eval()
            sample(model, args.batch, num_iter(name), args.cfg)  # warm-up
            seconds = timed(lambda: sample(model, args.batch, num_iter(name), args.cfg), device)
            line += f"  {seconds / args.batch:8.3f} s/image ({total * args.batch / seconds / 1e9:.1f} GFLOP/s)"
            row["seconds_per_image"] = seconds / args.batch
        rows.append(row)
        print(line)
        print("    " + "; ".join(f"{label}: {flops / total:.1%}" for label, flops in levels))
    if args.json:
        write_results(args.json, {"cfg": args.cfg, "batch": args.batch, "rows": rows}, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
