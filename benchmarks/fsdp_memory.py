"""Per-GPU memory of training under DDP and under --fsdp: the training state (parameters, gradients, AdamW
state) measured on the tiny model with the processes this is started with, the same arithmetic for the
released models and a larger configuration, and their activations measured on the CPU; together, what fits
in an 80 GB GPU at the released batch.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 benchmarks/fsdp_memory.py      # on the CPU (gloo), ~10 min

State, measured: the bytes of the tensors each rank holds after one training step (main_fractalgen.py's
step: forward, backward, clip, AdamW), its own shards under FSDP. State, arithmetic: float32 weights,
gradients and the two AdamW moments, 16 bytes per parameter, in full under DDP (plus its gradient buckets,
another float32 copy of the gradients) and split over N processes under FSDP, plus under FSDP the largest
block's weights gathered in bf16 twice (the block computing and the next one prefetched).

Activations: the storages that one training forward creates and that are still alive when it returns
(LiveStorages), i.e. what autograd and checkpointing keep for the backward, for one image with every MAR
level masking all its patches, composed level by level (see activations). With --grad_checkpointing the
peak adds one block's recompute (checkpointed_peak).
Writes benchmarks/results/fsdp_memory.json (with commit and versions).
"""
import collections
import gc
import math
import os
import sys
from unittest import mock

import torch
import torch.utils._pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import util.fsdp as fsdp  # noqa: E402
import util.misc as misc  # noqa: E402
from benchmarks.measure import write_results  # noqa: E402
from engine_fractalgen import apply_gradients  # noqa: E402
from main_fractalgen import param_groups  # noqa: E402
from models.fractalgen import FractalGen, RELEASED, build_model, fractalmar_small_in32  # noqa: E402
from models import layers  # noqa: E402
from models.layers import imagenet_stats  # noqa: E402
from util.misc import autocast  # noqa: E402

TINY = ("fractalmar_tiny_in16", dict(class_num=3, num_conds=5, guiding_pixel=True))
# a 2-3B configuration: the Huge model's levels, wider and deeper at the first two
LARGER = dict(img_size_list=(256, 16, 4, 1), embed_dim_list=(2048, 1024, 320, 64), num_blocks_list=(48, 12, 5, 1),
              num_heads_list=(16, 16, 4, 4), generator_type_list=("mar", "mar", "mar", "ar"))
LARGER_NAME = "larger (see LARGER)"
GIB = 2 ** 30
RELEASED_BATCH = {64: 64, 256: 32}  # per-GPU --batch_size of the release's training commands, by image size
GPUS = (8, 32)
# what the allocator may use on an 80 GB GPU: an H100 80GB shows 79.1 GiB to PyTorch, less ~1 GiB of CUDA
# context and library workspaces
USABLE_GIB = 78.0
# the fixed mask ratio of every MAR level: 1.0, all patches masked, is the most a training step hands down
# (the draw is N(1, 0.25) truncated to [0, 1], whose mode is 1); 0.80 is its mean, a typical step
MASK_RATIOS = {"worst": 1.0, "mean": 0.8}
CAP = 16  # samples a level passes on while measuring (see activations)


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


def configs():
    """{name: (architecture, constructor kwargs, released per-GPU batch)}: the released models and LARGER."""
    rows = {name: (r["config"].config, dict(num_conds=r["num_conds"], guiding_pixel=r["guiding_pixel"]),
                   RELEASED_BATCH[r["img_size"]]) for name, r in RELEASED.items()}
    rows[LARGER_NAME] = (LARGER, dict(num_conds=5, guiding_pixel=True), RELEASED_BATCH[256])
    return rows


def arithmetic(gpus=GPUS):
    """GiB per GPU of the training state under DDP (with its fp32 gradient buckets) and FSDP on each number
    of GPUs, for each model."""
    rows = {}
    for name, (config, kwargs, _) in configs().items():
        with torch.device("meta"):
            model = FractalGen(**config, class_num=1000, **kwargs)
        params = sum(p.numel() for p in model.parameters())
        gathered = 2 * 2 * largest_block(model)
        rows[name] = {"params_millions": params / 1e6, "ddp_gib": 16 * params / GIB,
                      "ddp_buckets_gib": 4 * params / GIB,
                      **{f"fsdp_{n}_gib": (16 * params / n + gathered) / GIB for n in gpus}}
    return rows


