"""Finetuning memory and speed on GPT-2 124M shapes (part of `make bench`).

Full finetuning (float32 weights, AdamW on every parameter, activations kept) against LoRA over a frozen base
stored as NF4 or int8 with block recomputation, same batch and sequence length, a few steps each. Prints peak
memory (the process's maximum resident set), memory by category, and tokens/s; writes bench-out/finetune.md.

usage: bench_finetune.py BUILD_DIR [--steps N] [--seq-len T] [--batch B]
"""
import argparse
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_report import cpu_name  # noqa: E402 - beside this file

ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def run(cmd):
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"bench_finetune: {' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
    return p.stdout


def metrics(run_dir):
    with h5py.File(os.path.join(run_dir, "metrics.h5"), "r") as f:
        m = {k: f["metrics"][k][:] for k in f["metrics"]}
    tps = m["tokens_per_s"][1:] if len(m["tokens_per_s"]) > 1 else m["tokens_per_s"]
    row = {k: float(np.max(m[k])) for k in m if k.startswith("mem_")}
    row["tokens_per_s"] = float(np.median(tps))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=16)
    a = ap.parse_args()
    lrllm = os.path.join(a.build, "lrllm")
    tmp = tempfile.mkdtemp(prefix="lrllm-ftbench-")
    shape = ["--model.n_layer", "12", "--model.n_head", "12", "--model.d_model", "768", "--model.d_ff", "3072",
             "--model.vocab_size", "50257", "--model.seq_len", str(a.seq_len)]
    tokens = "input/data/pretrain_train.bin"
    tasks = "input/data/tasks/finsent_train.jsonl"
    common = ["--device", "cpu", "--train.steps", str(a.steps), "--train.batch_size", str(a.batch),
              "--train.eval_every", "0", "--train.eval_batches", "1", "--run.log_every", "1"]
    print(f"bench_finetune: GPT-2 124M shapes, T={a.seq_len}, B={a.batch}, {a.steps} steps per run", flush=True)
    base_dir = os.path.join(tmp, "base")
    run([lrllm, "--mode", "pretrain", *shape, "--train.steps", "0", "--train.batch_size", "1",
         "--data.train", tokens, "--run.dir", base_dir])
    base = os.path.join(base_dir, "ckpt_000000.h5")
    runs = [
        ("full finetuning (fp32, AdamW)", [lrllm, "--mode", "pretrain", "--model.init", base, "--data.train", tokens]),
        ("NF4 + LoRA + recompute", [lrllm, "--mode", "finetune", "--model.init", base, "--data.train", tasks,
                                    "--lora.rank", str(a.lora_rank), "--quant.bits", "4",
                                    "--train.recompute", "block"]),
        ("int8 + LoRA + recompute", [lrllm, "--mode", "finetune", "--model.init", base, "--data.train", tasks,
                                     "--lora.rank", str(a.lora_rank), "--quant.bits", "8",
                                     "--train.recompute", "block"]),
        ("fp32 + LoRA (no recompute)", [lrllm, "--mode", "finetune", "--model.init", base, "--data.train", tasks,
                                        "--lora.rank", str(a.lora_rank), "--quant.bits", "0"]),
    ]
    rows = []
    for i, (name, cmd) in enumerate(runs):
        d = os.path.join(tmp, f"run{i}")
        print(f"bench_finetune: {name}", flush=True)
        run([*cmd, *common, "--run.dir", d])
        rows.append((name, metrics(d)))
        subprocess.run(["rm", "-rf", d])
    full = rows[0][1]["mem_peak"]
    lines = ["| run | peak MB | vs full | params MB (trainable / frozen / quantized) | grads MB | optimizer MB "
             "| activations MB | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['mem_peak'] / 1e6:.0f} | {full / r['mem_peak']:.2f}x | {r['mem_params'] / 1e6:.0f} "
            f"({r.get('mem_params_trainable', 0) / 1e6:.1f} / {r.get('mem_params_frozen', 0) / 1e6:.0f} / "
            f"{r.get('mem_params_quantized', 0) / 1e6:.0f}) | {r['mem_grads'] / 1e6:.1f} | {r['mem_optimizer'] / 1e6:.1f} "
            f"| {r['mem_activations'] / 1e6:.0f} | {r['tokens_per_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs("bench-out", exist_ok=True)
    with open("bench-out/finetune.md", "w") as f:
        f.write(f"# Finetuning memory, GPT-2 124M shapes, T={a.seq_len}, B={a.batch}, measured on {cpu_name()}\n\n"
                f"{table}\n")
    subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    main()
