"""Llama-2 finetuning memory on the CPU (opt-in part of `make bench`: BENCH_LLAMA=7b, or "7b 13b").

Llama-2 7B (or 13B) shapes with random weights, NF4 + LoRA rank 16 on every linear site + block recomputation
(input/configs/llama2-7b.cfg's recipe), rows of 512 tokens, batch 1, a few steps on random instruction data
of the Llama-2 tokenizer. The base file is exported first, a tensor at a time (the float32 model, 27 GB for
7B, is never built). Prints the peak resident memory of the steps and of the whole process, the export's
peak, and the memory by category lrllm reports, against the NF4 weights' own size; the baseline is the same
run over a 4-block d_model 128 model (process, MPI, OpenBLAS, tokenizer, data), less that model's own
memory. A 7B step takes minutes on two cores. Writes bench-out/llama-SIZE.md.

usage: bench_llama.py BUILD_DIR [--size 7b|13b] [--steps N] [--seq-len T] [--base FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_report import cpu_name  # noqa: E402 - beside this file

ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def timed(cmd, tmp):
    """Runs cmd under /usr/bin/time; returns its stdout, peak resident memory in bytes and wall seconds."""
    peak_file = os.path.join(tmp, "peak.txt")
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", peak_file, *cmd], env=ENV, capture_output=True,
                       text=True)
    seconds = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"bench_llama: {' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
    with open(peak_file) as f:
        peak = int(f.read().split()[-1]) * 1024
    return p.stdout, peak, seconds


def instruction_rows(n, seed, words):
    """Rows of random words: a prompt longer than a row (its left end is cut) and a 128-word answer."""
    rng = np.random.default_rng(seed)
    pick = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
    return [{"instruction": pick(16), "input": pick(600), "output": pick(128)} for _ in range(n)]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def metrics(run_dir):
    with h5py.File(os.path.join(run_dir, "metrics.h5"), "r") as f:
        m = {k: f["metrics"][k][:] for k in f["metrics"]}
    row = {k: float(np.max(m[k])) for k in m if k.startswith("mem_")}
    row["step_s"] = float(np.median(m["step_ms"])) / 1e3
    row["loss"] = [float(x) for x in m["loss"]]
    return row


def accounted(r):
    return r["mem_params"] + r["mem_grads"] + r["mem_optimizer"] + r["mem_activations"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--size", default="7b", choices=["7b", "13b"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--base", help="an NF4 model file of this shape to use instead of exporting one")
    a = ap.parse_args()
    lrllm = os.path.abspath(os.path.join(a.build, "lrllm"))
    cfg = os.path.abspath(f"input/configs/llama2-{a.size}.cfg")
    tiny_cfg = os.path.abspath("input/configs/tiny-llama.cfg")
    tmp = tempfile.mkdtemp(prefix="lrllm-llamabench-")
    cpu = cpu_name()
    print(f"bench_llama: Llama-2 {a.size} shapes, NF4 + LoRA r16 + recompute, T={a.seq_len}, B=1, {a.steps} steps, "
          f"on {cpu}", flush=True)

    base, export_peak, export_s = a.base, None, None
    if base is None:
        base = os.path.join(tmp, "base.h5")
        print("bench_llama: exporting random NF4 weights", flush=True)
        _, export_peak, export_s = timed([lrllm, "--mode", "export", "--config", cfg, "--data.output", base], tmp)
    with open("input/data/tokenizer-llama/tokenizer.json") as f:
        vocab = json.load(f)["model"]["vocab"]
    words = sorted(w[1:] for w in vocab if w.startswith("\u2581") and w[1:].isalpha())
    train = write_jsonl(os.path.join(tmp, "train.jsonl"), instruction_rows(8, 1, words))
    val = write_jsonl(os.path.join(tmp, "val.jsonl"), instruction_rows(1, 2, words))
    common = ["--data.train", train, "--data.val", val, "--model.seq_len", str(a.seq_len), "--data.padding",
              "max_length", "--train.eval_every", "0", "--train.eval_batches", "1", "--run.log_every", "1",
              "--device", "cpu"]

    # The baseline: the same run over a model of a few MB.
    tiny = os.path.join(tmp, "tiny.h5")
    subprocess.run([lrllm, "--mode", "export", "--config", tiny_cfg, "--model.seq_len", str(a.seq_len),
                    "--quant.bits", "4", "--data.output", tiny], env=ENV, check=True, capture_output=True)
    d = os.path.join(tmp, "tiny-run")
    _, tiny_peak, _ = timed([lrllm, "--mode", "finetune", "--config", tiny_cfg, "--model.init", tiny,
                             "--lora.rank", "16", "--quant.bits", "4", "--train.recompute", "block",
                             "--train.steps", "1", "--run.dir", d, *common], tmp)
    baseline = metrics(d)["mem_peak"] - accounted(metrics(d))
    subprocess.run(["rm", "-rf", d])

    print(f"bench_llama: finetuning {a.size}", flush=True)
    d = os.path.join(tmp, "run")
    out, process_peak, _ = timed([lrllm, "--mode", "finetune", "--config", cfg, "--model.init", base,
                                  "--train.steps", str(a.steps), "--run.dir", d, *common], tmp)
    r = metrics(d)
    counts = [line for line in out.splitlines() if line.startswith(("parameters:", "LoRA adapters:", "memory"))]
    nf4 = r["mem_params_quantized"]
    mb = lambda x: f"{x / 1e6:,.0f}"  # noqa: E731
    rows = [("NF4 weights (codes and scales: linear sites, embedding, lm_head)", nf4),
            ("float32 frozen (norms)", r["mem_params_frozen"]),
            ("adapters (LoRA A and B, float32)", r["mem_params_trainable"]),
            ("gradients", r["mem_grads"]),
            ("optimizer (AdamW moments)", r["mem_optimizer"]),
            (f"activations (recompute, T={a.seq_len}: block inputs, one block, logits chunk, tiles)",
             r["mem_activations"]),
            ("baseline (process, MPI, OpenBLAS, tokenizer, data)", baseline)]
    lines = [f"# Llama-2 {a.size} finetuning memory: NF4 + LoRA r16 (all sites) + recompute, T={a.seq_len}, B=1, "
             f"random weights, measured on {cpu}", "", "| | MB |", "|---|---|"]
    lines += [f"| {name} | {mb(v)} |" for name, v in rows]
    lines += [f"| sum of the above | {mb(sum(v for _, v in rows))} |",
              f"| **peak resident memory of the steps** (`mem_peak`) | **{mb(r['mem_peak'])}** "
              f"({r['mem_peak'] / nf4:.2f}x the NF4 weights) |",
              f"| peak of the whole process (`/usr/bin/time`: with validation and the final checkpoint) | "
              f"{mb(process_peak)} |"]
    if export_peak is not None:
        lines.append(f"| export of the NF4 file, a tensor at a time (peak; {export_s:.0f} s) | {mb(export_peak)} |")
    lines += [f"| NF4 model file on disk | {mb(os.path.getsize(base))} |", "",
              f"{a.steps} steps, median {r['step_s']:.0f} s a step (losses {', '.join(f'{x:.3f}' for x in r['loss'])}); "
              f"the tiny-model run behind the baseline peaked at {mb(tiny_peak)} MB.", "", "```", *counts, "```"]
    table = "\n".join(lines)
    print(table)
    os.makedirs("bench-out", exist_ok=True)
    with open(f"bench-out/llama-{a.size}.md", "w") as f:
        f.write(table + "\n")
    subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    main()
