#!/usr/bin/env python3
"""Helpers for tools/bench_gpu.sh (runs on the device machine, with its python3).

  bench_gpu.py jsonl PATH N                  N synthetic instruction examples for lrllm --mode finetune
  bench_gpu.py lrllm RUN_DIR LOG OUT_JSON    lrllm's rate and memory from a run's metrics.h5 and log
  bench_gpu.py report RAW_DIR OUT_MD --gpu NAME --peak TFLOPS [--lrllm-version V] [--torch-warmup N]
                                             the Markdown tables of every part in RAW_DIR, printed and written

RAW_DIR holds, per part (pretrain, finetune), PART.manifest: one line per run,
  TAG SYSTEM LABEL N_LAYER N_HEAD D_MODEL SEQ_LEN VOCAB BATCH RANK LORA_RANK STEPS
and per run TAG.json (its result), TAG.gpumem (MiB nvidia-smi saw in use above the run's start) and, when the
run failed, TAG.err (one line).
"""
import argparse
import json
import os
import random
import re
import statistics
import sys

from bench_report import WARMUP_STEPS, lrllm_params, model_flops_per_token

WORDS = ("revenue profit quarter market shares growth loss guidance margin demand supply costs dividend "
         "outlook investors forecast earnings sales debt cash").split()
LABELS = ("positive", "negative", "neutral")


def jsonl(path, n):
    rng = random.Random(1337)
    with open(path, "w") as f:
        for _ in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(120))
            f.write(json.dumps({"instruction": "What is the sentiment of this news? Answer positive, negative or "
                                "neutral.", "input": text, "output": rng.choice(LABELS)}) + "\n")


def lrllm(run_dir, log, out):
    import h5py
    import numpy as np

    with h5py.File(os.path.join(run_dir, "metrics.h5"), "r") as f:
        m = {k: np.asarray(f["metrics"][k][()], np.float64) for k in f["metrics"]}
    tps = list(m["tokens_per_s"])
    with open(log) as f:
        lora = re.search(r"LoRA adapters: (\d+) trainable", f.read())
    params = lrllm_params(log)
    result = {
        "tokens_per_s": statistics.median(tps[WARMUP_STEPS:] or tps),
        "step_ms": statistics.median(list(m["step_ms"])[WARMUP_STEPS:] or list(m["step_ms"])),
        "steps": len(tps),
        "params": params,
        "trainable_params": int(lora.group(1)) if lora else params,
        # On a device backend mem_peak is the most its allocations held (train.cpp's peak_memory_bytes).
        "peak_alloc_bytes": float(np.nanmax(m["mem_peak"])),
    }
    with open(out, "w") as f:
        json.dump(result, f)
        f.write("\n")


class Run:
    def __init__(self, raw, fields):
        self.tag, self.system, self.label = fields[:3]
        self.L, self.H, self.D, self.T, self.V, self.B, self.rank, self.lora_rank, self.steps = map(int, fields[3:])
        self.result = self.error = None
        self.gpu_mb = None
        base = os.path.join(raw, self.tag)
        if os.path.isfile(base + ".err"):
            with open(base + ".err") as f:
                self.error = f.read().strip()
        elif os.path.isfile(base + ".json"):
            with open(base + ".json") as f:
                self.result = json.load(f)
        else:
            self.error = "no result (interrupted?)"
        if os.path.isfile(base + ".gpumem") and not self.error:  # a failed run's memory means nothing
            with open(base + ".gpumem") as f:
                self.gpu_mb = float(f.read())

    def get(self, key):
        return self.result.get(key) if self.result else None

    def mfu(self, peak):
        flops, _ = model_flops_per_token(self.L, self.D, self.T, self.V, self.rank)
        return flops * self.get("tokens_per_s") / (peak * 1e12) if self.result else None


def fmt(value, spec, failed=False):
    if failed:
        return "failed"
    return "-" if value is None else format(value, spec)


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def alloc_mb(run):
    value = run.get("peak_alloc_bytes")
    return "-" if value is None else f"{value / 1e6:.0f}"


def table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def shape_of(r):
    return f"n_layer {r.L}, n_head {r.H}, d_model {r.D}, seq_len {r.T}, vocab {r.V}; batch {r.B}, {r.steps} steps"


def pretrain_section(runs, peak):
    by = {(r.label, r.system): r for r in runs}
    rows = []
    for label in ("dense", "lowrank"):
        lr, pt = by.get((label, "lrllm")), by.get((label, "torch"))
        if not lr or not pt:
            continue
        dense_linear = 12 * lr.D * lr.D * lr.L
        _, linear = model_flops_per_token(lr.L, lr.D, lr.T, lr.V, lr.rank)
        name = "dense" if not lr.rank else f"low-rank r{lr.rank} (linear {dense_linear / linear:.2f}x smaller)"
        params = lr.get("params") or pt.get("params")
        rows.append([name, "-" if params is None else f"{params / 1e6:.1f}M",
                     fmt(lr.get("tokens_per_s"), ".0f", lr.error), fmt(lr.mfu(peak), ".1%", lr.error),
                     fmt(pt.get("tokens_per_s"), ".0f", pt.error), fmt(pt.mfu(peak), ".1%", pt.error),
                     ratio(lr.get("tokens_per_s"), pt.get("tokens_per_s")), fmt(lr.gpu_mb, ".0f"),
                     fmt(pt.gpu_mb, ".0f"), alloc_mb(lr), alloc_mb(pt)])
    if not rows:
        return None
    header = ["model", "params", "lrllm tok/s", "lrllm MFU", "PyTorch tok/s", "PyTorch MFU", "lrllm / PyTorch",
              "lrllm GPU MB", "PyTorch GPU MB", "lrllm allocator MB", "PyTorch allocator MB"]
    torch_run = next((r for r in runs if r.system == "torch" and r.result), None)
    notes = ["PyTorch: float32 weights, bf16 autocast, torch.compile, fused AdamW"
             + (f" (torch {torch_run.get('torch_version')})" if torch_run else "") +
             "; lrllm: float32 weights, bf16 tensor-core matrix products."]
    return "\n\n".join([f"## Pretraining, GPT-2 124M shapes ({shape_of(runs[0])})", *notes, table(header, rows)])


