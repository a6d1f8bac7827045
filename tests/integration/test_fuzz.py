"""Seeded fuzz test of lrllm's input handling: bad options, config files, token files, checkpoints and metrics
files altered with h5py, instruction JSONL, output paths, and signals outside training.

Every case must either run (exit 0) or end with exactly one line on stderr and exit 2 (3 for a NaN loss),
within a time bound, and never print an MPI_ABORT banner, a crash or a sanitizer report. Cases run without
mpirun (lrllm runs as a singleton), several at a time.

Run as: /usr/bin/python3 tests/integration/test_fuzz.py BUILD_DIR
(LRLLM_FUZZ_SEED picks another seed; LRLLM_FUZZ_KEEP=1 keeps the cases' files.)
Prints one PASS/FAIL line per class of input and exits non-zero if any failed.
"""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

BUILD = sys.argv[1] if len(sys.argv) > 1 else "build"
LRLLM = os.path.abspath(os.path.join(BUILD, "lrllm"))
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
           OMPI_MCA_rmaps_base_oversubscribe="1")
SEED = int(os.environ.get("LRLLM_FUZZ_SEED", "13"))
# A case that takes longer hangs; the sanitizer build is some times slower than the plain one.
LIMIT_S = 60 if "sanitize" in BUILD else 30
WORKERS = 4
BANNED = ["MPI_ABORT", "Segmentation", "Aborted", "ERROR:", "runtime error", "core dumped", "terminate called"]
TMP = tempfile.mkdtemp(prefix="lrllm-fuzz-")
TOKENIZER = os.path.abspath("input/data/tokenizer")
SMALL = {"--model.vocab_size": "512", "--model.n_layer": "2", "--model.n_head": "2", "--model.d_model": "32",
         "--model.seq_len": "16", "--device": "cpu"}
GPT2_TINY = {**SMALL, "--model.vocab_size": "50257", "--model.n_layer": "1", "--model.seq_len": "32"}
rng = random.Random(SEED)
counter = [0]


def flip_bits(path, rng):
    """Flips 8 random bits in the first 4 KB of a file, where HDF5 keeps its superblock and root metadata."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for _ in range(8):
            data[rng.randrange(min(4096, len(data)))] ^= 1 << rng.randrange(8)
        f.seek(0)
        f.write(data)


def path(name):
    counter[0] += 1
    return os.path.join(TMP, f"{counter[0]:04d}-{name}")


def flat(options):
    return [x for kv in options.items() for x in kv]


def run(args, timeout=LIMIT_S):
    return subprocess.run([LRLLM] + args, env=ENV, capture_output=True, text=True, errors="replace",
                          timeout=timeout)


def write_tokens(name, n, vocab=512, seed=0, count=None):
    p = path(name)
    header = np.zeros(256, np.int32)
    header[:3] = [20240520, 1, n if count is None else count]
    with open(p, "wb") as f:
        f.write(header.tobytes())
        f.write(np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16).tobytes())
    return p


def checked(args):
    p = run(args)
    if p.returncode != 0:
        raise AssertionError(f"fixture {' '.join(args)} exited {p.returncode}: {p.stderr[-2000:]}")
    return p


# ------------------------------------------------------------------------------------------- fixtures

TRAIN = write_tokens("train.bin", 20000, seed=1)
VAL = write_tokens("val.bin", 2000, seed=2)
GPT2_TOKENS = write_tokens("gpt2.bin", 4000, vocab=50257, seed=3)
RUN = path("run")
checked(["--mode", "pretrain", *flat(SMALL), "--data.train", TRAIN, "--data.val", VAL, "--run.dir", RUN,
         "--train.steps", "2", "--train.eval_batches", "1"])
CKPT = os.path.join(RUN, "ckpt_000002.h5")
GPT2_RUN = path("gpt2-run")
checked(["--mode", "pretrain", *flat(GPT2_TINY), "--data.train", GPT2_TOKENS, "--run.dir", GPT2_RUN,
         "--train.steps", "1", "--train.eval_batches", "1"])
GPT2_CKPT = os.path.join(GPT2_RUN, "ckpt_000001.h5")


def write_jsonl(name, lines):
    p = path(name)
    with open(p, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write("\n".join(lines) + "\n")
    return p


def example(label):
    return json.dumps({"instruction": "Sentiment?", "input": "Shares rose.", "output": label})


JSONL = write_jsonl("tasks.jsonl", [example(l) for l in ["positive", "negative", "neutral", "positive"]])
LORA_RUN = path("lora-run")
checked(["--mode", "finetune", "--model.init", GPT2_CKPT, "--data.train", JSONL, "--data.tokenizer_dir",
         TOKENIZER, "--run.dir", LORA_RUN, "--train.steps", "1", "--train.batch_size", "2",
         "--train.eval_batches", "1", "--lora.rank", "2", "--quant.bits", "4"])
LORA_CKPT = os.path.join(LORA_RUN, "ckpt_000001.h5")
ADAPTERS = path("adapters.h5")
checked(["--mode", "export", "--model.init", LORA_CKPT, "--lora.only", "true", "--data.output", ADAPTERS])


def old_format(src):
    """The same file in HDF5's earliest format, as lrllm wrote before checksummed metadata."""
    dst = path("old.h5")

    def copy(a, b):  # object by object: HDF5 1.10's H5Ocopy crashes going from the new format to the old
        for k, v in a.attrs.items():
            b.attrs[k] = v
        for k, v in a.items():
            if isinstance(v, h5py.Group):
                copy(v, b.create_group(k))
            else:
                b[k] = v[()]
                for name, value in v.attrs.items():
                    b[k].attrs[name] = value

    with h5py.File(src, "r") as f, h5py.File(dst, "w", libver="earliest") as g:
        copy(f, g)
    return dst


