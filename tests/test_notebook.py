"""demo/run_fractalgen.ipynb run headless as Colab runs it: alone in an empty folder (its first cell clones
the repository from a local URL, offline) and inside a checkout, on the CPU with a tiny checkpoint,
through the sampling and editing sections; its setup failures are one line each."""
import base64
import importlib
import importlib.metadata
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import main_fractalgen
import models
import util.misc as misc
from models.fractalgen import build_model
from util.sampling import load_model

nbformat = pytest.importorskip("nbformat", reason="pip install -r requirements-test.txt")
nbclient = pytest.importorskip("nbclient", reason="pip install -r requirements-test.txt")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "demo", "run_fractalgen.ipynb")
# the sampling and editing settings of the runs that draw pictures: 3 classes, 16x16 upscaled x2; 2 edits of
# the first sample under each of 2 classes
DRAW = dict(class_labels=[0, 2, 1], samples_per_class=1, num_iter_list="", cfg=2.0, temperature=1.0, seed=3,
            upscale=2, edit_mask="right", edit_classes=[0, 2], edit_samples=2)


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


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A git repository holding this working tree's files (tracked and untracked, not ignored), committed:
    what the notebook clones from a file:// URL, as Colab clones the published repository."""
    try:
        listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "-co", "--exclude-standard"],
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs git and a git checkout of the project")
    repo = tmp_path_factory.mktemp("origin")
    for name in filter(None, listed):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(repo / name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), repo / name)
    git = ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "the tree under test"]):
        subprocess.run(git + command, check=True)
    return repo


def set_fields(cells, **fields):
    """Set form fields in `cells` (in place), as Colab's forms do: each `name = ...  #@param` line gets
    the new value."""
    for name, value in fields.items():
        pattern = re.compile(rf"^{name} = .*?(  #@param.*)$", re.M)
        holding = [cell for cell in cells if cell.cell_type == "code" and pattern.search(cell.source)]
        assert len(holding) == 1 and len(pattern.findall(holding[0].source)) == 1, f"one form field {name}"
        holding[0].source = pattern.sub(lambda m: f"{name} = {value!r}{m[1]}", holding[0].source)


def with_fields(**fields):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    set_fields(nb.cells, **fields)
    return nb


def run(nb, folder, reruns=()):
    """Execute `nb` with `folder` as its working directory; then, in the same kernel, run again the cell
    holding each dict of fields in `reruns`, with them set (as after editing a form). Returns the
    notebook with its outputs and the cells run again with theirs."""
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(folder)}})
    again = []
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        for fields in reruns:
            cells = [nbformat.from_dict(dict(cell, outputs=[])) for cell in nb.cells]
            set_fields(cells, **fields)
            (cell, index), = [(c, i) for i, c in enumerate(cells) if c.source != nb.cells[i].source]
            try:
                client.execute_cell(cell, index)
            except nbclient.exceptions.CellExecutionError:
                pass  # what it said is in its outputs
            again.append(cell)
    return (nb, again) if reruns else nb


def alone(tmp_path, **fields):
    """The notebook with `fields` set, alone in an empty folder (as Colab's /content): (nb, the folder)."""
    content = tmp_path / "content"
    content.mkdir()
    nb = with_fields(**fields)
    nbformat.write(nb, content / "run_fractalgen.ipynb")
    return nb, content


def texts(nb):
    return "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))


