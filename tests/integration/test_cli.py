"""End-to-end tests of the lrllm binary: MPI data parallelism, exact resume, decompose, eval, info, bad input.

Run as: /usr/bin/python3 tests/integration/test_cli.py BUILD_DIR
Prints PASS/FAIL per test and exits non-zero if any failed.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

import h5py
import numpy as np

BUILD = sys.argv[1] if len(sys.argv) > 1 else "build"
LRLLM = os.path.abspath(os.path.join(BUILD, "lrllm"))
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
           OMPI_MCA_rmaps_base_oversubscribe="1")
TMP = tempfile.mkdtemp(prefix="lrllm-it-")
SMALL = ["--model.vocab_size", "512", "--model.n_layer", "2", "--model.n_head", "2", "--model.d_model", "32",
         "--model.seq_len", "16", "--device", "cpu"]


def write_tokens(path, n, vocab=512, seed=0, count=None):
    rng = np.random.default_rng(seed)
    header = np.zeros(256, np.int32)
    header[:3] = [20240520, 1, n if count is None else count]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(rng.integers(0, vocab, n).astype(np.uint16).tobytes())
    return path


TRAIN = write_tokens(os.path.join(TMP, "train.bin"), 40000, seed=1)
VAL = write_tokens(os.path.join(TMP, "val.bin"), 4000, seed=2)


def run(args, np_=None, check=True):
    # --quiet keeps mpirun's own banner about a non-zero exit off stderr, leaving lrllm's one line.
    cmd = (["mpirun", "--quiet", "-np", str(np_), "--oversubscribe"] if np_ else []) + [LRLLM] + args
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


def pretrain(run_dir, extra=(), np_=None, check=True):
    """A 6-step run of the small model; options in extra replace the defaults."""
    options = {"--train.steps": "6", "--train.warmup": "2", "--train.lr": "3e-3", "--train.eval_every": "3",
               "--train.eval_batches": "2"}
    extra = list(extra)
    flags = []
    i = 0
    while i < len(extra):
        if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            options[extra[i]] = extra[i + 1]
            i += 2
        else:
            flags.append(extra[i])
            i += 1
    args = ["--mode", "pretrain", *SMALL, "--data.train", TRAIN, "--data.val", VAL, "--run.dir", run_dir]
    for k, v in options.items():
        args += [k, v]
    return run(args + flags, np_=np_, check=check)


def metric(run_dir, name):
    with h5py.File(os.path.join(run_dir, "metrics.h5"), "r") as f:
        return f["metrics"][name][:]


def tmpdir(name):
    d = os.path.join(TMP, name)
    shutil.rmtree(d, ignore_errors=True)
    return d


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30))


def model_tensors(path):
    out = {}
    with h5py.File(path, "r") as f:
        f["model"].visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


# ---------------------------------------------------------------------------------------------- tests


def test_metrics_and_checkpoint_layout():
    d = tmpdir("layout")
    pretrain(d)
    steps = metric(d, "step")
    assert list(steps) == [1, 2, 3, 4, 5, 6], steps
    for name in ["loss", "lr", "grad_norm", "tokens_per_s", "step_ms", "val_loss", "mem_params", "mem_grads",
                 "mem_optimizer", "mem_activations", "mem_peak"]:
        assert len(metric(d, name)) == 6, name
    val = metric(d, "val_loss")
    assert np.isnan(val[0]) and np.isfinite(val[2]) and np.isfinite(val[5]), val
    with h5py.File(os.path.join(d, "ckpt_000006.h5"), "r") as f:
        assert f.attrs["format"] == "lrllm" and f.attrs["format_version"] == 1
        assert f["config"].attrs["n_layer"] == 2 and f["config"].attrs["lowrank_rank"] == 0
        assert f["state"].attrs["step"] == 6
        assert f["optimizer/m/h.1/mlp/fc/W"].shape == (128, 32)
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]


def test_data_parallel_matches_single_rank():
    # The same global batch of 8 sequences: 1 rank x 2 micro-steps of 4, 2 ranks x 1 micro-step of 4, or
    # 4 ranks x 1 micro-step of 2.
    for kind, extra in [("dense", []), ("lowrank", ["--lowrank.rank", "8"])]:
        d1 = tmpdir(f"dp1-{kind}")
        pretrain(d1, [*extra, "--train.batch_size", "4", "--train.grad_accum", "2"], np_=1)
        for ranks, batch in [(2, "4"), (4, "2")]:
            d = tmpdir(f"dp{ranks}-{kind}")
            pretrain(d, [*extra, "--train.batch_size", batch, "--train.grad_accum", "1"], np_=ranks)
            l1, l2 = metric(d1, "loss"), metric(d, "loss")
            assert rel(l2, l1) < 1e-5, f"{kind} at {ranks} ranks: losses differ: {l1} vs {l2}"
            v1, v2 = metric(d1, "val_loss"), metric(d, "val_loss")
            assert np.array_equal(np.isnan(v1), np.isnan(v2))
            assert rel(v2[~np.isnan(v2)], v1[~np.isnan(v1)]) < 1e-5, f"{kind} at {ranks} ranks: val {v1} vs {v2}"


def test_resume_is_exact():
    full, part = tmpdir("resume-full"), tmpdir("resume-part")
    pretrain(full, ["--checkpoint.every", "3", "--lowrank.rank", "8", "--lowrank.targets", "qkv,fc"])
    pretrain(part, ["--checkpoint.every", "3", "--lowrank.rank", "8", "--lowrank.targets", "qkv,fc"])
    # Stop after 3 steps by removing the later checkpoint and resuming from step 3 with the command line that
    # started the run, as a requeued job does: options that agree with the checkpoint are no contradiction.
    os.remove(os.path.join(part, "ckpt_000006.h5"))
    p = pretrain(part, ["--checkpoint.every", "3", "--lowrank.rank", "8", "--lowrank.targets", "qkv,fc",
                        "--checkpoint.resume", "latest"])
    assert "resuming" in p.stdout, p.stdout
    assert np.array_equal(metric(full, "loss"), metric(part, "loss")), (metric(full, "loss"), metric(part, "loss"))
    assert list(metric(part, "step")) == [1, 2, 3, 4, 5, 6]
    a, b = model_tensors(os.path.join(full, "ckpt_000006.h5")), model_tensors(os.path.join(part, "ckpt_000006.h5"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs after resume"


def test_resume_refuses_options_that_contradict_the_checkpoint():
    d = tmpdir("resume-contradict")
    pretrain(d, ["--lowrank.rank", "8", "--lowrank.targets", "qkv,fc", "--train.steps", "2"])
    resume = ["--checkpoint.resume", "latest", "--train.steps", "3"]
    bad_input(["--mode", "pretrain", *SMALL, "--data.train", TRAIN, "--run.dir", d, *resume,
               "--lowrank.rank", "4", "--lowrank.targets", "qkv,fc"],
              "give qkv=r4,proj=none,fc=r4,mlp_proj=none but " + os.path.join(d, "ckpt_000002.h5") +
              " has qkv=r8,proj=none,fc=r8,mlp_proj=none")
    bad_input(["--mode", "pretrain", *SMALL, "--data.train", TRAIN, "--run.dir", d, *resume,
               "--lowrank.rank", "8", "--lowrank.targets", "all"], "proj=r8")
    base = base_checkpoint()
    ft = tmpdir("ft-contradict")
    finetune(ft, base, ["--quant.bits", "4"], steps=2)
    for option, value, expect in [("--lora.rank", "8", "adapters qkv=r8"), ("--lora.targets", "qkv", "proj=none"),
                                  ("--lora.alpha", "3", "--lora.alpha 3 contradicts"),
                                  ("--quant.bits", "8", "--quant.bits 8 contradicts"),
                                  ("--quant.block", "32", "--quant.block 32 contradicts"),
                                  ("--quant.embedding", "false", "whose embedding is quantized")]:
        options = {"--quant.bits": "4", "--checkpoint.resume": "latest", option: value}
        p = finetune(ft, base, [x for kv in options.items() for x in kv], check=False, steps=3)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert p.returncode == 2 and len(lines) == 1 and expect in lines[0], (option, p.returncode, p.stderr)
    # The same options again resume.
    p = finetune(ft, base, ["--quant.bits", "4", "--quant.block", "64", "--lora.alpha", "16", "--checkpoint.resume",
                            "latest"], steps=3)
    assert "resuming" in p.stdout and len(metric(ft, "loss")) == 3


def test_a_new_run_never_overwrites_an_earlier_one():
    d = tmpdir("rundir")
    pretrain(d, ["--train.steps", "2"])
    before = {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)}
    assert "ckpt_000002.h5" in before and "metrics.h5" in before
    bad_input(["--mode", "pretrain", *SMALL, "--data.train", TRAIN, "--run.dir", d, "--train.steps", "2"],
              "holds an earlier run (1 checkpoints and metrics.h5)")
    assert {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)} == before, "the refused run changed files"
    p = pretrain(d, ["--train.steps", "3", "--run.overwrite", "true"])
    aside = [n for n in os.listdir(d) if n.startswith("earlier-")]
    assert len(aside) == 1 and "moved the earlier run's 2 files" in p.stdout, (os.listdir(d), p.stdout)
    kept = os.path.join(d, aside[0])
    assert {n: open(os.path.join(kept, n), "rb").read() for n in os.listdir(kept)} == before
    assert list(metric(d, "step")) == [1, 2, 3] and os.path.exists(os.path.join(d, "ckpt_000003.h5"))


def test_checkpoint_keep():
    d = tmpdir("keep")
    pretrain(d, ["--checkpoint.every", "1", "--checkpoint.keep", "2"])
    assert sorted(n for n in os.listdir(d) if n.startswith("ckpt_")) == ["ckpt_000005.h5", "ckpt_000006.h5"]


def test_decompose_then_pretrain():
    dense = tmpdir("dec-dense")
    pretrain(dense)
    out = os.path.join(TMP, "lowrank.h5")
    p = run(["--mode", "decompose", "--model.init", os.path.join(dense, "ckpt_000006.h5"), "--lowrank.rank", "16",
             "--lowrank.targets", "qkv,proj,fc", "--data.output", out])
    assert "h.1/mlp/fc" in p.stdout and "rel. error" in p.stdout, p.stdout
    t = model_tensors(out)
    d = model_tensors(os.path.join(dense, "ckpt_000006.h5"))
    assert t["h.0/attn/qkv/A"].shape == (16, 32) and t["h.0/attn/qkv/B"].shape == (96, 16)
    w = d["h.0/mlp/fc/W"].astype(np.float64)
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    best = (u[:, :16] * sv[:16]) @ vt[:16]
    approx = t["h.0/mlp/fc/B"].astype(np.float64) @ t["h.0/mlp/fc/A"]
    assert np.linalg.norm(approx - best) / np.linalg.norm(w) < 1e-5, "B A is the best rank-16 approximation"
    expected_err = np.sqrt(np.sum(sv[16:] ** 2) / np.sum(sv ** 2))
    row = [l for l in p.stdout.splitlines() if l.startswith("h.0/mlp/fc ")][0]
    assert abs(float(row.split()[-1]) - expected_err) < 1e-4, (row, expected_err)
    assert "h.0/mlp/proj/W" in t and "h.0/attn/proj/A" in t
    cont = tmpdir("dec-cont")
    p = pretrain(cont, ["--model.init", out, "--train.steps", "3"])
    assert "init from" in p.stdout
    assert np.all(np.isfinite(metric(cont, "loss")))


def test_eval_and_info():
    d = tmpdir("evalinfo")
    pretrain(d, ["--lowrank.rank", "8"])
    ckpt = os.path.join(d, "ckpt_000006.h5")
    p = run(["--mode", "eval", "--model.init", ckpt, "--data.val", VAL, "--device", "cpu"])
    line = [l for l in p.stdout.splitlines() if "loss" in l and "ppl" in l]
    assert line, p.stdout
    loss = float(line[0].split("loss ")[1].split(",")[0])
    ppl = float(line[0].split("ppl ")[1].split()[0])
    assert abs(np.exp(loss) - ppl) / ppl < 1e-3
    p = run(["--mode", "info", "--model.init", ckpt])
    assert "lowrank r=8" in p.stdout and "/model/h.0/attn/qkv/A" in p.stdout and "compression" in p.stdout, p.stdout
    # The metrics file too: each series with its rows and last value.
    p = run(["--mode", "info", "--model.init", os.path.join(d, "metrics.h5")])
    # After the series, the run's record: its command line and configuration.
    table, record = p.stdout.split("command line: ")
    assert "--lowrank.rank 8" in record and "run configuration" in record, p.stdout
    rows = {l.split()[0]: l.split() for l in table.splitlines()[2:]}
    assert rows["step"][1:3] == ["6", "6"] and rows["loss"][1] == "6", p.stdout
    assert abs(float(rows["loss"][2]) - metric(d, "loss")[-1]) < 1e-4 * abs(metric(d, "loss")[-1]), p.stdout
    with h5py.File(os.path.join(d, "metrics.h5"), "r") as f:
        assert f.attrs["format"] == "lrllm-metrics"
    stray = os.path.join(TMP, "stray.h5")
    with h5py.File(stray, "w") as f:
        f["x"] = np.zeros(3)
    bad_input(["--mode", "info", "--model.init", stray], "not an lrllm file")


def test_nan_loss_keeps_last_checkpoint():
    d = tmpdir("nan")
    pretrain(d, ["--checkpoint.every", "3"])
    os.remove(os.path.join(d, "ckpt_000006.h5"))
    before = model_tensors(os.path.join(d, "ckpt_000003.h5"))
    p = pretrain(d, ["--checkpoint.every", "1", "--checkpoint.resume", "latest", "--train.lr", "1e30",
                     "--train.min_lr", "1e30", "--train.grad_clip", "0"], check=False)
    assert p.returncode == 3, (p.returncode, p.stderr)
    assert "loss is" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    after = model_tensors(os.path.join(d, "ckpt_000003.h5"))
    assert all(np.array_equal(before[k], after[k]) for k in before)
    for name in os.listdir(d):
        if name.startswith("ckpt_"):
            assert all(np.all(np.isfinite(v)) for v in model_tensors(os.path.join(d, name)).values()), name


def bad_input(args, expect, np_=None):
    p = run(args, np_=np_, check=False)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2, f"exit {p.returncode} for {args}: {p.stderr}"
    assert len(lines) == 1, f"expected one line on stderr for {args}, got: {p.stderr}"
    assert expect in lines[0], f"'{expect}' not in: {lines[0]}"


def gpu_visible():
    return shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def test_bad_options():
    base = ["--mode", "pretrain", *SMALL, "--data.train", TRAIN]
    bad_input(["--mode", "pretrain", "--no.such", "1"], "no.such")
    bad_input(["--mode", "pretrain", "--train.steps", "abc"], "train.steps")
    bad_input(["--mode", "fly"], "fly")
    bad_input([*base, "--train.lr", "-1"], "train.lr")
    bad_input([*base, "--lowrank.rank", "0", "--lowrank.targets", "qkv"], "lowrank.rank")
    bad_input([*base, "--lowrank.rank", "40"], "min(in, out)")
    bad_input(["--mode", "pretrain", "--config", os.path.join(TMP, "missing.cfg")], "missing.cfg")
    bad_input(["--mode", "pretrain", "--device", "tpu", "--data.train", TRAIN], "device")
    # Where no GPU is visible (CI), --device cuda is one clear line and exit 2, on every rank.
    if not gpu_visible():
        on_cuda = [*SMALL[:-2], "--device", "cuda", "--mode", "pretrain", "--data.train", TRAIN]
        bad_input(on_cuda, "--device cuda")
        bad_input(on_cuda, "--device cuda", np_=2)


def test_bad_files():
    base = ["--mode", "pretrain", *SMALL, "--run.dir", tmpdir("badfiles"), "--train.steps", "1"]
    bad_input([*base, "--data.train", os.path.join(TMP, "nope.bin")], "nope.bin")
    truncated = write_tokens(os.path.join(TMP, "trunc.bin"), 1000, count=2000)
    bad_input([*base, "--data.train", truncated], "header says 2000 tokens")
    bad_input([*base, "--data.train", truncated], "trunc.bin", np_=2)
    d = tmpdir("forfiles")
    pretrain(d)
    ckpt = os.path.join(d, "ckpt_000006.h5")
    missing = os.path.join(TMP, "missing_wte.h5")
    shutil.copy(ckpt, missing)
    with h5py.File(missing, "a") as f:
        del f["model/wte"]
    bad_input(["--mode", "eval", "--model.init", missing, "--data.val", VAL], "/model/wte is missing")
    wrong = os.path.join(TMP, "wrong_shape.h5")
    shutil.copy(ckpt, wrong)
    with h5py.File(wrong, "a") as f:
        del f["model/h.0/mlp/fc/W"]
        f["model/h.0/mlp/fc/W"] = np.zeros((7, 32), np.float32)
    bad_input(["--mode", "eval", "--model.init", wrong, "--data.val", VAL], "shape")
    corrupt = os.path.join(TMP, "corrupt.h5")
    with open(ckpt, "rb") as src, open(corrupt, "wb") as dst:
        dst.write(src.read()[: os.path.getsize(ckpt) // 2])
    bad_input(["--mode", "eval", "--model.init", corrupt, "--data.val", VAL], "corrupt.h5")
    bad_input(["--mode", "pretrain", "--model.init", ckpt, "--model.seq_len", "64", "--data.train", TRAIN,
               "--run.dir", tmpdir("seq")], "position table")
    bad_input(["--mode", "pretrain", *SMALL, "--data.train", TRAIN, "--checkpoint.resume", "latest",
               "--run.dir", tmpdir("empty")], "no checkpoint")


# -------------------------------------------------------------------------------------------- shards

SHARD_SOURCE = os.path.abspath("input/data/pretrain_val.bin")


def split_tokens(name, cuts, n=64 * 20 + 1):
    """Cuts the first n tokens of SHARD_SOURCE at the positions in cuts into NAME_000.bin, NAME_001.bin, ...;
    returns the shards' paths and a file of those n tokens, their concatenation."""
    header = np.fromfile(SHARD_SOURCE, np.int32, count=256)
    tokens = np.fromfile(SHARD_SOURCE, np.uint16, offset=1024)[:n]
    bounds = [0, *cuts, n]

    def write(path, part):
        h = header.copy()
        h[2] = len(part)
        with open(path, "wb") as f:
            f.write(h.tobytes() + part.tobytes())
        return path

    shards = [write(os.path.join(TMP, f"{name}_{k:03d}.bin"), tokens[a:b]) for k, (a, b) in
              enumerate(zip(bounds, bounds[1:]))]
    return shards, write(os.path.join(TMP, f"{name}_whole.bin"), tokens)


