"""The checkpoint format: saved, checked and loaded here, and nowhere else.

A run keeps one file, <output_dir>/checkpoint-last.pth, holding the release's keys {model, optimizer,
epoch, scaler, args}, plus `rng` (every rank's random state) and, for a checkpoint taken inside an
epoch, `resume_at` = {epoch, step, consumed}: the epoch under way, the step to run next and how many of
that epoch's images all ranks have trained on; and, when training keeps one (--ema_rate), `model_ema`:
the moving average of the weights, a state dict with the model's keys (MAR's name). The saved `epoch`
is always the last *finished* epoch, because the release resumes at `epoch + 1`: its code then continues
our checkpoints at the next whole epoch, and ours continues the release's. Weights, EMA weights or
optimizer state that are not finite are never saved.

With --sharded_checkpoint (under --fsdp) a run keeps <output_dir>/checkpoint-last.dcp/ instead: the
weights, optimizer state (keyed by parameter names) and EMA weights as torch.distributed.checkpoint writes
them, each process its own shards, and `progress.pth` with the other entries. It resumes with any number
of processes, and `python -m util.checkpoint consolidate` turns it into the one file.
"""
import argparse
import os
import shutil
import socket
import sys

import torch

import util.fsdp as fsdp
import util.misc as misc
from util.flags import Parser
from util.misc import UserError

torch.serialization.add_safe_globals([argparse.Namespace])  # the saved args, read with weights_only=True
NAME = "checkpoint-last.pth"
SHARDED = "checkpoint-last.dcp"
PROGRESS = "progress.pth"  # in a sharded checkpoint: every entry but the tensors of model, optimizer, model_ema


def path_in(folder):
    return os.path.join(folder, NAME)


def run_folder(folder):
    """The run's folder, for a `folder` that may also be its checkpoint-last.dcp."""
    folder = os.path.normpath(folder)
    return (os.path.dirname(folder) or ".") if os.path.basename(folder) == SHARDED else folder


def sharded_in(folder):
    """The complete sharded checkpoint in `folder`, or None: checkpoint-last.dcp, or the one it replaces
    (.old) when a save stopped between its two renames."""
    for path in (os.path.join(folder, SHARDED), os.path.join(folder, SHARDED + ".old")):
        if all(os.path.isfile(os.path.join(path, f)) for f in (".metadata", PROGRESS)):
            return path
    return None


# ----------------------------------------------------------------------------- save
def atomic_save(obj, path):
    """torch.save through a temporary file that is fsynced, then renamed over `path`: a crash or a full
    disk never leaves half a checkpoint, and the previous one stays until the new one is complete."""
    with misc.write_atomically(path) as f:  # a Python file, so that a full disk comes back as OSError(ENOSPC)
        torch.save(obj, f)


def first_non_finite(model, optimizer=None):
    """The name of the first weight (or optimizer state entry) holding nan or inf, or None; under FSDP,
    of this rank's shards."""
    for name, t in model.state_dict().items():
        t = fsdp.local(t)
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    if optimizer is not None:
        for i, state in enumerate(optimizer.state.values()):
            for key, t in state.items():
                t = fsdp.local(t)
                if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                    return f"optimizer state {key} of parameter {i}"
    return None


