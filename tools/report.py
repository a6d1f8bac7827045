#!/usr/bin/python3
"""Report on lrllm run directories: plots, a Markdown table per run and, with --compare, the runs side by side.

usage: report.py RUN_DIR [RUN_DIR ...] [--out DIR] [--compare]

Reads each RUN_DIR's metrics.h5 (the /metrics series and the /eval/<task>/ results), its newest
ckpt_NNNNNN.h5 and, when there, eval.txt (what lrllm --mode eval prints on a token file). Writes DIR/report.md
(and prints it) and DIR/loss.png, lr.png, tokens_per_s.png, memory.png, one line or bar group per run.
--compare adds one table of every run (dense, low-rank, quantized, LoRA) with ratios against the first run,
and the latest task evaluations side by side.
Exit status 2, with one line on stderr, when a run directory, its metrics.h5 or its checkpoint is missing or
not readable.
"""
import argparse
import contextlib
import glob
import math
import os
import re
import sys

import h5py
import numpy as np

import matplotlib

matplotlib.use("Agg")  # files only: no display
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

# The four linear sites of a block, as stored under /model/h.{i}/.
SITES = {"qkv": "attn/qkv", "proj": "attn/proj", "fc": "mlp/fc", "mlp_proj": "mlp/proj"}
ROLES = ["embedding", "linear dense", "linear low-rank", "LoRA", "other (biases, LayerNorm)"]
LINEAR_ROLES = ("linear dense", "linear low-rank")
QUANT_NAMES = {"nf4": "NF4", "int8": "int8"}
# Memory categories of metrics.h5 in plotting order; mem_params is the sum of the three that follow it.
MEMORY = [("mem_params", "params"), ("mem_params_trainable", "params trainable"),
          ("mem_params_frozen", "params frozen"), ("mem_params_quantized", "params quantized"),
          ("mem_grads", "grads"), ("mem_optimizer", "optimizer"), ("mem_activations", "activations"),
          ("mem_peak", "peak (RSS)")]
EVAL_FIELDS = ("accuracy", "f1_macro", "f1_weighted", "n")


class ReportError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def one_line(error):
    return " ".join(str(error).split())


@contextlib.contextmanager
def open_h5(path):
    """An HDF5 file for reading; a missing, corrupt or incomplete one becomes a ReportError naming it."""
    if not os.path.isfile(path):
        raise ReportError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ReportError(f"{path}: not a readable HDF5 file ({one_line(e)})") from None
    with f:
        try:
            yield f
        except KeyError as e:
            raise ReportError(f"{path}: missing data ({one_line(e)})") from None
        except (OSError, ValueError) as e:
            raise ReportError(f"{path}: not readable ({one_line(e)})") from None


def text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def latest_checkpoint(run_dir):
    found = glob.glob(os.path.join(run_dir, "ckpt_*.h5"))
    steps = {p: re.fullmatch(r"ckpt_(\d+)\.h5", os.path.basename(p)) for p in found}
    found = [p for p, m in steps.items() if m]
    if not found:
        raise ReportError(f"{run_dir}: no checkpoint (ckpt_NNNNNN.h5)")
    return max(found, key=lambda p: int(steps[p].group(1)))


def role_of(stem):
    leaf = stem.rsplit("/", 1)[-1]
    if stem in ("wte", "wpe", "lm_head"):
        return "embedding"
    if leaf == "W":
        return "linear dense"
    if leaf in ("A", "B"):
        return "linear low-rank"
    if leaf in ("lora_A", "lora_B"):
        return "LoRA"
    return "other (biases, LayerNorm)"


def count_parameters(model):
    """{(role, storage): [parameters, bytes]} over /model. A quantized tensor (X_q) counts the values of its
    logical shape, and its bytes include its scales (X_absmax...), so bytes per parameter shows the storage."""
    counts = {}

    def visit(name, obj):
        if not isinstance(obj, h5py.Dataset):
            return
        if "_absmax" in name:
            stem, params = name.split("_absmax")[0], 0
            storage = text(model[stem + "_q"].attrs["quant"])
        elif name.endswith("_q"):
            stem, params = name[:-2], int(np.prod(obj.attrs["shape"]))
            storage = text(obj.attrs["quant"])
        else:
            stem, params, storage = name, obj.size, str(obj.dtype)
        entry = counts.setdefault((role_of(stem), storage), [0, 0])
        entry[0] += params
        entry[1] += obj.size * obj.dtype.itemsize

    model.visititems(visit)
    return counts


def site_rank(block, site, factor):
    """The rank of a low-rank factor or LoRA adapter at one site of a block (0: none)."""
    if factor in block.get(site, {}):
        return int(block[site][factor].shape[0])
    if factor + "_q" in block.get(site, {}):
        return int(block[site][factor + "_q"].attrs["shape"][0])
    return 0