def shard_run(run_dir, train, val, extra=()):
    """6 steps of 4 sequences of 64 tokens: 24 sequences of a 20-sequence stream, so the run wraps an epoch."""
    return run(["--mode", "pretrain", *GPT2_SMALL, "--data.train", train, "--data.val", val, "--run.dir", run_dir,
                "--train.steps", "6", "--train.eval_every", "3", "--train.eval_batches", "2",
                "--checkpoint.every", "3", *extra])


def test_shards_equal_their_concatenation_and_resume_across_a_boundary():
    # Train shards end inside sequences 10 (tokens 640..704) and 15 (960..1024); the resume at step 3 starts at
    # sequence 12, in the second shard. The validation list is in reverse name order (the order given counts),
    # and ends inside its sequence 4.
    train, whole = split_tokens("train", [700, 1000])
    (val_head, val_tail), _ = split_tokens("val", [300])
    renamed = os.path.join(TMP, "val_002.bin")
    os.rename(val_head, renamed)
    val_list = renamed + "," + val_tail
    pattern = os.path.join(TMP, "train_0*.bin")
    for shuffle in ["false", "true"]:
        option = ["--data.shuffle", shuffle]
        one = tmpdir(f"shards-one-{shuffle}")
        p = shard_run(one, whole, whole, option)
        assert "1281 tokens" in p.stdout, p.stdout
        many = tmpdir(f"shards-many-{shuffle}")
        p = shard_run(many, pattern, val_list, option)
        assert "train 1281 tokens in 3 shards, val 1281 tokens in 2 shards" in p.stdout, p.stdout
        for name in ["loss", "val_loss"]:
            a, b = metric(one, name), metric(many, name)
            assert np.array_equal(a, b, equal_nan=True), f"{name} with shuffle {shuffle}: {a} vs {b}"
        resumed = tmpdir(f"shards-resumed-{shuffle}")
        shutil.copytree(many, resumed)
        os.remove(os.path.join(resumed, "ckpt_000006.h5"))
        p = shard_run(resumed, ",".join(train), val_list, [*option, "--checkpoint.resume", "latest"])
        assert "resuming" in p.stdout, p.stdout
        assert list(metric(resumed, "step")) == [1, 2, 3, 4, 5, 6]
        for name in ["loss", "val_loss"]:
            a, b = metric(many, name), metric(resumed, name)
            assert np.array_equal(a, b, equal_nan=True), f"resumed {name} with shuffle {shuffle}: {a} vs {b}"
    ckpt = os.path.join(TMP, "shards-many-true", "ckpt_000006.h5")
    evals = [run(["--mode", "eval", "--model.init", ckpt, "--data.val", data]).stdout for data in [whole, pattern]]
    losses = [re.search(r"loss (\S+), ppl", e).group(1) for e in evals]
    assert losses[0] == losses[1], evals