def save(args, model_without_ddp, optimizer, scaler, epoch, device, step=None, consumed=0, model_ema=None):
    """Write output_dir/checkpoint-last.pth (checkpoint-last.dcp with --sharded_checkpoint) after `epoch` finished, or, with `step`, inside `epoch` after
    `step` steps and `consumed` images (over all ranks); `model_ema`: the module holding the EMA weights,
    if any. Every rank must call it; rank 0 writes. Non-finite weights, EMA weights or optimizer state
    stop training instead (all ranks together), and the previous checkpoint stays in place. Returns the
    checkpoint's path."""
    bad = first_non_finite(model_without_ddp, optimizer)
    if bad is None and model_ema is not None and first_non_finite(model_ema) is not None:
        bad = f"the EMA weights, {first_non_finite(model_ema)}"
    if not misc.all_ranks_ok(bad is None, device):
        where = f"epoch {epoch}" + (f", step {step}" if step is not None else " (its end)")
        raise UserError(f"nan or inf at {where} (in {bad or 'the model on another rank'}); training stopped "
                        f"without saving ({previous(args.output_dir)}). Lower --blr (or --lr), raise "
                        "--warmup_epochs, or use --precision bf16/fp32")
    progress = {"epoch": epoch if step is None else epoch - 1, "scaler": scaler.state_dict(), "args": args,
                "rng": rng_states(device)}
    if step is not None:
        progress["resume_at"] = {"epoch": epoch, "step": step, "consumed": consumed}
    if args.sharded_checkpoint:
        return save_sharded(args.output_dir, progress, model_without_ddp, optimizer, model_ema)
    if fsdp.is_sharded(model_without_ddp):  # gathered to rank 0, in the unsharded format
        model_state, optimizer_state = fsdp.full_state(model_without_ddp, optimizer)
        ema_state = fsdp.full_state(model_ema)[0] if model_ema is not None else None
    elif misc.is_main_process():
        model_state, optimizer_state = model_without_ddp.state_dict(), optimizer.state_dict()
        ema_state = model_ema.state_dict() if model_ema is not None else None
    error = None
    if misc.is_main_process():
        ckpt = {"model": model_state, "optimizer": optimizer_state, **progress}
        if ema_state is not None:
            ckpt["model_ema"] = ema_state
        try:
            atomic_save(ckpt, path_in(args.output_dir))
        except UserError as e:  # a full disk: every rank stops, not only the one that writes
            error = str(e)
    error = misc.share_from_rank0(error)  # the others wait for the write without --dist_timeout's bound
    if error:
        raise UserError(error)
    return path_in(args.output_dir)


def save_sharded(output_dir, progress, model, optimizer, model_ema):
    """output_dir/checkpoint-last.dcp: written as .tmp (every rank its shards, then rank 0 the progress),
    then renamed over the previous one, which is kept as .old until the new one is in place. Every rank must
    call it; a failure on any rank (a full disk) stops all, and the previous checkpoint stays."""
    path = os.path.join(output_dir, SHARDED)
    tmp, old = path + ".tmp", path + ".old"
    if misc.is_main_process():  # what a save that did not finish left (never followed if a symlink)
        remove_tree(tmp)
    misc.share_from_rank0(None)
    try:
        fsdp.save_sharded(tmp, model, optimizer, model_ema)
        error = None
    except Exception as e:  # noqa: BLE001 - any rank's failure, raised on every rank
        error = (f"disk full while writing {tmp}: free space in {output_dir} and run the same command again"
                 if misc.disk_full(e) else
                 f"cannot write the sharded checkpoint {tmp} ({type(e).__name__}: {' '.join(str(e).split())[:300]})")
    if error is None and misc.is_main_process():
        try:
            atomic_save(progress, os.path.join(tmp, PROGRESS))
            if os.path.lexists(path):
                remove_tree(old)
                os.rename(path, old)
            os.rename(tmp, path)
            misc.sync_folder(output_dir)
            remove_tree(old)
        except (UserError, OSError) as e:  # the others are waiting for rank 0's word
            error = str(e)
    error = misc.share_from_rank0(error)
    if error:
        if misc.is_main_process():
            remove_tree(tmp)
        raise UserError(f"{error} ({previous(output_dir)})")
    return path


def remove_tree(path):
    """Remove a folder and what it holds, or a file or symlink (not what it points to), if there is one."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def previous(output_dir):
    """What a run that stops without saving leaves, for its message."""
    for path in (path_in(output_dir), sharded_in(output_dir)):
        if path and os.path.exists(path):
            return f"the last checkpoint, {path}, is unchanged"
    return f"no checkpoint was saved in {output_dir}"


def rng_states(device):
    """This rank's random state (dropout, label drop, MAR masks), gathered from every rank."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if not misc.is_dist():
        return [state]
    states = [None] * misc.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


