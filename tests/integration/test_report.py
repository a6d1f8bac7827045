"""tools/report.py on run directories made here: hand-built HDF5 files with known values (exact table numbers,
compression and ratios), real lrllm runs (dense, low-rank, NF4 + LoRA, evaluated), and bad directories.

Run as: /usr/bin/python3 tests/integration/test_report.py BUILD_DIR
Prints PASS/FAIL per test and exits non-zero if any failed.
"""
import os
import subprocess
import sys

import h5py
import numpy as np

import test_cli as cli
from test_cli import GPT2_SMALL, TMP, TOKENIZER, run, sentiment_rows, tmpdir, write_jsonl, write_tokens

REPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools", "report.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ["loss.png", "lr.png", "tokens_per_s.png", "memory.png"]


def report(dirs, out, compare=False):
    cmd = [sys.executable, REPORT, *dirs, "--out", out] + (["--compare"] if compare else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def report_ok(dirs, out, compare=False):
    p = report(dirs, out, compare)
    assert p.returncode == 0 and not p.stderr, f"report.py exited {p.returncode}: {p.stderr}"
    with open(os.path.join(out, "report.md")) as f:
        markdown = f.read()
    assert p.stdout == markdown, "stdout differs from report.md"
    return markdown


def sections(markdown):
    """{heading: text} of the '## ' sections; a run's heading is its name (before ': kind')."""
    out = {}
    for part in markdown.split("\n## ")[1:]:
        heading, _, body = part.partition("\n")
        out[heading.split(":")[0]] = body
    return out


def table(text, first_header):
    """Rows (header -> cell) of the Markdown table whose first header cell is first_header."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(cells, (c.strip() for c in row.strip().strip("|").split("|")))))
            return rows
    raise AssertionError(f"no table headed '{first_header}' in:\n{text}")


def by_first(rows):
    return {next(iter(r.values())): r for r in rows}


# ------------------------------------------------------------------------------------ hand-built runs
# One block, d_model 4, d_ff 8, vocab 10, seq_len 3. Dense linear weights: 3·16 + 16 + 4·8 + 8·4 = 128;
# embeddings 10·4 + 3·4 = 52; biases 12 + 4 + 8 + 4 and LayerNorms 3·8: 52; total 232.
CONFIG = {"arch": "gpt2", "vocab_size": 10, "seq_len": 3, "n_layer": 1, "n_head": 1, "d_model": 4, "d_ff": 8,
          "tied_embeddings": 1, "lowrank_rank": 0, "lora_rank": 0, "quant": "none", "quant_block": 64}
SHAPES = {"attn/qkv": (12, 4), "attn/proj": (4, 4), "mlp/fc": (8, 4), "mlp/proj": (4, 8)}


def write_checkpoint(path, kind):
    """kind: dense, lowrank (rank 2) or nf4-lora (NF4 codes and double-quantized scales, LoRA rank 1)."""
    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731 - values do not matter, only shapes
    with h5py.File(path, "w") as f:
        mode = "finetune" if kind == "nf4-lora" else "pretrain"
        f.attrs.update({"format": "lrllm", "format_version": 1, "mode": mode})
        config = dict(CONFIG, lowrank_rank=2 if kind == "lowrank" else 0, lora_rank=1 if kind == "nf4-lora" else 0,
                      quant="nf4" if kind == "nf4-lora" else "none")
        f.create_group("config").attrs.update(config)
        f["model/wte"], f["model/wpe"] = z(10, 4), z(3, 4)
        f["model/ln_f/w"], f["model/ln_f/b"] = z(4), z(4)
        for ln in ("ln_1", "ln_2"):
            f[f"model/h.0/{ln}/w"], f[f"model/h.0/{ln}/b"] = z(4), z(4)
        for site, (n_out, n_in) in SHAPES.items():
            g = f.create_group(f"model/h.0/{site}")
            g["b"] = z(n_out)
            if kind == "dense":
                g["W"] = z(n_out, n_in)
            elif kind == "lowrank":
                g["A"], g["B"] = z(2, n_in), z(n_out, 2)
            else:
                g["W_q"] = np.zeros(n_out * n_in // 2, np.uint8)
                g["W_q"].attrs.update({"quant": "nf4", "shape": [n_out, n_in], "block_size": 64})
                g["W_absmax_q"], g["W_absmax_scale"] = np.zeros(1, np.int8), z(1)
                g["lora_A"], g["lora_B"] = z(1, n_in), z(n_out, 1)
        f.create_group("state").attrs.update({"step": 5, "tokens_seen": 500})


def write_metrics(path, tokens_per_s, val_loss, evals=None):
    steps = np.arange(1, 6, dtype=np.float64)
    series = {"step": steps, "tokens_seen": 100 * steps, "loss": 6 - steps, "lr": 1e-3 * steps,
              "grad_norm": np.ones(5), "step_ms": np.full(5, 10.0), "tokens_per_s": tokens_per_s,
              "val_loss": val_loss, "mem_params": np.full(5, 1e6), "mem_grads": np.full(5, 1e6),
              "mem_optimizer": np.full(5, 2e6), "mem_activations": np.full(5, 5e6),
              "mem_peak": np.array([1e7, 2e7, 3e7, 3e7, 3e7])}
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "lrllm-metrics"
        for name, values in series.items():
            f.create_dataset(f"metrics/{name}", data=np.asarray(values, np.float64), maxshape=(None,))
        for task, fields in (evals or {}).items():
            for name, values in fields.items():
                f.create_dataset(f"eval/{task}/{name}", data=np.asarray(values, np.float64), maxshape=(None,))


def hand_built():
    """Three run directories: dense (tokens/s median 1500, validated), low-rank r2 (never validated), NF4 + LoRA
    (evaluated twice: the table shows the latest)."""
    nan = np.nan
    runs = {"dense": ([100, 1000, 2000, 3000, 10], [nan, nan, 3.5, nan, 3.25],
                      {"senti": {"accuracy": [0.25], "f1_macro": [0.2], "f1_weighted": [0.3], "n": [8]}}),
            "lowrank": ([1, 600, 600, 600, 600], [nan] * 5, None),
            "nf4-lora": ([5, 3000, 3000, 3000, 3000], [nan, nan, nan, nan, 2.0],
                         {"senti": {"accuracy": [0.5, 0.75], "f1_macro": [0.1, 0.6], "f1_weighted": [0.2, 0.7],
                                    "n": [4, 8]}})}
    dirs = []
    for kind, (tps, val, evals) in runs.items():
        d = tmpdir(f"hand-{kind}")
        os.makedirs(d)
        write_checkpoint(os.path.join(d, "ckpt_000005.h5"), kind)
        write_metrics(os.path.join(d, "metrics.h5"), np.asarray(tps, np.float64), np.asarray(val), evals)
        dirs.append(d)
    return dirs


# ---------------------------------------------------------------------------------------------- tests


def test_run_tables_have_exact_numbers():
    dense, lowrank, nf4 = hand_built()
    md = sections(report_ok([dense, lowrank, nf4], tmpdir("out-hand")))
    params = by_first(table(md["hand-dense"], "parameters by kind"))
    assert params["embedding"]["parameters"] == "52" and params["linear dense"]["parameters"] == "128", params
    assert params["other (biases, LayerNorm)"]["parameters"] == "52" and params["total"]["parameters"] == "232"
    facts = {k: r["value"] for k, r in by_first(table(md["hand-dense"], "quantity")).items()}
    assert facts["kind"] == "dense", facts
    assert facts["tokens/s (median, first step left out)"] == "1500", facts
    assert facts["final validation loss"] == "3.2500 (step 5)", facts
    assert facts["final train loss"] == "1.0000" and facts["tokens"] == "500" and facts["steps"] == "5", facts
    assert facts["linear compression (parameters)"] == "1.00x (128 against 128 dense)", facts
    assert "peak (RSS) 30.0" in facts["memory per rank, MB"], facts
    evals = by_first(table(md["hand-dense"], "task"))
    assert evals["senti"] == {"task": "senti", "n": "8", "accuracy": "0.250", "F1 macro": "0.200",
                              "F1 weighted": "0.300"}, evals

    facts = {k: r["value"] for k, r in by_first(table(md["hand-lowrank"], "quantity")).items()}
    assert facts["kind"] == "low-rank r2", facts
    # Rank 2: qkv 2·(4 + 12), proj 2·(4 + 4), fc 2·(4 + 8), mlp proj 2·(8 + 4) = 96 against 128.
    assert facts["linear compression (parameters)"] == "1.33x (96 against 128 dense)", facts
    assert facts["whole-model compression (parameters)"] == "1.16x", facts  # 232 / 200
    assert facts["final validation loss"] == "-" and facts["tokens/s (median, first step left out)"] == "600"
    assert "| task |" not in md["hand-lowrank"], "a run without evaluations has no task table"

    params = by_first(table(md["hand-nf4-lora"], "parameters by kind"))
    # NF4: half a byte per weight (64 bytes) and per site one int8 absmax and one float32 scale (20 bytes).
    q = params["linear dense"]
    assert (q["storage"], q["parameters"], q["MB"], q["bytes/parameter"]) == ("nf4", "128", "0.000", "0.66"), q
    assert params["LoRA"]["parameters"] == "48" and params["total"]["parameters"] == "280", params
    facts = {k: r["value"] for k, r in by_first(table(md["hand-nf4-lora"], "quantity")).items()}
    assert facts["kind"] == "NF4 + LoRA r1", facts
    assert facts["linear compression (parameters)"].startswith("1.00x"), facts
    assert facts["linear compression (bytes, against float32)"] == "6.10x", facts  # 512 / 84
    assert facts["whole-model compression (bytes, against float32)"] == "1.34x", facts  # 928 / 692
    assert facts["whole-model compression (parameters)"] == "0.83x", facts  # 232 / 280
    evals = by_first(table(md["hand-nf4-lora"], "task"))
    assert evals["senti"]["n"] == "8" and evals["senti"]["accuracy"] == "0.750", evals
    assert "Comparison" not in md, "no comparison without --compare"


def test_comparison_has_ratios_against_the_first_run():
    dense, lowrank, nf4 = hand_built()
    md = sections(report_ok([dense, lowrank, nf4], tmpdir("out-compare"), compare=True))
    rows = by_first(table(md["Comparison"], "run"))
    assert [r["kind"] for r in rows.values()] == ["dense", "low-rank r2", "NF4 + LoRA r1"], rows
    d, lr, q = rows["hand-dense"], rows["hand-lowrank"], rows["hand-nf4-lora"]
    assert d["tokens/s vs first"] == d["params vs first"] == d["MB vs first"] == "1.00x", d
    assert lr["tokens/s vs first"] == "0.40x" and q["tokens/s vs first"] == "2.00x", (lr, q)
    assert lr["params vs first"] == "0.86x" and lr["linear compression (params)"] == "1.33x", lr  # 200 / 232
    assert q["linear compression (bytes)"] == "6.10x" and q["MB vs first"] == "0.75x", q  # 692 / 928
    assert lr["val loss"] == "-" and d["val loss"] == "3.2500" and q["val loss"] == "2.0000", rows
    assert d["peak MB/rank"] == "30" and q["peak vs first"] == "1.00x", rows
    # Evaluations side by side: only the runs that have them.
    side = by_first(table(md["Comparison"], "task"))["senti"]
    assert side["n"] == "8" and side["hand-dense accuracy"] == "0.250", side
    assert side["hand-nf4-lora accuracy"] == "0.750" and side["hand-nf4-lora F1 weighted"] == "0.700", side
    assert "hand-lowrank accuracy" not in side, side


def test_plots_are_png_images():
    out = tmpdir("out-plots")
    report_ok(hand_built(), out)
    for name in PLOTS:
        path = os.path.join(out, name)
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC, f"{name} is not a PNG"
        assert os.path.getsize(path) > 10000, f"{name} is only {os.path.getsize(path)} bytes"


def test_real_runs_dense_lowrank_and_nf4_lora():
    tokens = write_tokens(os.path.join(TMP, "report_gpt2.bin"), 20000, vocab=50257, seed=5)
    val = write_tokens(os.path.join(TMP, "report_gpt2_val.bin"), 4000, vocab=50257, seed=6)
    dense, lowrank, tuned = tmpdir("real-dense"), tmpdir("real-lowrank"), tmpdir("real-nf4")
    for d, extra in [(dense, []), (lowrank, ["--lowrank.rank", "8"])]:
        run(["--mode", "pretrain", *GPT2_SMALL, *extra, "--data.train", tokens, "--data.val", val, "--run.dir", d,
             "--train.steps", "6", "--train.eval_every", "3", "--train.eval_batches", "1", "--run.log_every", "2"])
    base = os.path.join(dense, "ckpt_000006.h5")
    cli.finetune(tuned, base, ["--quant.bits", "4"])
    task = write_jsonl(os.path.join(TMP, "report_senti.jsonl"), sentiment_rows(9, 4))
    for model, d in [(base, dense), (os.path.join(tuned, "ckpt_000003.h5"), tuned)]:
        run(["--mode", "eval", "--model.init", model, "--eval.tasks", task, "--eval.method", "score",
             "--data.tokenizer_dir", TOKENIZER, "--run.dir", d])
    out = tmpdir("out-real")
    md = sections(report_ok([dense, lowrank, tuned], out, compare=True))
    rows = by_first(table(md["Comparison"], "run"))
    assert [r["kind"] for r in rows.values()] == ["dense", "low-rank r8", "NF4 + LoRA r4"], rows
    # d_model 32, d_ff 128, rank 8: 8·(32 + 96) + 8·(32 + 32) + 2·8·(32 + 128) = 4096 a block against 12288.
    assert rows["real-lowrank"]["linear compression (params)"] == "3.00x", rows
    assert float(rows["real-nf4"]["linear compression (bytes)"].rstrip("x")) > 6, rows
    for r in rows.values():
        assert float(r["tokens/s"]) > 0 and r["val loss"] != "-", r
    assert rows["real-dense"]["steps"] == "6" and rows["real-nf4"]["steps"] == "3", rows
    side = by_first(table(md["Comparison"], "task"))["report_senti"]
    assert side["n"] == "9" and 0 <= float(side["real-nf4 accuracy"]) <= 1, side
    with h5py.File(os.path.join(dense, "metrics.h5"), "r") as f:
        final_val = f["metrics/val_loss"][-1]
    facts = by_first(table(md["real-dense"], "quantity"))
    assert facts["final validation loss"]["value"] == f"{final_val:.4f} (step 6)", facts
    for name in PLOTS:
        assert os.path.getsize(os.path.join(out, name)) > 10000, name


def expect_bad(dirs, expect):
    p = report(dirs, tmpdir("out-bad"))
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, f"exit {p.returncode} for {dirs}: {p.stderr}"
    assert len(lines) == 1 and expect in lines[0], f"expected one line naming '{expect}', got: {p.stderr}"


def test_bad_run_directories_give_one_line_and_exit_2():
    dense = hand_built()[0]
    expect_bad([os.path.join(TMP, "no-such-run")], "no-such-run")
    no_metrics = tmpdir("bad-no-metrics")
    os.makedirs(no_metrics)
    write_checkpoint(os.path.join(no_metrics, "ckpt_000005.h5"), "dense")
    expect_bad([dense, no_metrics], "metrics.h5")
    no_checkpoint = tmpdir("bad-no-checkpoint")
    os.makedirs(no_checkpoint)
    write_metrics(os.path.join(no_checkpoint, "metrics.h5"), np.ones(5), np.ones(5))
    expect_bad([no_checkpoint], "checkpoint")
    garbage = tmpdir("bad-garbage")
    os.makedirs(garbage)
    write_checkpoint(os.path.join(garbage, "ckpt_000005.h5"), "dense")
    with open(os.path.join(garbage, "metrics.h5"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))
    expect_bad([garbage], os.path.join(garbage, "metrics.h5"))
    truncated = tmpdir("bad-truncated")
    os.makedirs(truncated)
    write_metrics(os.path.join(truncated, "metrics.h5"), np.ones(5), np.ones(5))
    with open(os.path.join(dense, "ckpt_000005.h5"), "rb") as src:
        data = src.read()
    with open(os.path.join(truncated, "ckpt_000005.h5"), "wb") as dst:
        dst.write(data[: len(data) // 2])
    expect_bad([truncated], "ckpt_000005.h5")


STUDY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools", "lowrank_study.py")


def test_lowrank_study_end_to_end():
    """tools/lowrank_study.py at a toy shape: every variant swept and trained, the table's compression (rank 9
    at 2.64x: 12288 dense weights a block against 9 x 512), dense's own gap of zero, the plot; a bad variant is
    one line and exit 2."""
    out = tmpdir("study")
    shape = ["--n_layer", "1", "--d_model", "32", "--n_head", "2", "--seq_len", "16", "--vocab_size", "512",
             "--batch_size", "4", "--train", cli.TRAIN, "--val", cli.VAL, "--lrllm", cli.LRLLM, "--eval_batches", "1"]
    p = subprocess.run([sys.executable, STUDY, *shape, "--tokens", "512", "--variants", "dense,naive,all",
                        "--lrs", "1e-3,3e-3,1e-2", "--sweep_fraction", "0.5", "--out", out],
                       capture_output=True, text=True, timeout=600, env=cli.ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "rank 9; 8 steps" in p.stdout, p.stdout
    with open(os.path.join(out, "study.md")) as f:
        rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
                for line in f if line.startswith("| ") and not line.startswith(("| variant", "| ---"))}
    assert set(rows) == {"dense", "naive", "all"}, rows
    assert rows["dense"][1] == "1.00x" and rows["dense"][4] == "+0.0000", rows["dense"]
    assert rows["naive"][0] == "4,608" and rows["naive"][1] == "2.67x", rows["naive"]
    for v, r in rows.items():
        assert r[2].rstrip("*") in ("0.001", "0.003", "0.01"), (v, r)
        assert float(r[3]) < 6.3, f"{v} diverged (uniform tokens: ln 512 = 6.24 is the floor): {r}"
    with open(os.path.join(out, "loss_vs_time.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC
    for v in ("dense", "naive", "all"):
        assert len([d for d in os.listdir(os.path.join(out, "runs")) if d.startswith(v + "-")]) == 4, v
    bad = subprocess.run([sys.executable, STUDY, *shape, "--tokens", "512", "--variants", "dense,wide"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "wide" in bad.stderr, bad.stderr


if __name__ == "__main__":
    cli.main(globals())
