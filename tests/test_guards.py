"""What protects a run from itself and its surroundings: no non-finite checkpoint, one run per folder,
SIGTERM/SIGINT answered with a step checkpoint, --resume that names nothing, a full disk, bad flags,
images that do not decode."""
import errno
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from PIL import Image

import engine_fractalgen
from util import png_folder
import main_fractalgen
import util.checkpoint as checkpoint
import util.misc as misc
import util.stop as stop
from helpers import MODEL_ARGS, ROOT, generate_pngs, run, write_image_folder
from models.fractalgen import build_model
from util.data import image_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("data")))


def parse(argv):
    return main_fractalgen.parse_args(argv)


def train_argv(data, out, *extra):
    return MODEL_ARGS + ["--data_path", data, "--output_dir", out, "--resume", out, "--batch_size", "8",
                         "--warmup_epochs", "1", "--save_last_freq", "100"] + list(extra)


def weights(folder):
    return checkpoint.load(checkpoint.path_in(folder))["model"]


def one_line(error):
    return "\n" not in str(error.value)


# ----------------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("extra", [["--blr", "1e7", "--save_every_steps", "1"], ["--lr", "1e25"]],
                         ids=["blr1e7-step-saves", "lr1e25-epoch-saves"])
def test_update_that_overflows_is_never_saved(data, tmp_path, extra):
    """The issue's repro: a finite loss whose update makes the weights non-finite stops training with the
    epoch and step, before any save; the last checkpoint (the epoch before's, or the last step's, still
    finite) stays."""
    out = str(tmp_path / "out")
    main_fractalgen.main(parse(train_argv(data, out, "--epochs", "1")))
    before = open(checkpoint.path_in(out), "rb").read()
    argv = train_argv(data, out, "--epochs", "3", "--batch_size", "4", "--warmup_epochs", "0") + extra
    with pytest.raises(misc.UserError, match=r"weights are not finite after the update of epoch 1, step \d") as e:
        main_fractalgen.main(parse(argv))
    assert one_line(e) and "checkpoint-last.pth, is unchanged" in str(e.value) and "--blr" in str(e.value)
    ckpt = checkpoint.load(checkpoint.path_in(out))
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    if "--save_every_steps" in extra:  # the step before the overflow was saved, finite
        assert ckpt["resume_at"]["epoch"] == 1 and str(e.value).count(f"step {ckpt['resume_at']['step']} ") == 1
    else:
        assert open(checkpoint.path_in(out), "rb").read() == before
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_save_refuses_non_finite_optimizer_state(tmp_path):
    model = build_model("fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, 3, 16, 16), torch.tensor([0, 1])).backward()
    optimizer.step()
    next(iter(optimizer.state.values()))["exp_avg_sq"].fill_(float("inf"))
    args = parse(MODEL_ARGS + ["--output_dir", str(tmp_path)])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(misc.UserError, match=r"nan or inf at epoch 4, step 7 \(in optimizer state exp_avg_sq") as e:
        checkpoint.save(args, model, optimizer, scaler, 4, torch.device("cpu"), step=7, consumed=56)
    assert one_line(e) and "no checkpoint was saved" in str(e.value) and os.listdir(tmp_path) == []


@pytest.fixture
def diverged(tmp_path):
    """A folder with a checkpoint (from before the check existed) holding a nan weight."""
    folder = str(tmp_path / "diverged")
    os.makedirs(folder)
    model = build_model("fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True)
    state = model.state_dict()
    state["generator.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    args = parse(MODEL_ARGS + ["--num_iter_list", "2,2"])
    torch.save({"model": state, "epoch": 2, "args": args}, checkpoint.path_in(folder))
    return folder


@pytest.mark.parametrize("mode", [["--evaluate_nll"], ["--evaluate_gen", "--num_images", "3", "--fid_stats", "none"],
                                  []])
def test_evaluation_and_resume_refuse_non_finite_weights(data, tmp_path, diverged, mode):
    out = str(tmp_path / "out")
    argv = MODEL_ARGS + ["--data_path", data, "--resume", diverged, "--output_dir", out] + mode
    with pytest.raises(misc.UserError, match="holds weights that are not finite .generator.blocks.0.attn.qkv") as e:
        main_fractalgen.main(parse(argv))
    assert one_line(e) and not os.path.exists(out)


def test_load_model_refuses_non_finite_weights(diverged):
    from util.sampling import load_model
    with pytest.raises(misc.UserError, match="not finite"):
        load_model(checkpoint.path_in(diverged))


# ----------------------------------------------------------------------------- one run per folder
HOLD_LOCK = "import sys, time; import util.misc as m; m.lock_output_dir(sys.argv[1]); print('locked', flush=True); " \
            "time.sleep(120)"


def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    folder = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, folder], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(misc.UserError, match=f"another run .pid {holder.pid} on .+. is using --output_dir {folder}; wait"):
            misc.lock_output_dir(folder)
    finally:
        holder.kill()
        holder.wait()
    misc.lock_output_dir(folder)  # the dead holder's lock went with it
    misc.release_output_dir(folder)


def test_a_save_removes_only_its_own_temporary_file(tmp_path, monkeypatch):
    """Another writer's temporary file is left alone (a live one would be, before: FileNotFoundError)."""
    path = checkpoint.path_in(str(tmp_path))
    other = path + ".tmp.999999"
    open(other, "wb").write(b"another writer's bytes")
    checkpoint.atomic_save({"model": {}}, path)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-last.pth", "checkpoint-last.pth.tmp.999999"]
    misc.remove_stale_temporaries(str(tmp_path), [checkpoint.NAME])  # what a run does once it holds the lock
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]


# ----------------------------------------------------------------------------- SIGTERM, SIGINT
def signal_on_call(monkeypatch, target, name, call_number, signum):
    """Send `signum` to this process during target.name's call_number-th call."""
    real, calls = getattr(target, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call_number:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    monkeypatch.setattr(target, name, wrapped)


def test_signals_save_at_the_step_boundary_and_resume_exactly(data, tmp_path, monkeypatch, capfd):
    """24 images, batch 8: 3 steps per epoch. SIGTERM during epoch 0's second step saves after it (resume
    at step 2); SIGINT during the last step of epoch 0 saves the finished epoch. Both resume to the same
    weights, bit for bit, as a run never stopped."""
    argv = train_argv(data, "OUT", "--epochs", "2")
    whole = str(tmp_path / "whole")
    main_fractalgen.main(parse([whole if a == "OUT" else a for a in argv]))
    for signum, call, resume_at, epoch in [(signal.SIGTERM, 2, {"epoch": 0, "step": 2, "consumed": 16}, -1),
                                           (signal.SIGINT, 3, None, 0)]:
        out = str(tmp_path / signal.Signals(signum).name)
        run_argv = [out if a == "OUT" else a for a in argv]
        with monkeypatch.context() as m:
            signal_on_call(m, engine_fractalgen, "apply_gradients", call, signum)
            with pytest.raises(stop.Stopped) as e:
                main_fractalgen.main(parse(run_argv))
        assert e.value.exit_code == {signal.SIGTERM: 143, signal.SIGINT: 130}[signum]
        assert str(e.value) == (f"stopped by {signal.Signals(signum).name} in epoch 0 after {call} of 3 steps: saved "
                                f"{checkpoint.path_in(out)}; run the same command with --resume {out} to continue")
        ckpt = checkpoint.load(checkpoint.path_in(out))
        assert ckpt["epoch"] == epoch and ckpt.get("resume_at") == resume_at
        assert signal.getsignal(signum) is not stop._on_signal  # handlers put back
        main_fractalgen.main(parse(run_argv))
        a, b = weights(whole), weights(out)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert "SIGINT received: stopping at the next safe point" in capfd.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds worker pids in /proc")
@pytest.mark.parametrize("sharding", [[], ["--fsdp", "--sharded_checkpoint"]], ids=["ddp", "fsdp_sharded"])
def test_torchrun_sigterm_to_one_worker_stops_both_with_a_step_checkpoint(data, tmp_path, sharding):
    """SIGTERM to one of two gloo workers: both agree (all-reduce) to stop after the same step, rank 0
    saves a step checkpoint (under --fsdp --sharded_checkpoint each rank its shards) and prints one line,
    both exit 143; the run then resumes and finishes (in one process, without --fsdp)."""
    out = str(tmp_path / "out")
    log_path = tmp_path / "log.txt"
    log = open(log_path, "w+")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_fractalgen.py"]
    argv = MODEL_ARGS + ["--data_path", data, "--output_dir", out, "--resume", out, "--batch_size", "2",
                         "--epochs", "2", "--warmup_epochs", "1", "--save_last_freq", "100"]
    agent = subprocess.Popen(cmd + argv + sharding, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Epoch [0] [1/6]" not in open(log_path).read() and time.time() < deadline and agent.poll() is None:
            time.sleep(0.1)
        workers = open(f"/proc/{agent.pid}/task/{agent.pid}/children").read().split()
        assert len(workers) == 2
        os.kill(int(workers[1]), signal.SIGTERM)
        agent.wait(timeout=120)
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        agent.wait()
        log.seek(0)
        output = log.read()
    assert output.count("stopped by SIGTERM in epoch 0 after ") == 1, output[-3000:]
    assert "exitcode  : 143" in output, output[-3000:]  # torchrun's report of the workers
    ckpt = (checkpoint.load_sharded_progress(os.path.join(out, checkpoint.SHARDED)) if sharding else
            checkpoint.load(checkpoint.path_in(out)))
    step = ckpt["resume_at"]["step"]
    assert ckpt["epoch"] == -1 and ckpt["resume_at"] == {"epoch": 0, "step": step, "consumed": step * 4}
    assert f"after {step} of 6 steps" in output
    main_fractalgen.main(parse(argv))  # continues (in one process, so without the two ranks' random state)
    assert checkpoint.load(checkpoint.path_in(out))["epoch"] == 1


def test_signals_outside_a_safe_section():
    """Outside training and generation, SIGTERM stops at once with exit code 143 (once installed, as the CLI
    does) and Ctrl-C is a KeyboardInterrupt; inside, a second Ctrl-C stops at once."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop.install()
        with pytest.raises(stop.Stopped, match="stopped by SIGTERM") as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert e.value.exit_code == 143
        with pytest.raises(KeyboardInterrupt):
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
                assert stop.requested() == signal.SIGINT
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def generate(trained, out, *extra):
    pngs, args = generate_pngs(trained, out, "--gen_bsz", "2", *extra)
    return png_folder.folder_of(args), pngs


def test_generation_stops_between_batches_keeping_its_images(trained, tmp_path, monkeypatch):
    _, whole = generate(trained, str(tmp_path / "whole"))
    out = str(tmp_path / "out")
    with monkeypatch.context() as m:
        signal_on_call(m, png_folder, "write_png", 3, signal.SIGTERM)  # inside batch 2 of 3
        with pytest.raises(stop.Stopped, match="stopped by SIGTERM: the images written so far are kept in") as e:
            generate(trained, out)
    assert e.value.exit_code == 143
    folder = png_folder.folder_of(parse(MODEL_ARGS + ["--output_dir", out, "--num_images", "6",
                                                                     "--num_iter_list", "2,2"]))
    assert sorted(f for f in os.listdir(folder) if f.endswith(".png")) == [f"{i:05d}.png" for i in range(4)]
    assert generate(trained, out)[1] == whole


# ----------------------------------------------------------------------------- --resume
def resume_case(tmp_path, resume, training=True):
    out = str(tmp_path / "out")
    args = parse(MODEL_ARGS + ["--output_dir", out, "--resume", resume.replace("OUT", out)] +
                 ([] if training else ["--evaluate_nll"]))
    return checkpoint.to_resume(args, training)


@pytest.mark.parametrize("resume,training,message", [
    ("/nonexistent/run", True, "no checkpoint-last.pth in --resume /nonexistent/run .no such folder.; point"),
    ("FILE", True, "is a file; pass the folder that holds checkpoint-last.pth"),
    ("EMPTY", True, "no checkpoint-last.pth in --resume .*empty; point --resume at the folder"),
    ("OUT", False, "evaluation needs a trained model: no checkpoint-last.pth in --resume"),
])
def test_resume_that_names_nothing_is_an_error(tmp_path, resume, training, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    resume = {"FILE": str(tmp_path / "file"), "EMPTY": str(tmp_path / "empty")}.get(resume, resume)
    with pytest.raises(misc.UserError, match=message) as e:
        resume_case(tmp_path, resume, training)
    assert one_line(e)


def test_resume_naming_the_output_dir_of_a_fresh_run_starts_it(tmp_path, capsys):
    assert resume_case(tmp_path, "OUT") == (None, None)
    assert "No checkpoint-last.pth in --resume" in capsys.readouterr().out
    assert resume_case(tmp_path, "OUT/") == (None, None)  # the same folder, spelled another way


# ----------------------------------------------------------------------------- disk full
def fill_disk_after(nbytes):
    """A torch.save / Image.save stand-in that writes some bytes, then fails as a full disk does."""
    def save(obj, f, *args, **kwargs):
        f.write(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = checkpoint.path_in(str(tmp_path))
    checkpoint.atomic_save({"model": {"w": torch.ones(3)}, "epoch": 1}, path)
    before = open(path, "rb").read()
    monkeypatch.setattr(torch, "save", fill_disk_after(1000))
    with pytest.raises(misc.UserError, match=f"disk full while writing {path}: free space in {tmp_path} ") as e:
        checkpoint.atomic_save({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    assert one_line(e) and open(path, "rb").read() == before and os.listdir(tmp_path) == [checkpoint.NAME]
    monkeypatch.undo()

    def fsync(fd):  # network file systems report a full disk here
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(misc.UserError, match="disk full while writing .*results.json"):
        misc.update_results(str(tmp_path), nll={"bpd": 1.0})
    assert os.listdir(tmp_path) == [checkpoint.NAME]


def test_disk_full_while_training_stops_with_one_line(data, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    main_fractalgen.main(parse(train_argv(data, out, "--epochs", "1")))
    before = open(checkpoint.path_in(out), "rb").read()
    monkeypatch.setattr(torch, "save", fill_disk_after(5000))
    with pytest.raises(misc.UserError, match=f"disk full while writing {checkpoint.path_in(out)}: free space in ") as e:
        main_fractalgen.main(parse(train_argv(data, out, "--epochs", "2")))
    assert one_line(e) and open(checkpoint.path_in(out), "rb").read() == before
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_disk_full_while_writing_images(trained, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    real_save, calls = Image.Image.save, [0]

    def save(self, fp, *args, **kwargs):
        calls[0] += 1
        return (fill_disk_after(10) if calls[0] == 3 else real_save)(self, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save)
    message = r"disk full while writing .*00002.png: free space in .*image6-res16 "
    with pytest.raises(misc.UserError, match=message) as e:
        generate(trained, out)
    assert one_line(e)
    folder = os.path.dirname(str(e.value).split("writing ")[1].split(":")[0])
    assert sorted(os.listdir(folder)) == ["00000.png", "00001.png", "generation.json"]


# ----------------------------------------------------------------------------- flags
BAD_FLAGS = [  # (arguments, message fragment)
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--batch_size", "-3"], "--batch_size must be at least 1"),
    (["--epochs", "-1"], "--epochs must be zero or more"),
    (["--epochs", "0"], "--epochs 0 trains nothing"),
    (["--save_last_freq", "0"], "--save_last_freq must be at least 1"),
    (["--eval_freq", "0"], "--eval_freq must be at least 1"),
    (["--save_every_steps", "-1"], "--save_every_steps must be zero or more"),
    (["--print_freq", "0"], "--print_freq must be at least 1"),
    (["--num_workers", "-1"], "--num_workers must be zero or more"),
    (["--evaluate_gen", "--gen_bsz", "-4"], "--gen_bsz must be a positive integer or auto, got '-4'"),
    (["--evaluate_gen", "--num_images", "0"], "--num_images must be at least 1"),
    (["--evaluate_nll", "--nll_bsz", "0"], "--nll_bsz must be at least 1"),
    (["--nll_forward_number", "0"], "--nll_forward_number must be at least 1"),
    (["--class_num", "0"], "--class_num must be at least 1"),
    (["--img_size", "0"], "--img_size must be at least 1"),
    (["--num_conds", "0"], "--num_conds must be at least 1"),
    (["--warmup_epochs", "-1"], "--warmup_epochs must be zero or more"),
    (["--start_epoch", "-2"], "--start_epoch must be zero or more"),
    (["--seed", "-1"], "--seed must be zero or more"),
    (["--seed", str(2 ** 40)], "--seed must be below"),
    (["--num_iter_list", "0,2"], "--num_iter_list must have every entry at least 1"),
    (["--num_iter_list", "4,"], "comma-separated integers"),
    (["--num_iter_list", ""], "comma-separated integers"),
    (["--blr", "nan"], "--blr must be a finite number > 0, got nan"),
    (["--blr", "0"], "--blr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "-0.0001"], "--lr must be a finite number > 0"),
    (["--min_lr", "-1"], "--min_lr must be a finite number >= 0"),
    (["--weight_decay", "nan"], "--weight_decay must be a finite number >= 0"),
    (["--cfg", "inf"], "--cfg must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number > 0"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--filter_threshold", "2"], "--filter_threshold must be in [0, 1]"),
    (["--label_drop_prob", "1.5"], "--label_drop_prob must be in [0, 1]"),
    (["--grad_clip", "nan"], "--grad_clip must be a finite number >= 0"),
    (["--attn_dropout", "1"], "--attn_dropout must be in [0, 1)"),
    (["--proj_dropout", "-0.1"], "--proj_dropout must be in [0, 1)"),
    (["--r_weight=-inf"], "--r_weight must be a finite number >= 0"),
    (["--device", "foo"], "--device 'foo' is not a device name"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--output_dir", "FILE"], "is a file, not a folder"),
    (["--log_dir", "FILE"], "is a file, not a folder; choose another --log_dir"),
    (["--output_dir", "FILE/run"], "is a file, so the folder cannot be made"),
    (["--output_dir", ""], "--output_dir is empty"),
    (["--start_epoch", "5", "--epochs", "3"], "--start_epoch 5 is not below --epochs 3"),
    (["--fid_inception_weights", "/nonexistent.pth"], "does not exist"),
]


@pytest.mark.parametrize("extra,message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_before_anything_is_written(data, tmp_path, extra, message):
    out = str(tmp_path / "out")
    (tmp_path / "file").write_text("a file")
    extra = [a.replace("FILE", str(tmp_path / "file")) for a in extra]
    argv = MODEL_ARGS + ["--data_path", data, "--output_dir", out, "--resume", out] + extra
    before = open(tmp_path / "file").read()
    with pytest.raises(misc.UserError, match=re.escape(message)) as e:
        main_fractalgen.main(parse(argv))
    assert one_line(e)
    assert not os.path.exists(out) and open(tmp_path / "file").read() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line():
    with pytest.raises(misc.UserError, match="--device cuda: no cuda device on this machine"):
        main_fractalgen.check_args(parse(MODEL_ARGS + ["--device", "cuda"]))


def test_cli_answers_a_flag_argparse_refuses_with_one_line_and_exit_2(tmp_path):
    """(A UserError's path through the CLI is tested in test_crash_safety.py.)"""
    out = str(tmp_path / "out")
    result = run(MODEL_ARGS + ["--output_dir", out, "--batch_size", "two"])
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("error: --batch_size must be an integer, got 'two' (see --help)")
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------- images
@pytest.mark.parametrize("as_error", [False, True], ids=["bomb-error", "bomb-warning-as-error"])
def test_image_that_does_not_decode_as_rgb_is_skipped(tmp_path, monkeypatch, as_error):
    """Pillow refuses images over 2 × MAX_IMAGE_PIXELS (DecompressionBombError) and warns above it
    (DecompressionBombWarning, an error under -W error): both are skipped with a warning naming the file."""
    root = write_image_folder(str(tmp_path / "data"), per_class=(2, 1))  # 20×20 images
    big = os.path.join(root, "train", "class1", "0.png")
    Image.new("RGB", (40, 40)).save(big)  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000 if as_error else 700)  # the 20×20 ones pass
    dataset = image_folder(root, "train", 16, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if as_error:
            warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
        images = [dataset[i] for i in range(len(dataset))]
    skipped = [str(w.message) for w in caught if "skipping image" in str(w.message)]
    assert len(skipped) == 1 and big in skipped[0] and "DecompressionBomb" in skipped[0]
    assert all(img.shape == (3, 16, 16) for img, _ in images)