# ----------------------------------------------------------------------------- activations
class LiveStorages(TorchDispatchMode):
    """Every storage that the ops run inside it create, by weak reference, with the tag current at its
    creation. After a training forward, the ones still alive are exactly what is kept for the backward
    (autograd's saved tensors, checkpointing's block inputs): the activation memory, independent of the
    allocator. Storages that existed before (weights, the batch) are not counted; autocast's copies of the
    weights are tagged ("cast", ...) apart, as they do not grow with the batch."""

    def __init__(self, existing):
        super().__init__()
        self.existing = {t.untyped_storage()._cdata for t in existing}
        self.tag, self.created = ("act", None, None), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        weight_cast = func is torch.ops.aten._to_copy.default and args[0].untyped_storage()._cdata in self.existing
        tag = ("cast",) + self.tag[1:] if weight_cast else self.tag
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                seen = self.created.get(s._cdata)
                if s._cdata not in self.existing and (seen is None or seen[0].expired()):
                    self.created[s._cdata] = (StorageWeakRef(s), s.nbytes(), tag)
        return out

    def alive(self):
        """{tag: bytes} of the storages created inside and still alive."""
        totals = collections.Counter()
        for ref, nbytes, tag in self.created.values():
            if not ref.expired():
                totals[tag] += nbytes
        return totals


def fractal_levels(model):
    """[(level module, its generator or None for the pixel head)] from the outermost level in."""
    levels = []
    while isinstance(model, FractalGen):
        levels.append((model, model.generator))
        model = model.next_fractal
    return levels + [(model, None)]


def activations(config, kwargs, batch_size, grad_checkpointing, precision, mask_ratio=1.0, cap=None):
    """Bytes kept for the backward of one training forward (see LiveStorages), as the GPU would keep them.

    Every MAR level masks a fixed `mask_ratio` of its patches (the training draw is patched on the instance);
    attention runs SDPA's fused kernel as on CUDA (on the CPU, dropout would send it to the explicit path
    or SDPA's math path, which keep the attention weights; CUDA's kernels keep only their log-sum-exp and
    regenerate the dropout mask), so its dropout is left out here. Each level's memory is linear in the
    samples it sees: with `cap`, a level passes at most `cap` samples to the next, and per-sample bytes are
    scaled back to the count it would pass (`per_image` composes them), which makes the 256×256 models
    affordable on the CPU. Returns per level: samples measured and per image, bytes kept per sample and
    per block (for the recompute under checkpointing), and the weight casts."""
    torch.manual_seed(0)
    with torch.device("meta"):  # weights left uninitialized: pages never written take no memory
        model = FractalGen(**config, class_num=10, grad_checkpointing=grad_checkpointing, **kwargs)
    model = model.to_empty(device="cpu").train()
    levels = fractal_levels(model)
    counts = []

    def enter(level):
        def hook(module, args):
            samples = args[0].size(0)
            if cap is not None and level > 0 and samples > cap:
                args = (args[0][:cap], [c[:cap] for c in args[1]])
            counts.append((samples, args[0].size(0)))
            mode.tag = ("act", level, None)
            return args
        return hook

    def block_hooks(level, i):
        def pre(module, args):
            mode.tag = ("act", level, i)

        def post(module, args, out):
            mode.tag = ("act", level, None)
        return pre, post

    for level, (module, generator) in enumerate(levels):
        module.register_forward_pre_hook(enter(level))
        if generator is not None:
            if hasattr(generator, "training_mask"):
                generator.training_mask = lambda ranks, g=generator: ranks < math.ceil(g.seq_len * mask_ratio)
            for i, block in enumerate(generator.blocks):
                pre, post = block_hooks(level, i)
                block.register_forward_pre_hook(pre)
                block.register_forward_hook(post)
    size = config["img_size_list"][0]
    mean, std = (t.view(1, 3, 1, 1) for t in imagenet_stats(torch.device("cpu")))
    images = (torch.randint(0, 256, (batch_size, 3, size, size)) / 255 - mean) / std
    labels = torch.randint(0, 10, (batch_size,))
    mode = LiveStorages(list(model.parameters()) + [images, labels])
    sdpa = layers.sdpa_in_chunks

    def fused_attention(q, k, v, causal=False, dropout_p=0.0):
        return sdpa(q, k, v, causal)
    with (mock.patch.object(layers, "explicit_is_faster", lambda *args: False),
          mock.patch.object(layers, "sdpa_in_chunks", fused_attention)):
        with mode:
            with autocast(torch.device("cpu"), precision):
                loss = model(images, labels)
            alive = mode.alive()
    num_blocks = [len(generator.blocks) if generator is not None else 0 for _, generator in levels]
    del loss, model, levels
    gc.collect()  # the hooks and patched masks make reference cycles: free the weights now
    measured = [kept for _, kept in counts]
    per_image = [batch_size]  # samples each level would see per image, without the cap
    for level in range(1, len(counts)):
        per_image.append(per_image[-1] * counts[level][0] / measured[level - 1])
    per_image = [n / batch_size for n in per_image]
    rows = []
    for level in range(len(num_blocks)):
        mine = {tag: b for tag, b in alive.items() if tag[1] == level}
        blocks = collections.Counter()
        for (kind, _, i), b in mine.items():
            if i is not None:
                blocks[(kind, i)] += b
        rows.append({"samples_measured": measured[level], "samples_per_image": per_image[level],
                     "bytes_per_sample": sum(b for t, b in mine.items() if t[0] == "act") / measured[level],
                     "weight_cast_bytes": sum(b for t, b in mine.items() if t[0] == "cast"),
                     "block_bytes_per_sample": [blocks[("act", i)] / measured[level] for i in range(num_blocks[level])],
                     "block_weight_cast_bytes": [blocks[("cast", i)] for i in range(num_blocks[level])]})
    other = sum(b for t, b in alive.items() if t[1] is None)
    return {"levels": rows, "untagged_bytes": other}


