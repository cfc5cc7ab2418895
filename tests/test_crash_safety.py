"""Crash safety: step checkpoints that resume exactly, torchrun restarts, resumable generation,
and bad inputs answered with one line that leaves output_dir as it was."""
import os
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch

import engine_fractalgen
from util import png_folder
import main_fractalgen
import util.checkpoint as checkpoint
import util.misc as misc
from helpers import MODEL_ARGS, ROOT, generate_pngs, kill_a_worker_once_checkpointed, run, write_image_folder
from models.fractalgen import build_model
from util.data import EpochSampler, image_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("data")))


def parse(argv):
    return main_fractalgen.parse_args(argv)


def crash_on_call(monkeypatch, target, name, call_number):
    """Make target.name raise on its call_number-th call, as if the process died there."""
    real, calls = getattr(target, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call_number:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)
    monkeypatch.setattr(target, name, wrapped)


# ----------------------------------------------------------------------------- step checkpoints
def test_sampler_resumes_the_rest_of_an_epoch():
    whole = list(EpochSampler(20, num_replicas=2, rank=0, seed=3))
    other = list(EpochSampler(20, num_replicas=2, rank=1, seed=3))
    assert len(whole) == 10 and not {i for i, _ in whole} & {i for i, _ in other}
    rest = EpochSampler(20, num_replicas=2, rank=0, seed=3)
    rest.set_epoch(0, consumed=8)  # 2 steps of batch 2 on each of 2 ranks
    assert list(rest) == whole[4:]
    one_rank = EpochSampler(20, num_replicas=1, rank=0, seed=3)
    one_rank.set_epoch(0, consumed=8)  # resumed with fewer ranks: the same remaining images
    assert sorted(list(one_rank)) == sorted(whole[4:] + other[4:])
    one_rank.set_epoch(1)
    assert [i for i, _ in one_rank] != [i for i, _ in EpochSampler(20, 1, 0, seed=3)]


def test_sampler_flips_half_the_images_unless_told_not_to():
    """--no_flip (the demo's digits are not mirror-symmetric) keeps the order and flips nothing."""
    flipped, plain = list(EpochSampler(200, seed=3)), list(EpochSampler(200, seed=3, flip=False))
    assert 60 < sum(f for _, f in flipped) < 140 and not any(f for _, f in plain)
    assert [i for i, _ in plain] == [i for i, _ in flipped]


def test_step_checkpoint_resumes_exactly(data, tmp_path, monkeypatch):
    """24 images, batch 8: 3 steps per epoch. A run that dies in epoch 1 at step 2, after the step-2
    checkpoint, and is resumed ends with the same weights, bit for bit, as a run that never died
    (dropout, label drop and MAR masks continue from the saved random state)."""
    argv = MODEL_ARGS + ["--data_path", data, "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "1",
                         "--save_every_steps", "2", "--save_last_freq", "100"]
    whole, crashed = str(tmp_path / "whole"), str(tmp_path / "crashed")
    main_fractalgen.main(parse(argv + ["--output_dir", whole]))

    with monkeypatch.context() as m:
        crash_on_call(m, engine_fractalgen, "apply_gradients", 3 + 3)  # epoch 1, step 2
        with pytest.raises(KeyboardInterrupt):
            main_fractalgen.main(parse(argv + ["--output_dir", crashed]))
    ckpt = checkpoint.load(os.path.join(crashed, "checkpoint-last.pth"))
    assert ckpt["epoch"] == 0 and ckpt["resume_at"] == {"epoch": 1, "step": 2, "consumed": 16}
    main_fractalgen.main(parse(argv + ["--output_dir", crashed, "--resume", crashed]))

    a = checkpoint.load(os.path.join(whole, "checkpoint-last.pth"))
    b = checkpoint.load(os.path.join(crashed, "checkpoint-last.pth"))
    assert a["epoch"] == b["epoch"] == 1 and "resume_at" not in b
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not [f for f in os.listdir(crashed) if ".tmp" in f]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds worker pids in /proc")
def test_torchrun_restarts_after_a_worker_is_killed(data, tmp_path):
    """SIGKILL one of two workers once a step checkpoint exists: torchrun restarts the group, which
    resumes from that checkpoint and finishes."""
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "main_fractalgen.py"] + MODEL_ARGS + [
        "--data_path", data, "--output_dir", out, "--resume", out, "--batch_size", "2", "--epochs", "4",
        "--warmup_epochs", "1", "--save_every_steps", "2", "--save_last_freq", "100"]
    ckpt_path = os.path.join(out, "checkpoint-last.pth")
    returncode, output = kill_a_worker_once_checkpointed(cmd, ckpt_path, tmp_path / "log.txt", timeout=120)
    assert returncode == 0, output[-3000:]
    assert output.count("Training from epoch 0 to 4") == 1 and "Resumed from" in output, output[-3000:]
    assert checkpoint.load(ckpt_path)["epoch"] == 3


# ----------------------------------------------------------------------------- generation
def generate(trained, out, *extra):
    return generate_pngs(trained, out, "--gen_bsz", "2", "--cfg", "2.0", *extra)[0]


