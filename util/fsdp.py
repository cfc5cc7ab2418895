"""FSDP2 training (--fsdp): each transformer block and the root sharded over the processes, and the
conversions that keep checkpoint-last.pth in the one format (full state dicts, optimizer state keyed by
parameter index as torch.optim saves it), so that a run can move between DDP and FSDP; and the opt-in
sharded format (--sharded_checkpoint, torch.distributed.checkpoint), for states too large for rank 0's memory.
"""
import contextlib
import sys
import warnings

import torch

import util.misc as misc

PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# torch.distributed.fsdp takes half a second to import: it is imported by shard(), and nothing is sharded before
def is_sharded(model):
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def local(t):
    """This rank's shard of a sharded tensor; a plain tensor as it is."""
    tensor = sys.modules.get("torch.distributed.tensor")
    return t.to_local() if tensor is not None and isinstance(t, tensor.DTensor) else t


def shard(model, precision, device, world):
    """fully_shard every transformer block (each level's, and the pixel head's), then the root, over all
    `world` processes. Under bf16/fp16 the blocks compute with parameters of that type and gradients are
    reduced in float32; autocast stays on for the layers outside the blocks, and the attention logits stay
    float32 (models.layers.attend). The root keeps its inputs as given: the images are the pixel targets.
    Every rank starts from rank 0's weights, as DDP does."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import init_device_mesh

    from models.ar import TransformerBlock
    from models.layers import Block
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(t, src=0)
    mesh = init_device_mesh(device.type, (world,))
    dtype = PARAM_DTYPES.get(precision)

    def policy(cast_forward_inputs=True):
        if dtype is None:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                    cast_forward_inputs=cast_forward_inputs)
    for block in [m for m in model.modules() if isinstance(m, (Block, TransformerBlock))]:
        fully_shard(block, mesh=mesh, mp_policy=policy())
    fully_shard(model, mesh=mesh, mp_policy=policy(cast_forward_inputs=False))
    return model


def parameter_names(model, optimizer):
    """The names of the optimizer's parameters, in the order of its state dict's indices."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model, optimizer=None):
    """(model state dict, optimizer state dict or None) gathered in full to rank 0's CPU memory (empty on
    the other ranks), in the unsharded model's format: the same keys, optimizer state keyed by index.
    Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if optimizer is None:
        return model_state, None
    state = get_optimizer_state_dict(model, optimizer, options=options)
    return model_state, by_index(state) if state else {}


def by_index(state):
    """An optimizer state dict keyed by parameter names (torch.distributed.checkpoint's) keyed by index instead,
    as torch.optim saves it: the names in the order of its param_groups."""
    index = {name: i for i, name in enumerate(name for g in state["param_groups"] for name in g["params"])}
    return {"state": {index[name]: s for name, s in state["state"].items()},
            "param_groups": [dict(g, params=[index[name] for name in g["params"]]) for g in state["param_groups"]]}


# ----------------------------------------------------------------------------- the sharded format
def sharded_state(model, optimizer, model_ema=None):
    """{model, optimizer[, model_ema]} as torch.distributed.checkpoint saves and loads them: this rank's shards
    of a sharded model, the full tensors of one that is not; optimizer state keyed by parameter names."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if model_ema is not None:
        state["model_ema"] = get_model_state_dict(model_ema)
    return state


@contextlib.contextmanager
def rank_failures_raised():
    """torch.distributed.checkpoint's CheckpointException (a BaseException gathering every rank's failure)
    raised as the failure itself, a full disk first, on every rank; and without its warning that one process
    without a process group is one process."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
            yield
    except CheckpointException as e:
        failures = [exc for exc, _ in e.failures.values()]  # (exception, its stack) of each rank that failed
        raise next((f for f in failures if misc.disk_full(f)), failures[0]) from None


def save_sharded(folder, model, optimizer, model_ema=None):
    """Every rank writes its own shards into `folder` (torch.distributed.checkpoint); every rank must call it."""
    import torch.distributed.checkpoint as dcp
    with rank_failures_raised():
        dcp.save(sharded_state(model, optimizer, model_ema), checkpoint_id=folder)


def load_sharded(folder, model, optimizer, model_ema=None):
    """Load a sharded checkpoint saved by any number of processes into `model` (sharded or not), its optimizer
    and `model_ema`: each rank reads the pieces of the shards it holds now. Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
    state = sharded_state(model, optimizer, model_ema)
    with rank_failures_raised():
        dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if model_ema is not None:
        set_model_state_dict(model_ema, state["model_ema"])


def saved_shapes(folder):
    """{entry: {name: shape}} of the tensors in a sharded checkpoint (entry: model, model_ema), from its metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    shapes = {}
    for key, meta in FileSystemReader(folder).read_metadata().state_dict_metadata.items():
        entry, _, name = key.partition(".")
        if entry in ("model", "model_ema") and hasattr(meta, "size"):
            shapes.setdefault(entry, {})[name] = tuple(meta.size)
    return shapes


def consolidated(folder):
    """{model, optimizer[, model_ema]} in full from a sharded checkpoint, in the one format (optimizer state
    keyed by index), read by this process alone."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    state = {}  # filled from the metadata: the public load() only fills the keys it is given
    _load_state_dict(state, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    state["optimizer"] = by_index(state["optimizer"])
    return state


def full_weights_everywhere(model):
    """The model's full state dict on every rank (for an unsharded copy to evaluate with)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model, optimizer, state):
    """Load an unsharded optimizer state dict (keyed by index, as checkpoint-last.pth holds it, from a DDP or an
    FSDP run) into the optimizer of the sharded `model`; every rank holds the full `state`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = parameter_names(model, optimizer)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def grad_scaler(precision, device):
    """fp16's loss scaler: one that agrees on skipped steps across ranks (each holds only its shards' gradients)."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    return ShardedGradScaler(device.type, enabled=precision == "fp16")
