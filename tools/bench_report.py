#!/usr/bin/python3
"""Helpers for tools/bench.sh.

  bench_report.py synth PATH N_TOKENS VOCAB   write a synthetic llm.c token file
  bench_report.py lrllm-metrics METRICS_H5    lrllm's rate and peak memory from a run's metrics.h5, as JSON
  bench_report.py report OUT_DIR              the side-by-side table, printed and written to OUT_DIR/bench.md
"""

import argparse
import json
import os
import re
import statistics
import sys

WARMUP_STEPS = 2  # left out of every median: page faults, allocator and thread-pool warm-up
NOISY_CORES = 0.25  # other processes' average CPU use during a run above which its timing is flagged


def synth(path, n_tokens, vocab):
    import numpy as np

    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, n_tokens)
    rng = np.random.default_rng(1337)
    tokens = rng.integers(0, vocab, size=n_tokens, dtype=np.int64).astype(np.uint16)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())


def lrllm_metrics(path):
    import h5py

    with h5py.File(path, "r") as f:
        tps = [float(x) for x in f["/metrics/tokens_per_s"][:]]
        peak = [float(x) for x in f["/metrics/mem_peak"][:]]
        step_ms = [float(x) for x in f["/metrics/step_ms"][:]]
    timed = tps[WARMUP_STEPS:] or tps
    print(json.dumps({
        "tokens_per_s": statistics.median(timed),
        "step_ms": statistics.median(step_ms[WARMUP_STEPS:] or step_ms),
        "steps": len(tps),
        "peak_rss_bytes": max(peak),
    }))


def model_flops_per_token(L, D, T, V, rank):
    """6 x (matmul weights, the tied lm_head's V*d included) + 12*L*T*d for attention's full T x T products."""
    F = 4 * D
    sites = [(D, 3 * D), (D, D), (D, F), (F, D)]  # (in, out): qkv, proj, fc, mlp proj
    linear = sum(rank * (i + o) if rank > 0 else i * o for i, o in sites) * L
    return 6 * (linear + V * D) + 12 * L * T * D, linear


def read_sgemm(path):
    core, alt_core, rates, alt_square = None, None, {}, None
    with open(path) as f:
        for line in f:
            p = line.split()
            if not p:
                continue
            if p[0] == "openblas":
                core = p[1]
            elif p[0] == "openblas-native":
                alt_core = p[1]
            elif p[0] == "sgemm":
                rates[p[1]] = (tuple(int(x) for x in p[2:5]), float(p[8]))
            elif p[0] == "sgemm-native":
                alt_square = float(p[8])
    return core, rates, alt_core, alt_square


def lrllm_params(log_path):
    with open(log_path) as f:
        m = re.search(r"parameters: total (\d+)", f.read())
    return int(m.group(1)) if m else None


def cpu_name():
    """The CPU's model name and its widest vector extension: every table says which CPU it comes from."""
    name, flags = "an unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "an unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({os.cpu_count()} cores, {vector})"