def test_generation_resumes_with_the_same_images(trained, tmp_path, monkeypatch, capsys):
    whole = generate(trained, str(tmp_path / "whole"))
    assert len(whole) == 6
    assert generate(trained, str(tmp_path / "again")) == whole  # same seed, same device: same images
    assert generate(trained, str(tmp_path / "seed2"), "--seed", "2") != whole

    out = str(tmp_path / "crashed")
    with monkeypatch.context() as m:
        crash_on_call(m, png_folder, "write_png", 4)  # dies after 3 images, inside batch 2
        with pytest.raises(KeyboardInterrupt):
            generate(trained, out)
    folder = png_folder.folder_of(parse(MODEL_ARGS + ["--output_dir", out, "--num_images", "6",
                                                                     "--num_iter_list", "2,2", "--cfg", "2.0"]))
    with open(os.path.join(folder, "00000.png"), "r+b") as f:  # a half-written image
        f.truncate(40)
    open(os.path.join(folder, "00004.png.tmp"), "wb").close()
    capsys.readouterr()
    assert generate(trained, out) == whole
    assert "kept 2 of 6 images" in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == [f"{i:05d}.png" for i in range(6)] + ["generation.json"]


def test_generation_replaces_images_of_other_weights(trained, tmp_path, capsys):
    out = str(tmp_path / "out")
    first = generate(trained, out)
    other = str(tmp_path / "other")
    os.makedirs(other)
    ckpt = checkpoint.load(os.path.join(trained, "checkpoint-last.pth"))
    ckpt["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    checkpoint.atomic_save(ckpt, os.path.join(other, "checkpoint-last.pth"))
    capsys.readouterr()
    second = generate(other, out)
    assert "Removing 6 images" in capsys.readouterr().out and second != first and len(second) == 6


# ----------------------------------------------------------------------------- bad inputs
def test_corrupt_image_is_skipped_with_a_warning(tmp_path):
    root = write_image_folder(str(tmp_path / "data"), per_class=(2, 1))
    bad = os.path.join(root, "train", "class1", "0.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    dataset = image_folder(root, "train", 16, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = [dataset[i] for i in range(len(dataset))]
    assert any(bad in str(w.message) for w in caught)
    assert all(img.shape == (3, 16, 16) for img, _ in images)


def write_checkpoint(out, model="fractalmar_tiny_in16", truncate=False):
    os.makedirs(out, exist_ok=True)
    sd = build_model(model, class_num=3, num_conds=5, guiding_pixel=True).state_dict()
    path = os.path.join(out, "checkpoint-last.pth")
    torch.save({"model": sd, "epoch": 0}, path)
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def empty_class_folder(data, out):
    os.makedirs(os.path.join(data, "train", "class9"))


def no_val_folder(data, out):
    shutil.rmtree(os.path.join(data, "val"))


def stats_without_sigma(data, out):
    np.savez(os.path.join(os.path.dirname(out), "stats.npz"), mu=np.zeros(2048))


BAD_INPUTS = [  # (extra arguments, message fragment, setup(data, out) or None)
    (["--data_path", "/nonexistent"], "no train/ folder in --data_path", None),
    ([], "needs at least one image", empty_class_folder),
    (["--class_num", "5"], "has 3 classes but --class_num is 5", None),
    (["--img_size", "32"], "pass --img_size 16", None),
    (["--model", "fractalmar_tiny"], "--model invalid choice: 'fractalmar_tiny'", None),
    (["--evaluate_gen", "--num_images", "7", "--fid_stats", "none"], "must be divisible by --class_num", None),
    (["--evaluate_gen", "--num_images", "30", "--fid_stats", "/nonexistent.npz"], "--fid_stats none", None),
    (["--evaluate_gen", "--num_images", "30", "--fid_stats", "STATS"], "sigma", stats_without_sigma),
    (["--resume", "OUT"], "does not match this model (missing:",
     lambda data, out: write_checkpoint(out, "fractalar_tiny_in16")),
    (["--resume", "OUT"], "truncated", lambda data, out: write_checkpoint(out, truncate=True)),
    ([], "exists from an earlier run; pass --resume", lambda data, out: write_checkpoint(out)),
    (["--evaluate_nll", "--resume", "/nonexistent"], "evaluation needs a trained model", None),
    (["--resume", "/nonexistent/run"], "no checkpoint-last.pth in --resume /nonexistent/run (no such folder)", None),
    (["--save_last_freq", "0"], "--save_last_freq must be at least 1", None),
    (["--final_nll"], "no val/ folder in --data_path", no_val_folder),  # found before training, not after
]


def snapshot(folder):
    if not os.path.isdir(folder):
        return None
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def bad_input_case(tmp_path, extra, setup):
    """Data, an output_dir holding finished results, and the arguments of one bad-input case."""
    data, out = write_image_folder(str(tmp_path / "data"), per_class=(2, 1)), str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, "results.json"), "w") as f:
        f.write('{"nll": {"bpd": 3.0}}')
    if setup is not None:
        setup(data, out)
    extra = [{"OUT": out, "STATS": str(tmp_path / "stats.npz")}.get(a, a) for a in extra]
    return out, MODEL_ARGS + ["--data_path", data, "--output_dir", out, "--epochs", "1"] + extra


@pytest.mark.parametrize("extra,message,setup", BAD_INPUTS, ids=[m for _, m, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line_and_output_untouched(tmp_path, extra, message, setup):
    out, argv = bad_input_case(tmp_path, extra, setup)
    before = snapshot(out)
    with pytest.raises(misc.UserError) as error:
        main_fractalgen.main(parse(argv))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert snapshot(out) == before


@pytest.mark.parametrize("extra,message,setup", BAD_INPUTS[:1] + BAD_INPUTS[9:10],
                         ids=[m for _, m, _ in BAD_INPUTS[:1] + BAD_INPUTS[9:10]])
def test_cli_prints_bad_input_as_one_line_and_exits_2(tmp_path, extra, message, setup):
    out, argv = bad_input_case(tmp_path, extra, setup)
    before = snapshot(out)
    result = run(argv)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(out) == before
