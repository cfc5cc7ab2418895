"""python -m util.sample: one command from a checkpoint (or a released model's name) to a grid PNG."""
import numpy as np
import pytest
import torch
from PIL import Image

import main_fractalgen
from models.fractalgen import RELEASED, build_model
from util.sample import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint as main_fractalgen.py writes it, of a tiny untrained 3-class model."""
    args = main_fractalgen.parse_args(
        ["--model", "fractalmar_tiny_in16", "--img_size", "16", "--class_num", "3", "--num_conds", "5",
         "--num_iter_list", "2,2", "--cfg", "1.5", "--temperature", "1.3"])
    torch.manual_seed(0)
    model = build_model(args.model, class_num=3, num_conds=5)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "epoch": 0, "args": args}, path)
    return str(path)


def test_grid_from_a_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["--checkpoint", checkpoint, "--classes", "0,2", "--per_class", "3", "--seed", "1", "--device", "cpu",
            "--cfg_schedule", "constant", "--output", str(out)]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "num_iter_list 2,2, cfg 1.5 (constant), temperature 1.3, seed 1" in said  # the checkpoint's, then ours
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 68 + 4, 3 * 68 + 4, 3)  # 2 classes × 3 samples, 16 px upscaled ×4, padded
    assert grid[4:68, 4:68].std() > 10
    again = tmp_path / "again.png"
    assert main(argv[:-1] + [str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), grid)  # the seed fixes the grid
    assert main(argv[:-1] + [str(again), "--seed", "2"]) == 0
    assert not np.array_equal(np.asarray(Image.open(again)), grid)


def test_every_class_by_default_and_mistakes_in_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "all.png"
    assert main(["--checkpoint", checkpoint, "--per_class", "1", "--upscale", "1", "--output", str(out)]) == 0
    assert Image.open(out).size == (1 * 18 + 2, 3 * 18 + 2)
    capsys.readouterr()
    assert main(["--checkpoint", checkpoint, "--classes", "0,3", "--output", str(out)]) == 2
    assert "--classes must lie in [0, 3)" in capsys.readouterr().err
    # a released model's name means its checkpoint in pretrained_models/, fetched from the recorded URL
    monkeypatch.setitem(RELEASED["fractalar_in64"], "url", "http://127.0.0.1:9/x.pth")  # nothing listens: offline
    assert main(["--model", "fractalar_in64", "--download_dir", str(tmp_path), "--classes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fractalar_in64/checkpoint-last.pth" in err and "offline" in err
