"""Side-by-side summary of lrllm run directories: parameters, tokens/s, validation loss.

usage: summarize.py RUN_DIR [RUN_DIR ...]
       summarize.py --eval RUN_DIR [RUN_DIR ...]
Reads RUN_DIR/metrics.h5, the newest RUN_DIR/ckpt_*.h5 and, if present, RUN_DIR/eval.txt (the output of
lrllm --mode eval). With --eval: the latest task evaluation of each run (/eval/<task>/ in metrics.h5), side
by side.
"""
import glob
import os
import re
import sys

import h5py
import numpy as np


def summarize(run_dir):
    ckpt = sorted(glob.glob(os.path.join(run_dir, "ckpt_*.h5")))[-1]
    counts = {"embedding": 0, "linear": 0, "other": 0}
    with h5py.File(ckpt, "r") as f:
        cfg = dict(f["config"].attrs)

        def visit(name, obj):
            if not isinstance(obj, h5py.Dataset):
                return
            leaf = name.rsplit("/", 1)[-1]
            key = "embedding" if name in ("wte", "wpe") else "linear" if leaf in ("W", "A", "B") else "other"
            counts[key] += obj.size

        f["model"].visititems(visit)
    with h5py.File(os.path.join(run_dir, "metrics.h5"), "r") as f:
        m = {k: f["metrics"][k][:] for k in f["metrics"]}
    tps = m["tokens_per_s"][1:] if len(m["tokens_per_s"]) > 1 else m["tokens_per_s"]
    val = m["val_loss"][~np.isnan(m["val_loss"])]
    eval_loss = ppl = float("nan")
    eval_file = os.path.join(run_dir, "eval.txt")
    if os.path.exists(eval_file):
        hit = re.search(r"loss ([0-9.]+), ppl ([0-9.]+)", open(eval_file).read())
        if hit:
            eval_loss, ppl = float(hit.group(1)), float(hit.group(2))
    return {
        "run": os.path.basename(run_dir.rstrip("/")),
        "rank": int(cfg.get("lowrank_rank", 0)),
        "params": sum(counts.values()),
        "linear": counts["linear"],
        "steps": int(m["step"][-1]),
        "tokens": int(m["tokens_seen"][-1]) if "tokens_seen" in m else 0,
        "tok_s": float(np.median(tps)),
        "train_loss": float(m["loss"][-1]),
        "val_loss": float(val[-1]) if len(val) else float("nan"),
        "eval_loss": eval_loss,
        "ppl": ppl,
        "peak_mb": float(np.max(m["mem_peak"])) / 1e6,
    }


def eval_table(dirs):
    results = {}
    tasks = []
    for d in dirs:
        with h5py.File(os.path.join(d, "metrics.h5"), "r") as f:
            for task in f.get("eval", {}):
                g = f["eval"][task]
                results[(d, task)] = {k: float(g[k][-1]) for k in ("accuracy", "f1_macro", "f1_weighted", "n")}
                if task not in tasks:
                    tasks.append(task)
    names = [os.path.basename(d.rstrip("/")) for d in dirs]
    print()
    print("| task | n | " + " | ".join(f"{n} accuracy | {n} F1 macro | {n} F1 weighted" for n in names) + " |")
    print("|---|---|" + "---|---|---|" * len(dirs))
    for task in tasks:
        cells = []
        n = 0
        for d in dirs:
            r = results.get((d, task))
            n = int(r["n"]) if r else n
            cells.append(f"{r['accuracy']:.3f} | {r['f1_macro']:.3f} | {r['f1_weighted']:.3f}" if r else "- | - | -")
        print(f"| {task} | {n} | " + " | ".join(cells) + " |")


def main():
    if sys.argv[1] == "--eval":
        eval_table(sys.argv[2:])
        return
    rows = [summarize(d) for d in sys.argv[1:]]
    base = rows[0]
    print()
    print("| run | low-rank r | parameters | linear params | linear compression | steps | tokens | tokens/s "
          "| speed vs first | train loss | val loss | eval loss | ppl | peak MB/rank |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['rank'] or 'dense'} | {r['params']:,} | {r['linear']:,} "
              f"| {base['linear'] / r['linear']:.2f}x | {r['steps']} | {r['tokens']:,} | {r['tok_s']:.0f} "
              f"| {r['tok_s'] / base['tok_s']:.2f}x | {r['train_loss']:.4f} | {r['val_loss']:.4f} "
              f"| {r['eval_loss']:.4f} | {r['ppl']:.1f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
