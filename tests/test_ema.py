"""EMA of the weights (--ema_rate): the update rule, checkpoints that resume it exactly, the same EMA
on every rank, which weights every evaluation uses (--eval_weights), and the ADM evaluator's .npz
(--save_npz)."""
import json
import os
import re
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import engine_fractalgen
import main_fractalgen
import util.checkpoint as checkpoint
import util.misc as misc
from helpers import MODEL_ARGS, ROOT, generate_pngs, write_image_folder
from models.fractalgen import build_model
from util import png_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("data")))


def train_argv(data, out, *extra):
    """24 images, batch 8: 3 steps per epoch."""
    return MODEL_ARGS + ["--data_path", data, "--output_dir", out, "--resume", out, "--batch_size", "8",
                         "--warmup_epochs", "1", "--save_last_freq", "100"] + list(extra)


def train(argv):
    main_fractalgen.main(main_fractalgen.parse_args(argv))


def saved(folder):
    return checkpoint.load(checkpoint.path_in(folder))


def tensorboard_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0}).Reload()
    return acc


# ----------------------------------------------------------------------------- training
def test_ema_follows_the_update_rule_in_float32(data, tmp_path, monkeypatch):
    """After each of the 3 steps, ema = R·ema + (1−R)·weights, starting from the initial weights; saved
    as model_ema with the model's keys, in float32. Without --ema_rate nothing changes."""
    rate, initial, after_steps = 0.8, {}, []
    real_update, real_boundary = engine_fractalgen.apply_gradients, engine_fractalgen.step_boundary

    def update(loss, model, *args):
        if not initial:
            initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_update(loss, model, *args)

    def boundary(model, device):  # after every update, before the EMA sees it
        after_steps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_boundary(model, device)
    monkeypatch.setattr(engine_fractalgen, "apply_gradients", update)
    monkeypatch.setattr(engine_fractalgen, "step_boundary", boundary)
    out = str(tmp_path / "out")
    train(train_argv(data, out, "--epochs", "1", "--ema_rate", str(rate)))
    assert len(after_steps) == 3
    ckpt = saved(out)
    assert set(ckpt["model_ema"]) == set(ckpt["model"])
    assert all(t.dtype == torch.float32 for t in ckpt["model_ema"].values())
    for k, expected in initial.items():
        for weights in after_steps:
            expected = rate * expected + (1 - rate) * weights[k]
        assert torch.allclose(ckpt["model_ema"][k], expected, atol=1e-6, rtol=1e-5), k
        assert torch.equal(ckpt["model"][k], after_steps[-1][k])
    assert not torch.equal(ckpt["model_ema"]["generator.blocks.0.attn.qkv.weight"],
                           ckpt["model"]["generator.blocks.0.attn.qkv.weight"])

    plain = str(tmp_path / "plain")
    train(train_argv(data, plain, "--epochs", "1"))
    assert "model_ema" not in saved(plain)
    assert all(torch.equal(saved(plain)["model"][k], ckpt["model"][k]) for k in ckpt["model"])  # training unchanged