def test_shards_bad_shard_is_one_line_and_exit_2():
    shards, _ = split_tokens("bad", [700, 1000])
    pattern = os.path.join(TMP, "bad_0*.bin")
    base = ["--mode", "pretrain", *GPT2_SMALL, "--run.dir", tmpdir("shards-bad"), "--train.steps", "1"]
    with open(shards[1], "r+b") as f:
        f.truncate(os.path.getsize(shards[1]) - 100)
    bad_input([*base, "--data.train", pattern], shards[1] + ": header says 300 tokens")
    bad_input([*base, "--data.train", pattern], "bad_001.bin", np_=2)
    bad_input([*base, "--data.train", shards[0] + "," + os.path.join(TMP, "bad_009.bin")], "bad_009.bin")
    bad_input([*base, "--data.train", shards[0], "--data.val", os.path.join(TMP, "nothing_*.bin")],
              "nothing_*.bin: the pattern matches no file")


# ------------------------------------------------------------------------------------------ finetuning

GPT2_SMALL = ["--model.vocab_size", "50257", "--model.n_layer", "2", "--model.n_head", "2", "--model.d_model",
              "32", "--model.seq_len", "64", "--device", "cpu"]
TOKENIZER = os.path.abspath("input/data/tokenizer")


def write_jsonl(path, rows):
    import json
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def sentiment_rows(n, seed):
    rng = np.random.default_rng(seed)
    words = {"positive": ["profits rose", "sales grew strongly", "the market rallied"],
             "negative": ["losses widened", "shares fell sharply", "the deficit grew"],
             "neutral": ["the meeting is on monday", "the report was published", "the board met"]}
    rows = []
    for _ in range(n):
        label = ["positive", "negative", "neutral"][rng.integers(3)]
        rows.append({"instruction": "What is the sentiment of this news? Please choose an answer from "
                                    "{negative/neutral/positive}.",
                     "input": str(rng.choice(words[label])).capitalize() + ".", "output": label})
    return rows


def base_checkpoint():
    d = tmpdir("ft-base")
    gpt2_tokens = write_tokens(os.path.join(TMP, "gpt2.bin"), 20000, vocab=50257, seed=5)
    run(["--mode", "pretrain", *GPT2_SMALL, "--data.train", gpt2_tokens, "--run.dir", d, "--train.steps", "2",
         "--train.eval_batches", "1"])
    return os.path.join(d, "ckpt_000002.h5")


def finetune(run_dir, base, extra=(), check=True, np_=None, steps=3, batch_size=4):
    train = write_jsonl(os.path.join(TMP, "ft_train.jsonl"), sentiment_rows(24, 1))
    val = write_jsonl(os.path.join(TMP, "ft_val.jsonl"), sentiment_rows(8, 2))
    return run(["--mode", "finetune", "--model.init", base, "--data.train", train, "--data.val", val,
                "--data.tokenizer_dir", TOKENIZER, "--run.dir", run_dir, "--train.steps", str(steps),
                "--train.batch_size", str(batch_size), "--train.lr", "1e-2", "--train.warmup", "0", "--train.eval_batches", "1",
                *([] if "--lora.rank" in extra else ["--lora.rank", "4"]), *extra], check=check, np_=np_)


def test_finetune_trains_only_adapters_over_a_frozen_quantized_base():
    base = base_checkpoint()
    for bits, kind, quant_wte in [("4", "nf4", "true"), ("8", "int8", "true"), ("4", "nf4", "false"),
                                  ("0", "none", "true")]:
        d = tmpdir(f"ft-{bits}-{quant_wte}")
        p = finetune(d, base, ["--quant.bits", bits, "--quant.embedding", quant_wte])
        assert "frozen base stored as" in p.stdout, p.stdout
        ckpt = os.path.join(d, "ckpt_000003.h5")
        with h5py.File(base, "r") as fb, h5py.File(ckpt, "r") as ff:
            assert ff["config"].attrs["quant"] == kind and ff["config"].attrs["lora_rank"] == 4
            wte_quantized = kind != "none" and quant_wte == "true"
            # A quantized wte's codes are checked against a reference quantization in tests/reference.
            assert ("wte_q" in ff["model"]) == wte_quantized and ("wte" in ff["model"]) != wte_quantized
            for name in ["wpe", "ln_f/w", "h.0/ln_1/w", "h.1/mlp/fc/b", "h.0/attn/qkv/b"] + \
                    ([] if wte_quantized else ["wte"]):
                assert np.array_equal(fb["model/" + name][()], ff["model/" + name][()]), f"{name} changed"
            if kind == "none":
                assert np.array_equal(fb["model/h.0/attn/qkv/W"][()], ff["model/h.0/attn/qkv/W"][()])
            else:
                assert "W" not in ff["model/h.0/attn/qkv"] and "W_q" in ff["model/h.0/attn/qkv"]
            opt = []
            ff["optimizer/m"].visititems(lambda n, o: opt.append(n) if isinstance(o, h5py.Dataset) else None)
            assert opt and all(n.endswith("lora_A") or n.endswith("lora_B") for n in opt), opt
            assert np.abs(ff["model/h.1/mlp/proj/lora_B"][()]).max() > 0, "lora_B did not train"
        assert np.all(np.isfinite(metric(d, "loss")))
        assert metric(d, "mem_params_quantized")[0] > 0 or kind == "none"


def test_finetune_recompute_gives_identical_losses():
    base = base_checkpoint()
    for dropout in ["0", "0.2"]:
        a, b = tmpdir("ft-rc-none"), tmpdir("ft-rc-block")
        finetune(a, base, ["--quant.bits", "4", "--lora.dropout", dropout])
        finetune(b, base, ["--quant.bits", "4", "--lora.dropout", dropout, "--train.recompute", "block"])
        assert np.array_equal(metric(a, "loss"), metric(b, "loss")), dropout
    # Dropout draws masks from the step, so an interrupted and resumed run matches one that never stopped.
    a, b = tmpdir("ft-do-full"), tmpdir("ft-do-part")
    finetune(a, base, ["--lora.dropout", "0.2", "--checkpoint.every", "1"])
    finetune(b, base, ["--lora.dropout", "0.2", "--checkpoint.every", "1"])
    os.remove(os.path.join(b, "ckpt_000003.h5"))
    finetune(b, base, ["--lora.dropout", "0.2", "--checkpoint.every", "1", "--checkpoint.resume", "latest"])
    assert np.array_equal(metric(a, "loss"), metric(b, "loss"))


