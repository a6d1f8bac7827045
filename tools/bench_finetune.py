"""Finetuning memory and speed on GPT-2 124M shapes (part of `make bench`).

Full finetuning (float32 weights, AdamW on every parameter, activations kept) against LoRA over a frozen base
stored as NF4 or int8 with block recomputation, same batch and sequence length, a few steps each. Prints peak
memory (the process's maximum resident set), memory by category, and tokens/s. Then the demo tasks' finetuning
tokens/s with rows padded to seq_len, to each batch's longest, and packed; and the demo's base and finetuned
scores when runs/demo holds them. Writes bench-out/finetune.md.

usage: bench_finetune.py BUILD_DIR [--steps N] [--seq-len T] [--batch B] [--layout-steps N]
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
    ap.add_argument("--layout-steps", type=int, default=10)
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
    layouts = batch_layouts(lrllm, tmp, a.layout_steps)
    print(layouts)
    scores = demo_scores()
    print(scores)
    os.makedirs("bench-out", exist_ok=True)
    with open("bench-out/finetune.md", "w") as f:
        f.write(f"# Finetuning memory, GPT-2 124M shapes, T={a.seq_len}, B={a.batch}, measured on {cpu_name()}\n\n"
                f"{table}\n\n{layouts}\n\n{scores}\n")
    subprocess.run(["rm", "-rf", tmp])


def batch_layouts(lrllm, tmp, steps):
    """Finetuning tokens/s on the demo tasks with rows padded to seq_len, to each batch's longest, and packed:
    the demo's shape and recipe (NF4 + LoRA + recompute) over a random base, one rank, real tokens counted."""
    shape = ["--model.n_layer", "4", "--model.n_head", "4", "--model.d_model", "128", "--model.d_ff", "512",
             "--model.vocab_size", "50257", "--model.seq_len", "256"]
    base_dir = os.path.join(tmp, "tiny-base")
    run([lrllm, "--mode", "pretrain", *shape, "--train.steps", "0", "--train.batch_size", "1",
         "--data.train", "input/data/pretrain_train.bin", "--run.dir", base_dir])
    lines = [f"# Finetuning batch layouts, demo shape (4 layers, d 128, seq_len 256), NF4 + LoRA 8 + recompute, "
             f"batch 8, {steps} steps, measured on {cpu_name()}", "",
             "| task | examples' mean tokens | pad to seq_len tok/s | pad to longest tok/s | packed tok/s | "
             "longest vs seq_len | packed vs seq_len |", "|---|---|---|---|---|---|---|"]
    for task in ("finsent", "brown-genre", "spam"):
        rates = []
        mean_tokens = 0.0
        for layout in (["--data.padding", "max_length"], ["--data.padding", "longest"], ["--data.packing", "true"]):
            d = os.path.join(tmp, f"layout-{task}-{len(rates)}")
            run([lrllm, "--mode", "finetune", "--model.init", os.path.join(base_dir, "ckpt_000000.h5"),
                 "--data.train", f"input/data/tasks/{task}_train.jsonl", "--lora.rank", "8", "--quant.bits", "4",
                 "--train.recompute", "block", "--device", "cpu", "--train.steps", str(steps),
                 "--train.batch_size", "8", "--train.eval_every", "0", "--train.eval_batches", "1",
                 "--run.dir", d, *layout])
            rates.append(metrics(d)["tokens_per_s"])
            if len(rates) == 2:
                with h5py.File(os.path.join(d, "metrics.h5"), "r") as f:
                    mean_tokens = float(f["metrics"]["tokens_seen"][-1]) / (8 * steps)
            subprocess.run(["rm", "-rf", d])
        lines.append(f"| {task} | {mean_tokens:.0f} | {rates[0]:.0f} | {rates[1]:.0f} | {rates[2]:.0f} | "
                     f"{rates[1] / rates[0]:.2f}x | {rates[2] / rates[0]:.2f}x |")
    return "\n".join(lines)


def demo_scores():
    """The demo's base and finetuned accuracy and weighted F1 per task, from the last `make run`."""
    runs = [("base (pretrained tiny)", "runs/demo/tiny"), ("finetuned", "runs/demo/tiny-finetune")]
    lines = ["# Demo tasks: base and finetuned (from the last `make run`, runs/demo)", "",
             "| model | method | task | accuracy | f1_weighted |", "|---|---|---|---|---|"]
    found = False
    for name, d in runs:
        for method, sub in (("score", ""), ("generate", "eval-generate")):
            path = os.path.join(d, sub, "metrics.h5")
            if not os.path.exists(path):
                continue
            with h5py.File(path, "r") as f:
                if "eval" not in f:
                    continue
                for task in sorted(f["eval"]):
                    g = f["eval"][task]
                    found = True
                    lines.append(f"| {name} | {method} | {task} | {float(g['accuracy'][-1]):.3f} | "
                                 f"{float(g['f1_weighted'][-1]):.3f} |")
    if not found:
        lines.append("| (no runs/demo: run `make run` first) | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