OLD_CKPT = old_format(CKPT)
OLD_GPT2_CKPT = old_format(GPT2_CKPT)

# -------------------------------------------------------------------------------------------- checks


def sha(p):
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def verdict(p):
    """None when the run ended as it must, else what was wrong."""
    text = p.stdout + p.stderr
    banned = [b for b in BANNED if b in text]
    if banned:
        return f"printed {banned}"
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    if p.returncode == 0:
        return None
    if p.returncode not in (2, 3):
        return f"exit {p.returncode}"
    if len(lines) != 1 or not lines[0].startswith("lrllm: error: "):
        return f"exit {p.returncode} with {len(lines)} stderr lines"
    return None


class Case:
    def __init__(self, kind, args, after=None):
        self.kind, self.args, self.after = kind, args, after


def run_case(case):
    try:
        p = run(case.args)
    except subprocess.TimeoutExpired:
        return case, f"still running after {LIMIT_S} s", ""
    problem = verdict(p)
    if problem is None and case.after is not None:
        problem = case.after(p)
    return case, problem, p.stderr[-600:]


# ------------------------------------------------------------------------------------------ generators

# Values that no option of their type accepts, or sizes that no machine can hold: a valid but enormous
# value (a 65536-layer model) would only be slow, not wrong, and is left out.
BAD_INTS = ["-1", "0", "2147483647", "-2147483648", "1000000000", "99999999999", "2.7", "abc", "", "1e3",
            "0x10", "3"]
BAD_DOUBLES = ["nan", "inf", "-inf", "-1", "0", "1e308", "1e-320", "abc", "", "1"]
BAD_BOOLS = ["maybe", "2", "", "yes", "-1"]
INT_OPTIONS = ["--model.n_layer", "--model.n_head", "--model.d_model", "--model.d_ff", "--model.seq_len",
               "--model.vocab_size", "--lowrank.rank", "--lowrank.rank_qkv", "--lowrank.rank_fc",
               "--parallel.tp", "--parallel.pp", "--parallel.micro_batches", "--parallel.zero",
               "--train.batch_size", "--train.grad_accum", "--train.eval_batches", "--train.warmup",
               "--train.eval_every", "--checkpoint.keep", "--checkpoint.every", "--run.log_every",
               "--quant.bits", "--quant.block", "--lora.rank", "--generate.top_k", "--eval.max_new_tokens",
               "--generate.max_new_tokens"]
