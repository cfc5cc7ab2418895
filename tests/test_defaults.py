"""The flags keep the release's names and defaults; mistakes end in one line before anything is written."""

import pytest
import torch

import main_fractalgen
from helpers import run
from models.fractalgen import MODELS

# every flag of the release's main_fractalgen.py and its default there (--device follows the machine here)
RELEASE_DEFAULTS = {
    "batch_size": 64, "epochs": 400, "seed": 0, "resume": "", "start_epoch": 0, "num_workers": 10, "pin_mem": True,
    "model": "fractalmar_in64", "img_size": 64, "num_iter_list": "64,16", "num_images": 50000, "cfg": 1.0,
    "cfg_schedule": "linear", "temperature": 1.0, "filter_threshold": 1e-4, "label_drop_prob": 0.1, "eval_freq": 40,
    "save_last_freq": 5, "online_eval": False, "evaluate_gen": False, "evaluate_nll": False, "gen_bsz": 1024,
    "nll_bsz": 128, "nll_forward_number": 1, "weight_decay": 0.05, "grad_checkpointing": False, "lr": None,
    "blr": 5e-5, "min_lr": 0.0, "lr_schedule": "cosine", "warmup_epochs": 40, "guiding_pixel": False, "num_conds": 1,
    "r_weight": 5.0, "grad_clip": 3.0, "attn_dropout": 0.1, "proj_dropout": 0.1, "data_path": "./data/imagenet",
    "class_num": 1000, "output_dir": "./output_dir", "world_size": 1, "local_rank": -1, "dist_on_itp": False,
    "dist_url": "env://"}


def test_release_flags_keep_their_defaults():
    ours = vars(main_fractalgen.get_args_parser().parse_args([]))
    assert {name: ours.get(name, "MISSING") for name in RELEASE_DEFAULTS} == RELEASE_DEFAULTS
    assert ours["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_help_explains_every_flag_and_lists_the_models():
    parser = main_fractalgen.get_args_parser()
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == []
    text = parser.format_help()
    assert all(name in text for name in MODELS)


def test_demo_is_a_preset_that_resumes_its_own_output_dir():
    args = main_fractalgen.parse_args(["--demo", "--output_dir", "elsewhere"])
    assert args.output_dir == "elsewhere" and args.resume == "elsewhere"
    assert main_fractalgen.parse_args(["--demo"]).resume == main_fractalgen.DEMO_DEFAULTS["output_dir"]
    assert main_fractalgen.parse_args(["--demo", "--resume", "old"]).resume == "old"
    assert main_fractalgen.parse_args(["--dem"]).model == main_fractalgen.DEMO_DEFAULTS["model"]  # abbreviated
    assert main_fractalgen.parse_args([]).resume == ""  # no preset: the release's default


def check(**flags):
    args = main_fractalgen.parse_args([])
    vars(args).update(flags)
    main_fractalgen.check_args(args)
    return args


def test_fp16_on_the_cpu_is_refused():
    with pytest.raises(main_fractalgen.misc.UserError, match="fp16 is for CUDA.*bf16 or fp32"):
        check(device="cpu", precision="fp16")
    assert check(device="cpu", precision="bf16").precision == "bf16"
    assert check(device="cpu").precision == "fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_and_writes_nothing(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    proc = run(["--demo", "--device", "cuda", "--output_dir", str(out), "--data_path", str(data)])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: no cuda device") and "--device cpu" in lines[0]
    assert not out.exists() and not data.exists()