def ranks_label(ranks):
    """'r32' when every site has the same rank, else the sites that have one: 'qkv r16, fc r8'."""
    present = {s: r for s, r in ranks.items() if r}
    if len(present) == len(SITES) and len(set(present.values())) == 1:
        return f"r{next(iter(present.values()))}"
    return ", ".join(f"{s} r{r}" for s, r in present.items())


def kind_label(f, config):
    """dense, low-rank r32, NF4, int8, each with + LoRA rN when adapters are there."""
    block = f["model/h.0"]
    lowrank = {s: site_rank(block, p, "A") for s, p in SITES.items()}
    lora = {s: site_rank(block, p, "lora_A") for s, p in SITES.items()}
    parts = []
    if any(lowrank.values()):
        parts.append("low-rank " + ranks_label(lowrank))
    quant = text(config.get("quant", "none"))
    if quant != "none":
        parts.append(QUANT_NAMES.get(quant, quant))
    label = " ".join(parts) or "dense"
    if any(lora.values()):
        label += " + LoRA " + ranks_label(lora)
    return label


def dense_linear_parameters(config):
    """Linear weights of a dense model of this shape: as the file records it (/config linear_dense_equivalent,
    from lrllm's description of its architecture), else GPT-2's (files from before lrllm recorded it): qkv 3d²,
    proj d², fc d·d_ff, mlp proj d_ff·d a block."""
    if "linear_dense_equivalent" in config:
        return int(config["linear_dense_equivalent"])
    d, d_ff = int(config["d_model"]), int(config["d_ff"])
    return int(config["n_layer"]) * (3 * d * d + d * d + 2 * d * d_ff)


class Run:
    def __init__(self, run_dir):
        if not os.path.isdir(run_dir):
            raise ReportError(f"{run_dir}: no such run directory")
        self.path = run_dir
        self.name = os.path.basename(os.path.normpath(run_dir))
        self.metrics_path = os.path.join(run_dir, "metrics.h5")
        if not os.path.isfile(self.metrics_path):
            raise ReportError(f"{run_dir}: no metrics.h5 (not an lrllm run directory?)")
        self.checkpoint = latest_checkpoint(run_dir)
        self._read_checkpoint()
        self._read_metrics()
        self.eval_loss = self.ppl = None
        eval_txt = os.path.join(run_dir, "eval.txt")
        if os.path.isfile(eval_txt):
            with open(eval_txt, errors="replace") as f:
                hit = re.search(r"loss ([0-9.]+), ppl ([0-9.]+)", f.read())
            if hit:
                self.eval_loss, self.ppl = float(hit.group(1)), float(hit.group(2))

    def _read_checkpoint(self):
        with open_h5(self.checkpoint) as f:
            self.config = dict(f["config"].attrs)
            for name in ("n_layer", "d_model", "d_ff", "seq_len", "vocab_size"):
                if name not in self.config:
                    raise ReportError(f"{self.checkpoint}: /config has no attribute {name}")
            self.mode = text(f.attrs.get("mode", "?"))
            self.counts = count_parameters(f["model"])
            self.kind = kind_label(f, self.config)
        self.params = sum(p for p, _ in self.counts.values())
        self.bytes = sum(b for _, b in self.counts.values())
        self.linear_params = sum(p for (role, _), (p, _) in self.counts.items() if role in LINEAR_ROLES)
        self.linear_bytes = sum(b for (role, _), (_, b) in self.counts.items() if role in LINEAR_ROLES)
        self.dense_linear = dense_linear_parameters(self.config)
        # The dense float32 model of the same shape differs only in its linear weights (and has no adapters).
        self.dense_params = self.dense_linear + sum(p for (role, _), (p, _) in self.counts.items()
                                                    if role not in LINEAR_ROLES and role != "LoRA")

    def _read_metrics(self):
        with open_h5(self.metrics_path) as f:
            self.series = {k: np.asarray(v[()], np.float64) for k, v in f["metrics"].items()}
            self.evals = {task: {k: float(g[k][-1]) for k in EVAL_FIELDS}
                          for task, g in f.get("eval", {}).items() if len(g["n"])}
        for name in ("step", "loss"):
            if name not in self.series:
                raise ReportError(f"{self.metrics_path}: /metrics/{name} is missing")

    def last(self, name):
        values = self.series.get(name, np.array([]))
        return float(values[-1]) if len(values) else None

    def tokens_per_s(self):
        """Median over the steps, the first left out: it carries the warm-up."""
        values = self.series.get("tokens_per_s", np.array([]))
        values = values[1:] if len(values) > 1 else values
        return float(np.median(values)) if len(values) else None

    def final_val(self):
        """(validation loss, step) of the last evaluation, or (None, None)."""
        val = self.series.get("val_loss", np.array([]))
        evaluated = np.flatnonzero(~np.isnan(val))
        if not len(evaluated):
            return None, None
        i = evaluated[-1]
        return float(val[i]), int(self.series["step"][i])

    def memory(self, name):
        """Largest value of a memory series in MB (peak RSS only grows; the others are constant)."""
        values = self.series.get(name, np.array([]))
        return float(np.nanmax(values)) / 1e6 if len(values) else None