FINETUNE_NAMES = {
    "lrllm-nf4-lora": "lrllm: NF4 base + LoRA r{lora} + block recompute",
    "torch-full": "PyTorch: full finetuning, pure bf16 (weights, grads, AdamW state), eager",
    "torch-lora": "PyTorch: LoRA r{lora} over a frozen bf16 base, bf16 autocast, eager",
}


def finetune_section(runs):
    by = {r.label: r for r in runs}
    full, lora = by.get("torch-full"), by.get("torch-lora")
    rows = []
    for label, name in FINETUNE_NAMES.items():
        r = by.get(label)
        if not r:
            continue
        rows.append([name.format(lora=r.lora_rank), fmt(r.get("trainable_params"), ",", r.error),
                     fmt(r.gpu_mb, ".0f"), alloc_mb(r),
                     ratio(full and full.gpu_mb, r.gpu_mb) if not r.error else "-",
                     ratio(full and full.get("peak_alloc_bytes"), r.get("peak_alloc_bytes")),
                     fmt(r.get("tokens_per_s"), ".0f", r.error),
                     ratio(r.get("tokens_per_s"), lora and lora.get("tokens_per_s"))])
    if not rows:
        return None
    header = ["run", "trainable params", "GPU MB", "allocator MB", "PyTorch full GPU MB / this",
              "PyTorch full allocator MB / this", "tok/s", "tok/s / PyTorch LoRA"]
    return "\n\n".join([f"## Finetuning, GPT-2 1.5B shapes ({shape_of(runs[0])})", table(header, rows)])


def report(raw, out_md, gpu, peak, lrllm_version, torch_warmup):
    parts = {}
    for part in ("pretrain", "finetune"):
        path = os.path.join(raw, f"{part}.manifest")
        if os.path.isfile(path):
            with open(path) as f:
                parts[part] = [Run(raw, line.split()) for line in f if line.strip()]
    lines = [f"# lrllm vs PyTorch on {gpu}",
             f"{lrllm_version}. Peak {peak:g} TFLOP/s (bf16 dense). MFU = tokens/s x model FLOPs per token / "
             "peak, with model FLOPs per token = 6 x (linear weights + vocab x d_model) + 12 x n_layer x seq_len x "
             "d_model (attention's products), a low-rank model's own weights counted (tools/bench_report.py). "
             f"tokens/s: the median step after the first {WARMUP_STEPS} (lrllm) or {torch_warmup} (PyTorch: "
             "compilation) steps.",
             "GPU MB: the most device memory nvidia-smi saw in use during the run above what was in use before it: "
             "the process's whole footprint (CUDA context, library workspaces, allocator caches). allocator MB: "
             "the most the framework's own allocations held: PyTorch's torch.cuda.max_memory_allocated, lrllm's "
             "mem_peak metric (its CUDA backend's allocation peak)."]
    sections = [s for s in (pretrain_section(parts.get("pretrain", []), peak) if parts.get("pretrain") else None,
                            finetune_section(parts["finetune"]) if parts.get("finetune") else None) if s]
    failures = [f"- {r.tag} ({r.system}): {r.error} (log: {os.path.join(raw, r.tag + '.log')})"
                for runs in parts.values() for r in runs if r.error]
    text = "\n\n".join(lines + sections + (["## Failures\n\n" + "\n".join(failures)] if failures else []))
    print(text)
    with open(out_md, "w") as f:
        f.write(text + "\n")


def main():
    ap = argparse.ArgumentParser(description="helpers for tools/bench_gpu.sh")
    sub = ap.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("jsonl")
    j.add_argument("path")
    j.add_argument("n", type=int)
    s = sub.add_parser("lrllm")
    s.add_argument("run_dir")
    s.add_argument("log")
    s.add_argument("out")
    r = sub.add_parser("report")
    r.add_argument("raw")
    r.add_argument("out_md")
    r.add_argument("--gpu", required=True)
    r.add_argument("--peak", type=float, required=True, help="peak TFLOP/s the MFU is taken against")
    r.add_argument("--lrllm-version", default="?")
    r.add_argument("--torch-warmup", type=int, default=3, help="steps PyTorch's median left out")
    a = ap.parse_args()
    if a.cmd == "jsonl":
        jsonl(a.path, a.n)
    elif a.cmd == "lrllm":
        lrllm(a.run_dir, a.log, a.out)
    else:
        report(a.raw, a.out_md, a.gpu, a.peak, a.lrllm_version, a.torch_warmup)


if __name__ == "__main__":
    sys.exit(main())