DOUBLE_OPTIONS = ["--train.lr", "--train.min_lr", "--train.weight_decay", "--train.grad_clip", "--train.beta1",
                  "--train.beta2", "--train.eps", "--lora.alpha", "--lora.dropout", "--generate.temperature",
                  "--parallel.bucket_mb"]
BOOL_OPTIONS = ["--data.shuffle", "--lora.merge", "--quant.double", "--quant.embedding"]
STRING_OPTIONS = {"--device": ["tpu", "", "cuda0"], "--model.arch": ["llama", ""],
                  "--train.recompute": ["all", ""], "--eval.method": ["vote", ""],
                  "--lowrank.targets": ["qkv,,zz", "none", "all,x"], "--lora.targets": ["nothing", ","],
                  "--mode": ["fly", "", "PRETRAIN"], "--seed": ["-1", "abc", "18446744073709551616", "1e3"]}


def base_command(mode):
    """A working command of each mode, as an option dict (so that a fuzzed option replaces its value)."""
    if mode == "pretrain":
        return {"--mode": "pretrain", **SMALL, "--data.train": TRAIN, "--data.val": VAL, "--run.dir": path("r"),
                "--train.steps": "1", "--train.eval_batches": "1"}
    if mode == "eval":
        return {"--mode": "eval", "--model.init": CKPT, "--data.val": VAL, "--train.eval_batches": "1",
                "--device": "cpu"}
    if mode == "generate":
        return {"--mode": "generate", "--model.init": GPT2_CKPT, "--data.tokenizer_dir": TOKENIZER,
                "--generate.max_new_tokens": "3", "--generate.prompt": "Shares of", "--device": "cpu"}
    if mode == "finetune":
        return {"--mode": "finetune", "--model.init": GPT2_CKPT, "--data.train": JSONL, "--data.tokenizer_dir":
                TOKENIZER, "--run.dir": path("ft"), "--train.steps": "1", "--train.batch_size": "2",
                "--train.eval_batches": "1", "--lora.rank": "2", "--device": "cpu"}
    return {"--mode": "export", **SMALL, "--data.output": path("out.h5")}


def option_cases(n):
    cases = []
    for _ in range(n):
        cmd = base_command(rng.choice(["pretrain", "pretrain", "eval", "generate", "export", "finetune"]))
        for _ in range(rng.choice([1, 1, 2])):
            kind = rng.random()
            if kind < 0.5:
                cmd[rng.choice(INT_OPTIONS)] = rng.choice(BAD_INTS)
            elif kind < 0.75:
                cmd[rng.choice(DOUBLE_OPTIONS)] = rng.choice(BAD_DOUBLES)
            elif kind < 0.85:
                cmd[rng.choice(BOOL_OPTIONS)] = rng.choice(BAD_BOOLS)
            else:
                option = rng.choice(sorted(STRING_OPTIONS))
                cmd[option] = rng.choice(STRING_OPTIONS[option])
        cases.append(Case("options", flat(cmd)))
    # The layouts and shapes of issue 13, each once.
    for extra in [{"--parallel.tp": "65536", "--parallel.pp": "65536"}, {"--model.n_layer": "2147483647"},
                  {"--model.d_ff": "2147483647"}, {"--model.n_layer": "1000000000"},
                  {"--model.d_model": "1073741824", "--model.n_head": "1"}]:
        cases.append(Case("options", flat({**base_command("pretrain"), **extra})))
    return cases


