#!/usr/bin/python3
"""Low-rank pretraining against dense at one shape: validation loss at equal tokens, each variant at its own lr.

usage: lowrank_study.py --n_layer L --d_model C --n_head H --seq_len T --tokens N [--ranks R | --ratio X]
                        [--variants dense,naive,silu,product_std,lr_mult,refactor,all] [--lrs a,b,c]
                        [--device cpu|cuda] [--out DIR] ...

Every variant trains on the same tokens (data.train in file order, no shuffle) with the same warmup + cosine
schedule. Each first sweeps the --lrs (three by default) on --sweep_fraction of the budget, then trains at
the one with the lowest validation loss for the whole budget. Writes DIR/study.md (the table, also printed)
and DIR/loss_vs_time.png (training loss against wall-clock, validation loss as points), and keeps every run
directory under DIR/runs/.

Variants (docs/design.md, Linear layers): dense; naive (W = B A at the default init); silu (B silu(A x),
CoLA's form); product_std (CoLA's init); lr_mult (the factors' lr times --lr_mult); refactor (balanced
refactoring every --refactor_every steps); all (silu + product_std + lr_mult: refactoring keeps B A, which a
silu site does not compute, so it is left out of "all").

The rank: --ranks R for every site, or --ratio X (default 2.64, the paper's compression) for the rank whose
linear-layer parameters are 1/X of the dense model's. Exit status 2, with one line on stderr, on bad options
or a missing file; a failed run stops the study with its stderr's last lines.
"""
import argparse
import glob
import math
import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np

import matplotlib

matplotlib.use("Agg")  # files only: no display
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
VARIANTS = ("dense", "naive", "silu", "product_std", "lr_mult", "refactor", "all")


class StudyError(Exception):
    """Bad input: one line on stderr, exit status 2."""


def site_shapes(d_model, d_ff):
    """(in, out) of a GPT-2 block's four linear sites: qkv, proj, fc, mlp_proj."""
    return [(d_model, 3 * d_model), (d_model, d_model), (d_model, d_ff), (d_ff, d_model)]


def rank_for_ratio(d_model, d_ff, ratio):
    """The rank r at which r (in + out) summed over the sites is 1/ratio of the dense in * out."""
    shapes = site_shapes(d_model, d_ff)
    dense = sum(i * o for i, o in shapes)
    return max(1, round(dense / (ratio * sum(i + o for i, o in shapes))))


def variant_options(variant, rank, args):
    if variant == "dense":
        return []
    opts = ["--lowrank.rank", str(rank)]
    if variant in ("silu", "all"):
        opts += ["--lowrank.activation", "silu"]
    if variant in ("product_std", "all"):
        opts += ["--lowrank.init", "product_std"]
    if variant in ("lr_mult", "all"):
        opts += ["--lowrank.lr_mult", str(args.lr_mult)]
    if variant == "refactor":
        opts += ["--lowrank.refactor_every", str(args.refactor_every)]
    return opts


def linear_params(ckpt):
    """Parameters in the linear layers' W, or A and B, of a checkpoint."""
    total = 0
    with h5py.File(ckpt, "r") as f:
        for name, obj in f["model"].items():
            if not name.startswith("h."):
                continue
            for site in ("attn/qkv", "attn/proj", "mlp/fc", "mlp/proj"):
                for t in ("W", "A", "B"):
                    if f"{site}/{t}" in obj:
                        total += int(np.prod(obj[f"{site}/{t}"].shape))
    return total


def metrics(run_dir):
    with h5py.File(os.path.join(run_dir, "metrics.h5"), "r") as f:
        return {k: f["metrics"][k][:] for k in f["metrics"]}