def test_finetune_trains_saved_modules_beside_adapters_and_resumes_exactly():
    base = base_checkpoint()
    mods = ["--quant.bits", "4", "--lora.modules_to_save", "ln_f,h.*/ln_2,h.0/mlp/fc/b,wpe", "--checkpoint.every", "2"]
    full, part = tmpdir("ft-saved-full"), tmpdir("ft-saved-part")
    p = finetune(full, base, mods, steps=4)
    assert "trained beside them" in p.stdout, p.stdout
    finetune(part, base, mods, steps=4)
    os.remove(os.path.join(part, "ckpt_000004.h5"))
    finetune(part, base, [*mods, "--checkpoint.resume", "latest"], steps=4)
    assert np.array_equal(metric(full, "loss"), metric(part, "loss"))
    saved = ["ln_f/w", "ln_f/b", "h.0/ln_2/w", "h.1/ln_2/b", "h.0/mlp/fc/b", "wpe"]
    with h5py.File(base, "r") as fb, h5py.File(os.path.join(full, "ckpt_000004.h5"), "r") as fa, \
            h5py.File(os.path.join(part, "ckpt_000004.h5"), "r") as fp:
        assert fa.attrs["format_version"] == 2 and fa["config"].attrs["lora_modules"] == "ln_f,h.*/ln_2,h.0/mlp/fc/b,wpe"
        for name in saved:
            assert not np.array_equal(fb["model/" + name][()], fa["model/" + name][()]), f"{name} did not train"
            assert np.array_equal(fa["model/" + name][()], fp["model/" + name][()]), f"{name} differs after resume"
            assert np.array_equal(fa["optimizer/m/" + name][()], fp["optimizer/m/" + name][()]), name
        for name in ["h.0/ln_1/w", "h.1/ln_1/b", "h.1/mlp/fc/b", "h.0/attn/qkv/b"]:
            assert np.array_equal(fb["model/" + name][()], fa["model/" + name][()]), f"frozen {name} changed"
            assert "optimizer/m/" + name not in fa
    # The memory the saved modules add is counted as trainable parameters, gradients and optimizer state.
    assert metric(full, "mem_params_trainable")[0] > 0
    p = run(["--mode", "eval", "--model.init", os.path.join(full, "ckpt_000004.h5"), "--data.val",
             write_tokens(os.path.join(TMP, "saved_val.bin"), 2000, vocab=50257, seed=9), "--train.eval_batches", "1"])
    assert "loss" in p.stdout
    common = ["--mode", "finetune", "--model.init", base, "--data.train",
              write_jsonl(os.path.join(TMP, "saved.jsonl"), sentiment_rows(4, 3)), "--data.tokenizer_dir", TOKENIZER,
              "--lora.rank", "4", "--quant.bits", "4", "--run.dir", tmpdir("ft-saved-bad")]
    bad_input([*common, "--lora.modules_to_save", "h.*/mlp/fc/W"], "names no LayerNorm, bias or embedding")
    bad_input([*common, "--lora.modules_to_save", "wte"], "wte is stored quantized")


def test_finetune_trains_chosen_tokens_rows_resumes_exactly_and_merges():
    base = base_checkpoint()
    with open(os.path.join(TOKENIZER, "encoder.json")) as f:
        encoder = json.load(f)
    # "answers": the training answers' tokens (" positive" ... one token each in GPT-2's BPE) and <|endoftext|>.
    want = sorted([encoder["\u0120" + w] for w in ("positive", "negative", "neutral")] + [50256])
    mods = ["--quant.bits", "4", "--lora.trainable_tokens", "answers", "--checkpoint.every", "2"]
    full, part = tmpdir("ft-tokens-full"), tmpdir("ft-tokens-part")
    p = finetune(full, base, mods, steps=4)
    assert "trainable tokens: 4 wte rows" in p.stdout, p.stdout
    finetune(part, base, mods, steps=4)
    os.remove(os.path.join(part, "ckpt_000004.h5"))
    finetune(part, base, [*mods, "--checkpoint.resume", "latest"], steps=4)
    assert np.array_equal(metric(full, "loss"), metric(part, "loss"))
    ft = os.path.join(full, "ckpt_000004.h5")
    with h5py.File(ft, "r") as fa, h5py.File(os.path.join(part, "ckpt_000004.h5"), "r") as fp:
        assert fa.attrs["format_version"] == 3 and list(fa["config"].attrs["trainable_tokens"]) == want
        delta = fa["model/trainable_tokens/delta"][()]
        assert delta.shape == (4, 32) and np.all(np.abs(delta).sum(axis=1) > 0), "every chosen row trains"
        for name in ["model/trainable_tokens/delta", "optimizer/m/trainable_tokens/delta",
                     "optimizer/v/trainable_tokens/delta"]:
            assert np.array_equal(fa[name][()], fp[name][()]), f"{name} differs after resume"
    # Merged, the deltas fold into their wte rows: the same model without adapters or deltas.
    tokens = write_tokens(os.path.join(TMP, "tokens_eval.bin"), 3000, vocab=50257, seed=9)
    merged = os.path.join(TMP, "merged-tokens.h5")
    run(["--mode", "export", "--model.init", ft, "--lora.merge", "true", "--data.output", merged])
    with h5py.File(merged, "r") as f:
        assert "trainable_tokens" not in f["model"] and "trainable_tokens" not in f["config"].attrs
    a, b = eval_loss(ft, tokens), eval_loss(merged, tokens)
    assert abs(a - b) < 1e-4 * abs(a), (a, b)
    common = ["--mode", "finetune", "--model.init", base, "--data.train",
              write_jsonl(os.path.join(TMP, "tokens.jsonl"), sentiment_rows(4, 3)), "--data.tokenizer_dir", TOKENIZER,
              "--lora.rank", "4", "--run.dir", tmpdir("ft-tokens-bad")]
    bad_input([*common, "--lora.trainable_tokens", "12,x"], "'x' is not a token id")
    bad_input([*common, "--lora.trainable_tokens", "-3"], "'-3' is not a token id")
    bad_input([*common, "--lora.trainable_tokens", "50257"], "outside the vocabulary of 50257")
    bad_input([*common, "--quant.embedding", "false", "--lora.modules_to_save", "wte", "--lora.trainable_tokens",
               "answers"], "wte trains in full already")
    bad_input(["--mode", "finetune", "--checkpoint.resume", ft, "--data.train", os.path.join(TMP, "tokens.jsonl"),
               "--data.tokenizer_dir", TOKENIZER, "--run.dir", full, "--lora.trainable_tokens", "5,6"],
              "contradicts")


def ft_command(run_dir, base, train, extra=()):
    return ["--mode", "finetune", "--model.init", base, "--data.train", train, "--data.tokenizer_dir", TOKENIZER,
            "--run.dir", run_dir, "--train.lr", "1e-2", "--train.warmup", "0", "--train.eval_batches", "1",
            "--lora.rank", "4", *extra]


def test_finetune_batches_pad_to_the_longest_row_pack_and_count_real_tokens():
    base = base_checkpoint()
    # Padding to the longest row or to seq_len is the same arithmetic: the same losses and real tokens.
    longest, max_length = tmpdir("ft-pad-longest"), tmpdir("ft-pad-max")
    p = finetune(longest, base, steps=3)
    assert "padded to each batch's longest" in p.stdout, p.stdout
    finetune(max_length, base, ["--data.padding", "max_length"], steps=3)
    assert np.allclose(metric(longest, "loss"), metric(max_length, "loss"), rtol=1e-5, atol=0)
    seen = metric(longest, "tokens_seen")
    assert np.array_equal(seen, metric(max_length, "tokens_seen")), "padding is not counted"
    # The examples are 30 to 40 tokens: 12 of them padded to 64 would count 768.
    assert 12 * 25 < seen[-1] < 12 * 45, f"{seen[-1]} tokens: the padding to seq_len 64 was counted"
    rate = metric(max_length, "tokens_per_s")
    assert np.all(rate > 0) and np.all(np.isfinite(rate))

    # One epoch, one example a row (24 examples, 4 a step: 6 steps) and packed (several a row, one row a step):
    # the same real tokens.
    short = [{**r, "instruction": "Sentiment?"} for r in sentiment_rows(24, 1)]  # about 15 tokens each
    train = write_jsonl(os.path.join(TMP, "ft_epoch.jsonl"), short)
    rows_dir, packed_dir = tmpdir("ft-epoch-rows"), tmpdir("ft-epoch-packed")
    p = run(ft_command(rows_dir, base, train, ["--train.epochs", "1", "--train.batch_size", "4"]))
    assert "validation runs on" not in p.stdout and "the training examples themselves" in p.stdout, p.stdout
    assert list(metric(rows_dir, "step")) == list(range(1, 7))
    p = run(ft_command(packed_dir, base, train, ["--train.epochs", "1", "--train.batch_size", "1",
                                                 "--data.packing", "true"]))
    m = re.search(r"train 24 examples packed in (\d+) rows", p.stdout)
    assert m and 1 < int(m.group(1)) < 24, p.stdout
    steps = metric(packed_dir, "step")
    assert len(steps) == int(m.group(1)), "one packed row a step for one epoch"
    assert metric(packed_dir, "tokens_seen")[-1] == metric(rows_dir, "tokens_seen")[-1]
    assert np.all(np.isfinite(metric(packed_dir, "loss")))

    # A held-out share, and rows cut to --model.seq_len below the base's 64.
    held = tmpdir("ft-held")
    p = run(ft_command(held, base, train, ["--train.steps", "2", "--data.val_fraction", "0.25",
                                           "--model.seq_len", "32"]))
    assert "train 18 examples, val 6 examples (0.25 of" in p.stdout, p.stdout
    assert "rows of at most 32 tokens" in p.stdout, p.stdout
    assert np.isfinite(metric(held, "val_loss")[-1])

    common = ft_command(tmpdir("ft-data-bad"), base, train)
    bad_input([*common, "--data.padding", "left"], "--data.padding must be longest or max_length")
    bad_input([*common, "--train.epochs", "-1"], "--train.epochs must be between")
    bad_input([*common, "--train.epochs", "nan"], "--train.epochs must be between")
    bad_input([*common, "--train.epochs", "1", "--train.steps", "5"], "give one")
    bad_input([*common, "--data.val_fraction", "1.5"], "--data.val_fraction must be in [0, 1)")
    bad_input([*common, "--data.val_fraction", "0.2", "--data.val", train], "give one")
    bad_input([*common, "--data.val_fraction", "0.01"], "leaves no validation example")
    bad_input([*common, "--model.seq_len", "65"], "above the position table")
    bad_input([*common, "--data.packing", "true", "--device", "cuda"], "CPU backend only")


