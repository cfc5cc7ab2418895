"""The benchmark tools on a tiny model: bench.py end to end (workers, interleaved timing, FLOPs, memory,
the comparison with another checkout, here this one, so the samples must be identical, the report and
the stamped results file), the FLOP counts of scaling.py, breakdown.py, the release stand-ins."""
import ast
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench.py"), "--model", "fractalmar_tiny_in16",
           "--threads", "1", "--repeats", "1", "--batch", "2", "--num_iter_list", "2,2", "--train_batch", "2",
           "--nll_batch", "2", "--compare", REPO, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in ("matmul peak", "img/s", "GFLOP/s", "util", "speedup", "peak MiB",
                 "same samples for the same seed and weights: True"):
        assert text in proc.stdout, text
    result = json.loads(out.read_text())
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    stamp = result["provenance"]
    assert stamp["commit"] == head.stdout.strip() and isinstance(stamp["dirty"], bool)
    assert stamp["torch"] == torch.__version__ and stamp["device"] and stamp["machine"] and stamp["date"]
    assert result["impls"]["ours"].split("+")[0] == stamp["commit"]  # commits, not paths
    assert REPO not in out.read_text()
    assert set(result["times"]) == {"ours", "other"}
    for impl in ("ours", "other"):
        assert set(result["times"][impl]) == {"sample", "train", "train_ckpt", "nll"}
        for task, t in result["times"][impl].items():
            assert 0 < t["min"] <= t["median"] <= t["max"] and t["n"] == 1, task
            assert result["flops"][impl][task] > 0, task
        memory = result["memory"][impl]
        assert memory["train_ckpt"]["bytes"] < memory["train"]["bytes"]  # checkpointing saves activations
    assert result["flops"]["ours"] == result["flops"]["other"]  # the same code counted twice
    assert result["matmul_peak_flops_per_s"]["median"] > 0
    assert result["same_samples"]["identical"]


def test_breakdown_levels_add_up_to_at_most_a_sampling_call(tmp_path):
    """benchmarks/breakdown.py: every level is timed, self times (the levels inside taken out) sum to at
    most the whole call, and the results file is written."""
    from benchmarks import breakdown
    out = tmp_path / "breakdown.json"
    assert breakdown.main(["--model", "fractalmar_tiny_in16", "--threads", "1", "--batch", "2", "--num_iter_list",
                           "2,2", "--json", str(out)]) == 0
    sample = json.loads(out.read_text())["sample"]
    assert [row["calls"] for row in sample["levels"]] == [1, 2, 4]  # 2 steps, 2 steps, then 2 x 2 heads
    assert 0 < sum(row["seconds"] for row in sample["levels"]) <= sample["total_s"]


def test_benchmark_modules_import_no_circle():
    """Each benchmarks/ module imports only the ones below it (measure at the bottom)."""
    imports = {}
    for path in glob.glob(os.path.join(REPO, "benchmarks", "*.py")):
        name = os.path.basename(path)[:-3]
        tree = ast.parse(open(path).read())
        imports[name] = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                         and node.module == "benchmarks" for alias in node.names}
        imports[name] |= {node.module.split(".")[1] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                          and (node.module or "").startswith("benchmarks.")}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n,))) for n in imports.get(start, ()))
    assert imports["bench"] >= {"measure", "workload"} and not imports["measure"]
    assert not [name for name in imports if reaches(name, name)]


def test_scaling_level_counts_add_up_to_a_whole_sample():
    """benchmarks/scaling.py counts each level once with a stub below it; the sum must equal the FLOPs of
    sampling whole images."""
    from benchmarks.measure import FlopCounter
    from benchmarks.scaling import level_flops, model_kwargs, sample
    from models.fractalgen import build_model
    name = "fractalmar_tiny_in16"
    _, levels = level_flops(name, cfg=4.0, steps=[4, 2])
    with torch.device("meta"):
        model = build_model(name, **model_kwargs(name)).eval()
    with FlopCounter() as counter:
        sample(model, 2, [4, 2], 4.0)
    assert sum(flops for _, flops in levels) == counter.total / 2


