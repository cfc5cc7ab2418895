"""--evaluate_gen at scale: the progress bar and speed line, --gen_bsz auto and out-of-memory messages."""

import pytest
import torch

import main_fractalgen
from util import png_folder
from util.misc import UserError
from helpers import generate_pngs


def generate(trained, out, *extra):
    """Run --evaluate_gen (cfg 2.0); returns the PNG files' bytes by name and the args after the run."""
    return generate_pngs(trained, out, "--cfg", "2.0", *extra)


def out_of_memory_above(monkeypatch, max_images):
    """Sampling more than `max_images` at once raises torch.OutOfMemoryError, as a full GPU would."""
    real, sizes = png_folder.sample_classes, []

    def sample_classes(model, labels, *args, **kwargs):
        sizes.append(len(labels))
        if len(labels) > max_images:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, labels, *args, **kwargs)
    monkeypatch.setattr(png_folder, "sample_classes", sample_classes)
    return sizes


def test_progress_bar_counts_the_whole_run_and_the_end_line_gives_images_per_second(trained, tmp_path, capsys):
    generate(trained, str(tmp_path / "out"), "--gen_bsz", "4")
    captured = capsys.readouterr()
    bar = captured.err.replace("\r", "\n").splitlines()
    final = [line for line in bar if line.startswith("Generation:")][-1]
    assert "6/6" in final and ("img/s" in final or "s/img" in final) and "100%" in final, captured.err
    assert "images/s per process (1 process(es))" in captured.out
    # a rerun keeps every image: the bar starts full and nothing is generated
    generate(trained, str(tmp_path / "out"), "--gen_bsz", "4")
    captured = capsys.readouterr()
    assert "kept 6 of 6" in captured.out and "images/s" not in captured.out


def test_gen_bsz_auto_halves_on_out_of_memory_and_gives_the_images_of_that_fixed_size(trained, tmp_path,
                                                                                         monkeypatch, capsys):
    fixed, _ = generate(trained, str(tmp_path / "fixed"), "--gen_bsz", "2")
    with monkeypatch.context() as m:
        sizes = out_of_memory_above(m, 2)
        auto, args = generate(trained, str(tmp_path / "auto"), "--gen_bsz", "auto")
    assert sizes[:3] == [6, 4, 2]  # 8 capped to the 6 images, halved to 4, then 2
    assert auto == fixed and len(auto) == 6
    assert "--gen_bsz auto chose 2" in capsys.readouterr().out


def test_gen_bsz_that_does_not_fit_says_what_to_do(trained, tmp_path, monkeypatch):
    out_of_memory_above(monkeypatch, 2)
    with pytest.raises(UserError, match=r"--gen_bsz 4 does not fit in the memory of cpu: pass a smaller "
                                             r"--gen_bsz \(e.g. 2\), or --gen_bsz auto"):
        generate(trained, str(tmp_path / "out"), "--gen_bsz", "4")


def test_gen_bsz_flag_takes_positive_integers_or_auto():
    parse = main_fractalgen.parse_args
    assert parse([]).gen_bsz == 1024 and parse(["--gen_bsz", "64"]).gen_bsz == 64
    assert parse(["--gen_bsz", "auto"]).gen_bsz == "auto"
    for bad in ("0", "-3", "many"):
        with pytest.raises(UserError, match=f"--gen_bsz must be a positive integer or auto, got '{bad}'"):
            parse(["--gen_bsz", bad, "--evaluate_gen"])


@pytest.mark.slow
def test_compile_sampling_flag_compiles_the_heads_and_keeps_the_images(trained, tmp_path, monkeypatch):
    """--compile_sampling head reaches util.sampling.compile_sampling; its graphs run as captured here (the
    inductor build is tested in test_fast_sampling.py's slow tests), so the images must be the same."""
    import functools
    from util.sampling import compile_sampling
    eager, _ = generate(trained, str(tmp_path / "eager"), "--gen_bsz", "3")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(png_folder, "compile_sampling", functools.partial(compile_sampling, backend=backend))
    compiled, _ = generate(trained, str(tmp_path / "compiled"), "--gen_bsz", "3", "--compile_sampling", "head")
    assert graphs and compiled == eager