def pictures(nb):
    pngs = [out["data"]["image/png"] for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")) for png in pngs]


def check_samples_and_edits(nb, saved):
    """DRAW's samples (one row per class) and edits (the first sample's right half regenerated)."""
    shown, edited = pictures(nb)  # one picture of samples, one of edits
    assert shown.shape == (2 + 3 * 34, 2 + 34, 3)  # a row per class, 16x16 upscaled x2, padded
    assert np.array_equal(shown, np.asarray(Image.open(saved)))
    assert shown[2:34, 2:34].std() > 10  # samples, not a blank
    assert edited.shape == (2 + 2 * 34, 2 + 4 * 34, 3)  # per class 0 and 2: input, mask, 2 edits
    tile = lambda row, col: edited[2 + 34 * row:34 * (row + 1), 2 + 34 * col:34 * (col + 1)]  # noqa: E731
    assert np.array_equal(tile(0, 0), shown[2:34, 2:34])  # the input is the first sample
    for row in range(2):
        for col in range(2, 4):
            assert np.array_equal(tile(row, col)[:, :16], tile(0, 0)[:, :16])  # the known left half, as given
        assert not np.array_equal(tile(row, 2)[:, 16:], tile(0, 0)[:, 16:])  # the right half, made anew
    text = texts(nb)
    assert "fractalmar_tiny_in16" in text and "num_iter_list 2,2, cfg 2.0 (linear), temperature 1.0" in text
    assert "2 steps shown as they were generated" in text  # the live view, redrawn after each outer step


def one_line_error(cell):
    """The error `cell` stopped at, checking that it is shown as one line."""
    error, = [out for out in cell.outputs if out.output_type == "error"]
    assert error.traceback == [f"{error.ename}: {error.evalue}"]  # no traceback
    return error.traceback[0]


def test_notebook_alone_clones_the_repository_and_samples(tmp_path, origin, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline: a requirement missing here fails the setup cell, fast
    saved = tmp_path / "grid.png"
    nb, content = alone(tmp_path, repository=f"file://{origin}", checkpoint_path=tiny_checkpoint(tmp_path / "c.pth"),
                        save_to=str(saved), **DRAW)
    check_samples_and_edits(run(nb, content), saved)
    clone = content / "fractalgen"
    assert (clone / "models" / "fractalgen.py").is_file() and (clone / ".git").is_dir()
    assert sorted(os.listdir(content)) == ["fractalgen", "run_fractalgen.ipynb"]
    text = texts(nb)
    assert f"cloned file://{origin} into {clone}" in text
    # everything is installed here, so nothing is, and this torch is the one the kernel imports
    assert f"requirements: all there; kept torch {importlib.metadata.version('torch')}, torchvision" in text
    assert f"torch {torch.__version__} on cpu" in text


def test_notebook_inside_a_checkout_changes_nothing(tmp_path):
    def status():  # every file git sees, ignored ones too (a download, an output), but Python's caches
        listed = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--ignored", "-uall"],
                                capture_output=True, text=True).stdout.splitlines()
        return [line for line in listed if "__pycache__" not in line]
    before = status()
    saved = tmp_path / "grid.png"
    # then the model cell again without a checkpoint: a local path that does not exist, and a released model
    # that cannot be downloaded (a URL where nothing listens stands in for the release's: tests stay offline)
    nb = with_fields(repository="https://example.invalid/unused.git", save_to=str(saved), **DRAW,
                     checkpoint_path=tiny_checkpoint(tmp_path / "c.pth"))
    nb, (missing, offline) = run(
        nb, os.path.join(ROOT, "demo"),
        reruns=[dict(checkpoint_path=str(tmp_path / "nowhere.pth")),
                dict(checkpoint_path="", model_name="fractalmar_in64", download_dir=str(tmp_path / "downloads"),
                     checkpoint_url="http://127.0.0.1:9/checkpoint-last.pth")])
    check_samples_and_edits(nb, saved)
    assert f"inside the checkout {ROOT}: nothing cloned or installed" in texts(nb)
    assert status() == before
    for cell, says in [(missing, "UserError: no checkpoint at .*nowhere.pth: train one with the Quick start"),
                       (offline, "UserError: cannot reach http://127.0.0.1:9/.*offline.*"
                                 "downloads/fractalmar_in64/checkpoint-last.pth")]:
        assert cell.source.startswith("#@title Load the model")
        assert re.match(says, one_line_error(cell))




@pytest.mark.parametrize("case", ["no repository", "clone fails", "install fails"])
def test_notebook_alone_says_in_one_line_why_setup_failed(tmp_path, origin, monkeypatch, case):
    """Opened alone with no repository given, with a URL that cannot be cloned, or with a checkout whose
    requirements cannot be installed (pip offline: no index)."""
    if case == "install fails":
        checkout = tmp_path / "checkout"
        shutil.copytree(origin, checkout)
        with open(checkout / "requirements.txt", "a") as f:
            f.write("fractalgen-no-such-package==0.0\n")
        monkeypatch.setenv("PIP_NO_INDEX", "1")  # the kernel inherits it
    repository = {"no repository": "", "clone fails": f"file://{tmp_path}/nowhere",
                  "install fails": str(tmp_path / "checkout")}[case]
    nb, content = alone(tmp_path, repository=repository)
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        run(nb, content)
    setup, *later = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert not any(cell.outputs for cell in later)  # nothing ran after it
    assert re.fullmatch({
        "no repository": r"SetupError: this notebook is not inside a FractalGen checkout: set `repository` .*",
        "clone fails": r"SetupError: git clone file://.*/nowhere failed: fatal: .*",
        "install fails": r"SetupError: pip could not install fractalgen-no-such-package==0\.0: ERROR: .*"}[case],
        one_line_error(setup))
    if case == "install fails":
        assert "installing fractalgen-no-such-package==0.0 ..." in texts(nb)  # only what is missing


def test_notebook_is_committed_without_outputs_and_device_agnostic():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    sources = "\n".join(cell.source for cell in nb.cells)
    assert ".cuda()" not in sources and "torch.cuda.is_available()" in sources
    assert nb.cells[0].cell_type == "markdown" and code[0].source.startswith("#@title Setup")


def test_an_older_torch_is_refused_by_its_version(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.3.1+cu121")
    with pytest.raises(ImportError, match=r"FractalGen needs torch 2\.4 or newer, found torch 2\.3\.1\+cu121"):
        importlib.reload(models)
    monkeypatch.undo()
    importlib.reload(models)


def test_load_model_needs_a_name_without_args(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "bare.pth", with_args=False)
    with pytest.raises(misc.UserError, match="pass model_name, one of fractalar_in64"):
        load_model(ckpt)
    model, settings = load_model(tiny_checkpoint(tmp_path / "full.pth"))
    assert settings == dict(model="fractalmar_tiny_in16", class_num=3, num_conds=5, guiding_pixel=True,
                            num_iter_list="2,2", cfg=1.0, cfg_schedule="linear", temperature=1.0, filter_threshold=1e-4,
                            seed=0, img_size=16, weights="raw")
    assert not model.training