# ----------------------------------------------------------------------------- load
def load(path):
    """Read a checkpoint (ours or the release's); a missing, truncated or foreign file is a UserError."""
    run = run_folder(path if os.path.isdir(path) else os.path.dirname(path))
    if not os.path.isfile(path) and sharded_in(run):
        raise UserError(f"{run} holds a sharded checkpoint (--sharded_checkpoint), which only training resumes; make "
                        f"the one file from it first: python -m util.checkpoint consolidate {run}")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first, or point --resume (or the path) at the folder "
                        "or file that holds it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "it may be truncated: restore it or point --resume elsewhere") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a FractalGen checkpoint (no 'model' entry)")
    problem = malformed(ckpt)
    if problem:
        raise UserError(f"checkpoint {path} is damaged or not one this code wrote: {problem}; restore it or point "
                        "--resume elsewhere")
    return ckpt


def load_sharded_progress(folder):
    """A sharded checkpoint's progress.pth, with `sharded`: {folder, shapes} added (the saved tensors' shapes,
    from its metadata): everything about it but its tensors, which fsdp.load_sharded reads."""
    path = os.path.join(folder, PROGRESS)
    try:
        progress = torch.load(path, map_location="cpu", weights_only=True)
        shapes = fsdp.saved_shapes(folder)
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise unreadable(folder, e) from None
    problem = "it is not a dict" if not isinstance(progress, dict) else malformed(progress)
    if problem is None and ("model" not in shapes or "epoch" not in progress):
        problem = "no model weights or no epoch"
    if problem:
        raise UserError(f"the sharded checkpoint {folder} is damaged or not one this code wrote: {problem}; "
                        "restore it or point --resume elsewhere")
    return dict(progress, sharded={"folder": folder, "shapes": shapes})


def unreadable(folder, error):
    return UserError(f"cannot read the sharded checkpoint {folder} ({type(error).__name__}: "
                     f"{' '.join(str(error).split())[:300]}); restore it or point --resume elsewhere")


def holds_ema(ckpt):
    return ckpt is not None and ("model_ema" in ckpt or "model_ema" in ckpt.get("sharded", {}).get("shapes", {}))


def where_it_continues(ckpt):
    """(epoch, step) at which a checkpoint's run continues, to tell which of two is newer."""
    at = ckpt.get("resume_at")
    return (at["epoch"], at["step"]) if at else (ckpt.get("epoch", -1) + 1, 0)