def test_kill_and_resume_ends_with_the_same_ema(data, tmp_path, monkeypatch):
    """A run killed in epoch 1 at step 2 (after the step-2 checkpoint) and resumed ends with the EMA, bit
    for bit, of a run that never died."""
    argv = ["--epochs", "2", "--save_every_steps", "2", "--ema_rate", "0.9"]
    whole, crashed = str(tmp_path / "whole"), str(tmp_path / "crashed")
    train(train_argv(data, whole, *argv))
    real, calls = engine_fractalgen.apply_gradients, [0]

    def dies_at_the_sixth_update(*a, **k):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(engine_fractalgen, "apply_gradients", dies_at_the_sixth_update)
        with pytest.raises(KeyboardInterrupt):
            train(train_argv(data, crashed, *argv))
    assert saved(crashed)["resume_at"]["step"] == 2 and "model_ema" in saved(crashed)
    train(train_argv(data, crashed, *argv))
    a, b = saved(whole), saved(crashed)
    assert a["epoch"] == b["epoch"] == 1
    assert all(torch.equal(a["model_ema"][k], b["model_ema"][k]) for k in a["model_ema"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_checkpoint_without_ema_starts_it_from_its_weights(data, tmp_path, capsys):
    out = str(tmp_path / "out")
    train(train_argv(data, out, "--epochs", "1"))
    before = saved(out)["model"]
    capsys.readouterr()
    train(train_argv(data, out, "--epochs", "2", "--ema_rate", "0.5"))
    said = capsys.readouterr().out
    assert said.count("holds no EMA weights (model_ema): the EMA starts from its weights") == 1
    after = saved(out)
    key = "generator.blocks.0.attn.qkv.weight"  # 3 updates at rate 0.5: 1/8 of the start remains
    start_share = (after["model_ema"][key] - after["model"][key]).norm() / (before[key] - after["model"][key]).norm()
    assert 0.01 < start_share < 0.9
    capsys.readouterr()
    train(train_argv(data, out, "--epochs", "3"))  # turned off again: said, and dropped
    assert "--ema_rate 0: the EMA weights of" in capsys.readouterr().out and "model_ema" not in saved(out)


TWO_RANKS = """
import sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
import main_fractalgen, util.checkpoint as checkpoint, util.misc as misc
real_save = checkpoint.save
def save(*args, model_ema=None, **kwargs):  # every rank calls it: compare the ranks' EMA weights there
    flat = torch.cat([t.flatten() for t in model_ema.state_dict().values()]).double()
    ranks = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(ranks, flat)
    if dist.get_rank() == 0:
        print("EMA identical on every rank:", all(torch.equal(r, ranks[0]) for r in ranks), flush=True)
    return real_save(*args, model_ema=model_ema, **kwargs)
checkpoint.save = save
sys.exit(misc.run_command(lambda: main_fractalgen.main(main_fractalgen.parse_args(sys.argv[2:]))))
"""


def test_torchrun_keeps_the_same_ema_on_every_rank_and_evaluates_both(data, tmp_path):
    """Ranks start from different random weights (seed + rank) until DDP broadcasts rank 0's: the EMA
    is the same on both at every save. --eval_weights both: the online generation and the NLL after
    training, each for the EMA and the raw weights, in TensorBoard and results.json."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    out = str(tmp_path / "out")
    argv = train_argv(data, out, "--batch_size", "4", "--epochs", "1", "--save_every_steps", "1", "--ema_rate", "0.9",
                      "--eval_weights", "both", "--online_eval", "--num_images", "3", "--num_iter_list", "2,1",
                      "--fid_stats", "none", "--final_nll", "--nll_bsz", "3")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           ROOT] + argv
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # saved after steps 1 and 2 of 3, and at the end of the epoch
    assert result.stdout.count("EMA identical on every rank: True") == 3, result.stdout[-3000:]
    assert "False" not in result.stdout
    assert re.search(r"BPD: \S+ \(EMA weights\)", result.stdout)
    assert re.search(r"BPD: \S+ \(raw weights\)", result.stdout)
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["nll_ema"]["weights"] == "ema" and results["nll"]["weights"] == "raw"
    assert results["nll_ema"]["bpd"] != results["nll"]["bpd"]
    assert results["generation_ema"]["images"].endswith("-ema") and os.path.isdir(results["generation"]["images"])
    logged = tensorboard_scalars(out)
    assert {"val_bpd", "val_bpd_ema"} <= set(logged.Tags()["scalars"])
    assert {"samples", "samples_ema"} <= set(logged.Tags()["images"])


# ----------------------------------------------------------------------------- the finite-weights guard
def test_save_refuses_non_finite_ema_weights(tmp_path):
    model = build_model("fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True)
    ema = build_model("fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True)
    with torch.no_grad():
        ema.generator.norm.weight[0] = float("inf")
    args = main_fractalgen.parse_args(MODEL_ARGS + ["--output_dir", str(tmp_path)])
    with pytest.raises(misc.UserError, match=r"nan or inf at epoch 2 \(its end\) \(in the EMA weights, "
                                             r"generator.norm.weight\)") as e:
        checkpoint.save(args, model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                        2, torch.device("cpu"), model_ema=ema)
    assert "\n" not in str(e.value) and os.listdir(tmp_path) == []


@pytest.mark.parametrize("mode", [["--evaluate_nll"], ["--epochs", "2", "--ema_rate", "0.9"]],
                         ids=["evaluate", "resume"])
def test_evaluation_resume_and_load_model_refuse_non_finite_ema_weights(data, tmp_path, mode):
    folder = str(tmp_path / "diverged")
    os.makedirs(folder)
    model = build_model("fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    ema["generator.norm.weight"][0] = float("nan")
    args = main_fractalgen.parse_args(MODEL_ARGS + ["--num_iter_list", "2,2"])
    checkpoint.atomic_save({"model": model.state_dict(), "model_ema": ema, "epoch": 0, "args": args},
                           checkpoint.path_in(folder))
    out = str(tmp_path / "out")
    with pytest.raises(misc.UserError, match="holds weights that are not finite .generator.norm.weight") as e:
        train(MODEL_ARGS + ["--data_path", data, "--resume", folder, "--output_dir", out, "--batch_size", "8", *mode])
    assert "\n" not in str(e.value) and not os.path.exists(out)
    from util.sampling import load_model
    with pytest.raises(misc.UserError, match="not finite"):
        load_model(checkpoint.path_in(folder))
    assert load_model(checkpoint.path_in(folder), weights="raw")[1]["weights"] == "raw"


# ----------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def with_ema(tmp_path_factory):
    """Folders holding a checkpoint with raw and EMA weights ("both"), and the same EMA weights as the
    plain weights of another ("ema_as_raw"), so that evaluating one can be compared with the other."""
    root = tmp_path_factory.mktemp("with_ema")
    args = main_fractalgen.parse_args(MODEL_ARGS + ["--num_iter_list", "2,2"])
    torch.manual_seed(0)
    raw = build_model("fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True).state_dict()
    ema = build_model("fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True).state_dict()
    folders = {}
    for name, ckpt in {"both": {"model": raw, "model_ema": ema}, "ema_as_raw": {"model": ema},
                       "raw": {"model": raw}}.items():
        folders[name] = str(root / name)
        os.makedirs(folders[name])
        checkpoint.atomic_save(dict(ckpt, epoch=0, args=args), checkpoint.path_in(folders[name]))
    return folders


def nll(data, folder, out, capsys, *extra):
    capsys.readouterr()
    train(MODEL_ARGS + ["--data_path", data, "--resume", folder, "--output_dir", out, "--evaluate_nll",
                        "--nll_bsz", "6", *extra])
    return [(float(line.split()[1]), line.split("(")[1].rstrip(")")) for line in capsys.readouterr().out.splitlines()
            if line.startswith("BPD: ")]


def test_evaluation_uses_the_ema_weights_unless_told(data, with_ema, tmp_path, capsys):
    out = str(tmp_path / "out")
    [(ema_bpd, said)] = nll(data, with_ema["both"], out, capsys)
    assert said == "EMA weights"
    [(ema_as_raw, said_raw)] = nll(data, with_ema["ema_as_raw"], str(tmp_path / "o2"), capsys)
    assert ema_as_raw == ema_bpd and said_raw == "raw weights"
    [(raw_bpd, said)] = nll(data, with_ema["both"], out, capsys, "--eval_weights", "raw")
    [(raw_only, _)] = nll(data, with_ema["raw"], str(tmp_path / "o3"), capsys)
    assert said == "raw weights" and raw_bpd == raw_only != ema_bpd
    assert nll(data, with_ema["both"], out, capsys, "--eval_weights", "both") == [(ema_bpd, "EMA weights"),
                                                                                 (raw_bpd, "raw weights")]
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["nll_ema"]["bpd"] == pytest.approx(ema_bpd, abs=1e-5) and results["nll"]["weights"] == "raw"
    assert results["nll"]["bpd"] == pytest.approx(raw_bpd, abs=1e-5) and results["nll_ema"]["weights"] == "ema"
    with pytest.raises(misc.UserError, match="--eval_weights both: .* holds no EMA weights"):
        nll(data, with_ema["raw"], str(tmp_path / "o4"), capsys, "--eval_weights", "both")


def generated(checkpoint_dir, out, *extra):
    """--evaluate_gen of 6 images: {weights: the PNGs' bytes by file name} for each folder written."""
    train(MODEL_ARGS + ["--resume", checkpoint_dir, "--output_dir", out, "--evaluate_gen", "--num_images", "6",
                        "--num_iter_list", "2,2", "--fid_stats", "none", *extra])
    results = json.load(open(os.path.join(out, "results.json")))
    return {r["weights"]: {f: open(os.path.join(r["images"], f), "rb").read()
                           for f in sorted(os.listdir(r["images"])) if f.endswith(".png")}
            for key, r in results.items() if key.startswith("generation")}


def test_generation_of_the_ema_weights_has_its_own_folder_and_npz(with_ema, tmp_path):
    out = str(tmp_path / "out")
    made = generated(with_ema["both"], out, "--save_npz")
    assert list(made) == ["ema"] and made["ema"] == generated(with_ema["ema_as_raw"], str(tmp_path / "o2"))["raw"]
    results = json.load(open(os.path.join(out, "results.json")))["generation_ema"]
    assert results["images"].endswith("-ema") and results["npz"] == results["images"] + ".npz"
    assert os.path.isfile(results["npz"])
    both = generated(with_ema["both"], out, "--eval_weights", "both")
    assert both["ema"] == made["ema"] and len(both["raw"]) == 6 and both["raw"] != made["ema"]
    assert both["raw"] == generated(with_ema["raw"], str(tmp_path / "o3"))["raw"]


def test_sample_and_edit_say_which_weights_and_take_the_flag(with_ema, tmp_path, capsys):
    import util.edit
    import util.sample
    from util.sampling import load_model
    grids = {}
    for name, extra in (("ema", []), ("raw", ["--eval_weights", "raw"])):
        path = tmp_path / f"{name}.png"
        assert util.sample.main(["--checkpoint", checkpoint.path_in(with_ema["both"]), "--per_class", "1",
                                 "--output", str(path), *extra]) == 0
        assert capsys.readouterr().out.strip().endswith(f"{name.upper() if name == 'ema' else name} weights")
        grids[name] = np.asarray(Image.open(path))
    assert util.sample.main(["--checkpoint", checkpoint.path_in(with_ema["ema_as_raw"]), "--per_class", "1",
                             "--output", str(tmp_path / "same.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "same.png")), grids["ema"])
    assert not np.array_equal(grids["raw"], grids["ema"])
    assert load_model(checkpoint.path_in(with_ema["both"]))[1]["weights"] == "ema"
    assert load_model(checkpoint.path_in(with_ema["both"]), weights="raw")[1]["weights"] == "raw"
    assert load_model(checkpoint.path_in(with_ema["raw"]))[1]["weights"] == "raw"
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    capsys.readouterr()
    assert util.edit.cli(["--checkpoint", checkpoint.path_in(with_ema["both"]), "--image", str(image), "--mask",
                          "left", "--class", "1", "--num_samples", "1", "--output", str(tmp_path / "edit.png")]) == 0
    assert "(EMA weights)" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--eval_weights", "both"], "--eval_weights both evaluates the EMA weights next to the raw ones: pass --ema_rate"),
    (["--save_npz"], "--save_npz writes the images of --evaluate_gen"),
    (["--ema_rate", "1"], r"--ema_rate must be in \[0, 1\), got 1"),
])
def test_bad_ema_and_npz_flags_are_one_line(data, tmp_path, extra, message):
    out = str(tmp_path / "out")
    with pytest.raises(misc.UserError, match=message):
        train(train_argv(data, out, "--epochs", "1", *extra))
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------- the ADM evaluator's npz
def read_like_the_adm_evaluator(path):
    """guided-diffusion's evaluator.py streams arr_0.npy out of the zip: header first, then rows."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        return shape, fortran, dtype, np.frombuffer(f.read(), dtype=dtype).reshape(shape)


def test_npz_holds_the_pngs_in_order_and_a_resumed_run_writes_the_same_file(trained, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    pngs, args = generate_pngs(trained, out, "--save_npz", "--gen_bsz", "2")
    path = png_folder.folder_of(args) + ".npz"
    with np.load(path) as npz:
        assert list(npz) == ["arr_0"] and npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (6, 16, 16, 3)
        for i, name in enumerate(sorted(pngs)):
            assert np.array_equal(npz["arr_0"][i], np.asarray(Image.open(os.path.join(png_folder.folder_of(args),
                                                                                       name))))
    shape, fortran, dtype, arr = read_like_the_adm_evaluator(path)
    assert shape == (6, 16, 16, 3) and not fortran and dtype == np.uint8
    whole = open(path, "rb").read()

    crashed = str(tmp_path / "crashed")
    real, calls = png_folder.write_png, [0]

    def dies_at_the_fourth_image(*a, **k):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(png_folder, "write_png", dies_at_the_fourth_image)
        with pytest.raises(KeyboardInterrupt):
            generate_pngs(trained, crashed, "--save_npz", "--gen_bsz", "2")
    assert not [f for f in os.listdir(crashed) if f.endswith(".npz")]
    generate_pngs(trained, crashed, "--save_npz", "--gen_bsz", "2")
    crashed_path = png_folder.folder_of(main_fractalgen.parse_args(MODEL_ARGS + [
        "--output_dir", crashed, "--num_images", "6", "--num_iter_list", "2,2"])) + ".npz"
    assert open(crashed_path, "rb").read() == whole
    generate_pngs(trained, crashed, "--save_npz", "--gen_bsz", "2")  # all PNGs kept: rebuilt from them
    assert open(crashed_path, "rb").read() == whole
    assert not [f for f in os.listdir(crashed) if ".tmp" in f]


def test_npz_is_written_one_image_at_a_time(tmp_path):
    """200 images of 64×64 are 2.4 MB; writing their npz allocates a small fraction of that."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(200):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    tracemalloc.start()
    path = png_folder.save_npz(str(folder), 200, 64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 * 64 * 64 * 3 / 8, peak
    with np.load(path) as npz:
        assert npz["arr_0"].shape == (200, 64, 64, 3)
        assert np.array_equal(npz["arr_0"][123], np.asarray(Image.open(folder / "00123.png")))