def memory_categories(runs):
    """(series, label) of the memory series some run has; mem_params only when no run splits it."""
    categories = [(n, label) for n, label in MEMORY if any(r.memory(n) is not None for r in runs)]
    if any(n == "mem_params_trainable" for n, _ in categories):
        categories = [(n, label) for n, label in categories if n != "mem_params"]
    return categories


# ------------------------------------------------------------------------------------------- formatting


def fmt(value, spec):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def parameter_table(run):
    rows = []
    for role in ROLES:
        for (r, storage), (params, nbytes) in sorted(run.counts.items()):
            if r == role:
                rows.append([role, storage, f"{params:,}", f"{100 * params / run.params:.1f}%",
                             f"{nbytes / 1e6:.3f}", f"{nbytes / params:.2f}"])
    rows.append(["total", "", f"{run.params:,}", "100.0%", f"{run.bytes / 1e6:.3f}",
                 f"{run.bytes / run.params:.2f}"])
    return table(["parameters by kind", "storage", "parameters", "share", "MB", "bytes/parameter"], rows)


def run_section(run):
    val, val_step = run.final_val()
    steps, tokens = run.last("step"), run.last("tokens_seen")
    memory = ", ".join(f"{label} {run.memory(name):.1f}" for name, label in memory_categories([run]))
    c = run.config
    facts = [
        ["kind", run.kind],
        ["linear compression (parameters)",
         f"{ratio(run.dense_linear, run.linear_params)} ({run.linear_params:,} against {run.dense_linear:,} dense)"],
        ["linear compression (bytes, against float32)", ratio(4 * run.dense_linear, run.linear_bytes)],
        ["whole-model compression (parameters)", ratio(run.dense_params, run.params)],
        ["whole-model compression (bytes, against float32)", ratio(4 * run.dense_params, run.bytes)],
        ["steps", fmt(steps, ".0f")],
        ["tokens", fmt(tokens, ",.0f")],
        ["tokens/s (median, first step left out)", fmt(run.tokens_per_s(), ".0f")],
        ["final train loss", fmt(run.last("loss"), ".4f")],
        ["final validation loss", "-" if val is None else f"{val:.4f} (step {val_step})"],
        ["eval loss / perplexity (eval.txt)",
         "-" if run.eval_loss is None else f"{run.eval_loss:.4f} / {run.ppl:.1f}"],
        ["memory per rank, MB", memory or "-"],
    ]
    parts = [f"## {run.name}: {run.kind}",
             f"`{run.path}`, checkpoint `{os.path.basename(run.checkpoint)}` ({run.mode}); GPT-2 "
             f"n_layer {c['n_layer']}, d_model {c['d_model']}, d_ff {c['d_ff']}, seq_len {c['seq_len']}, "
             f"vocab {c['vocab_size']}",
             parameter_table(run), table(["quantity", "value"], facts)]
    if run.evals:
        parts.append(table(["task", "n", "accuracy", "F1 macro", "F1 weighted"],
                           [[t, f"{e['n']:.0f}", f"{e['accuracy']:.3f}", f"{e['f1_macro']:.3f}",
                             f"{e['f1_weighted']:.3f}"] for t, e in run.evals.items()]))
    return "\n\n".join(parts)