def test_finetune_records_its_template_for_eval_and_resume():
    base = base_checkpoint()
    d = tmpdir("ft-alpaca")
    p = finetune(d, base, ["--data.template", "alpaca", "--checkpoint.every", "1"], steps=2)
    assert "alpaca template" in p.stdout, p.stdout
    ckpt = os.path.join(d, "ckpt_000002.h5")
    with h5py.File(ckpt, "r") as f:
        assert f["config"].attrs["prompt_template"] == "alpaca"
    tasks = write_jsonl(os.path.join(TMP, "alpaca_tasks.jsonl"), sentiment_rows(6, 4))
    common = ["--mode", "eval", "--model.init", ckpt, "--eval.tasks", tasks, "--eval.method", "score",
              "--data.tokenizer_dir", TOKENIZER]
    p = run([*common, "--run.dir", tmpdir("ft-alpaca-eval")])
    assert "alpaca template" in p.stdout, p.stdout
    p = run([*common, "--data.template", "fingpt", "--run.dir", tmpdir("ft-alpaca-eval2")])
    assert "fingpt template" in p.stdout, p.stdout
    with h5py.File(base, "r") as f:
        assert "prompt_template" not in f["config"].attrs, "a base records no template"
    os.remove(ckpt)
    bad_input(["--mode", "finetune", "--checkpoint.resume", "latest", "--data.train",
               os.path.join(TMP, "ft_train.jsonl"), "--data.tokenizer_dir", TOKENIZER, "--run.dir", d,
               "--train.steps", "2", "--data.template", "fingpt"], "finetuned with alpaca")
    bad_input([*common, "--data.template", "vicuna", "--run.dir", tmpdir("ft-alpaca-bad")],
              "--data.template must be fingpt or alpaca")
    finetune(d, base, ["--data.template", "alpaca", "--checkpoint.resume", "latest"], steps=2)


def test_finetune_bad_input():
    base = base_checkpoint()
    bad = os.path.join(TMP, "bad.jsonl")
    with open(bad, "w") as f:
        f.write('{"instruction": "a", "input": "b", "output": "c"}\nnot json\n')
    common = ["--mode", "finetune", "--model.init", base, "--data.tokenizer_dir", TOKENIZER, "--lora.rank", "4",
              "--run.dir", tmpdir("ft-bad")]
    bad_input([*common, "--data.train", bad], "bad.jsonl:2")
    missing = write_jsonl(os.path.join(TMP, "nooutput.jsonl"), [{"instruction": "a", "input": "b"}])
    bad_input([*common, "--data.train", missing], "output")
    good = write_jsonl(os.path.join(TMP, "good.jsonl"), sentiment_rows(4, 3))
    bad_input([*common, "--data.train", good, "--quant.bits", "3"], "quant.bits")
    bad_input(["--mode", "finetune", "--model.init", base, "--data.train", good, "--run.dir", tmpdir("ft-bad2")],
              "lora.rank")
    wrong = os.path.join(TMP, "ft_wrong_shape.h5")
    shutil.copy(base, wrong)
    with h5py.File(wrong, "a") as f:
        del f["model/h.0/mlp/fc/W"]
        f["model/h.0/mlp/fc/W"] = np.zeros((7, 32), np.float32)
    bad_input(["--mode", "finetune", "--model.init", wrong, "--data.train", good, "--data.tokenizer_dir",
               TOKENIZER, "--lora.rank", "4", "--quant.bits", "4", "--run.dir", tmpdir("ft-bad3")], "shape")


def test_eval_on_instruction_tasks():
    base = base_checkpoint()
    d = tmpdir("ft-eval")
    finetune(d, base, ["--quant.bits", "4"])
    task = write_jsonl(os.path.join(TMP, "senti.jsonl"), sentiment_rows(9, 4))
    for method in ["generate", "score"]:
        p = run(["--mode", "eval", "--model.init", os.path.join(d, "ckpt_000003.h5"), "--eval.tasks", task,
                 "--eval.method", method, "--data.tokenizer_dir", TOKENIZER, "--run.dir", d,
                 "--eval.max_new_tokens", "3"], np_=2)
        row = [l for l in p.stdout.splitlines() if l.startswith("| senti |")]
        assert row, p.stdout
        n, acc = row[0].split("|")[2:4]
        assert int(n) == 9 and 0.0 <= float(acc) <= 1.0, row
    bad_input(["--mode", "eval", "--model.init", os.path.join(d, "ckpt_000003.h5"), "--eval.tasks", task,
               "--eval.labels", "negative,positive", "--data.tokenizer_dir", TOKENIZER, "--run.dir", d],
              "not one of the task's labels")
    with h5py.File(os.path.join(d, "metrics.h5"), "r") as f:
        assert list(f["eval/senti/n"][:]) == [9, 9]
        assert f["eval/senti/accuracy"].shape == (2,) and "f1_macro" in f["eval/senti"]


def eval_loss(model, tokens):
    p = run(["--mode", "eval", "--model.init", model, "--data.val", tokens, "--device", "cpu"])
    return float(p.stdout.split("loss ")[1].split(",")[0])


def test_export_quantizes_and_merges_adapters():
    base = base_checkpoint()
    tokens = write_tokens(os.path.join(TMP, "gpt2_eval.bin"), 3000, vocab=50257, seed=9)
    for name, extra in [("dense", []), ("lowrank", ["lowrank"])]:
        start = base
        if extra:
            start = os.path.join(TMP, "lowrank_base.h5")
            run(["--mode", "decompose", "--model.init", base, "--lowrank.rank", "8", "--lowrank.targets", "qkv,fc",
                 "--data.output", start])
        d = tmpdir(f"exp-{name}")
        finetune(d, start, ["--quant.bits", "4"])
        ft = os.path.join(d, "ckpt_000003.h5")
        merged = os.path.join(TMP, f"merged-{name}.h5")
        p = run(["--mode", "export", "--model.init", ft, "--lora.merge", "true", "--data.output", merged])
        assert "adapters merged" in p.stdout, p.stdout
        with h5py.File(merged, "r") as f:
            assert f["config"].attrs["lora_rank"] == 0 and f["config"].attrs["quant"] == "none"
            assert "lora_A" not in f["model/h.0/mlp/proj"]
            if extra:
                assert f["model/h.0/attn/qkv/A"].shape == (12, 32), "rank 8 + LoRA rank 4"
        a, b = eval_loss(ft, tokens), eval_loss(merged, tokens)
        assert abs(a - b) < 1e-4 * abs(a), (name, a, b)
    small = os.path.join(TMP, "base-nf4.h5")
    p = run(["--mode", "export", "--model.init", base, "--quant.bits", "4", "--data.output", small])
    assert os.path.getsize(small) < os.path.getsize(base)
    assert abs(eval_loss(small, tokens) - eval_loss(base, tokens)) < 0.05
    p = run(["--mode", "info", "--model.init", small])
    assert "nf4 codes" in p.stdout, p.stdout
    bad_input(["--mode", "pretrain", "--model.init", small, "--data.train", tokens, "--run.dir", tmpdir("exp-bad")],
              "quantized")


def generate(model, extra=()):
    p = run(["--mode", "generate", "--model.init", model, "--data.tokenizer_dir", TOKENIZER, "--generate.prompt",
             "Shares of", "--generate.max_new_tokens", "12", *extra])
    assert p.stdout.startswith("Shares of") and p.stdout.endswith("\n"), p.stdout
    assert "generated " in p.stderr, p.stderr
    return p.stdout


def test_generate_is_seeded_and_reads_exports():
    base = base_checkpoint()
    greedy = generate(base)
    assert greedy == generate(base, ["--seed", "7"]), "greedy decoding must not depend on the seed"
    assert greedy == generate(base, ["--generate.temperature", "1.5", "--generate.top_k", "1"]), "top_k 1 is greedy"
    sampled = ["--generate.temperature", "1.0", "--generate.top_k", "50"]
    a = generate(base, sampled + ["--seed", "1"])
    assert a == generate(base, sampled + ["--seed", "1"]), "same seed, same text"
    assert a != generate(base, sampled + ["--seed", "2"]), "another seed should draw other tokens"
    nf4 = os.path.join(TMP, "generate-nf4.h5")
    run(["--mode", "export", "--model.init", base, "--quant.bits", "4", "--data.output", nf4])
    assert len(generate(nf4)) > len("Shares of\n")
    bad_input(["--mode", "generate", "--data.tokenizer_dir", TOKENIZER], "--model.init")
    bad_input(["--mode", "generate", "--model.init", base, "--generate.temperature", "-1"], "temperature")
    bad_input(["--mode", "generate", "--model.init", base, "--generate.top_k", "-3"], "top_k")
    small = os.path.join(tmpdir("gen-small"), "ckpt_000001.h5")
    pretrain(os.path.dirname(small), ["--train.steps", "1", "--train.eval_every", "0"])
    bad_input(["--mode", "generate", "--model.init", small, "--data.tokenizer_dir", TOKENIZER], "vocabulary")


