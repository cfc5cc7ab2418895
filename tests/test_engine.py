"""Training, resuming, NLL and generation through main_fractalgen.py, on CPU, with torchrun."""
import argparse
import glob
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import main_fractalgen
import util.checkpoint as checkpoint
import util.misc as misc
from helpers import MODEL_ARGS, ROOT, run, write_image_folder
from util.crop import center_crop_arr
from util.lr_sched import lr_at


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("data")))


# ----------------------------------------------------------------------------- pieces
def test_lr_schedule():
    args = argparse.Namespace(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10, lr_schedule="cosine")
    assert lr_at(0, args) == 0 and lr_at(1, args) == 0.5 and lr_at(2, args) == 1.0
    assert lr_at(6, args) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(10, args) == pytest.approx(0.1)
    args.lr_schedule = "constant"
    assert lr_at(7.5, args) == 1.0


def test_weight_decay_groups():
    from models.fractalgen import build_model
    model = build_model("fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True)
    no_decay, decay = main_fractalgen.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "generator.blocks.0.attn.qkv.weight" in decay_names and "generator.pos_embed_learned" in decay_names
    assert "fake_latent" in decay_names
    assert "generator.norm.weight" in no_decay_names and "generator.blocks.0.attn.qkv.bias" in no_decay_names
    assert "next_fractal.next_fractal.r_mlm.bias" in no_decay_names  # 2-D, but named *.bias
    assert len(no_decay_names) + len(decay_names) == len(names)


def test_adm_center_crop():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    out = center_crop_arr(img, 64)
    assert out.size == (64, 64)
    assert center_crop_arr(Image.new("RGB", (20, 30), (10, 200, 30)), 16).getpixel((8, 8)) == (10, 200, 30)


KEEP_FREED_MEMORY_PROBE = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from util.misc import keep_freed_memory
applied = keep_freed_memory()
def step():  # tensors of a few MB made and freed in turn, as in a forward pass
    x = torch.ones(1 << 20)
    for _ in range(4):
        y = x.repeat(3) + 1
        x = y[: 1 << 20] * 2
        del y
def page_faults(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
page_faults(5)
print(applied, page_faults(20))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings")
def test_keep_freed_memory_reuses_pages_instead_of_faulting_them_in_again():
    """With glibc's defaults these 20 steps page-fault about 300,000 times (freed blocks go back to the
    OS and come back as fresh pages); with keep_freed_memory(), about a thousand."""
    out = subprocess.run([sys.executable, "-c", KEEP_FREED_MEMORY_PROBE, ROOT], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "True" and int(out[1]) < 20_000, out


def test_checkpoint_is_atomic_and_loads(tmp_path):
    path = str(tmp_path / "checkpoint-last.pth")
    checkpoint.atomic_save({"model": {"w": torch.ones(2)}, "epoch": 3, "args": argparse.Namespace(a=1)}, path)
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]
    assert checkpoint.load(path)["epoch"] == 3
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(misc.UserError, match="truncated"):
        checkpoint.load(path)
    with pytest.raises(misc.UserError, match="no checkpoint at .*train one first"):
        checkpoint.load(str(tmp_path / "missing.pth"))


# ----------------------------------------------------------------------------- end to end
def test_torchrun_train_resume_nll_and_tensorboard(data, tmp_path):
    out = str(tmp_path / "out")
    common = MODEL_ARGS + ["--data_path", data, "--output_dir", out, "--resume", out, "--batch_size", "4",
                           "--warmup_epochs", "1", "--save_last_freq", "1"]
    first = run(common + ["--epochs", "2"], nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Training from epoch 0 to 2" in first.stdout
    ckpt = torch.load(os.path.join(out, "checkpoint-last.pth"), map_location="cpu", weights_only=False)
    assert set(ckpt) == {"model", "optimizer", "epoch", "scaler", "args", "rng"} and ckpt["epoch"] == 1
    assert len(ckpt["rng"]) == 2  # every rank's random state
    second = run(common + ["--epochs", "3", "--final_nll", "--final_samples", "2", "--num_iter_list", "2,1"], nproc=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resumed from" in second.stdout and "Training from epoch 2 to 3" in second.stdout
    # after training: the NLL and a grid of 3 classes × 2 (no digit check: these are not the bundled digits)
    assert second.stdout.count("BPD: ") == 1 and second.stdout.count("Samples: ") == 1
    assert "Recognised" not in second.stdout and Image.open(os.path.join(out, "samples.png")).size[1] > 3 * 16 * 4
    assert torch.load(os.path.join(out, "checkpoint-last.pth"), map_location="cpu", weights_only=False)["epoch"] == 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scalars = set()
    for events in glob.glob(os.path.join(out, "events.out.tfevents.*")):
        acc = EventAccumulator(events, size_guidance={"scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
    assert {"train_loss", "lr"} <= scalars

    nll = run(common + ["--evaluate_nll", "--nll_bsz", "2", "--nll_forward_number", "2"], nproc=2)
    assert nll.returncode == 0, nll.stderr[-3000:]
    bpd = float(nll.stdout.split("BPD: ")[1].split()[0])
    assert math.isfinite(bpd) and 0 < bpd < 20


def test_non_finite_loss_stops_and_keeps_checkpoint(data, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    argv = MODEL_ARGS + ["--data_path", data, "--output_dir", out, "--resume", out, "--batch_size", "8",
                         "--warmup_epochs", "1"]
    main_fractalgen.main(main_fractalgen.parse_args(argv + ["--epochs", "1"]))
    path = os.path.join(out, "checkpoint-last.pth")
    before = open(path, "rb").read()
    from models.fractalgen import FractalGen
    real_forward = FractalGen.forward
    monkeypatch.setattr(FractalGen, "forward", lambda self, x, y: real_forward(self, x, y) * float("nan"))
    with pytest.raises(misc.UserError, match=r"loss is nan at epoch 1, step 0"):
        main_fractalgen.main(main_fractalgen.parse_args(argv + ["--epochs", "2"]))
    assert open(path, "rb").read() == before


def test_torchrun_generation_writes_balanced_pngs_and_scores_offline(data, tmp_path):
    """Train briefly, then generate with 2 processes and score FID/IS against statistics of the
    training images, with a random-weight InceptionV3 saved here (no download)."""
    from util.fid import compute_fid_stats, make_random_inception_weights
    out = str(tmp_path / "out")
    weights = make_random_inception_weights(str(tmp_path / "inception.pth"))
    stats = str(tmp_path / "stats.npz")
    compute_fid_stats(os.path.join(data, "train"), stats, torch.device("cpu"), inception_weights=weights)
    common = MODEL_ARGS + ["--data_path", data, "--output_dir", out, "--resume", out]
    train = run(common + ["--epochs", "2", "--batch_size", "8", "--save_last_freq", "1"])
    assert train.returncode == 0, train.stderr[-3000:]
    assert train.stdout.count(f"Saved {os.path.join(out, 'checkpoint-last.pth')} (epoch") == 2
    assert "Epoch 0 done" in train.stdout and "ETA of the run 00:00:" in train.stdout
    gen = run(common + ["--evaluate_gen", "--num_images", "12", "--gen_bsz", "3", "--num_iter_list", "4,2",
                        "--cfg", "2.0", "--cfg_schedule", "linear", "--fid_stats", stats,
                        "--fid_inception_weights", weights], nproc=2)
    assert gen.returncode == 0, gen.stderr[-3000:]
    folder = glob.glob(os.path.join(out, "ariter4-2-*"))[0]
    assert sorted(os.listdir(folder)) == [f"{i:05d}.png" for i in range(12)] + ["generation.json"]
    assert all(Image.open(os.path.join(folder, f"{i:05d}.png")).size == (16, 16) for i in range(12))
    fid = float(gen.stdout.split("FID: ")[1].split(",")[0])
    inception = float(gen.stdout.split("Inception Score: ")[1].split()[0])
    assert math.isfinite(fid) and fid > 0 and inception >= 1.0
    import json
    results = json.load(open(os.path.join(out, "results.json")))["generation"]
    assert results["fid"] == pytest.approx(fid, abs=1e-3) and results["num_images"] == 12
    logged = tensorboard_events(out)
    assert logged.Scalars("fid")[-1].value == pytest.approx(fid, abs=1e-3)
    assert logged.Scalars("is")[-1].value == pytest.approx(inception, abs=1e-3)
    assert logged.Images("samples")[-1].width == 8 * 18 + 2  # 12 images, 8 to a row, 16 px + padding


def tensorboard_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0}).Reload()


def test_generation_labels_are_class_balanced():
    from util.png_folder import labels_of
    assert labels_of(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(misc.UserError, match="divisible"):
        main_fractalgen.check_args(main_fractalgen.parse_args(["--evaluate_gen", "--num_images", "7", "--class_num", "3"]))


LAUNCHERS = {  # the variables SLURM's srun and OpenMPI's mpirun give each process
    "slurm": lambda rank: {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2"},
    "openmpi": lambda rank: {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2",
                             "OMPI_COMM_WORLD_LOCAL_RANK": str(rank)},
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_slurm_and_openmpi_start_two_processes(data, tmp_path, launcher):
    """Two processes started as srun / mpirun would start them share the NLL evaluation."""
    from models.fractalgen import build_model
    out = str(tmp_path / "out")
    os.makedirs(out)
    model = build_model("fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True)
    checkpoint.atomic_save({"model": model.state_dict()}, os.path.join(out, "checkpoint-last.pth"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    argv = MODEL_ARGS + ["--data_path", data, "--output_dir", out, "--resume", out, "--evaluate_nll",
                         "--nll_bsz", "2"] + (["--dist_on_itp"] if launcher == "openmpi" else [])
    procs = [subprocess.Popen([sys.executable, "main_fractalgen.py"] + argv, cwd=ROOT, text=True,
                              env={**env, **LAUNCHERS[launcher](rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for rank in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]
    assert "2 process(es)" in outputs[0] and "BPD: " in outputs[0] and "BPD: " not in outputs[1]
    assert 0 < float(outputs[0].split("BPD: ")[1].split()[0]) < 20


def test_demo_preset_writes_the_digits_and_reports_nll_samples_and_digit_check(tmp_path, monkeypatch, capsys):
    """--demo with its defaults (data/demo written on first use, in the working directory), overridden only
    where a test must be quick (0 epochs, few steps)."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    args = main_fractalgen.parse_args(["--demo", "--output_dir", out, "--epochs", "0", "--num_iter_list", "2,1",
                                       "--num_workers", "0"])
    assert args.model == main_fractalgen.DEMO_DEFAULTS["model"] == "fractalar_tiny_in16" and args.class_num == 10
    main_fractalgen.main(args)
    assert sorted(os.listdir(tmp_path / "data" / "demo" / "train")) == [str(d) for d in range(10)]
    import json
    results = json.load(open(os.path.join(out, "results.json")))
    assert 0 < results["nll"]["bpd"] < 20
    grid = Image.open(os.path.join(out, "samples.png"))
    assert grid.size[1] > 10 * 16 * 4  # ten rows of 16-pixel samples shown 4× larger
    said = capsys.readouterr().out
    assert "Nothing to train: the run is at epoch 0 and --epochs is 0" in said and "checkpoint:" not in said
    assert "Samples: " in said and said.index("BPD: ") < said.index("PNG: ") < said.index("Recognised as their")
    digits = results["final_samples"]
    assert 0 <= digits["recognised_share"] <= 1 and 0.85 < digits["real_digits_accuracy"] < 1
    assert digits["png_bpd"] > 0 and digits["held_out_digits"] == 500
    logged = tensorboard_events(out)
    assert logged.Scalars("recognised_share")[-1].value == pytest.approx(digits["recognised_share"])
    assert 0 < logged.Scalars("val_bpd")[-1].value < 20 and logged.Images("samples")
