"""FSDP2 training (--fsdp): each transformer block and the root sharded over the processes, and the
conversions that keep checkpoint-last.pth in the one format (full state dicts, optimizer state keyed by
parameter index as torch.optim saves it), so that a run can move between DDP and FSDP.
"""
import sys

import torch

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
    if not state:
        return model_state, {}
    index = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
    state = {"state": {index[name]: s for name, s in state["state"].items()},
             "param_groups": [dict(g, params=[index[name] for name in g["params"]]) for g in state["param_groups"]]}
    return model_state, state


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