CONFIG_LINES = ["[model]", "[train]", "[data]", "[nosuch]", "n_layer = 2", "n_head = 3", "d_model = 2147483647",
                "steps = 1e99", "steps = -5", "= 4", "n_layer", "lr = nan", "n_layer = 2.7", "[model", "x" * 5000,
                "\x00\x01\x02", "tp = 65536", "[parallel]", "pp = 65536", "shuffle = maybe", "seq_len = 0",
                "vocab_size = 70000", "# comment", ";", "d_ff = 1000000000", "batch_size = 2147483647"]


def config_cases(n):
    cases = []
    for _ in range(n):
        p = path("fuzz.cfg")
        with open(p, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("[model]\nvocab_size = 512\nd_model = 32\nseq_len = 16\n[train]\nsteps = 1\neval_batches = 1\n")
            f.write("\n".join(rng.choice(CONFIG_LINES) for _ in range(rng.randint(1, 5))) + "\n")
        cases.append(Case("config files", ["--mode", "pretrain", "--config", p, "--device", "cpu", "--data.train",
                                           TRAIN, "--run.dir", path("r")]))
    cases.append(Case("config files", ["--mode", "pretrain", "--config", TMP, "--data.train", TRAIN,
                                       "--train.steps", "1"]))
    return cases


def token_file_cases(n):
    with open(TRAIN, "rb") as f:
        good = bytearray(f.read())
    cases = []
    for i in range(n):
        data = bytearray(good)
        kind = i % 8
        if kind == 0:
            data[0:4] = np.int32(rng.randint(-2**31, 2**31 - 1)).tobytes()
        elif kind == 1:
            data[4:8] = np.int32(rng.choice([0, 2, -1])).tobytes()
        elif kind == 2:
            data[8:12] = np.int32(rng.choice([-1, 0, 1, 19999, 20001, 2**31 - 1])).tobytes()
        elif kind == 3:
            data = data[:rng.randint(0, 1100)]
        elif kind == 4:
            ids = np.frombuffer(bytes(data[1024:]), np.uint16).copy()
            ids[rng.randrange(len(ids))] = rng.choice([512, 600, 65535])
            data[1024:] = ids.tobytes()
        elif kind == 5:
            data = data[:1024 + 2 * rng.randint(0, 16)]
            data[8:12] = np.int32((len(data) - 1024) // 2).tobytes()
        elif kind == 6:
            data = data + b"\x00" * rng.randint(1, 3)
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 4096)))
        p = path("tokens.bin")
        with open(p, "wb") as f:
            f.write(bytes(data))
        if rng.random() < 0.5:
            args = flat({**base_command("pretrain"), "--data.train": p})
        else:
            args = flat({**base_command("eval"), "--data.val": p})
        cases.append(Case("token files", args))
    for p in [TMP, "/dev/null", os.path.join(TMP, "no", "such.bin")]:
        cases.append(Case("token files", flat({**base_command("eval"), "--data.val": p})))
    return cases


ATTRS = ["/format_version", "/config/n_layer", "/config/n_head", "/config/d_model", "/config/vocab_size",
         "/config/seq_len", "/config/d_ff", "/config/quant_block", "/config/lora_alpha", "/config/arch",
         "/format", "/state/step", "/optimizer/step", "/state/data_cursor", "/state/tokens_seen",
         "/optimizer/name", "/config/base_checksum", "/config/quant", "/config/lora_modules"]
ATTR_VALUES = [lambda v: np.array([v, v, v]), lambda v: np.array([[1, 2], [3, 4]]), lambda v: 2.7,
               lambda v: "4", lambda v: -3, lambda v: 2**40, lambda v: 16777216, lambda v: 0, lambda v: 3,
               lambda v: -1, lambda v: np.array([b"ab", b"cd"]), lambda v: np.float32(float("nan")), None]
DATASETS = ["/model/wte", "/model/wpe", "/model/h.0/attn/qkv/W", "/model/h.0/ln_1/w", "/optimizer/m/wte",
            "/model/ln_f/b", "/model/h.0/attn/qkv/lora_A", "/model/h.1/mlp/proj/lora_B"]