def comparison_section(runs):
    first = runs[0]
    rows = []
    for r in runs:
        val, _ = r.final_val()
        rows.append([r.name, r.kind, f"{r.params:,}", ratio(r.params, first.params), f"{r.linear_params:,}",
                     ratio(r.dense_linear, r.linear_params), ratio(4 * r.dense_linear, r.linear_bytes),
                     f"{r.bytes / 1e6:.2f}", ratio(r.bytes, first.bytes),
                     fmt(r.last("step"), ".0f"), fmt(r.last("tokens_seen"), ",.0f"), fmt(r.tokens_per_s(), ".0f"),
                     ratio(r.tokens_per_s(), first.tokens_per_s()), fmt(r.last("loss"), ".4f"), fmt(val, ".4f"),
                     fmt(r.eval_loss, ".4f"), fmt(r.ppl, ".1f"), fmt(r.memory("mem_peak"), ".0f"),
                     ratio(r.memory("mem_peak"), first.memory("mem_peak"))])
    header = ["run", "kind", "parameters", "params vs first", "linear params", "linear compression (params)",
              "linear compression (bytes)", "model MB", "MB vs first", "steps", "tokens", "tokens/s",
              "tokens/s vs first", "train loss", "val loss", "eval loss", "ppl", "peak MB/rank", "peak vs first"]
    parts = ["## Comparison",
             f"Ratios \"vs first\" are this run's value over the first run's ({first.name}, {first.kind}); linear "
             "compression is the dense float32 linear layers of the same shape over this run's.",
             table(header, rows)]
    evaluated = [r for r in runs if r.evals]
    if evaluated:
        tasks = sorted({t for r in evaluated for t in r.evals})
        header = ["task", "n"] + [f"{r.name} {m}" for r in evaluated for m in ("accuracy", "F1 macro", "F1 weighted")]
        rows = []
        for task in tasks:
            found = [r.evals.get(task) for r in evaluated]
            n = next(e["n"] for e in found if e)
            cells = [c for e in found for c in ([f"{e['accuracy']:.3f}", f"{e['f1_macro']:.3f}",
                                                 f"{e['f1_weighted']:.3f}"] if e else ["-", "-", "-"])]
            rows.append([task, f"{n:.0f}"] + cells)
        parts += ["Task evaluations (the latest of each run), side by side:", table(header, rows)]
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------------ plots


def x_axis(runs):
    """Tokens seen when every run has them, else steps."""
    if all(len(r.series.get("tokens_seen", [])) == len(r.series["step"]) for r in runs):
        return "tokens_seen", "tokens"
    return "step", "step"


def save_plot(fig, ax, path, grid_axis):
    ax.grid(axis=grid_axis, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def line_plot(runs, path, series, ylabel, title):
    x_name, x_label = x_axis(runs)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        if len(r.series.get(series, [])):
            ax.plot(r.series[x_name], r.series[series], label=r.name, linewidth=1)
    ax.set(xlabel=x_label, ylabel=ylabel, title=title)
    save_plot(fig, ax, path, grid_axis="both")


def loss_plot(runs, path):
    x_name, x_label = x_axis(runs)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, r in enumerate(runs):
        color = f"C{i}"
        x = r.series[x_name]
        ax.plot(x, r.series["loss"], color=color, linewidth=1, alpha=0.7, label=f"{r.name} train")
        val = r.series.get("val_loss", np.full(len(x), np.nan))
        seen = ~np.isnan(val)
        if seen.any():
            ax.plot(x[seen], val[seen], "o--", color=color, label=f"{r.name} validation")
    ax.set(xlabel=x_label, ylabel="loss (nats/token)", title="training and validation loss")
    save_plot(fig, ax, path, grid_axis="both")


def memory_plot(runs, path):
    categories = memory_categories(runs)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        heights = [r.memory(n) if r.memory(n) is not None else np.nan for n, _ in categories]
        bars = ax.bar(np.arange(len(categories)) + (i - (len(runs) - 1) / 2) * width, heights, width,
                      label=r.name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(np.arange(len(categories)), [label for _, label in categories], rotation=20)
    ax.set(ylabel="MB per rank", title="memory by category")
    save_plot(fig, ax, path, grid_axis="y")


def write_plots(runs, out):
    loss_plot(runs, os.path.join(out, "loss.png"))
    line_plot(runs, os.path.join(out, "lr.png"), "lr", "learning rate", "learning rate")
    line_plot(runs, os.path.join(out, "tokens_per_s.png"), "tokens_per_s", "tokens/s", "throughput")
    memory_plot(runs, os.path.join(out, "memory.png"))


# ------------------------------------------------------------------------------------------------- main


def name_apart(runs):
    """Runs of the same basename (a/run, b/run) are named by their path instead."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = r.path


def report(runs, compare):
    parts = ["# lrllm report", "![loss](loss.png)\n![learning rate](lr.png)\n![tokens/s](tokens_per_s.png)\n"
             "![memory](memory.png)"]
    if compare:
        parts.append(comparison_section(runs))
    parts += [run_section(r) for r in runs]
    return "\n\n".join(parts) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", default="report", help="folder for report.md and the plots (default: report)")
    parser.add_argument("--compare", action="store_true",
                        help="one table of all runs with ratios against the first, evaluations side by side")
    args = parser.parse_args()
    try:
        runs = [Run(d) for d in args.runs]
    except ReportError as e:
        print(f"report.py: {e}", file=sys.stderr)
        sys.exit(2)
    name_apart(runs)
    markdown = report(runs, args.compare)
    os.makedirs(args.out, exist_ok=True)
    write_plots(runs, args.out)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(markdown)
    print(markdown, end="")


if __name__ == "__main__":
    main()