def per_image(levels):
    """Bytes kept per image (composed over levels) and the weight casts (per model, not per image)."""
    return (sum(r["bytes_per_sample"] * r["samples_per_image"] for r in levels),
            sum(r["weight_cast_bytes"] for r in levels))


def checkpointed_peak(checkpointed, plain, batch_size):
    """Bytes at the peak under checkpointing, for `batch_size` images: the kept bytes when the forward
    returns, or, if more, during the backward of one block, whose recompute (its bytes without
    checkpointing, with its weight casts) comes on top of what its own and the outer levels keep; the
    deeper levels' backward (they ran later in the forward) has freed theirs by then."""
    kept = [r["bytes_per_sample"] * r["samples_per_image"] * batch_size + r["weight_cast_bytes"]
            for r in checkpointed]
    peak = sum(kept)
    for level, r in enumerate(plain):
        for block, casts in zip(r["block_bytes_per_sample"], r["block_weight_cast_bytes"]):
            peak = max(peak, sum(kept[:level + 1]) + block * r["samples_per_image"] * batch_size + casts)
    return peak


def activation_gib(result, batch_size):
    """GiB kept for the backward at `batch_size` images: without checkpointing, and with it at its peak
    (checkpointed_peak)."""
    plain, plain_casts = per_image(result["plain"]["levels"])
    return {"plain": (plain * batch_size + plain_casts) / GIB,
            "checkpointed": checkpointed_peak(result["checkpointed"]["levels"], result["plain"]["levels"],
                                              batch_size) / GIB}


MEASURED = {"fp32": ("fp32", "worst"), "bf16": ("bf16", "worst"), "bf16_mean_ratio": ("bf16", "mean")}


def measure_activations(names):
    """With and without checkpointing, at one image (capped, see activations): float32 and bf16 autocast at
    the worst mask ratio, bf16 at the mean one."""
    every = configs()
    out = {}
    for name in names:
        config, kwargs, _ = every[name]
        out[name] = {key: {way: activations(config, kwargs, 1, way == "checkpointed", precision,
                                            MASK_RATIOS[ratio], CAP)
                           for way in ("plain", "checkpointed")} for key, (precision, ratio) in MEASURED.items()}
        print(name, {p: {w: round(per_image(r["levels"])[0] / GIB, 3) for w, r in v.items()}
                     for p, v in out[name].items()}, flush=True)
    return out


