"""--fsdp (FSDP2) with 2 gloo processes on the CPU: the same numbers as DDP from the same weights,
checkpoints in the one format that move between DDP and FSDP, evaluation after training, and the sharded
format (--sharded_checkpoint): exact resumption, resharding, consolidation, bad inputs."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import util.checkpoint as checkpoint
from helpers import MODEL_ARGS, ROOT, kill_a_worker_once_checkpointed, run, small_disk, write_image_folder

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


def train(out, data, epochs, *extra, resume=False, nproc=2):
    r = run(TRAIN + ["--data_path", data, "--output_dir", out, "--epochs", str(epochs), *extra]
            + (["--resume", out] if resume else []), nproc=nproc, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return None if "--sharded_checkpoint" in extra else checkpoint.load(checkpoint.path_in(out))


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


# ----------------------------------------------------------------------------- --sharded_checkpoint
SHARDED = ["--fsdp", "--grad_checkpointing", "--sharded_checkpoint"]


def consolidate(folder, *extra):
    return subprocess.run([sys.executable, "-m", "util.checkpoint", "consolidate", folder, *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sharded_run(runs, tmp_path_factory):
    """The folder of one epoch under --fsdp --sharded_checkpoint (as the `runs` FSDP run's first epoch)."""
    out = str(tmp_path_factory.mktemp("sharded") / "run")
    train(out, runs["data"], 1, *SHARDED)
    return out


def test_a_sharded_checkpoint_resumes_exactly_and_consolidates_to_the_one_file(runs, sharded_run, tmp_path):
    """Each rank writes its own shards; resumed for a second epoch, the run ends bit for bit where the
    uninterrupted --fsdp run does, and util.checkpoint consolidate writes that checkpoint as the one file
    (which it never replaces)."""
    shards = os.path.join(sharded_run, checkpoint.SHARDED)
    assert sorted(os.listdir(shards)) == [".metadata", "__0_0.distcp", "__1_0.distcp", checkpoint.PROGRESS]
    assert not os.path.exists(checkpoint.path_in(sharded_run))
    out = str(tmp_path / "resumed")
    shutil.copytree(sharded_run, out)
    train(out, runs["data"], 2, *SHARDED, resume=True)
    done = consolidate(out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"wrote {checkpoint.path_in(out)} (after epoch 1, with EMA weights)"
    ckpt, uninterrupted = checkpoint.load(checkpoint.path_in(out)), runs["fsdp"][1]
    assert ckpt["epoch"] == 1 and len(ckpt["rng"]) == 2
    for key in ("model", "model_ema"):
        assert largest_difference(ckpt[key], uninterrupted[key]) == 0
    assert ckpt["optimizer"]["param_groups"] == uninterrupted["optimizer"]["param_groups"]
    for i, state in uninterrupted["optimizer"]["state"].items():
        assert all(torch.equal(v, ckpt["optimizer"]["state"][i][k]) for k, v in state.items())
    before = os.stat(checkpoint.path_in(out)).st_mtime_ns
    again = consolidate(out)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: {checkpoint.path_in(out)} exists and is left as it is: pass --output another file, or move it "
        "away first"]
    assert os.stat(checkpoint.path_in(out)).st_mtime_ns == before


def test_a_sharded_checkpoint_resumes_with_another_number_of_processes(sharded_run, runs, tmp_path):
    """Saved by 2 processes, resumed by 1 without --fsdp (the shards read into full tensors): the same weights
    after another epoch as resuming the consolidated file."""
    from_shards, from_file = str(tmp_path / "from_shards"), str(tmp_path / "from_file")
    for out in (from_shards, from_file):
        shutil.copytree(sharded_run, out)
    assert consolidate(from_file).returncode == 0
    shutil.rmtree(os.path.join(from_file, checkpoint.SHARDED))
    ckpts = [train(out, runs["data"], 2, resume=True, nproc=1) for out in (from_shards, from_file)]
    assert ckpts[0]["epoch"] == 1 and all(s["step"] == 3 + 6 for s in ckpts[0]["optimizer"]["state"].values())
    for key in ("model", "model_ema"):
        assert largest_difference(ckpts[0][key], ckpts[1][key]) == 0


def test_sharded_checkpoints_refuse_what_they_cannot_do_in_one_line(sharded_run, tmp_path):
    """--sharded_checkpoint without --fsdp; an evaluation of a run that has only shards; a damaged progress
    file: one line each, before anything is written."""
    import main_fractalgen
    import util.misc as misc
    args = main_fractalgen.parse_args(MODEL_ARGS + ["--sharded_checkpoint", "--output_dir", str(tmp_path)])
    with pytest.raises(misc.UserError, match="--sharded_checkpoint saves the shards of --fsdp: add --fsdp"):
        main_fractalgen.check_args(args)
    args = main_fractalgen.parse_args(MODEL_ARGS + ["--evaluate_nll", "--resume", sharded_run])
    with pytest.raises(misc.UserError, match=f"make the one file from it first: python -m util.checkpoint "
                                             f"consolidate {sharded_run}$"):
        checkpoint.to_resume(args, training=False)
    damaged = str(tmp_path / "damaged")
    shutil.copytree(sharded_run, damaged)
    with open(os.path.join(damaged, checkpoint.SHARDED, checkpoint.PROGRESS), "r+b") as f:
        f.truncate(100)
    args = main_fractalgen.parse_args(MODEL_ARGS + ["--resume", damaged, "--output_dir", damaged])
    with pytest.raises(misc.UserError, match="cannot read the sharded checkpoint .*; restore it or point --resume "
                                             "elsewhere$") as e:
        checkpoint.to_resume(args, training=True)
    assert "\n" not in str(e.value)


def test_a_missing_shard_stops_the_resumed_run_in_one_line(sharded_run, runs, tmp_path):
    out = str(tmp_path / "missing")
    shutil.copytree(sharded_run, out)
    os.remove(os.path.join(out, checkpoint.SHARDED, "__1_0.distcp"))
    r = run(TRAIN + ["--data_path", runs["data"], "--output_dir", out, "--resume", out, "--epochs", "2"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot read the sharded checkpoint {os.path.join(out, checkpoint.SHARDED)} ("), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_a_full_disk_during_a_sharded_save_keeps_the_previous_one(runs, tmp_path):
    """The first sharded checkpoint (15 MB without an EMA) fits, the second does not: every rank stops with
    the line, the first stays complete and the partial one is removed."""
    with small_disk(str(tmp_path / "disk"), "24m") as out:
        r = run(TRAIN + ["--data_path", runs["data"], "--output_dir", out, "--epochs", "2", "--ema_rate", "0",
                         *SHARDED], nproc=2, timeout=600)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert errors and all(e == errors[0] for e in errors), r.stderr[-3000:]
        assert errors[0].startswith(f"error: disk full while writing {os.path.join(out, checkpoint.SHARDED)}.tmp: "
                                    f"free space in {out} and run the same command again (the last checkpoint, ")
        assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr  # torchrun's own is there
        assert sorted(os.listdir(out)) == sorted([".fractalgen.lock", checkpoint.SHARDED]
                                                 + [f for f in os.listdir(out) if f.startswith("events.")])
        assert checkpoint.load_sharded_progress(os.path.join(out, checkpoint.SHARDED))["epoch"] == 0


@pytest.mark.slow
def test_fsdp_with_compiled_blocks_trains_as_eager(runs, tmp_path):
    """--compile under --fsdp: fully_shard wraps the compiled blocks; without dropout (inductor draws its own
    random numbers) the losses of 3 steps are eager's within float32 rounding."""
    flags = ["--fsdp", "--grad_checkpointing", "--attn_dropout", "0", "--proj_dropout", "0", "--ema_rate", "0"]
    folders = [str(tmp_path / name) for name in ("eager", "compiled")]
    for folder, extra in zip(folders, ([], ["--compile"])):
        train(folder, runs["data"], 1, *flags, *extra)
    eager, compiled = (losses(f) for f in folders)
    assert len(eager) == 3 and max(abs(a - b) / a for a, b in zip(eager, compiled)) < 1e-5, (eager, compiled)


def test_a_folder_with_both_formats_resumes_the_newer(sharded_run, tmp_path, capsys):
    """A checkpoint-last.pth beside checkpoint-last.dcp: at the same point (consolidated from it), the format
    --sharded_checkpoint asks for; the file when it is further along."""
    import main_fractalgen
    out = str(tmp_path / "both")
    shutil.copytree(sharded_run, out)
    assert consolidate(out).returncode == 0
    shards = os.path.join(out, checkpoint.SHARDED)
    argv = MODEL_ARGS + ["--fsdp", "--resume", out, "--output_dir", out]
    for extra, expected in (([], checkpoint.path_in(out)), (["--sharded_checkpoint"], shards)):
        assert checkpoint.to_resume(main_fractalgen.parse_args(argv + extra), training=True)[0] == expected
        assert f"resuming from {expected}, at the same point" in capsys.readouterr().out
    ckpt = checkpoint.load(checkpoint.path_in(out))
    ckpt["epoch"] += 1
    checkpoint.atomic_save(ckpt, checkpoint.path_in(out))
    args = main_fractalgen.parse_args(argv + ["--sharded_checkpoint"])
    assert checkpoint.to_resume(args, training=True)[0] == checkpoint.path_in(out)
    assert f"resuming from {checkpoint.path_in(out)}, the newer" in capsys.readouterr().out


def test_a_sharded_save_never_writes_through_a_symlink_at_its_temporary_name(runs, tmp_path):
    """A symlink planted at checkpoint-last.dcp.tmp (one process, --fsdp --sharded_checkpoint): removed, its
    target left empty, and the checkpoint written in the output folder."""
    out, target = str(tmp_path / "run"), str(tmp_path / "elsewhere")
    os.makedirs(out)
    os.makedirs(target)
    os.symlink(target, os.path.join(out, checkpoint.SHARDED + ".tmp"))
    train(out, runs["data"], 1, "--fsdp", "--sharded_checkpoint", "--ema_rate", "0", nproc=1)
    assert os.listdir(target) == []
    assert not os.path.lexists(os.path.join(out, checkpoint.SHARDED + ".tmp"))
    assert checkpoint.load_sharded_progress(os.path.join(out, checkpoint.SHARDED))["epoch"] == 0