def test_release_like_head_draws_the_same_pixels_with_more_work():
    """benchmarks/release_like.py: the release's schedule (the whole head sequence again per channel) must
    draw what our cached head draws for the same seed, and cost more FLOPs, or the comparison is void."""
    import copy
    from benchmarks.measure import count_flops
    from benchmarks.release_like import use_release_head
    from models.fractalgen import build_model
    ours = build_model("fractalmar_tiny_in16", class_num=10, num_conds=5).eval()
    release = use_release_head(copy.deepcopy(ours))
    head, release_head = (next(m for m in model.modules() if type(m).__name__ == "PixelLoss")
                          for model in (ours, release))
    cond = torch.randn(2 * 64, head.cond_proj.in_features)  # [conditional; unconditional]

    def draw(h):
        torch.manual_seed(0)
        with torch.no_grad():
            return h.sample([cond], temperature=1.0, cfg=3.0, filter_threshold=1e-4)
    assert torch.allclose(draw(head), draw(release_head), atol=1e-6)
    assert count_flops(lambda: draw(release_head)) > 2 * count_flops(lambda: draw(head))


def test_release_like_head_gives_the_same_loss_with_more_work():
    """The release's 4-token teacher-forced head sequence (benchmarks/release_like.py) must give our
    3-token loss, in training and for the NLL, and cost more FLOPs."""
    import copy
    from benchmarks.measure import count_flops
    from benchmarks.release_like import use_release_head
    from models.fractalgen import build_model
    torch.manual_seed(0)
    ours = build_model("fractalmar_tiny_in16", class_num=10, num_conds=5, r_weight=5.0)
    release = use_release_head(copy.deepcopy(ours))
    images, labels = torch.rand(4, 3, 16, 16) * 2 - 1, torch.arange(4)

    def loss(model, training):
        torch.manual_seed(1)
        with torch.no_grad():
            return model.train(training)(images, labels)
    for training in (True, False):
        assert torch.allclose(loss(ours, training), loss(release, training), rtol=1e-5, atol=1e-6)
        assert count_flops(lambda: loss(release, training)) > count_flops(lambda: loss(ours, training))


@pytest.mark.slow
def test_gpu_check_script_runs_on_tiny_models(tmp_path):
    """benchmarks/gpu_check.sh is run on a lent GPU with no time to debug it: check it here on the CPU."""
    env = dict(os.environ, DEVICE="cpu", QUICK="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "passed" in (tmp_path / "cuda_tests.txt").read_text()
    labels = ["sample_tiny", "train_tiny", "sample_compiled_tiny", "train_compiled_tiny"]
    # the side by side with the release runs where the script finds the release (a checkout beside ../shared)
    has_release = any(os.path.isdir(os.path.join(REPO, p)) for p in ("shared_copy/upstream/fractalgen",
                                                                     "../shared/upstream/fractalgen"))
    for label in labels + ["train_vs_release_tiny"] * has_release:
        assert f"{label}: exit 0" in proc.stdout
        assert json.loads((tmp_path / f"{label}.json").read_text())["times"]["ours"]
    compiled = json.loads((tmp_path / "sample_compiled_tiny.json").read_text())
    assert set(compiled["times"]) == {"ours", "compiled-head"} and compiled["same_samples"]["identical"]
    assert compiled["flops"]["compiled-head"]["sample"] == compiled["flops"]["ours"]["sample"] > 0
    if has_release:
        release = json.loads((tmp_path / "train_vs_release_tiny.json").read_text())
        assert set(release["times"]) == {"ours", "release"}
        assert release["fixed_mask_levels"] == {"ours": 2, "release": 2}
    assert json.loads((tmp_path / "train_compiled_tiny.json").read_text())["compiled"]["ours-compiled"]
    assert (tmp_path / "train_table.md").read_text().count("| fractalmar_tiny_in16") == 2


def test_fixed_mask_ratios_mask_the_same_count_in_every_call():
    """benchmarks/release.py: ours and the release's stand-ins mask ceil(seq_len · r) patches."""
    from benchmarks.release import FixedRatio, NumpyWithFixedCount, fix_mask_ratios
    from models.fractalgen import build_model
    model = build_model("fractalmar_tiny_in16", num_conds=5, class_num=10)
    assert fix_mask_ratios(model, 0.8, 0.5) == 2
    for seed in range(3):
        ranks = torch.argsort(torch.rand(3, 16, generator=torch.Generator().manual_seed(seed)), dim=1)
        assert model.generator.training_mask(ranks).sum(1).tolist() == [13] * 3  # ceil(16 · 0.8)
        assert model.generator.nll_mask(ranks).sum(1).tolist() == [8] * 3
    assert FixedRatio(0.8).rvs(3).tolist() == [0.8] * 3
    numpy = NumpyWithFixedCount(0.5)
    assert numpy.random.randint(16) + 1 == 8 and numpy.ceil(0.2) == 1.0  # the rest is numpy
