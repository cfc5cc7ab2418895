"""--fsdp (FSDP2) with 2 gloo processes on the CPU: the same numbers as DDP from the same weights,
checkpoints in the one format that move between DDP and FSDP, and evaluation after training."""
import os
import shutil
import sys

import pytest
import torch

import util.checkpoint as checkpoint
from helpers import MODEL_ARGS, ROOT, kill_a_worker_once_checkpointed, run, write_image_folder

# 24 training images, 4 per process and step: 3 steps per epoch; constant lr, so --epochs only says where to stop;
# a gradient norm clipped at every step (it is above 1 here), so that clipping on shards is compared too; an EMA
# of the weights (on shards under FSDP)
TRAIN = MODEL_ARGS + ["--batch_size", "4", "--lr", "1e-3", "--warmup_epochs", "0", "--lr_schedule", "constant",
                      "--seed", "3", "--save_last_freq", "1", "--grad_clip", "0.2", "--ema_rate", "0.9"]
# FSDP against DDP from the same weights, fp32, 2 processes. Without clipping the two were measured bit for
# bit equal (a gradient is the sum of 2 ranks' halved, the same float in either order). The clipped norm is
# summed over shards under FSDP, over whole tensors under DDP: the first loss is still the same, then
# rounding spreads; measured after 6 steps: losses within 9.5e-7 (one float32 step at 10), weights within
# 2.3e-6, AdamW moments within 1.4e-9, the NLL equal. The tolerances leave a margin of about 4x.
LOSS_TOLERANCE, WEIGHT_TOLERANCE, STATE_TOLERANCE = 4e-6, 1e-5, 1e-8


