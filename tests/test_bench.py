"""benchmarks/bench.py runs end to end on a tiny model: workers, interleaved timing, FLOPs, memory,
the comparison with another checkout (here this one, so the samples must be identical) and the report."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench.py"), "--model", "fractalmar_tiny_in16",
           "--threads", "1", "--repeats", "1", "--batch", "2", "--num_iter_list", "2,2", "--train_batch", "2",
           "--nll_batch", "2", "--compare", REPO, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in ("matmul peak", "img/s", "GFLOP/s", "util", "speedup", "peak MiB", "load average",
                 "same samples for the same seed and weights: True"):
        assert text in proc.stdout, text
    result = json.loads(out.read_text())
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



def test_scaling_level_counts_add_up_to_a_whole_sample():
    """benchmarks/scaling.py counts each level once with a stub below it; the sum must equal the FLOPs of
    sampling whole images."""
    import torch
    from benchmarks.bench import FlopCounter
    from benchmarks.scaling import level_flops, model_kwargs, sample
    from models.fractalgen import build_model
    name = "fractalmar_tiny_in16"
    _, levels = level_flops(name, cfg=4.0, num_iter=[4, 2])
    with torch.device("meta"):
        model = build_model(name, **model_kwargs(name)).eval()
    with FlopCounter() as counter:
        sample(model, 2, [4, 2], 4.0)
    assert sum(flops for _, flops in levels) == counter.total / 2