def malformed(ckpt):
    """What is wrong with the entries of a loaded checkpoint, or None; checked at loading, so that a bad file
    stops a run before it writes anything, not at its first step."""
    from models.fractalgen import MODELS

    def state_dict_problem(sd):
        if not isinstance(sd, dict):
            return f"a {type(sd).__name__}, not a state dict"
        bad = next((k for k, v in sd.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
        return None if bad is None else f"entry {bad!r} is a {type(sd[bad]).__name__}, not a tensor"

    def is_count(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    for key in ("model", "model_ema"):
        if key in ckpt and state_dict_problem(ckpt[key]):
            return f"'{key}' is {state_dict_problem(ckpt[key])}"
    args = ckpt.get("args")
    if args is not None:
        if not isinstance(args, argparse.Namespace):
            return f"'args' is a {type(args).__name__}, not the argparse.Namespace main_fractalgen.py saves"
        if getattr(args, "model", None) is not None and args.model not in MODELS:
            return f"'args' names an unknown model {args.model!r}"
    if "epoch" in ckpt and not (is_count(ckpt["epoch"]) or ckpt["epoch"] == -1):  # -1: a step inside epoch 0
        return f"'epoch' is {ckpt['epoch']!r}, not an epoch"
    optimizer = ckpt.get("optimizer")
    if optimizer is not None and not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
                                      and isinstance(optimizer.get("param_groups"), list)):
        return "'optimizer' is not an optimizer state dict (state and param_groups)"
    rng = ckpt.get("rng")
    if rng is not None and not (isinstance(rng, list) and all(
            isinstance(r, dict) and all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in r.values()) and "cpu" in r
            for r in rng)):
        return "'rng' is not a list of random states (one per process)"
    at = ckpt.get("resume_at")
    if at is not None and not (isinstance(at, dict) and all(is_count(at.get(k)) for k in ("epoch", "step", "consumed"))):
        return f"'resume_at' is {at!r}, not {{epoch, step, consumed}} counts"
    return None


def check_training_state(ckpt, param_groups, path):
    """That the checkpoint's optimizer state fits the optimizer about to be built over `param_groups`
    (groups, parameters per group, state shapes), so that a mismatch is found before anything is written."""
    saved = ckpt.get("optimizer")
    if saved is None or "epoch" not in ckpt:
        return
    sizes = [len(g["params"]) for g in param_groups]
    saved_sizes = [len(g.get("params", ())) if isinstance(g, dict) else None for g in saved["param_groups"]]
    if saved_sizes != sizes:
        raise UserError(f"the optimizer state in {path} has parameter groups of {saved_sizes} parameters, this model "
                        f"needs {sizes}: it is another model's or another code's; pass --resume a checkpoint of "
                        "this --model")
    params = [p for g in param_groups for p in g["params"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    for index, param in zip(ids, params):
        state = saved["state"].get(index, {})
        for key, t in (state.items() if isinstance(state, dict) else ()):
            if torch.is_tensor(t) and t.ndim and t.shape != param.shape:
                raise UserError(f"the optimizer state {key} of parameter {index} in {path} has shape "
                                f"{tuple(t.shape)}, its parameter {tuple(param.shape)}: the checkpoint is damaged; "
                                "restore it or point --resume elsewhere")


def check_shapes(model, shapes, path):
    """That the weights of a checkpoint, {name: shape}, are those of `model`: else a UserError naming the keys
    that differ."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(ours.keys() - shapes.keys()), sorted(shapes.keys() - ours.keys())
    mismatched = sorted(k for k in ours.keys() & shapes.keys() if ours[k] != shapes[k])
    if missing or unexpected or mismatched:
        def few(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        parts = [f"{label}: {few(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape differs", mismatched)) if keys]
        raise UserError(f"checkpoint {path} does not match this model ({'; '.join(parts)}); "
                        "check --model, --num_conds, --guiding_pixel and --class_num")


def load_model_state(model, state_dict, path):
    """Strict load with a message naming the keys that differ, for a checkpoint of another model; weights
    that are not finite (a diverged run's, from before this check existed) are refused."""
    check_shapes(model, {k: tuple(v.shape) for k, v in state_dict.items()}, path)
    model.load_state_dict(state_dict, strict=True)
    bad = first_non_finite(model)
    if bad is not None:
        raise UserError(f"checkpoint {path} holds weights that are not finite ({bad}): it comes from a run that "
                        "diverged; use an earlier checkpoint or train again with a lower learning rate")


def to_resume(args, training):
    """(path, checkpoint) named by --resume, or (None, None) for a fresh run; read and checked before
    anything is written. --resume may name the --output_dir of a fresh run (the release's commands pass
    --resume ${OUTPUT_DIR} on the first run too: this case is announced); otherwise it must be a folder
    holding a checkpoint. A fresh training run never overwrites a checkpoint in --output_dir."""
    ours, path = path_in(args.output_dir), path_in(args.resume) if args.resume else None
    if args.resume and os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume} is a file; pass the folder that holds {NAME} "
                        f"(--resume {os.path.dirname(args.resume) or '.'})")
    found = path is not None and os.path.isfile(path)
    earlier = ours if os.path.exists(ours) else sharded_in(args.output_dir)
    if training and earlier and not (args.resume and same_folder(args.resume, args.output_dir)):
        raise UserError(f"{earlier} exists from an earlier run; pass --resume {args.output_dir} to continue "
                        "it, or choose another --output_dir")
    sharded = sharded_in(args.resume) if args.resume else None
    if sharded and training:
        progress = load_sharded_progress(sharded)
        if not found:
            return sharded, progress
        ckpt = load(path)  # both: the newer, or at the same point the format --sharded_checkpoint asks for
        in_file, in_shards = where_it_continues(ckpt), where_it_continues(progress)
        same = in_file == in_shards
        chosen = (path, ckpt) if in_file > in_shards or (same and not args.sharded_checkpoint) else (sharded, progress)
        if misc.is_main_process():
            print(f"--resume {args.resume} holds both {NAME} and {SHARDED}: resuming from {chosen[0]}, "
                  f"{'at the same point' if same else 'the newer'}", flush=True)
        return chosen
    if found or sharded:
        return path, load(path)  # a sharded one alone: load() says how to make the one file for an evaluation
    if not training:
        raise UserError(f"evaluation needs a trained model: no {NAME} in --resume {args.resume!r}; point --resume "
                        "at the folder that holds it")
    if path is not None and not same_folder(args.resume, args.output_dir):
        what = "" if os.path.isdir(args.resume) else " (no such folder)"
        raise UserError(f"no {NAME} in --resume {args.resume}{what}; point --resume at the folder of the run "
                        "to continue, or pass --resume with the --output_dir (or no --resume) for a fresh run")
    if path is not None and misc.is_main_process():
        print(f"No {NAME} in --resume {args.resume} yet: starting a fresh run, which saves there", flush=True)
    return None, None


def resume_on_every_rank(args, training):
    """to_resume on every rank, which must all see the same checkpoint files as rank 0 (or their
    absence): otherwise every rank stops with one line naming a rank that differs, instead of one rank
    resuming while another starts afresh and their collectives hang."""
    try:
        (path, ckpt), error = to_resume(args, training), None
    except misc.UserError as e:
        path, ckpt, error = None, None, str(e)
    seen = _files_seen(args, ckpt)
    rank0 = misc.share_from_rank0(seen)
    differs = next((p for p, mine, theirs in zip((f for f, _ in seen), seen, rank0) if mine != theirs), None)
    misc.stop_unless_all(differs and (
        f"{socket.gethostname()} (rank {misc.get_rank()}) sees {_describe_seen(dict(seen)[differs])} at {differs}, "
        f"rank 0 {_describe_seen(dict(rank0)[differs])}: --output_dir must be on a disk every node shares (and "
        "--resume too)"))
    if error:
        raise misc.UserError(error)
    return path, ckpt


def _files_seen(args, ckpt):
    """What this rank sees of the run's checkpoint files (--resume's, --output_dir's): for each path, its size
    and modification time, and the epoch and step of the one resumed from; None where there is no file."""
    folders = [f for f in (args.resume, args.output_dir) if f]
    paths = dict.fromkeys([path_in(f) for f in folders] + [os.path.join(f, SHARDED, PROGRESS) for f in folders])
    seen = []
    for p in paths:
        try:
            st = os.stat(p)
            seen.append((p, {"bytes": st.st_size, "modified": st.st_mtime_ns}))
        except OSError:
            seen.append((p, None))
    seen.append(("the checkpoint resumed from",
                 ckpt and {"epoch": ckpt.get("epoch"), "resume_at": ckpt.get("resume_at")}))
    return seen


def _describe_seen(file):
    if file is None:
        return "no checkpoint"
    if "bytes" in file:
        return f"a checkpoint of {file['bytes']} bytes modified at {file['modified'] / 1e9:.3f}"
    step = f", step {file['resume_at']['step']}" if file.get("resume_at") else ""
    return f"epoch {file['epoch']}{step}"


def what_changed(ckpt, args, world, lr_given):
    """One line when a run resumes with another number of processes or batch size than it saved with
    (an elastic restart on fewer nodes): the processes, the effective batch and the learning rate, which
    follows --blr unless --lr is given; None when nothing changed (or the checkpoint does not say)."""
    saved, saved_world = ckpt.get("args"), len(ckpt.get("rng") or [])
    if saved is None or not saved_world or not hasattr(saved, "batch_size"):
        return None
    before, now = saved.batch_size * saved_world, args.batch_size * world
    if (saved_world, before) == (world, now):
        return None
    old_lr = getattr(saved, "lr", None)
    lr = (f"lr {args.lr:.4g} as given by --lr" if lr_given else
          f"lr {args.lr:.4g} (--blr {args.blr:g} × {now} / 256)") + (f" instead of {old_lr:.4g}" if old_lr else "")
    keep = f"; pass --lr {old_lr:.4g} to keep the old one" if old_lr and not lr_given and old_lr != args.lr else ""
    return (f"The run continues with {world} process(es) instead of {saved_world}: effective batch {now} instead of "
            f"{before}, {lr}{keep}")


def same_folder(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def restore_training_state(ckpt, optimizer, scaler, device, model=None, model_ema=None):
    """Optimizer, scaler and random state from a checkpoint, and from a sharded one also the weights of
    `model` and `model_ema` (each rank reads the pieces it holds); returns (epoch to run, images of that
    epoch already trained on). A release checkpoint holding only `model` starts at epoch 0. `model`: the
    optimizer's model, needed when it is sharded (FSDP) or the checkpoint is. Every rank must call it."""
    if "sharded" in ckpt:
        folder = ckpt["sharded"]["folder"]
        try:
            fsdp.load_sharded(folder, model, optimizer, model_ema if holds_ema(ckpt) else None)
        except Exception as e:  # noqa: BLE001 - a missing or damaged shard file
            raise unreadable(folder, e) from None
    elif "optimizer" not in ckpt or "epoch" not in ckpt:
        return 0, 0
    elif model is not None and fsdp.is_sharded(model):
        fsdp.load_optimizer_state(model, optimizer, ckpt["optimizer"])
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if not restore_rng_states(ckpt.get("rng"), device) and "rng" in ckpt and misc.is_main_process():
        print("The number of processes changed since the checkpoint: random state not restored", flush=True)
    if "resume_at" in ckpt:
        return ckpt["resume_at"]["epoch"], ckpt["resume_at"]["consumed"]
    return ckpt["epoch"] + 1, 0


def restore_rng_states(states, device):
    """Put back this rank's random state from a checkpoint; False if the number of ranks changed."""
    if not states or len(states) != misc.get_world_size():
        return False
    state = states[misc.get_rank()]
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    return True


def describe(ckpt):
    """Where a resumed run continues, for the log."""
    ema = ", with EMA weights" if holds_ema(ckpt) else ""
    if "resume_at" in ckpt:
        return f"inside epoch {ckpt['resume_at']['epoch']}, at step {ckpt['resume_at']['step']}{ema}"
    return f"after epoch {ckpt.get('epoch', 'n/a')}{ema}"


def weights_for(ckpt, choice):
    """('ema' or 'raw', state dict) for --eval_weights `choice` ('ema' or 'raw'): the EMA weights when
    asked for and the checkpoint has them, else the raw ones."""
    if choice == "ema" and "model_ema" in ckpt:
        return "ema", ckpt["model_ema"]
    return "raw", ckpt["model"]


# ----------------------------------------------------------------------------- python -m util.checkpoint
def consolidate(folder, output=None):
    """Write the one file (checkpoint-last.pth, or `output`) from the sharded checkpoint of the run in `folder`,
    read by this process alone (it needs the full state in memory, which training never did). Returns (its path,
    where its run continues)."""
    folder = run_folder(folder)
    sharded = sharded_in(folder)
    if sharded is None:
        raise UserError(f"no sharded checkpoint in {folder} ({SHARDED} with its .metadata and {PROGRESS}): pass the "
                        "--output_dir of a run trained with --sharded_checkpoint")
    output = output or path_in(folder)
    if os.path.lexists(output):
        raise UserError(f"{output} exists and is left as it is: pass --output another file, or move it away first")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise UserError(f"--output {output}: its folder does not exist")
    progress = load_sharded_progress(sharded)
    del progress["sharded"]
    try:
        ckpt = dict(fsdp.consolidated(sharded), **progress)
    except Exception as e:  # noqa: BLE001 - a missing or damaged shard file
        raise unreadable(sharded, e) from None
    atomic_save(ckpt, output)
    return output, describe(ckpt)


def main(argv=None):
    parser = Parser(prog="python -m util.checkpoint", description="Checkpoint tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("consolidate", help=f"the one file ({NAME}) from a run's sharded checkpoint ({SHARDED})")
    p.add_argument("folder", help="the run's --output_dir (or its checkpoint-last.dcp)")
    p.add_argument("--output", default=None, help=f"where to write; default {NAME} in the folder (never replaced)")
    args = parser.parse_args(argv)
    path, described = consolidate(args.folder, args.output)
    print(f"wrote {path} ({described})")


if __name__ == "__main__":
    sys.exit(misc.run_command(main))