def llama_checkpoint():
    """A tiny Llama (grouped-query: 4 heads, 2 kv heads) pretrained for 2 steps, with GPT-2's vocabulary."""
    d = tmpdir("llama-base")
    gpt2_tokens = write_tokens(os.path.join(TMP, "gpt2.bin"), 20000, vocab=50257, seed=5)
    shape = [*GPT2_SMALL]
    shape[shape.index("--model.n_head") + 1] = "4"
    run(["--mode", "pretrain", *shape, "--model.arch", "llama", "--model.n_kv_head", "2", "--data.train",
         gpt2_tokens, "--run.dir", d, "--train.steps", "2", "--train.eval_batches", "1"])
    return os.path.join(d, "ckpt_000002.h5")


def test_generate_with_the_kv_cache_equals_rerunning_the_window():
    task = write_jsonl(os.path.join(TMP, "senti-cache.jsonl"), sentiment_rows(6, 5))
    for arch, model in [("gpt2", base_checkpoint()), ("llama", llama_checkpoint())]:
        # 12 tokens stay inside the window of 64; 80 pass it, where the window slides.
        for new in [12, 80]:
            out = {}
            for cache in ["true", "false"]:
                # Bytes: a random model's tokens need not join into valid UTF-8.
                p = subprocess.run([LRLLM, "--mode", "generate", "--model.init", model, "--data.tokenizer_dir",
                                    TOKENIZER, "--generate.prompt", "Shares of", "--generate.max_new_tokens",
                                    str(new), "--generate.kv_cache", cache], env=ENV, capture_output=True,
                                   timeout=300)
                err = p.stderr.decode(errors="replace")
                assert p.returncode == 0, (arch, cache, err)
                out[cache] = p.stdout
                n = int(re.search(r"generated (\d+) tokens", err).group(1))
                assert n == new, (arch, cache, err)
            assert out["true"] == out["false"], (arch, new, out)
        rows = {}
        for cache in ["true", "false"]:
            p = run(["--mode", "eval", "--model.init", model, "--eval.tasks", task, "--eval.method", "generate",
                     "--data.tokenizer_dir", TOKENIZER, "--run.dir", tmpdir(f"eval-cache-{arch}-{cache}"),
                     "--eval.max_new_tokens", "4", "--generate.kv_cache", cache])
            rows[cache] = [l for l in p.stdout.splitlines() if l.startswith("| senti-cache |")]
            assert len(rows[cache]) == 1, p.stdout
        assert rows["true"] == rows["false"], (arch, rows)


def test_logs_are_plain_lines_when_not_a_terminal():
    d = tmpdir("plain-log")
    p = pretrain(d)
    text = p.stdout + p.stderr
    assert "step " in p.stdout, p.stdout
    control = sorted({hex(ord(c)) for c in text if ord(c) < 32 and c != "\n"})
    assert not control, f"control characters in a non-tty log: {control}"


def test_export_of_random_weights_quantizes_low_rank_factors():
    shape = [*GPT2_SMALL, "--lowrank.rank", "8", "--seed", "3"]
    plain, nf4 = os.path.join(TMP, "random-f32.h5"), os.path.join(TMP, "random-nf4.h5")
    p = run(["--mode", "export", *shape, "--data.output", plain])
    assert "(random weights)" in p.stdout, p.stdout
    run(["--mode", "export", *shape, "--quant.bits", "4", "--data.output", nf4])
    with h5py.File(nf4, "r") as f:
        assert {"A_q", "B_q"} <= set(f["model/h.0/attn/qkv"]) and "wte_q" in f["model"]
        assert "A" not in f["model/h.0/attn/qkv"] and "wte" not in f["model"]
    assert os.path.getsize(nf4) < 0.3 * os.path.getsize(plain)
    tokens = write_tokens(os.path.join(TMP, "random_eval.bin"), 3000, vocab=50257, seed=11)
    assert abs(eval_loss(nf4, tokens) - eval_loss(plain, tokens)) < 0.05
    assert "low-rank" in run(["--mode", "info", "--model.init", nf4]).stdout
    assert len(generate(nf4)) > len("Shares of\n")


LLAMA_SMALL = ["--model.arch", "llama", "--model.vocab_size", "512", "--model.n_layer", "2", "--model.n_head", "4",
               "--model.n_kv_head", "2", "--model.d_model", "32", "--model.d_ff", "88", "--model.seq_len", "16",
               "--device", "cpu"]


def test_export_of_random_weights_streams_what_a_built_model_holds():
    # The streamed export (a tensor drawn, quantized and written at a time) against the built model's: the
    # initial checkpoint of a zero-step run holds Model::init_random's tensors, and exporting it quantizes
    # them through the loaded model.
    for name, shape in [("gpt2-lowrank", [*SMALL, "--lowrank.rank", "4", "--lowrank.targets", "qkv,mlp_proj"]),
                        ("llama", LLAMA_SMALL)]:
        d = tmpdir(f"stream-{name}")
        run(["--mode", "pretrain", *shape, "--seed", "4", "--data.train", TRAIN, "--train.steps", "0",
             "--run.dir", d])
        built = os.path.join(d, "ckpt_000000.h5")
        for bits, embedding in [("0", "true"), ("4", "true"), ("4", "false"), ("8", "true")]:
            streamed = os.path.join(TMP, f"stream-{name}-{bits}-{embedding}.h5")
            p = run(["--mode", "export", *shape, "--seed", "4", "--quant.bits", bits, "--quant.embedding",
                     embedding, "--data.output", streamed])
            assert "a tensor at a time" in p.stdout, p.stdout
            expected = built
            if bits != "0":
                expected = os.path.join(TMP, f"stream-{name}-{bits}-{embedding}-built.h5")
                run(["--mode", "export", "--model.init", built, "--quant.bits", bits, "--quant.embedding",
                     embedding, "--data.output", expected])
            a, b = model_tensors(streamed), model_tensors(expected)
            assert sorted(a) == sorted(b), (name, bits, sorted(set(a) ^ set(b)))
            for t in a:
                assert a[t].dtype == b[t].dtype and np.array_equal(a[t], b[t]), (name, bits, embedding, t)
            with h5py.File(streamed, "r") as f, h5py.File(expected, "r") as g:
                for t in a:
                    x, y = f["model"][t].attrs, g["model"][t].attrs
                    assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x), (name, bits, t)
                for k in ("quant", "quant_block", "quant_double", "quant_embedding", "arch", "n_kv_head"):
                    if k in g["config"].attrs:
                        assert f["config"].attrs[k] == g["config"].attrs[k], (name, bits, k)


def test_tiny_llama_exported_by_streaming_finetunes():
    # input/configs/tiny-llama.cfg's shape, its random NF4 file written a tensor at a time, finetuned with
    # LoRA and recomputation on Llama-2's tokenizer at a shorter row length.
    cfg = os.path.abspath("input/configs/tiny-llama.cfg")
    nf4 = os.path.join(TMP, "tiny-llama-nf4.h5")
    run(["--mode", "export", "--config", cfg, "--quant.bits", "4", "--data.output", nf4])
    d = tmpdir("tiny-llama-ft")
    train = write_jsonl(os.path.join(TMP, "llama_train.jsonl"), sentiment_rows(16, 3))
    p = run(["--mode", "finetune", "--config", cfg, "--model.init", nf4, "--data.train", train, "--run.dir", d,
             "--lora.rank", "8", "--quant.bits", "4", "--train.recompute", "block", "--model.seq_len", "48",
             "--train.steps", "8", "--train.batch_size", "8", "--train.lr", "1e-2", "--train.warmup", "0",
             "--train.eval_every", "0", "--train.eval_batches", "1", "--run.log_every", "1", "--device", "cpu"])
    assert "frozen base stored as nf4" in p.stdout and "rows of at most 48 tokens" in p.stdout, p.stdout
    loss = metric(d, "loss")
    assert len(loss) == 8 and np.all(np.isfinite(loss)), loss
    assert loss[-1] < loss[0] - 1.0, loss  # over a nat lower in 8 steps: the adapters learn the answers


def stored_config(path, out):
    with h5py.File(path, "r") as f:
        text, argv = f.attrs["run_config"], f.attrs["command_line"]
    with open(out, "w") as f:
        f.write(text)
    return out, argv