def train(args, run_dir, variant, rank, lr, steps):
    """One lrllm pretraining run; returns its metrics."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ([] if args.np <= 1 else ["mpirun", "--quiet", "-np", str(args.np)]) + [
        args.lrllm, "--mode", "pretrain", "--device", args.device, "--seed", str(args.seed),
        "--model.n_layer", str(args.n_layer), "--model.d_model", str(args.d_model),
        "--model.n_head", str(args.n_head), "--model.seq_len", str(args.seq_len),
        "--model.d_ff", str(args.d_ff), "--model.vocab_size", str(args.vocab_size),
        "--data.train", args.train, "--data.val", args.val, "--data.shuffle", "false",
        "--train.steps", str(steps), "--train.batch_size", str(args.batch_size),
        "--train.lr", repr(lr), "--train.min_lr", repr(lr / 10), "--train.warmup", str(max(1, steps // 10)),
        "--train.eval_every", str(max(1, steps // args.evals)), "--train.eval_batches", str(args.eval_batches),
        "--run.dir", run_dir, "--run.log_every", str(max(1, steps // 10)),
        *variant_options(variant, rank, args), *args.extra]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{tail}")
    m = metrics(run_dir)
    m["wall_s"] = time.time() - t0
    return m


def final_val(m):
    v = m["val_loss"][~np.isnan(m["val_loss"])]
    return float(v[-1]) if len(v) else math.nan


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n_layer", type=int, required=True)
    ap.add_argument("--d_model", type=int, required=True)
    ap.add_argument("--n_head", type=int, required=True)
    ap.add_argument("--seq_len", type=int, required=True)
    ap.add_argument("--d_ff", type=int, default=0, help="MLP width (0: 4 * d_model)")
    ap.add_argument("--vocab_size", type=int, default=50257)
    ap.add_argument("--tokens", type=float, required=True, help="training tokens of each full run")
    ap.add_argument("--batch_size", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--np", type=int, default=1, help="data-parallel ranks (mpirun -np)")
    rank = ap.add_mutually_exclusive_group()
    rank.add_argument("--ranks", type=int, default=0, help="the rank of every low-rank site")
    rank.add_argument("--ratio", type=float, default=2.64, help="linear-layer compression (paper: 2.64)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--lrs", default="", help="the sweep's learning rates (default: base/2, base, base*2)")
    ap.add_argument("--base_lr", type=float, default=1e-3)
    ap.add_argument("--sweep_fraction", type=float, default=0.25, help="share of the budget for each sweep run")
    ap.add_argument("--lr_mult", type=float, default=2.0, help="lowrank.lr_mult of lr_mult and all")
    ap.add_argument("--refactor_every", type=int, default=0, help="refactor's period (0: a tenth of the run)")
    ap.add_argument("--evals", type=int, default=5, help="validations per run")
    ap.add_argument("--eval_batches", type=int, default=8)
    ap.add_argument("--train", default=os.path.join(REPO, "input/data/pretrain_train.bin"),
                    help="token files: a file, a glob or a comma list (lrllm's data.train)")
    ap.add_argument("--val", default=os.path.join(REPO, "input/data/pretrain_val.bin"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--lrllm", default=os.path.join(REPO, "build/lrllm"))
    ap.add_argument("--out", default=os.path.join(REPO, "runs/lowrank-study"))
    ap.add_argument("--cpu_name", default="", help="the machine, for the table's caption (default: lscpu's)")
    ap.add_argument("extra", nargs="*", help="more lrllm options after --, given to every run")
    args = ap.parse_args(argv)
    if args.d_ff == 0:
        args.d_ff = 4 * args.d_model
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        if v not in VARIANTS:
            raise StudyError(f"--variants: unknown variant '{v}' (known: {', '.join(VARIANTS)})")
    try:
        args.lrs = ([float(x) for x in args.lrs.split(",")] if args.lrs
                    else [args.base_lr / 2, args.base_lr, args.base_lr * 2])
    except ValueError:
        raise StudyError(f"--lrs must be a comma list of numbers, not '{args.lrs}'") from None
    if args.tokens <= 0 or args.ratio <= 1 or args.ranks < 0 or not 0 < args.sweep_fraction <= 1:
        raise StudyError("--tokens must be > 0, --ratio > 1, --ranks >= 0 and --sweep_fraction in (0, 1]")
    if not os.path.isfile(args.lrllm):
        raise StudyError(f"{args.lrllm}: no such file")
    # data.train and data.val take a file, a glob or a comma list of either, as lrllm does.
    for entry in [e for spec in (args.train, args.val) for e in spec.split(",")]:
        if not glob.glob(entry):
            raise StudyError(f"{entry}: no such token file")
    return args


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv):
    try:
        args = parse_args(argv)
    except StudyError as e:
        print(f"lowrank_study: error: {e}", file=sys.stderr)
        return 2
    rank = args.ranks or rank_for_ratio(args.d_model, args.d_ff, args.ratio)
    per_step = args.batch_size * args.np * args.seq_len
    steps = max(1, round(args.tokens / per_step))
    sweep_steps = max(1, round(steps * args.sweep_fraction))
    if args.refactor_every == 0:
        args.refactor_every = max(1, steps // 10)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    print(f"study: {args.n_layer} layers, d_model {args.d_model}, {args.n_head} heads, seq_len {args.seq_len}; "
          f"rank {rank}; {steps} steps of {per_step} tokens ({steps * per_step} tokens), sweeps of {sweep_steps} "
          f"steps over lr {args.lrs}", flush=True)
    results = {}
    for v in args.variants:
        sweep = {}
        for lr in args.lrs:
            m = train(args, os.path.join(args.out, "runs", f"{v}-sweep-lr{lr:g}"), v, rank, lr, sweep_steps)
            sweep[lr] = final_val(m)
            print(f"  {v:12s} sweep lr {lr:<8g} val {sweep[lr]:.4f}", flush=True)
        finite = {lr: x for lr, x in sweep.items() if math.isfinite(x)}
        if not finite:
            raise RuntimeError(f"{v}: every sweep run diverged ({sweep})")
        best = min(finite, key=finite.get)
        run_dir = os.path.join(args.out, "runs", f"{v}-full-lr{best:g}")
        m = train(args, run_dir, v, rank, best, steps)
        ckpt = os.path.join(run_dir, f"ckpt_{steps:06d}.h5")
        results[v] = dict(lr=best, m=m, val=final_val(m), linear=linear_params(ckpt), sweep=sweep)
        print(f"  {v:12s} full  lr {best:<8g} val {results[v]['val']:.4f} ({m['wall_s']:.0f} s)", flush=True)

    dense_linear = sum(i * o for i, o in site_shapes(args.d_model, args.d_ff)) * args.n_layer
    ref = results.get("dense")
    machine = args.cpu_name or (cpu_name() if args.device == "cpu" else args.device)
    lines = [f"Low-rank study: GPT-2 {args.n_layer} layers, d_model {args.d_model}, {args.n_head} heads, seq_len "
             f"{args.seq_len}, d_ff {args.d_ff}; rank {rank}; {steps * per_step} training tokens ({steps} steps of "
             f"{per_step}), each variant at the best of lr {', '.join(f'{x:g}' for x in args.lrs)} "
             f"(swept on {sweep_steps} steps); {args.device} ({machine}).", "",
             "| variant | linear params | compression | lr | val loss | gap (nats) | gap | tokens/s | wall s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v, r in results.items():
        tps = r["m"]["tokens_per_s"][1:] if len(r["m"]["tokens_per_s"]) > 1 else r["m"]["tokens_per_s"]
        gap = r["val"] - ref["val"] if ref else math.nan
        # A best lr at the sweep's edge says the sweep did not bracket the optimum.
        edge = "*" if r["lr"] in (min(args.lrs), max(args.lrs)) else ""
        lines.append(f"| {v} | {r['linear']:,} | {dense_linear / r['linear']:.2f}x | {r['lr']:g}{edge} | {r['val']:.4f} | "
                     f"{gap:+.4f} | {100 * gap / ref['val'] if ref else math.nan:+.2f}% | {np.mean(tps):,.0f} | "
                     f"{r['m']['wall_s']:.0f} |")
    lines += ["", "lr*: the best lr was at the sweep's edge (the sweep did not bracket the optimum). Gaps are "
              "against dense, in nats and relative to dense's validation loss."]
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write(table)
    print(table)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v, r in results.items():
        t = np.cumsum(r["m"]["step_ms"]) / 1000.0
        (line,) = ax.plot(t, r["m"]["loss"], label=f"{v} (lr {r['lr']:g})", linewidth=1)
        ok = ~np.isnan(r["m"]["val_loss"])
        ax.plot(t[ok], r["m"]["val_loss"][ok], "o", color=line.get_color(), markersize=4)
    ax.set_xlabel("wall-clock (s, summed step time)")
    ax.set_ylabel("loss (lines: train, points: validation)")
    ax.set_title(f"low-rank study: d_model {args.d_model}, rank {rank}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "loss_vs_time.png"), dpi=120)
    print(f"wrote {os.path.join(args.out, 'study.md')} and loss_vs_time.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