def exactness_checks():
    """The two assumptions of the composition on a small model: bytes per image do not depend on the
    batch, and capping the samples a level passes on gives the uncapped total."""
    config, kwargs = fractalmar_small_in32.config, dict(num_conds=5, guiding_pixel=True)
    rows = {}
    for way in (False, True):
        one, two, capped = (activations(config, kwargs, b, way, "fp32", MASK_RATIOS["worst"], cap)
                            for b, cap in ((1, None), (2, None), (1, 4)))
        rows["checkpointed" if way else "plain"] = {
            "bytes_per_image_batch_1": per_image(one["levels"])[0],
            "bytes_per_image_batch_2": per_image(two["levels"])[0],
            "bytes_per_image_batch_1_cap_4": per_image(capped["levels"])[0]}
    return {"model": "fractalmar_small_in32", "fp32": rows}


def fits_table(arith, acts):
    """Per model at its released batch with checkpointing and 16-bit autocast (as released), at the worst and
    the mean mask ratio: GiB per GPU of state and activations, whether it fits in USABLE_GIB, and the
    largest batch that fits."""
    rows = {}
    for name, (_, _, batch) in configs().items():
        state = arith[name]
        ways = {"ddp": state["ddp_gib"] + state["ddp_buckets_gib"],
                **{f"fsdp_{n}": state[f"fsdp_{n}_gib"] for n in GPUS}}
        measured = {"worst": acts[name]["bf16"], "mean": acts[name]["bf16_mean_ratio"]}
        act = {ratio: activation_gib(r, batch)["checkpointed"] for ratio, r in measured.items()}
        row = {"batch_size": batch, "activations_gib": act}
        for way, gib in ways.items():
            largest = {}
            for ratio, r in measured.items():
                largest[ratio] = 0
                while gib + activation_gib(r, largest[ratio] + 1)["checkpointed"] <= USABLE_GIB:
                    largest[ratio] += 1
            row[way] = {"state_gib": gib, "total_gib": {ratio: gib + a for ratio, a in act.items()},
                        "fits": {ratio: gib + a <= USABLE_GIB for ratio, a in act.items()},
                        "largest_batch": largest}
        rows[name] = row
    return rows


def main():
    device = misc.init_distributed_mode("cpu")
    world, rank = misc.get_world_size(), misc.get_rank()
    measured = {"ddp": measure(False, device, world), "fsdp": measure(True, device, world)}
    every_rank = [None] * world
    torch.distributed.all_gather_object(every_rank, measured)
    # the slow part, spread over the processes: the most expensive models first, in turns
    by_cost = [LARGER_NAME, "fractalmar_huge_in256", "fractalmar_large_in256", "fractalar_in64",
               "fractalmar_in64", "fractalmar_base_in256"]
    mine = {"activations": measure_activations(by_cost[rank::world])}
    if rank == world - 1:
        mine["checks"] = exactness_checks()
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    if misc.is_main_process():
        acts = {name: r for g in gathered for name, r in g["activations"].items()}
        checks = next(g["checks"] for g in gathered if "checks" in g)
        arith = arithmetic()
        per_image_gib = {name: {p: {w: per_image(r["levels"])[0] / GIB for w, r in v.items()}
                                for p, v in acts[name].items()} for name in by_cost}
        result = {"model": TINY[0], "processes": world, "measured_bytes_per_rank": every_rank,
                  "table_gib_per_gpu": arith, "larger_config": LARGER, "usable_gib": USABLE_GIB,
                  "mask_ratios": MASK_RATIOS, "cap": CAP, "activation_checks": checks,
                  "activations_gib_per_image": per_image_gib,
                  "activations_gib_at_released_batch": {
                      name: {p: activation_gib(acts[name][p], configs()[name][2]) for p in MEASURED}
                      for name in by_cost},
                  "fits": fits_table(arith, acts), "activations": acts}
        for way in ("ddp", "fsdp"):
            print(way, [r[way] for r in every_rank])
        print("checks", checks)
        for name, row in result["fits"].items():
            print(name, row)
        path = os.path.join(REPO, "benchmarks", "results", "fsdp_memory.json")
        write_results(path, result, "cpu")
        print("wrote", path)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