def report(out, threads, steps):
    raw = os.path.join(out, "raw")
    core, sgemm, alt_core, alt_square = read_sgemm(os.path.join(raw, "sgemm.txt"))
    square = sgemm["square"][1]
    header = ["shape", "kind", "params", "lrllm tok/s", "torch tok/s", "ratio", "lrllm GFLOP/s", "% sgemm",
              "% cls sgemm", "lrllm peak MB", "torch peak MB"]
    rows, notes, torch_info = [], [], None
    with open(os.path.join(raw, "manifest.txt")) as f:
        manifest = [line.split() for line in f if line.strip()]
    for label, kind, L, H, D, T, B, rank, V in manifest:
        L, H, D, T, B, rank, V = map(int, (L, H, D, T, B, rank, V))
        tag = f"{label}-{kind}"
        with open(os.path.join(raw, f"{tag}-lrllm.json")) as f:
            lr = json.load(f)
        with open(os.path.join(raw, f"{tag}-torch.json")) as f:
            pt = json.load(f)
        torch_info = pt
        for who in ("lrllm", "torch"):
            try:
                with open(os.path.join(raw, f"{tag}-{who}.other")) as f:
                    other = float(f.read())
            except (OSError, ValueError):
                continue
            if other > NOISY_CORES:
                notes.append(f"{tag}: other processes kept {other:.2f} cores busy during the {who} run; "
                             "its timing is unreliable, rerun on a quiet machine")
        params = lrllm_params(os.path.join(raw, f"{tag}-lrllm.log"))
        if params is not None and params != pt["params"]:
            notes.append(f"{tag}: parameter counts differ (lrllm {params}, PyTorch {pt['params']})")
        flops, _ = model_flops_per_token(L, D, T, V, rank)
        if kind == "llama":  # its widths differ from GPT-2's: count its linear weights as PyTorch holds them
            flops = 6 * (pt["linear_weights"] + V * D) + 12 * L * T * D
        gflops = flops * lr["tokens_per_s"] / 1e9
        cls = sgemm.get(f"cls-{label}", (None, float("nan")))[1]
        kind_name = "llama dense" if kind == "llama" else f"lowrank r{rank}" if rank else "dense"
        rows.append([label, kind_name, f"{(params or pt['params']) / 1e6:.2f}M", f"{lr['tokens_per_s']:.0f}",
                     f"{pt['tokens_per_s']:.0f}", f"{lr['tokens_per_s'] / pt['tokens_per_s']:.2f}x",
                     f"{gflops:.1f}", f"{100 * gflops / square:.0f}%", f"{100 * gflops / cls:.0f}%",
                     f"{lr['peak_rss_bytes'] / 1e6:.0f}", f"{pt['peak_rss_bytes'] / 1e6:.0f}"])

    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    table = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]

    lines = [f"# lrllm vs PyTorch, CPU, {threads} threads, measured on {cpu_name()}",
             "",
             f"{steps} steps per run; tokens/s is the median over steps after the first {WARMUP_STEPS}.",
             f"sgemm (OpenBLAS kernels `{core}`, {threads} threads): {square:.1f} GFLOP/s on "
             f"{sgemm['square'][0][0]}^3; " +
             ", ".join(f"{v[1]:.1f} GFLOP/s on {k[4:]}'s lm_head {v[0][0]}x{v[0][1]}x{v[0][2]}"
                       for k, v in sgemm.items() if k.startswith("cls-")) + ".",
             "Model FLOPs/token = 6 x (linear weights + vocab x d) + 12 x L x T x d; "
             "'% sgemm' divides lrllm's rate by the square sgemm rate, '% cls sgemm' by the lm_head shape's."]
    with open(os.path.join(raw, "coretype.txt")) as f:
        lines.append(f"OpenBLAS: {f.read().strip()}.")
    if alt_square is not None:
        lines.append(f"OpenBLAS's own `{alt_core}` kernels run the square sgemm at {alt_square:.1f} GFLOP/s "
                     f"({square / alt_square:.1f}x slower).")
    if torch_info:
        lines.append(f"PyTorch {torch_info['torch_version']}, eager nn.Module code (no torch.compile), "
                     f"attention: {torch_info['attention']}, torch.set_num_threads({torch_info['threads']}).")
    lines += ["", *table]
    if notes:
        lines += ["", *(f"WARNING: {n}" for n in notes)]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(text + "\n")


def main():
    ap = argparse.ArgumentParser(description="helpers for tools/bench.sh")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth")
    s.add_argument("path")
    s.add_argument("n_tokens", type=int)
    s.add_argument("vocab", type=int)
    m = sub.add_parser("lrllm-metrics")
    m.add_argument("path")
    r = sub.add_parser("report")
    r.add_argument("out")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--steps", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "synth":
        synth(args.path, args.n_tokens, args.vocab)
    elif args.cmd == "lrllm-metrics":
        lrllm_metrics(args.path)
    else:
        report(args.out, args.threads, args.steps)


if __name__ == "__main__":
    sys.exit(main())