DATASET_VALUES = [lambda s: np.zeros(7, np.float32), lambda s: np.zeros(s, np.int64),
                  lambda s: np.array(b"text"), lambda s: np.float32(1),
                  lambda s: np.zeros((s[0], max(1, s[-1] - 1)), np.float32),
                  lambda s: np.zeros((2, 2, 2), np.float32), lambda s: np.full(s, np.nan, np.float32), None]


def mutate_h5(src):
    """A copy of src altered by one seeded mutation; returns its path."""
    p = path("mutated.h5")
    shutil.copy(src, p)
    kind = rng.random()
    if kind < 0.45:
        with h5py.File(p, "a") as f:
            target = rng.choice([a for a in ATTRS if os.path.dirname(a) in f])
            group, name = os.path.dirname(target), os.path.basename(target)
            value = f[group].attrs.get(name, 1)
            make = rng.choice(ATTR_VALUES)
            if name in f[group].attrs:
                del f[group].attrs[name]
            if make is not None:
                f[group].attrs[name] = make(value)
    elif kind < 0.7:
        with h5py.File(p, "a") as f:
            name = rng.choice([d for d in DATASETS if d in f])
            shape = f[name].shape
            make = rng.choice(DATASET_VALUES)
            del f[name]
            if make is not None:
                f[name] = make(shape)
    elif kind < 0.75:
        with h5py.File(p, "a") as f:
            f["model/h.0/loop"] = f["model"]  # a group that contains itself
    elif kind < 0.95:
        flip_bits(p, rng)
    else:
        with open(p, "r+b") as f:
            f.truncate(rng.randrange(os.path.getsize(p)))
    return p


def checkpoint_cases(n):
    cases = []
    for _ in range(n):
        mode = rng.choice(["eval", "info", "generate", "resume", "pretrain", "export", "finetune"])
        old = rng.random() < 0.3
        if mode in ("generate", "finetune"):
            p = mutate_h5(OLD_GPT2_CKPT if old else GPT2_CKPT)
            args = flat({**base_command(mode), "--model.init": p})
        elif mode == "info":
            args = ["--mode", "info", "--model.init", mutate_h5(OLD_CKPT if old else CKPT)]
        elif mode == "resume":
            d = path("resume")
            os.makedirs(d)
            os.rename(mutate_h5(OLD_CKPT if old else CKPT), os.path.join(d, "ckpt_000002.h5"))
            args = flat({**base_command("pretrain"), "--run.dir": d, "--checkpoint.resume": "latest",
                         "--train.steps": "3"})
        else:
            p = mutate_h5(OLD_CKPT if old else CKPT)
            cmd = base_command(mode)
            cmd["--model.init"] = p
            for k in SMALL:
                cmd.pop(k, None)
            cmd["--device"] = "cpu"
            args = flat(cmd)
        cases.append(Case("checkpoints", args))
    return cases


def adapter_cases(n):
    """--lora.init with a damaged adapter file, or over a damaged base, in each mode that reads one."""
    cases = []
    for _ in range(n):
        mode = rng.choice(["generate", "finetune", "export", "export-only"])
        adapters, base = (mutate_h5(ADAPTERS), GPT2_CKPT) if rng.random() < 0.8 else (ADAPTERS, mutate_h5(GPT2_CKPT))
        if mode.startswith("export"):
            cmd = {"--mode": "export", "--model.init": base, "--data.output": path("out.h5"),
                   "--lora.only" if mode == "export-only" else "--lora.merge": "true"}
        else:
            cmd = base_command(mode)
            cmd.pop("--lora.rank", None)
            cmd["--model.init"] = base
        cmd["--lora.init"] = adapters
        cases.append(Case("adapter files", flat(cmd)))
    return cases


