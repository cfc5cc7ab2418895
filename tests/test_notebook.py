"""demo/run_fractalgen.ipynb runs headless against a tiny checkpoint and shows the samples and edits."""
import base64
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main_fractalgen
import util.misc as misc
from models.fractalgen import build_model
from util.sampling import load_model

nbformat = pytest.importorskip("nbformat", reason="pip install -r requirements-test.txt")
nbclient = pytest.importorskip("nbclient", reason="pip install -r requirements-test.txt")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "demo", "run_fractalgen.ipynb")


def tiny_checkpoint(path, with_args=True):
    """A checkpoint as main_fractalgen.py writes it, of a tiny untrained 3-class model."""
    args = main_fractalgen.parse_args(
        ["--model", "fractalmar_tiny_in16", "--img_size", "16", "--class_num", "3", "--num_conds", "5",
         "--guiding_pixel", "--num_iter_list", "2,2"])
    torch.manual_seed(0)
    model = build_model(args.model, class_num=3, num_conds=5, guiding_pixel=True)
    ckpt = {"model": model.state_dict(), "epoch": 0, **({"args": args} if with_args else {})}
    torch.save(ckpt, path)
    return str(path)


def run_notebook(**parameters):
    """Execute the notebook from demo/ with `parameters` set after its parameters cell (as papermill does)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    overrides = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(overrides))
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    return nb


def test_notebook_samples_from_a_local_checkpoint(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "checkpoint-last.pth")
    saved = tmp_path / "grid.png"
    nb = run_notebook(checkpoint_path=ckpt, class_labels=[0, 2, 1], samples_per_class=2, num_iter_list="",
                      cfg=2.0, temperature=1.0, seed=3, upscale=2, save_to=str(saved))
    pngs = [out["data"]["image/png"] for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(pngs) == 2, "the notebook should show one picture of samples and one of edits"
    shown, edited = (np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")) for png in pngs)
    assert shown.shape == (2 + 3 * 34, 2 + 2 * 34, 3)  # 3 classes × 2 samples, 16×16 upscaled ×2, padded
    assert np.array_equal(shown, np.asarray(Image.open(saved)))
    assert shown[2:34, 2:34].std() > 10  # samples, not a blank
    # the edit section: the first sample, its right half regenerated under classes 0 and 2, 4 edits each
    assert edited.shape == (2 + 2 * 34, 2 + 6 * 34, 3)  # input, mask, 4 edits per row
    tile = lambda row, col: edited[2 + 34 * row:34 * (row + 1), 2 + 34 * col:34 * (col + 1)]  # noqa: E731
    assert np.array_equal(tile(0, 0), shown[2:34, 2:34])  # the input is the first sample
    for row in range(2):
        for col in range(2, 6):
            assert np.array_equal(tile(row, col)[:, :16], tile(0, 0)[:, :16])  # the known left half, as given
    text = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert "fractalmar_tiny_in16" in text and "num_iter_list 2,2" in text  # settings read from the checkpoint
    assert "cfg 2.0 (linear), temperature 1.0" in text  # given, then the checkpoint's own
    assert "2 steps shown as they were generated" in text  # the live view, redrawn after each outer step
    sources = "\n".join(cell.source for cell in nb.cells)
    assert ".cuda()" not in sources and "torch.cuda.is_available()" in sources


@pytest.mark.parametrize("local, message", [(True, "no checkpoint at .*Quick start"),
                                            (False, "cannot reach .*offline.*fractalmar_in64/checkpoint-last.pth")])
def test_notebook_says_what_to_do_without_a_checkpoint(tmp_path, local, message):
    """A local path that does not exist, or a released model that cannot be downloaded (a URL where
    nothing listens stands in for the recorded one: tests stay offline)."""
    parameters = dict(checkpoint_path=str(tmp_path / "nowhere.pth")) if local else \
        dict(checkpoint_path="", model_name="fractalmar_in64", download_dir=str(tmp_path),
             checkpoint_url="http://127.0.0.1:9/checkpoint-last.pth")
    with pytest.raises(nbclient.exceptions.CellExecutionError, match=message):
        run_notebook(**parameters)


def test_load_model_needs_a_name_without_args(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "bare.pth", with_args=False)
    with pytest.raises(misc.UserError, match="pass model_name, one of fractalar_in64"):
        load_model(ckpt)
    model, settings = load_model(tiny_checkpoint(tmp_path / "full.pth"))
    assert settings == dict(model="fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True,
                            num_iter_list="2,2", cfg=1.0, cfg_schedule="linear", temperature=1.0, filter_threshold=1e-4,
                            seed=0, img_size=16, weights="raw")
    assert not model.training