def train(out, data, epochs, *extra, resume=False):
    r = run(TRAIN + ["--data_path", data, "--output_dir", out, "--epochs", str(epochs), *extra]
            + (["--resume", out] if resume else []), nproc=2, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return checkpoint.load(checkpoint.path_in(out))


def resumed(source, out, data, epochs, *extra):
    shutil.copytree(source, out)
    return train(out, data, epochs, *extra, resume=True)


def losses(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(folder, size_guidance={"scalars": 0}).Reload()
    return [e.value for e in acc.Scalars("train_loss")]


def largest_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two epochs (6 steps) from the same seed under DDP and under --fsdp (with --grad_checkpointing), each
    generating 6 images after each epoch (--online_eval, no scoring) and followed by its NLL and samples, of
    the EMA and of the raw weights:
    {name: (folder, checkpoint)}."""
    tmp = tmp_path_factory.mktemp("fsdp")
    data = write_image_folder(str(tmp / "data"))
    after = ["--final_nll", "--final_samples", "1", "--eval_weights", "both", "--num_iter_list", "2,2", "--online_eval",
             "--eval_freq", "1", "--fid_stats", "none", "--num_images", "6"]
    ddp, fsdp = str(tmp / "ddp"), str(tmp / "fsdp")
    return {"data": data, "ddp": (ddp, train(ddp, data, 2, *after)),
            "fsdp": (fsdp, train(fsdp, data, 2, "--fsdp", "--grad_checkpointing", *after))}


def test_fsdp_trains_as_ddp(runs):
    """The same first loss; the losses of 6 steps, the weights and optimizer state after them and the NLL
    agree within the measured tolerances."""
    (ddp, ddp_ckpt), (fsdp, fsdp_ckpt) = runs["ddp"], runs["fsdp"]
    ddp_losses, fsdp_losses = losses(ddp), losses(fsdp)
    assert len(ddp_losses) == len(fsdp_losses) == 6
    assert fsdp_losses[0] == ddp_losses[0] and ddp_losses[-1] < ddp_losses[0]
    assert max(abs(a - b) for a, b in zip(ddp_losses, fsdp_losses)) < LOSS_TOLERANCE
    for key in ("model", "model_ema"):
        assert largest_difference(ddp_ckpt[key], fsdp_ckpt[key]) < WEIGHT_TOLERANCE
    assert largest_difference(fsdp_ckpt["model"], fsdp_ckpt["model_ema"]) > 1e-3  # an average, not a copy
    for i, state in ddp_ckpt["optimizer"]["state"].items():
        assert largest_difference(state, fsdp_ckpt["optimizer"]["state"][i]) < STATE_TOLERANCE
    import util.misc as misc
    results = [misc.read_json(os.path.join(f, "results.json")) for f in (ddp, fsdp)]
    for tag in ("", "_ema"):
        assert abs(results[0]["nll" + tag]["bpd"] - results[1]["nll" + tag]["bpd"]) < LOSS_TOLERANCE
        assert os.path.isfile(os.path.join(fsdp, f"samples{tag}.png"))
        generated = results[1]["generation" + tag]
        assert generated["epoch"] == 1 and len([f for f in os.listdir(generated["images"]) if f.endswith(".png")]) == 6
    assert results[1]["nll"]["bpd"] != results[1]["nll_ema"]["bpd"]


def test_fsdp_checkpoint_is_the_one_format(runs):
    """The release's keys, full tensors that load strict into build_model, the optimizer state keyed and
    shaped as DDP's."""
    from models.fractalgen import build_model
    ddp_ckpt, fsdp_ckpt = runs["ddp"][1], runs["fsdp"][1]
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= fsdp_ckpt.keys()
    assert fsdp_ckpt["epoch"] == ddp_ckpt["epoch"] == 1
    model = build_model("fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True)
    checkpoint.load_model_state(model, fsdp_ckpt["model"], "the FSDP checkpoint")  # strict
    ours, theirs = fsdp_ckpt["optimizer"], ddp_ckpt["optimizer"]
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for i, state in theirs["state"].items():
        assert {k: tuple(v.shape) for k, v in ours["state"][i].items()} == {k: tuple(v.shape) for k, v in state.items()}
        assert ours["state"][i]["step"] == state["step"]


def test_checkpoints_move_between_ddp_and_fsdp(runs, tmp_path):
    """DDP's checkpoint continues under --fsdp and FSDP's under DDP: both continue training (the step counts,
    the weights), and both paths end at weights that agree within the tolerance."""
    data = runs["data"]
    to_fsdp = resumed(runs["ddp"][0], str(tmp_path / "to_fsdp"), data, 3, "--fsdp")
    to_ddp = resumed(runs["fsdp"][0], str(tmp_path / "to_ddp"), data, 3)
    for ckpt in (to_fsdp, to_ddp):
        assert ckpt["epoch"] == 2 and "model_ema" in ckpt
        assert all(s["step"] == 9 for s in ckpt["optimizer"]["state"].values())
    assert largest_difference(runs["ddp"][1]["model"], to_fsdp["model"]) > 1e-3  # it trained on
    for key in ("model", "model_ema"):
        assert largest_difference(to_fsdp[key], to_ddp[key]) < WEIGHT_TOLERANCE


@pytest.mark.slow
def test_fsdp_stop_and_resume_is_exact(runs, tmp_path):
    """An --fsdp run stopped after its first epoch and resumed ends with the same weights, bit for bit, as
    the uninterrupted one."""
    data, out = runs["data"], str(tmp_path / "stopped")
    train(out, data, 1, "--fsdp", "--grad_checkpointing")
    ckpt = train(out, data, 2, "--fsdp", "--grad_checkpointing", resume=True)
    uninterrupted = runs["fsdp"][1]
    assert largest_difference(ckpt["model"], uninterrupted["model"]) == 0
    assert largest_difference(ckpt["model_ema"], uninterrupted["model_ema"]) == 0
    for i, state in uninterrupted["optimizer"]["state"].items():
        assert all(torch.equal(v, ckpt["optimizer"]["state"][i][k]) for k, v in state.items())


@pytest.mark.slow
def test_fsdp_bf16_trains_as_ddp_bf16(runs, tmp_path):
    """--precision bf16: the blocks compute with bf16 weights (MixedPrecisionPolicy) where DDP casts them per
    operation (autocast); measured after 3 steps: first loss 1.2e-4 apart (of 11.15), weights up to 4.6e-3
    (AdamW's steps of lr 1e-3 where a gradient's sign differs), the NLL 6e-5 apart. Saved in float32."""
    data, folders = runs["data"], [str(tmp_path / w) for w in ("ddp", "fsdp")]
    ckpts = [train(f, data, 1, "--precision", "bf16", "--final_nll", "--eval_weights", "raw", *extra)
             for f, extra in zip(folders, ([], ["--fsdp"]))]
    first = [losses(f)[0] for f in folders]
    assert abs(first[0] - first[1]) < 1e-3
    assert largest_difference(ckpts[0]["model"], ckpts[1]["model"]) < 2e-2
    assert all(t.dtype == torch.float32 for key in ("model", "model_ema") for t in ckpts[1][key].values())
    import util.misc as misc
    bpd = [misc.read_json(os.path.join(f, "results.json"))["nll"]["bpd"] for f in folders]
    assert abs(bpd[0] - bpd[1]) < 1e-3


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds worker pids in /proc")
def test_fsdp_kill_and_resume_is_exact(runs, tmp_path):
    """SIGKILL one of two --fsdp workers once a step checkpoint exists: torchrun restarts the group, which
    resumes from the last step checkpoint and ends with the same weights, bit for bit, as a run never killed."""
    data, out = runs["data"], str(tmp_path / "killed")
    flags = ["--fsdp", "--save_every_steps", "1"]
    whole = train(str(tmp_path / "whole"), data, 4, *flags)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "main_fractalgen.py"] + TRAIN + ["--data_path", data, "--output_dir", out, "--resume", out, "--epochs", "4",
                                            *flags]
    ckpt_path = checkpoint.path_in(out)
    returncode, output = kill_a_worker_once_checkpointed(cmd, ckpt_path, tmp_path / "log.txt", timeout=300)
    assert returncode == 0 and "Resumed from" in output and "inside epoch" in output, output[-3000:]
    ckpt = checkpoint.load(ckpt_path)
    assert ckpt["epoch"] == 3 and largest_difference(ckpt["model"], whole["model"]) == 0