def metrics_cases(n):
    cases = []
    for i in range(n):
        d = path("metrics-run")
        os.makedirs(d)
        ckpt = os.path.join(d, "ckpt_000002.h5")
        shutil.copy(CKPT, ckpt)
        metrics = os.path.join(d, "metrics.h5")
        shutil.copy(os.path.join(RUN, "metrics.h5"), metrics)
        kind = i % 10  # 9: a sound file, which a resume must keep using
        if kind == 0:
            with open(metrics, "r+b") as f:
                f.truncate(rng.randrange(os.path.getsize(metrics)))
        elif kind == 1:
            os.remove(metrics)
            os.makedirs(metrics)
        elif kind in (2, 3, 4):
            with h5py.File(metrics, "a") as f:
                name = "metrics/" + rng.choice(["step", "loss", "val_loss"])
                del f[name]
                f[name] = [np.zeros((2, 3)), np.array([b"a", b"b"]), np.float64(1)][kind - 2]
        elif kind == 5:
            with h5py.File(metrics, "a") as f:
                del f["metrics"]
                f["metrics"] = np.zeros(3)
        elif kind == 6:
            flip_bits(metrics, rng)
        elif kind == 7:
            with open(metrics, "wb") as f:
                f.write(rng.randbytes(rng.randint(0, 2000)))
        elif kind == 8:
            with h5py.File(metrics, "a") as f:
                f["eval/task/n"] = np.zeros((2, 2))
        before = sha(ckpt)

        def untouched(p, ckpt=ckpt, before=before):
            return None if sha(ckpt) == before else "the checkpoint changed"

        if rng.random() < 0.75:
            args = flat({**base_command("pretrain"), "--run.dir": d, "--checkpoint.resume": "latest",
                         "--train.steps": "3"})
        else:
            args = ["--mode", "info", "--model.init", metrics]
        cases.append(Case("metrics files", args, untouched))
    return cases


JSON_LINES = ['{"instruction": "a", "output": "positive"}', '{"instruction": 1e400, "output": "x"}',
              '{"instruction": "a", "output": 123456789012345678901234567890}',
              '{"instruction": "a", "input": 18446744073709551616, "output": "b"}', "[1, 2, 3]", "{", "null",
              '{"instruction": "a"}', '{"output": "b"}', '{"instruction": ["a"], "output": "b"}', "\udcff\udcfe",
              '{"instruction": "' + "word " * 3000 + '", "output": "positive"}', '{"instruction": "a", "output": ""}',
              "", "   ", '{"instruction": "a", "output": "positive", "input": {"x": -1e-400}}', example("negative")]


def jsonl_cases(n):
    cases = []
    for _ in range(n):
        p = write_jsonl("fuzz.jsonl", [rng.choice(JSON_LINES) for _ in range(rng.randint(1, 4))])
        if rng.random() < 0.5:
            args = ["--mode", "eval", "--model.init", GPT2_CKPT, "--eval.tasks", p, "--data.tokenizer_dir",
                    TOKENIZER, "--run.dir", path("ev"), "--eval.max_new_tokens", "2", "--device", "cpu",
                    "--eval.method", rng.choice(["score", "generate"])]
        else:
            args = flat({**base_command("finetune"), "--data.train": p})
        cases.append(Case("instruction JSONL", args))
    return cases


def output_cases():
    missing = os.path.join(TMP, "no", "such", "dir", "out.h5")
    decompose = ["--mode", "decompose", "--lowrank.rank", "4", "--device", "cpu"]
    return [Case("output paths", flat({**base_command("export"), "--data.output": missing})),
            Case("output paths", flat({**base_command("export"), "--data.output": TMP})),
            Case("output paths", ["--mode", "export", "--model.init", LORA_CKPT, "--data.output", missing]),
            Case("output paths", decompose + ["--model.init", CKPT, "--data.output", missing]),
            Case("output paths", decompose + ["--model.init", CKPT, "--data.output", TMP]),
            Case("output paths", decompose + ["--model.init", LORA_CKPT, "--data.output", path("lr.h5")]),
            Case("output paths", decompose + ["--model.init", CKPT, "--data.output", path("lr.h5")]),
            Case("output paths", ["--mode", "tokenize", "--data.input", JSONL, "--data.output", TMP,
                                  "--data.tokenizer_dir", TOKENIZER])]