def test_resolved_config_repeats_a_run():
    d, again = tmpdir("cfg-first"), tmpdir("cfg-again")
    p = pretrain(d, ["--train.lr", "2e-3", "--seed", "5"])
    line = [l for l in p.stdout.splitlines() if l.startswith("checkpoint ") and "ckpt_000006.h5" in l]
    assert line and line[0].endswith(" s") and " MB in " in line[0], p.stdout
    ckpt = os.path.join(d, "ckpt_000006.h5")
    ini, argv = stored_config(ckpt, os.path.join(TMP, "first.ini"))
    assert "--train.lr 2e-3" in argv and "lr = 0.002" in open(ini).read() and "# beta1 = 0.9" in open(ini).read()
    with h5py.File(os.path.join(d, "metrics.h5"), "r") as f:
        assert f.attrs["run_config"] == open(ini).read()
    assert "run configuration (--config reads it back)" in run(["--mode", "info", "--model.init", ckpt]).stdout
    # The stored file alone repeats the run: the same losses and bit-identical weights.
    run(["--config", ini, "--run.dir", again])
    assert np.array_equal(metric(d, "loss"), metric(again, "loss"))
    a, b = model_tensors(ckpt), model_tensors(os.path.join(again, "ckpt_000006.h5"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # A finetuning run's shape comes from its base: options left at their defaults stay defaults on replay.
    base = base_checkpoint()
    ft, ft_again = tmpdir("cfg-ft"), tmpdir("cfg-ft-again")
    finetune(ft, base, ["--quant.bits", "4"])
    ini, _ = stored_config(os.path.join(ft, "ckpt_000003.h5"), os.path.join(TMP, "ft.ini"))
    run(["--config", ini, "--run.dir", ft_again])
    a, b = model_tensors(os.path.join(ft, "ckpt_000003.h5")), model_tensors(os.path.join(ft_again, "ckpt_000003.h5"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_adapters_alone_over_their_base():
    base = base_checkpoint()
    d = tmpdir("lora-only")
    finetune(d, base, ["--quant.bits", "4", "--lora.modules_to_save", "ln_f", "--lora.trainable_tokens", "answers"])
    ft = os.path.join(d, "ckpt_000003.h5")
    adapters = os.path.join(TMP, "adapters.h5")
    p = run(["--mode", "export", "--model.init", ft, "--lora.only", "true", "--data.output", adapters])
    assert "exported the adapters" in p.stdout, p.stdout
    assert os.path.getsize(adapters) < 0.1 * os.path.getsize(ft), (os.path.getsize(adapters), os.path.getsize(ft))
    names = set(model_tensors(adapters))
    assert names == {n for n in model_tensors(ft)
                     if n.endswith(("lora_A", "lora_B")) or n.startswith(("ln_f", "trainable_tokens"))}, names
    assert "trainable_tokens/delta" in names
    with h5py.File(adapters, "r") as f, h5py.File(ft, "r") as g:
        assert f.attrs["format"] == "lrllm-adapters" and f["config"].attrs["base"] == base
        assert f["config"].attrs["base_checksum"] == g["config"].attrs["base_checksum"]
        assert f["config"].attrs["base_checksum"].startswith("fnv1a64:")
    over = ["--model.init", base, "--lora.init", adapters]
    tokens = write_tokens(os.path.join(TMP, "lora_only_eval.bin"), 3000, vocab=50257, seed=12)
    full = run(["--mode", "eval", "--model.init", ft, "--data.val", tokens]).stdout
    alone = run(["--mode", "eval", *over, "--data.val", tokens]).stdout
    assert full.split("loss ")[1] == alone.split("loss ")[1], (full, alone)
    assert generate(ft) == generate(base, over[2:])
    m1, m2 = os.path.join(TMP, "merged-full.h5"), os.path.join(TMP, "merged-alone.h5")
    run(["--mode", "export", "--model.init", ft, "--lora.merge", "true", "--data.output", m1])
    run(["--mode", "export", *over, "--lora.merge", "true", "--data.output", m2])
    a, b = model_tensors(m1), model_tensors(m2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # Finetuning continues from the adapters' values: a run of zero steps starts exactly at them.
    cont = tmpdir("lora-continue")
    finetune(cont, base, [*over[2:], "--quant.bits", "4"], steps=0)
    c, f_ = model_tensors(os.path.join(cont, "ckpt_000000.h5")), model_tensors(adapters)
    assert all(np.array_equal(c[k], f_[k]) for k in f_)
    finetune(tmpdir("lora-continue2"), base, over[2:], steps=2)
    # Bad input: one line, exit 2.
    ev = ["--mode", "eval", "--data.val", tokens]
    changed = os.path.join(TMP, "changed_base.h5")
    shutil.copy(base, changed)
    with h5py.File(changed, "a") as f:
        f["model/h.0/ln_1/w"][0] += 1.0
    bad_input([*ev, "--model.init", changed, "--lora.init", adapters], "checksum")
    bad_input([*ev, "--model.init", base, "--lora.init", os.path.join(TMP, "no_adapters.h5")], "no_adapters.h5")
    truncated = os.path.join(TMP, "truncated_adapters.h5")
    with open(adapters, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read()[: os.path.getsize(adapters) // 2])
    bad_input([*ev, "--model.init", base, "--lora.init", truncated], "truncated_adapters.h5")
    layers = os.path.join(TMP, "adapters_layers.h5")
    shutil.copy(adapters, layers)
    with h5py.File(layers, "a") as f:
        f["config"].attrs["n_layer"] = np.int64(3)
    bad_input([*ev, "--model.init", base, "--lora.init", layers], "n_layer 3")
    shape = os.path.join(TMP, "adapters_shape.h5")
    shutil.copy(adapters, shape)
    with h5py.File(shape, "a") as f:
        del f["model/h.1/mlp/fc/lora_B"]
        f["model/h.1/mlp/fc/lora_B"] = np.zeros((128, 3), np.float32)
    bad_input([*ev, "--model.init", base, "--lora.init", shape], "shape")
    bad_input([*ev, "--model.init", ft, "--lora.init", adapters], "has LoRA adapters already")
    bad_input([*ev, "--model.init", base, "--lora.init", base], "not an lrllm adapter file")
    bad_input(["--mode", "export", "--model.init", base, "--lora.only", "true", "--data.output",
               os.path.join(TMP, "none.h5")], "no LoRA adapters")
    bad_input(["--mode", "export", "--model.init", ft, "--lora.only", "true", "--lora.merge", "true",
               "--data.output", os.path.join(TMP, "none.h5")], "--lora.only")
    bad_input(["--mode", "pretrain", *SMALL, "--data.train", TRAIN, "--lora.init", adapters], "--lora.init")


def test_help_and_version():
    p = run(["--help"])
    for opt in ["--train.lr", "--lowrank.rank", "--checkpoint.resume", "--data.train", "--run.dir", "--generate.top_k"]:
        assert opt in p.stdout, opt
    p = run(["--version"])
    assert p.stdout.startswith("lrllm ") and ("CPU-only" in p.stdout or "CUDA" in p.stdout), p.stdout


LLAMA_TOKENIZER = os.path.abspath("input/data/tokenizer-llama")
TINY_LLAMA = ["--model.arch", "llama", "--model.vocab_size", "32000", "--model.n_layer", "2", "--model.n_head",
              "4", "--model.n_kv_head", "2", "--model.d_model", "32", "--model.d_ff", "64", "--model.seq_len", "64",
              "--device", "cpu"]


def test_llama_in_every_mode():
    """A tiny Llama over the Llama-2 tokenizer: tokenize, pretrain (and resume exactly), info, NF4 + LoRA
    finetuning with recomputation, task evaluation by score and by generation, generate, a merged int8 export
    that evaluates, and decompose."""
    corpus = os.path.join(TMP, "llama-corpus")
    os.makedirs(corpus, exist_ok=True)
    with open(os.path.join(corpus, "a.txt"), "w") as f:
        f.write("Profits rose and the market rallied. " * 300 + "Shares fell sharply as losses widened. " * 300)
    tokens = os.path.join(TMP, "llama.bin")
    p = run(["--mode", "tokenize", "--data.input", corpus, "--data.output", tokens, "--data.tokenizer_dir",
             LLAMA_TOKENIZER])
    with open(tokens, "rb") as f:
        header = np.frombuffer(f.read(1024), np.int32)
        first = np.frombuffer(f.read(4), np.uint16)
    assert header[2] > 1000 and first[0] == 1, (header[:3], first)  # each document starts with <s>
    full, part = tmpdir("llama-pre"), tmpdir("llama-pre-part")
    common = ["--mode", "pretrain", *TINY_LLAMA, "--data.train", tokens, "--train.eval_batches", "1",
              "--train.batch_size", "2", "--checkpoint.every", "2"]
    run([*common, "--run.dir", full, "--train.steps", "4"])
    run([*common, "--run.dir", part, "--train.steps", "2"])
    run([*common, "--run.dir", part, "--train.steps", "4", "--checkpoint.resume", "latest"])
    assert np.array_equal(metric(part, "loss"), metric(full, "loss")), (metric(part, "loss"), metric(full, "loss"))
    base = os.path.join(full, "ckpt_000004.h5")
    info = run(["--mode", "info", "--model.init", base]).stdout
    assert "arch llama" in info and "n_kv_head 2" in info and "/model/lm_head" in info and "wpe" not in info, info
    ft = tmpdir("llama-ft")
    train_rows = write_jsonl(os.path.join(TMP, "llama_train.jsonl"), sentiment_rows(24, 1))
    run(["--mode", "finetune", "--model.init", base, "--data.train", train_rows, "--data.tokenizer_dir",
         LLAMA_TOKENIZER, "--lora.rank", "4", "--quant.bits", "4", "--train.recompute", "block", "--run.dir", ft,
         "--train.steps", "6", "--train.batch_size", "4", "--train.lr", "1e-2", "--train.warmup", "0",
         "--train.eval_batches", "1"])
    losses = metric(ft, "loss")
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    adapters = model_tensors(os.path.join(ft, "ckpt_000006.h5"))
    # The fused sites carry one adapter each: qkv over q (32), k and v (2 kv heads of 8), fc over gate and up.
    assert adapters["h.0/attn/qkv/lora_B"].shape == (64, 4) and adapters["h.0/mlp/fc/lora_B"].shape == (128, 4), \
        {k: v.shape for k, v in adapters.items() if "lora" in k}
    test_rows = write_jsonl(os.path.join(TMP, "llama_test.jsonl"), sentiment_rows(8, 3))
    for method in ["score", "generate"]:
        out = run(["--mode", "eval", "--model.init", os.path.join(ft, "ckpt_000006.h5"), "--eval.tasks", test_rows,
                   "--eval.method", method, "--data.tokenizer_dir", LLAMA_TOKENIZER, "--run.dir", ft,
                   "--eval.max_new_tokens", "3"]).stdout
        assert "| llama_test | 8 |" in out, out
    gen = run(["--mode", "generate", "--model.init", base, "--generate.prompt", "Profits", "--data.tokenizer_dir",
               LLAMA_TOKENIZER, "--generate.max_new_tokens", "4"])
    assert gen.stdout.startswith("Profits"), gen.stdout
    merged = os.path.join(TMP, "llama-merged.h5")
    run(["--mode", "export", "--model.init", os.path.join(ft, "ckpt_000006.h5"), "--lora.merge", "true",
         "--quant.bits", "8", "--data.output", merged])
    assert "loss" in run(["--mode", "eval", "--model.init", merged, "--data.val", tokens]).stdout
    low = os.path.join(TMP, "llama-low.h5")
    run(["--mode", "decompose", "--model.init", base, "--lowrank.rank", "8", "--data.output", low])
    assert "h.1/mlp/fc/A" in model_tensors(low) and "lm_head" in model_tensors(low)


def test_llama_bad_configs_exit_2():
    d = tmpdir("llama-bad")
    base = ["--mode", "pretrain", "--data.train", TRAIN, "--run.dir", d, "--train.steps", "1"]
    shape = [a for a in TINY_LLAMA]
    shape[shape.index("--model.vocab_size") + 1] = "512"
    kv = [*shape]
    kv[kv.index("--model.n_kv_head") + 1] = "3"
    bad_input([*base, *kv], "--model.n_kv_head 3 must divide n_head 4")
    odd = [*shape]
    odd[odd.index("--model.d_model") + 1] = "12"
    bad_input([*base, *odd], "must be even")
    bad_input([*base, *SMALL, "--model.n_kv_head", "1"], "--model.n_kv_head is llama's")
    bad_input([*base, *SMALL, "--model.arch", "mamba"], "--model.arch must be gpt2 or llama")
    # A Llama of 512 tokens cannot read the Llama-2 tokenizer's 32000.
    run([*base, *shape])
    rows = write_jsonl(os.path.join(TMP, "llama_bad.jsonl"), sentiment_rows(4, 1))
    bad_input(["--mode", "finetune", "--model.init", os.path.join(d, "ckpt_000001.h5"), "--data.train", rows,
               "--data.tokenizer_dir", LLAMA_TOKENIZER, "--lora.rank", "4", "--run.dir", tmpdir("llama-bad-ft")],
              "has 32000 tokens but the model's vocabulary is 512")


LOWRANK_OPTIONS = {"silu": ["--lowrank.activation", "silu"], "product_std": ["--lowrank.init", "product_std"],
                   "lr_mult": ["--lowrank.lr_mult", "2.5"], "refactor": ["--lowrank.refactor_every", "2"]}


def test_lowrank_options_change_the_run_are_recorded_and_resume_exactly():
    base = ["--checkpoint.every", "3", "--lowrank.rank", "8"]
    naive = tmpdir("lr-naive")
    pretrain(naive, base)
    for name, opts in LOWRANK_OPTIONS.items():
        full, part = tmpdir(f"lr-{name}-full"), tmpdir(f"lr-{name}-part")
        pretrain(full, [*base, *opts])
        pretrain(part, [*base, *opts])
        os.remove(os.path.join(part, "ckpt_000006.h5"))
        pretrain(part, [*base, *opts, "--checkpoint.resume", "latest"])
        assert np.array_equal(metric(full, "loss"), metric(part, "loss")), (name, metric(full, "loss"),
                                                                            metric(part, "loss"))
        a, b = model_tensors(os.path.join(full, "ckpt_000006.h5")), model_tensors(os.path.join(part, "ckpt_000006.h5"))
        for k in a:
            assert np.array_equal(a[k], b[k]), f"{name}: {k} differs after resume"
        assert not np.array_equal(metric(full, "loss"), metric(naive, "loss")), f"{name} changed nothing"
        with h5py.File(os.path.join(full, "ckpt_000006.h5"), "r") as f:
            c = f["config"].attrs
            assert f.attrs["format_version"] == (5 if name == "silu" else 1), (name, f.attrs["format_version"])
            assert c["lowrank_activation"] == ("silu" if name == "silu" else "none")
            assert c["lowrank_init"] == ("product_std" if name == "product_std" else "default")
            assert c["lowrank_lr_mult"] == (2.5 if name == "lr_mult" else 1.0)
            assert c["lowrank_refactor_every"] == (2 if name == "refactor" else 0)
            if name == "refactor":  # refactored after step 6: the factors' moments restart, the rest keep theirs
                assert not f["optimizer/m/h.0/attn/qkv/A"][()].any() and not f["optimizer/v/h.1/mlp/proj/B"][()].any()
                assert f["optimizer/m/h.0/ln_1/w"][()].any()
        if name == "silu":
            p = run(["--mode", "info", "--model.init", os.path.join(full, "ckpt_000006.h5")])
            assert "silu" in p.stdout, p.stdout
            # A resume that names another option value than the checkpoint's is refused, not silently run.
            bad_input(["--mode", "pretrain", *SMALL, "--data.train", TRAIN, "--run.dir", full, "--lowrank.rank", "8",
                       "--lowrank.activation", "none", "--checkpoint.resume", "latest", "--train.steps", "7"],
                      "--lowrank.activation none contradicts")
        if name == "lr_mult":
            bad_input(["--mode", "pretrain", *SMALL, "--data.train", TRAIN, "--run.dir", full, "--lowrank.rank", "8",
                       "--checkpoint.resume", "latest", "--train.steps", "7"], "--lowrank.lr_mult 1 contradicts")


def test_lowrank_option_refusals():
    base = ["--mode", "pretrain", *SMALL, "--data.train", TRAIN, "--lowrank.rank", "8"]
    bad_input([*base, "--lowrank.activation", "relu"], "--lowrank.activation must be none or silu")
    bad_input([*base, "--lowrank.init", "xavier"], "--lowrank.init must be default or product_std")
    bad_input([*base, "--lowrank.lr_mult", "0"], "--lowrank.lr_mult must be > 0")
    bad_input([*base, "--lowrank.refactor_every", "-1"], "--lowrank.refactor_every must be >= 0")
    bad_input([*base, "--lowrank.refactor_every", "2", "--lowrank.activation", "silu"], "a silu site does not compute")
    bad_input([*base, "--lowrank.refactor_every", "2", "--parallel.tp", "2"], "needs --parallel.tp 1")
    bad_input(["--mode", "pretrain", *SMALL, "--data.train", TRAIN, "--lowrank.activation", "silu"],
              "needs a low-rank site")
    # W = B A does not hold for a silu site: decompose into one, export it as dense, or merge adapters into it.
    dense = tmpdir("lr-refuse-dense")
    pretrain(dense, ["--train.steps", "1"])
    bad_input(["--mode", "decompose", "--model.init", os.path.join(dense, "ckpt_000001.h5"), "--lowrank.rank", "8",
               "--lowrank.activation", "silu", "--data.output", os.path.join(TMP, "silu-dec.h5")],
              "W = B A does not hold")
    silu = tmpdir("lr-refuse-silu")
    gpt2_tokens = write_tokens(os.path.join(TMP, "gpt2-silu.bin"), 20000, vocab=50257, seed=5)
    run(["--mode", "pretrain", *GPT2_SMALL, "--data.train", gpt2_tokens, "--run.dir", silu, "--train.steps", "1",
         "--train.eval_batches", "1", "--lowrank.rank", "8", "--lowrank.activation", "silu"])
    ckpt = os.path.join(silu, "ckpt_000001.h5")
    bad_input(["--mode", "export", "--model.init", ckpt, "--export.format", "hf", "--data.output",
               os.path.join(TMP, "silu-hf")], "W = B A does not hold")
    ft = tmpdir("lr-refuse-ft")
    finetune(ft, ckpt, steps=1)
    bad_input(["--mode", "export", "--model.init", os.path.join(ft, "ckpt_000001.h5"), "--lora.merge", "true",
               "--data.output", os.path.join(TMP, "silu-merged.h5")], "W = B A does not hold")


def main(namespace=None):
    """Runs the test_* functions of namespace (this module's by default)."""
    tests = [(n, f) for n, f in (namespace or globals()).items() if n.startswith("test_") and callable(f)]
    only = os.environ.get("LRLLM_TEST_FILTER")
    failed = 0
    for name, fn in tests:
        if only and only not in name:
            continue
        try:
            fn()
            print(f"PASS {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            failed += 1
            print(f"FAIL {name}: {e}", flush=True)
            traceback.print_exc(limit=3)
    shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
