"""Where materialized attention beats SDPA on the CPU: the crossover behind CPU_EXPLICIT_MAX_KEYS.

    python benchmarks/attention.py --threads 2 --repeats 31 --json benchmarks/results/attention_cpu.json

For the sequence lengths of every level (the pixel head's 3 tokens, 17-21 for the inner levels, 69 for
fractalmar_small_in32's outer level, 257-261 for the released outer levels), times
torch's scaled_dot_product_attention and models.layers.explicit_attention on q, k, v laid out as the
models make them (strided views of one fused qkv projection): inference, and forward plus backward
with the training dropout. Medians over interleaved repeats; ratio above 1: explicit is faster.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.measure import interleaved, write_results  # noqa: E402
from models.layers import CPU_EXPLICIT_MAX_KEYS, explicit_attention  # noqa: E402

# (label, sequences, heads, queries, keys, head dim, causal); one query: a KV-cached sampling step
SHAPES = [("pixel head, sampling step", 128, 4, 1, 3, 16, False),
          ("pixel head, teacher forced", 4096, 4, 3, 3, 16, True),
          ("AR level, sampling step", 16, 8, 1, 257, 64, False),
          ("AR inner level (fractalar_in64)", 256, 8, 17, 17, 64, True),
          ("MAR inner level (small_in32)", 256, 4, 21, 21, 32, False),
          ("MAR outer level (small_in32)", 16, 4, 69, 69, 64, False),
          ("133 tokens", 8, 8, 133, 133, 64, False),
          ("MAR outer level (in64, base_in256)", 4, 12, 261, 261, 64, False)]


def qkv_views(n, heads, queries, keys, dim, requires_grad=False):
    """q, k, v as (n, heads, tokens, dim) views of a token-major fused projection, as the models have them."""
    qkv = torch.randn(n, keys, 3, heads, dim, requires_grad=requires_grad)
    q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))
    return qkv, (q[:, :, keys - queries:], k, v)


def medians(fns, repeats):
    """Median seconds of each fn, called in turns so that machine noise hits all of them alike."""
    return {name: t["median"] for name, t in interleaved(fns, torch.device("cpu"), repeats).items()}


def inference(n, heads, queries, keys, dim, causal):
    _, (q, k, v) = qkv_views(n, heads, queries, keys, dim)
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        diff = (explicit_attention(q, k, v, causal) - ref).abs().max().item()
    return {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "explicit": lambda: explicit_attention(q, k, v, causal)}, diff


def training(n, heads, tokens, dim, causal, dropout_p):
    qkv, (q, k, v) = qkv_views(n, heads, tokens, tokens, dim, requires_grad=True)

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal).sum().backward(
            retain_graph=True)

    def explicit():
        explicit_attention(q, k, v, causal, dropout_p).sum().backward(retain_graph=True)
    return {"sdpa": sdpa, "explicit": explicit}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows here (measure.write_results)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU, {args.threads} threads, float32, {args.repeats} interleaved repeats; "
          f"models.layers uses explicit attention on the CPU up to {CPU_EXPLICIT_MAX_KEYS} keys")
    print(f"{'shape':36s} {'b×h×q×k×d':>18s}  {'inference ms (sdpa / explicit)':>32s}  "
          f"{'train (MAR: dropout 0.1)':>26s}  max |diff|")
    rows = []
    for label, n, heads, queries, keys, dim, causal in SHAPES:
        fns, diff = inference(n, heads, queries, keys, dim, causal)
        inf = medians(fns, args.repeats)
        rows.append({"shape": label, "b_h_q_k_d": [n, heads, queries, keys, dim], "causal": causal,
                     "inference_s": inf, "max_abs_diff": diff})
        shape = f"{n}×{heads}×{queries}×{keys}×{dim}"
        line = (f"{label:36s} {shape:>18s}  {inf['sdpa'] * 1e3:8.2f} / {inf['explicit'] * 1e3:7.2f} "
                f"= {inf['sdpa'] / inf['explicit']:4.2f}x")
        if queries == keys:  # training: attention dropout 0.1 in the MAR levels, none in the head and AR
            tr = medians(training(n, heads, keys, dim, causal, 0.0 if causal else 0.1), max(3, args.repeats // 3))
            rows[-1]["training_s"] = tr
            line += (f"  {tr['sdpa'] * 1e3:7.1f} / {tr['explicit'] * 1e3:6.1f} "
                     f"= {tr['sdpa'] / tr['explicit']:4.2f}x")
        else:
            line += " " * 28
        print(f"{line}  {diff:.1e}")
    if args.json:
        write_results(args.json, {"threads": args.threads, "repeats": args.repeats,
                                  "cpu_explicit_max_keys": CPU_EXPLICIT_MAX_KEYS, "rows": rows}, "cpu")


if __name__ == "__main__":
    main()
