"""Real file systems and damaged files: a full disk (a small tmpfs), a stop signal during decoding,
checkpoints that load but are not what they say, damaged results files, dangling symlinks."""
import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import main_fractalgen
import util.checkpoint as checkpoint
import util.misc as misc
import util.stop as stop
from helpers import MODEL_ARGS, small_disk, write_image_folder
from util.data import SkipCorruptImages


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("data")))


def train_argv(data, out, *extra):
    return MODEL_ARGS + ["--data_path", data, "--output_dir", out, "--resume", out, "--batch_size", "8",
                         "--warmup_epochs", "1", "--save_last_freq", "100", "--epochs", "1"] + list(extra)


def one_line(error):
    return "\n" not in str(error.value)


@pytest.fixture(scope="module")
def trained_run(data, tmp_path_factory):
    """The output folder of one epoch of training (a checkpoint with optimizer, scaler, rng, args)."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    main_fractalgen.main(main_fractalgen.parse_args(train_argv(data, out)))
    misc.release_output_dir(out)
    return out


# ----------------------------------------------------------------------------- a full disk, for real
def test_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_previous(tmp_path):
    with small_disk(str(tmp_path / "disk"), "1m") as disk:
        path = checkpoint.path_in(disk)
        checkpoint.atomic_save({"model": {"w": torch.ones(3)}}, path)
        before = open(path, "rb").read()
        with pytest.raises(misc.UserError, match=f"disk full while writing {path}: free space in {disk} ") as e:
            checkpoint.atomic_save({"model": {"w": torch.zeros(1 << 20)}}, path)  # 4 MB on a 1 MB disk
        assert one_line(e) and open(path, "rb").read() == before and os.listdir(disk) == [checkpoint.NAME]


def test_full_disk_during_training_stops_with_one_line(data, tmp_path):
    """A checkpoint (about 15 MB with the optimizer state) that does not fit: exit 2, nothing half-written."""
    with small_disk(str(tmp_path / "disk"), "8m") as out:
        result = subprocess.run([*main_command(), *train_argv(data, out)], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: disk full while writing {checkpoint.path_in(out)}: free space in "), last
        assert "Traceback" not in result.stderr
        assert not [f for f in os.listdir(out) if ".tmp" in f] and not os.path.exists(checkpoint.path_in(out))


def main_command():
    import sys
    return [sys.executable, "main_fractalgen.py"]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- a stop is not bad data
def test_a_stop_signal_while_an_image_decodes_stops_instead_of_skipping_it(tmp_path):
    folder = tmp_path / "images" / "c"
    folder.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8)).save(folder / "a.png")
    dataset = SkipCorruptImages(str(tmp_path / "images"), transform=lambda image: 0)
    previous = signal.getsignal(signal.SIGTERM)
    stop.install()
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        with warnings.catch_warnings(record=True) as caught, pytest.raises(stop.Stopped):
            warnings.simplefilter("always")
            timer.start()
            deadline = time.time() + 30
            while time.time() < deadline:
                dataset[0]
        assert not [w for w in caught if "skipping image" in str(w.message)]
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- checkpoints that load but are wrong
def damage(key, value):
    def change(ckpt):
        ckpt[key] = value(ckpt) if callable(value) else value
    return change


def change_args(**kw):
    def change(ckpt):
        ckpt["args"] = argparse.Namespace(**{**vars(ckpt["args"]), **kw})
    return change


def bad_optimizer_shape(ckpt):
    state = ckpt["optimizer"]["state"]
    first = next(iter(state))
    state[first]["exp_avg"] = torch.zeros(7, 7)


def drop_group(ckpt):
    ckpt["optimizer"]["param_groups"] = ckpt["optimizer"]["param_groups"][:1]


DAMAGED = [
    ("args-dict", damage("args", lambda c: vars(c["args"])), r"'args' is a dict, not the argparse.Namespace"),
    ("unknown-model", change_args(model="fractalmar_gigantic"), r"'args' names an unknown model 'fractalmar_gigantic'"),
    ("model-list", damage("model", lambda c: list(c["model"].values())), r"'model' is a list, not a state dict"),
    ("weight-not-tensor", damage("model", lambda c: {**c["model"], next(iter(c["model"])): [1.0, 2.0]}),
     r"'model' is entry '.*' is a list, not a tensor"),
    ("optimizer-groups", drop_group, r"parameter groups of \[\d+\] parameters, this model needs \[\d+, \d+\]"),
    ("optimizer-shape", bad_optimizer_shape, r"optimizer state exp_avg of parameter \d+ .* has shape \(7, 7\)"),
    ("rng", damage("rng", [{"cpu": "not a state"}]), r"'rng' is not a list of random states"),
    ("resume_at", damage("resume_at", {"epoch": 1, "step": "x"}), r"'resume_at' is .*, not \{epoch, step, consumed\}"),
]


@pytest.mark.parametrize("change, message", [d[1:] for d in DAMAGED], ids=[d[0] for d in DAMAGED])
def test_a_damaged_checkpoint_is_one_line_before_anything_is_written(data, trained_run, tmp_path, change, message):
    out = str(tmp_path / "out")
    os.makedirs(out)
    ckpt = torch.load(checkpoint.path_in(trained_run), weights_only=False)
    change(ckpt)
    torch.save(ckpt, checkpoint.path_in(out))
    with pytest.raises(misc.UserError, match=message) as e:
        main_fractalgen.main(main_fractalgen.parse_args(train_argv(data, out, "--epochs", "2")))
    assert one_line(e) and os.listdir(out) == [checkpoint.NAME]


# ----------------------------------------------------------------------------- damaged results, symlinks
@pytest.mark.parametrize("damaged", [b"[1, 2]", b'{"nll": {"bpd"', b""], ids=["a-list", "cut-short", "empty"])
def test_a_damaged_results_file_is_set_aside_and_the_new_result_kept(data, trained_run, tmp_path, damaged, capsys):
    out = str(tmp_path / "out")
    os.makedirs(out)
    open(os.path.join(out, "results.json"), "wb").write(damaged)
    main_fractalgen.main(main_fractalgen.parse_args(
        MODEL_ARGS + ["--data_path", data, "--resume", trained_run, "--output_dir", out, "--evaluate_nll"]))
    assert "bpd" in json.load(open(os.path.join(out, "results.json")))["nll"]
    aside = [f for f in os.listdir(out) if f.startswith("results.json.damaged-")]
    assert len(aside) == 1 and open(os.path.join(out, aside[0]), "rb").read() == damaged
    assert f"moved it to {os.path.join(out, aside[0])}" in capsys.readouterr().out


def test_results_and_temporaries_are_never_written_through_a_symlink(data, trained_run, tmp_path):
    out, victim = str(tmp_path / "out"), tmp_path / "someone_elses_file"
    os.makedirs(out)
    victim.write_bytes(b"precious")
    os.symlink(victim, os.path.join(out, "results.json"))
    os.symlink(victim, os.path.join(out, f"results.json.tmp.{os.getpid()}"))
    with pytest.raises(OSError):  # a planted temporary name is refused, not followed
        misc.update_results(out, nll={"bpd": 1.0})
    assert not os.path.lexists(os.path.join(out, f"results.json.tmp.{os.getpid()}"))  # the failed writer's name
    misc.update_results(out, nll={"bpd": 1.0})
    assert victim.read_bytes() == b"precious" and not os.path.islink(os.path.join(out, "results.json"))
    assert json.load(open(os.path.join(out, "results.json"))) == {"nll": {"bpd": 1.0}}


def test_an_empty_generation_manifest_makes_the_images_again(trained, tmp_path):
    from helpers import generate_pngs
    from util import png_folder
    out = str(tmp_path / "out")
    first, args = generate_pngs(trained, out)
    open(os.path.join(png_folder.folder_of(args), png_folder.MANIFEST), "w").close()
    misc.release_output_dir(out)
    again, _ = generate_pngs(trained, out)
    assert again == first


def test_a_dangling_symlink_as_output_dir_is_one_line(data, tmp_path):
    link = str(tmp_path / "out")
    os.symlink(tmp_path / "gone", link)
    with pytest.raises(misc.UserError, match=f"--output_dir {link}: {link} is a symlink to .*gone, which does not "
                                             "exist") as e:
        main_fractalgen.main(main_fractalgen.parse_args(train_argv(data, link)))
    assert one_line(e) and not os.path.exists(tmp_path / "gone")


# ----------------------------------------------------------------------------- --evaluate_gen checks scoring first
def test_evaluate_gen_checks_scoring_inputs_before_any_image(trained, tmp_path):
    from util.fid import save_fid_stats
    stats = str(tmp_path / "small.npz")
    save_fid_stats(stats, np.zeros(64), np.eye(64))
    out = str(tmp_path / "out")
    argv = MODEL_ARGS + ["--resume", trained, "--output_dir", out, "--evaluate_gen", "--num_images", "12",
                         "--num_iter_list", "2,2", "--fid_stats", stats]
    with pytest.raises(misc.UserError, match="holds 64-d statistics; Inception FID needs 2048-d") as e:
        main_fractalgen.main(main_fractalgen.parse_args(argv))
    assert one_line(e) and not os.path.exists(out)


# ----------------------------------------------------------------------------- util.sample and util.edit outputs
@pytest.mark.parametrize("output, message", [
    ("folder.png", "folder.png is a folder; name a .png file in it"), ("grid.txt", "must name a .png file"),
    ("a_file/grid.png", "a_file is a file, not a folder")], ids=["folder", "no-png", "under-a-file"])
def test_sample_checks_its_output_before_sampling(trained, tmp_path, output, message, capsys):
    from util.sample import main
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder.png").mkdir()
    assert main(["--checkpoint", checkpoint.path_in(trained), "--model_name", "fractalar_in64",
                 "--output", str(tmp_path / output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_full_disk_leaves_no_empty_grid(tmp_path):
    from util.sampling import save_png
    with small_disk(str(tmp_path / "disk"), "64k") as disk:
        with pytest.raises(misc.UserError, match="disk full while writing"):
            save_png(torch.rand(3, 512, 512), os.path.join(disk, "grid.png"))  # random pixels: ~800 KB of PNG
        assert os.listdir(disk) == []


def test_edit_refuses_a_decompression_bomb_in_one_line(tmp_path):
    import struct
    import zlib
    from util.edit import open_image

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb = tmp_path / "bomb.png"  # a header that claims 30000×30000 pixels, and one row of data
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 90001)) + chunk(b"IEND", b""))
    with pytest.raises(misc.UserError, match="cannot read .*bomb.png as an image .DecompressionBombError") as e:
        open_image(str(bomb))
    assert one_line(e)


def test_a_disk_full_before_the_run_starts_is_one_line_and_leaves_no_lock_file(data, tmp_path):
    with small_disk(str(tmp_path / "disk"), "64k") as out:
        with open(os.path.join(out, "filler"), "wb", buffering=0) as f:  # the disk is full before the run starts
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        with pytest.raises(misc.UserError, match=f"disk full in --output_dir {out}: free space there") as e:
            main_fractalgen.main(main_fractalgen.parse_args(train_argv(data, out)))
        assert one_line(e) and os.listdir(out) == ["filler"]


@pytest.mark.parametrize("flag", [["--per_class", "0"], ["--per_class", "-2"], ["--temperature", "0"], ["--cfg", "nan"],
                                  ["--filter_threshold", "2"], ["--filter_threshold", "nan"], ["--cfg", "-1"]],
                         ids=lambda f: " ".join(f))
def test_the_helpers_answer_a_bad_value_as_main_does(trained, tmp_path, flag, capsys):
    """The same value gets the same one-line answer from util.sample, util.edit and (where it has the flag)
    main_fractalgen.py: one home for each flag's range."""
    from util import edit, sample
    ckpt = checkpoint.path_in(trained)
    answers = []
    for command, argv in ((sample.main, ["--checkpoint", ckpt]),
                          (edit.cli, ["--checkpoint", ckpt, "--image", "x.png", "--class", "0"])):
        if flag[0] == "--per_class" and command is edit.cli:
            continue
        assert command(argv + ["--output", str(tmp_path / "out.png")] + flag) == 2
        answers.append(capsys.readouterr().err)
    if flag[0] != "--per_class":
        with pytest.raises(misc.UserError) as e:
            main_fractalgen.parse_args(flag)
        answers.append(f"error: {e.value}\n")
    assert len(set(answers)) == 1 and answers[0].count("\n") == 1 and f"{flag[0]} must be" in answers[0], answers
    assert not os.path.exists(tmp_path / "out.png")