# --------------------------------------------------------------------------------------------- signals


def stopped(args, sig, output=None, wait_for_stdout=False):
    """Starts lrllm, sends sig once it works, and checks that it ends within 5 s as 128 + sig (or 75) without
    leaving a partial output behind."""
    p = subprocess.Popen([LRLLM] + args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait_for_stdout:
        p.stdout.read(1)  # the first bytes of output: the run is under way
    else:
        time.sleep(1.5)
    p.send_signal(sig)
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return "still running 5 s after the signal"
    finally:
        p.stdout.close()
        p.stderr.close()
    if p.returncode not in (75, 128 + sig):
        return f"exit {p.returncode} after signal {sig}"
    if output is not None:
        if os.path.exists(output + ".tmp"):
            return "left " + output + ".tmp behind"
        if os.path.exists(output):
            with h5py.File(output, "r") as f:  # a complete file only: written before the signal came
                f.attrs["format"]
    return None


def test_signals_outside_training():
    long_generate = flat({**base_command("generate"), "--generate.max_new_tokens": "100000"})
    long_eval = flat({**base_command("eval"), "--train.eval_batches": "1000000"})
    out = path("big.h5")
    big_export = ["--mode", "export", "--model.vocab_size", "50257", "--model.n_layer", "12", "--model.n_head",
                  "12", "--model.d_model", "768", "--model.seq_len", "64", "--data.output", out]
    problems = []
    for args, sig, output, first in [(long_generate, signal.SIGTERM, None, True),
                                     (long_generate, signal.SIGINT, None, True),
                                     (long_eval, signal.SIGTERM, None, False),
                                     (big_export, signal.SIGTERM, out, False)]:
        problem = stopped(args, sig, output, first)
        if problem:
            problems.append(f"{' '.join(args)}: {problem}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------ main


def test_fuzzed_inputs():
    cases = (option_cases(72) + config_cases(24) + token_file_cases(24) + checkpoint_cases(80) +
             adapter_cases(24) + metrics_cases(20) + jsonl_cases(24) + output_cases())
    start = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(run_case, cases))
    seconds = time.monotonic() - start
    by_kind = {}
    for case, problem, stderr in results:
        by_kind.setdefault(case.kind, []).append((case, problem, stderr))
    failed = 0
    for kind, rows in by_kind.items():
        bad = [(c, pr, err) for c, pr, err in rows if pr is not None]
        ran = sum(1 for _, pr, err in rows if pr is None and not err.strip().startswith("lrllm: error"))
        if bad:
            failed += 1
            print(f"FAIL fuzz {kind}: {len(bad)} of {len(rows)} cases", flush=True)
            for c, pr, err in bad:
                print(f"  {pr}: lrllm {' '.join(c.args)}\n    {err.strip()[-400:]}", flush=True)
        else:
            print(f"PASS fuzz {kind}: {len(rows)} cases ({ran} ran, {len(rows) - ran} refused)", flush=True)
    print(f"{len(cases)} cases with seed {SEED} in {seconds:.1f} s", flush=True)
    assert failed == 0, f"{failed} classes of input failed"


def main():
    failed = 0
    # test_fuzzed_inputs prints a line per class of input itself.
    for name, fn, reports in [("fuzzed inputs", test_fuzzed_inputs, True),
                              ("signals outside training", test_signals_outside_training, False)]:
        try:
            fn()
            if not reports:
                print(f"PASS {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            failed += 1
            if not reports or not isinstance(e, AssertionError):
                print(f"FAIL {name}: {e}", flush=True)
                traceback.print_exc(limit=3)
    if os.environ.get("LRLLM_FUZZ_KEEP"):  # the cases' files, to rerun a failed one by hand
        print(f"cases kept in {TMP}", flush=True)
    else:
        shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
