"""Per-rank bytes of the training state (parameters, gradients, AdamW state) under DDP and under --fsdp:
measured on the tiny model with the processes this is started with, and the same arithmetic for the
released models and a larger configuration (parameter counts from the models built on the meta device).

    torchrun --nproc_per_node=2 benchmarks/fsdp_memory.py      # on the CPU (gloo)

Measured: the bytes of the tensors each rank holds after one training step (main_fractalgen.py's step:
forward, backward, clip, AdamW), its own shards under FSDP. The table: float32 weights, gradients and the
two AdamW moments, 16 bytes per parameter, in full under DDP and split over N processes under FSDP, plus
under FSDP the largest block's weights gathered in bf16 twice (the block computing and the next one
prefetched). Activations are not counted. Writes benchmarks/results/fsdp_memory.json (with commit and versions).
"""
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import util.fsdp as fsdp  # noqa: E402
import util.misc as misc  # noqa: E402
from benchmarks.measure import write_results  # noqa: E402
from engine_fractalgen import apply_gradients  # noqa: E402
from main_fractalgen import param_groups  # noqa: E402
from models.fractalgen import FractalGen, RELEASED, build_model  # noqa: E402
from models.layers import imagenet_stats  # noqa: E402

TINY = ("fractalmar_tiny_in16", dict(class_num=3, num_conds=5, guiding_pixel=True))
# a 2-3B configuration: the Huge model's levels, wider and deeper at the first two
LARGER = dict(img_size_list=(256, 16, 4, 1), embed_dim_list=(2048, 1024, 320, 64), num_blocks_list=(48, 12, 5, 1),
              num_heads_list=(16, 16, 4, 4), generator_type_list=("mar", "mar", "mar", "ar"))
GIB = 2 ** 30


def state_bytes(model, optimizer):
    """Bytes of this rank's parameters, gradients and optimizer state (its shards under FSDP)."""
    def size(t):
        t = fsdp.local(t)
        return t.numel() * t.element_size()
    params = list(model.parameters())
    return {"parameters": sum(size(p) for p in params),
            "gradients": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(size(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))}


def measure(sharded, device, world, batch_size=4):
    torch.manual_seed(0)
    model = build_model(TINY[0], **TINY[1]).to(device)
    if sharded:
        fsdp.shard(model, "fp32", device, world)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    mean, std = (t.view(1, 3, 1, 1) for t in imagenet_stats(device))
    images = (torch.randint(0, 256, (batch_size, 3, 16, 16)) / 255 - mean) / std
    labels = torch.randint(0, 3, (batch_size,))
    apply_gradients(model(images, labels), model, optimizer, torch.amp.GradScaler("cpu", enabled=False), 3.0)
    return state_bytes(model, optimizer)


def largest_block(model):
    from models.ar import TransformerBlock
    from models.layers import Block
    blocks = [m for m in model.modules() if isinstance(m, (Block, TransformerBlock))]
    return max(sum(p.numel() for p in m.parameters()) for m in blocks)


def arithmetic(gpus=(8, 32)):
    """GiB per GPU of the training state under DDP and FSDP on each number of GPUs, for each model."""
    configs = {name: (r["config"].config, dict(num_conds=r["num_conds"], guiding_pixel=r["guiding_pixel"]))
               for name, r in RELEASED.items()}
    configs["larger (see LARGER)"] = (LARGER, dict(num_conds=5, guiding_pixel=True))
    rows = {}
    for name, (config, kwargs) in configs.items():
        with torch.device("meta"):
            model = FractalGen(**config, class_num=1000, **kwargs)
        params = sum(p.numel() for p in model.parameters())
        gathered = 2 * 2 * largest_block(model)
        rows[name] = {"params_millions": params / 1e6, "ddp_gib": 16 * params / GIB,
                      **{f"fsdp_{n}_gib": (16 * params / n + gathered) / GIB for n in gpus}}
    return rows


def main():
    device = misc.init_distributed_mode("cpu")
    world = misc.get_world_size()
    measured = {"ddp": measure(False, device, world), "fsdp": measure(True, device, world)}
    every_rank = [None] * world
    torch.distributed.all_gather_object(every_rank, measured)
    if misc.is_main_process():
        result = {"model": TINY[0], "processes": world, "measured_bytes_per_rank": every_rank,
                  "table_gib_per_gpu": arithmetic(), "larger_config": LARGER}
        for way in ("ddp", "fsdp"):
            print(way, [r[way] for r in every_rank])
        for name, row in result["table_gib_per_gpu"].items():
            print(name, {k: round(v, 2) for k, v in row.items()})
        path = os.path.join(REPO, "benchmarks", "results", "fsdp_memory.json")
        write_results(path, result, "cpu")
        print("wrote", path)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
