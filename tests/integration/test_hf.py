"""Hugging Face GPT-2 and Llama folders in and out: --mode import, --mode export --export.format hf, and LoRA
adapters as PEFT folders (--export.format peft, --lora.init PEFT_DIR).

The folders are built here with torch (random weights, HF names, GPT-2's Conv1D orientation, Llama's separate
q/k/v and gate/up), their safetensors files written by the small spec-following writer below, independent of
lrllm's C++. lrllm's eval loss on a token file is compared with float64 GPT-2 and Llama forwards written here
from the HF tensors.

Run as: /usr/bin/python3 tests/integration/test_hf.py BUILD_DIR
Prints PASS/FAIL per test and exits non-zero if any failed.
"""
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback

import h5py
import numpy as np
import torch

BUILD = sys.argv[1] if len(sys.argv) > 1 else "build"
LRLLM = os.path.abspath(os.path.join(BUILD, "lrllm"))
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOKENIZER = os.path.join(ROOT, "input", "data", "tokenizer")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
TMP = tempfile.mkdtemp(prefix="lrllm-hf-")
# GPT-2's vocabulary, so that its tokenizer fits; a small body.
CFG = {"vocab_size": 50257, "n_positions": 16, "n_embd": 32, "n_layer": 2, "n_head": 2}


def run(args, check=True, cwd=None):
    p = subprocess.run([LRLLM, *args], env=ENV, capture_output=True, text=True, timeout=300, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"lrllm {' '.join(args)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


def path(*names):
    return os.path.join(TMP, *names)


# ------------------------------------------------------------------------------------- safetensors by hand


def encode(values, dtype):
    """Raw little-endian bytes of a float32 array as F32, F16 or BF16 (torch rounds to nearest even)."""
    values = np.ascontiguousarray(values, np.float32)
    if dtype == "F32":
        return values.astype("<f4").tobytes()
    if dtype == "F16":
        return values.astype("<f2").tobytes()
    if dtype == "BF16":
        return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    raise ValueError(dtype)


def decode(raw, dtype, shape):
    if dtype == "F32":
        v = np.frombuffer(raw, "<f4")
    elif dtype == "F16":
        v = np.frombuffer(raw, "<f2").astype(np.float32)
    elif dtype == "BF16":
        v = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise ValueError(dtype)
    return v.reshape(shape)


def st_write(file, tensors, metadata=None):
    """tensors: (name, dtype, shape, raw bytes) in data order; the header padded with spaces to 8 bytes."""
    header, offset = {}, 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(t[3] for t in tensors))


def st_read(file):
    """(header, metadata, {name: (dtype, shape, raw bytes)}), checking the layout as the spec has it."""
    with open(file, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    assert (8 + n) % 8 == 0, f"{file}: header of {n} bytes leaves the data unaligned"
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    metadata = header.pop("__metadata__", None)
    spans = sorted((h["data_offsets"][0], h["data_offsets"][1]) for h in header.values())
    at = 0
    for b, e in spans:
        assert b == at, f"{file}: hole or overlap at {b}"
        at = e
    assert at == len(body), f"{file}: {len(body) - at} trailing bytes"
    return header, metadata, {k: (h["dtype"], h["shape"], body[h["data_offsets"][0]:h["data_offsets"][1]])
                              for k, h in header.items()}


# ------------------------------------------------------------------------------------------ GPT-2 folders


def hf_names(cfg):
    C, F, V, T = cfg["n_embd"], 4 * cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C)}
    for l in range(cfg["n_layer"]):
        p = f"h.{l}."
        shapes.update({p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "attn.c_attn.weight": (C, 3 * C),
                       p + "attn.c_attn.bias": (3 * C,), p + "attn.c_proj.weight": (C, C),
                       p + "attn.c_proj.bias": (C,), p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
                       p + "mlp.c_fc.weight": (C, F), p + "mlp.c_fc.bias": (F,), p + "mlp.c_proj.weight": (F, C),
                       p + "mlp.c_proj.bias": (C,)})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def random_weights(cfg, seed):
    """Weights large enough that the loss depends on every tensor and its orientation (not ~ln V)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_names(cfg).items():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            v = 1 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            v = 0.1 * torch.randn(shape, generator=g)
        elif name == "wte.weight":
            v = 0.6 * torch.randn(shape, generator=g)
        else:
            v = 0.2 * torch.randn(shape, generator=g)
        out[name] = v.numpy().astype(np.float32)
    return out


def make_folder(name, dtype="F32", shards=1, prefix="transformer.", seed=0, cfg=None, tokenizer="files",
                extra=None, config=None, lm_head=True, buffers=True):
    """A GPT2LMHeadModel folder; returns (folder, {HF name without prefix: float32 values as stored})."""
    cfg = dict(CFG, **(cfg or {}))
    d = path(name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    weights = random_weights(cfg, seed)
    stored = {k: decode(encode(v, dtype), dtype, v.shape) for k, v in weights.items()}
    tensors = [(prefix + k, dtype, v.shape, encode(v, dtype)) for k, v in weights.items()]
    if lm_head:
        tensors.append(("lm_head.weight", dtype, weights["wte.weight"].shape, encode(weights["wte.weight"], dtype)))
    if buffers:  # the causal-mask buffers older transformers saved
        T = cfg["n_positions"]
        mask = np.tril(np.ones((T, T), np.float32)).reshape(1, 1, T, T)
        tensors += [(f"{prefix}h.{l}.attn.bias", "F32", mask.shape, encode(mask, "F32")) for l in range(cfg["n_layer"])]
    tensors += extra or []
    conf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-05, "n_inner": None, "n_ctx": cfg["n_positions"], **cfg}
    conf.update(config or {})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(conf, f)
    if shards == 1:
        st_write(os.path.join(d, "model.safetensors"), tensors, {"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = tensors[s::shards]
            st_write(os.path.join(d, file), part, {"format": "pt"})
            weight_map.update({t[0]: file for t in part})
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    if tokenizer == "files":
        shutil.copy(os.path.join(TOKENIZER, "encoder.json"), os.path.join(d, "vocab.json"))
        with open(os.path.join(TOKENIZER, "vocab.bpe"), encoding="utf-8") as src, \
                open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as dst:
            lines = src.read().split("\n")
            dst.write("\n".join(lines[1:]))  # without the #version line, which lrllm's vocab.bpe needs back
    return d, stored


def write_tokens(file, tokens):
    header = np.zeros(256, np.int32)
    header[:3] = [20240520, 1, len(tokens)]
    with open(file, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, np.uint16).tobytes())
    return file


def gelu_new(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def torch_logits(W, x, cfg=None):
    """GPT2LMHeadModel's logits from HF tensors: Conv1D is x @ W + b with W [in, out]; c_attn is q, k, v."""
    cfg = dict(CFG, **(cfg or {}))
    g = {k: torch.tensor(v, dtype=torch.float64) for k, v in W.items()}
    C, H = cfg["n_embd"], cfg["n_head"]
    n, T = x.shape
    ln = lambda h, p: torch.nn.functional.layer_norm(h, (C,), g[p + ".weight"], g[p + ".bias"], 1e-5)
    h = g["wte.weight"][x] + g["wpe.weight"][:T]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for l in range(cfg["n_layer"]):
        p = f"h.{l}."
        qkv = ln(h, p + "ln_1") @ g[p + "attn.c_attn.weight"] + g[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(n, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=-1))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(C // H)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        a = (att @ v).transpose(1, 2).reshape(n, T, C)
        h = h + a @ g[p + "attn.c_proj.weight"] + g[p + "attn.c_proj.bias"]
        m = gelu_new(ln(h, p + "ln_2") @ g[p + "mlp.c_fc.weight"] + g[p + "mlp.c_fc.bias"])
        h = h + m @ g[p + "mlp.c_proj.weight"] + g[p + "mlp.c_proj.bias"]
    return ln(h, "ln_f") @ g["wte.weight"].T


def sampled_tokens(W, sequences=8, seed=7, logits=None, T=None, V=None):
    """A token stream drawn from the reference model itself, sequence by sequence as lrllm's eval cuts it
    (seq_len + 1 tokens, each sequence starting at position 0): the loss then measures the model's own
    predictions, and any tensor in the wrong place or orientation raises it, where random tokens would give
    ~ln V for any weights."""
    g = torch.Generator().manual_seed(seed)
    logits, T, V = logits or torch_logits, T or CFG["n_positions"], V or CFG["vocab_size"]
    tokens = [int(torch.randint(V, (1,), generator=g))]
    for _ in range(sequences):
        ctx = [tokens[-1]]
        for _ in range(T):
            probs = torch.softmax(logits(W, torch.tensor([ctx]))[0, -1], -1)
            ctx.append(int(torch.multinomial(probs, 1, generator=g)))
        tokens += ctx[1:]
    return np.array(tokens)


def torch_loss(W, tokens, logits_fn=None, T=None):
    T = T or CFG["n_positions"]
    n = (len(tokens) - 1) // T
    x = torch.tensor(np.stack([tokens[i * T:i * T + T] for i in range(n)]).astype(np.int64))
    y = torch.tensor(np.stack([tokens[i * T + 1:i * T + T + 1] for i in range(n)]).astype(np.int64))
    logits = (logits_fn or torch_logits)(W, x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()


def eval_loss(model, tokens):
    p = run(["--mode", "eval", "--model.init", model, "--data.val", tokens, "--device", "cpu"])
    return float(p.stdout.split("loss ")[1].split(",")[0])


def model_tensors(file):
    out = {}
    with h5py.File(file, "r") as f:
        f["model"].visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def check_loss(model, stored, rel=1e-5):
    tokens = sampled_tokens(stored)
    file = write_tokens(model + ".tokens.bin", tokens)
    ours, ref = eval_loss(model, file), torch_loss(stored, tokens)
    # The model predicts its own samples far better than chance, so the comparison tells wrong weights apart.
    assert ref < math.log(CFG["vocab_size"]) - 2, f"the reference loss {ref} is ~ln V: the test would not tell"
    assert abs(ours - ref) <= rel * abs(ref), f"lrllm {ours} vs PyTorch {ref} (rel {abs(ours - ref) / ref:.2e})"


# ------------------------------------------------------------------------------------------------- tests


def test_import_f32_matches_torch_and_brings_the_tokenizer():
    d, stored = make_folder("f32", "F32")
    out = path("f32.h5")
    p = run(["--mode", "import", "--data.input", d, "--data.output", out])
    assert "F32" in p.stdout and out + ".tokenizer" in p.stdout, p.stdout
    check_loss(out, stored)
    W = model_tensors(out)
    assert np.array_equal(W["h.1/attn/qkv/W"], stored["h.1.attn.c_attn.weight"].T)
    assert np.array_equal(W["wte"], stored["wte.weight"])
    with h5py.File(out, "r") as f:
        assert f["config"].attrs["tokenizer_dir"] == "f32.h5.tokenizer", dict(f["config"].attrs)
        assert f.attrs["mode"] == "import" and f.attrs["format_version"] == 1
    tok = out + ".tokenizer"
    assert sorted(os.listdir(tok)) == ["encoder.json", "vocab.bpe"], os.listdir(tok)
    with open(os.path.join(tok, "encoder.json"), "rb") as a, open(os.path.join(TOKENIZER, "encoder.json"), "rb") as b:
        assert a.read() == b.read()
    with open(os.path.join(tok, "vocab.bpe"), "rb") as a, open(os.path.join(TOKENIZER, "vocab.bpe"), "rb") as b:
        assert a.read() == b.read()
    # From a folder without lrllm's default tokenizer path, generate finds the model's own.
    here = path("elsewhere")
    os.makedirs(here, exist_ok=True)
    p = run(["--mode", "generate", "--model.init", out, "--generate.prompt", "The market", "--generate.max_new_tokens",
             "3", "--device", "cpu"], cwd=here)
    assert p.stdout.startswith("The market"), p.stdout
    p = run(["--mode", "generate", "--model.init", out, "--generate.prompt", "x", "--data.tokenizer_dir",
             path("no-such-folder"), "--device", "cpu"], check=False, cwd=here)
    assert p.returncode == 2, "--data.tokenizer_dir given wins over the recorded folder"
    # The file reads in info and evaluates after a move, with its tokenizer folder beside it.
    assert "config: arch gpt2, vocab_size 50257, seq_len 16, n_layer 2" in run(["--mode", "info", "--model.init", out]).stdout


def test_import_bf16_sharded_without_prefix_matches_torch():
    d, stored = make_folder("bf16", "BF16", shards=3, prefix="", lm_head=False, buffers=False, tokenizer=None)
    out = path("bf16.h5")
    p = run(["--mode", "import", "--data.input", d, "--data.output", out])
    assert "BF16" in p.stdout and "tokenizer none" in p.stdout, p.stdout
    assert not os.path.exists(out + ".tokenizer")
    with h5py.File(out, "r") as f:
        assert "tokenizer_dir" not in f["config"].attrs
    check_loss(out, stored)


def test_import_f16_and_tokenizer_json():
    d, stored = make_folder("f16", "F16", tokenizer=None)
    with open(os.path.join(TOKENIZER, "encoder.json")) as f:
        vocab = json.load(f)
    with open(os.path.join(TOKENIZER, "vocab.bpe"), encoding="utf-8") as f:
        merges = [l for l in f.read().split("\n")[1:] if l]
    # Newer tokenizers files store a merge as a pair.
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump({"model": {"type": "BPE", "vocab": vocab, "merges": [m.split(" ") for m in merges]}}, f)
    out = path("f16.h5")
    run(["--mode", "import", "--data.input", d, "--data.output", out])
    check_loss(out, stored)
    a = run(["--mode", "generate", "--model.init", out, "--generate.prompt", "Profits rose", "--generate.max_new_tokens",
             "4", "--device", "cpu"]).stdout
    b = run(["--mode", "generate", "--model.init", out, "--generate.prompt", "Profits rose", "--generate.max_new_tokens",
             "4", "--device", "cpu", "--data.tokenizer_dir", TOKENIZER]).stdout
    assert a == b, (a, b)


def test_export_then_import_is_bit_identical():
    d, stored = make_folder("rt", "F32")
    first, hf, second = path("rt1.h5"), path("rt-hf"), path("rt2.h5")
    shutil.rmtree(hf, ignore_errors=True)
    run(["--mode", "import", "--data.input", d, "--data.output", first])
    p = run(["--mode", "export", "--export.format", "hf", "--model.init", first, "--data.output", hf])
    assert "F32" in p.stdout, p.stdout
    assert sorted(os.listdir(hf)) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"], os.listdir(hf)
    with open(os.path.join(hf, "config.json")) as f:
        conf = json.load(f)
    assert conf["architectures"] == ["GPT2LMHeadModel"] and conf["model_type"] == "gpt2", conf
    for k, v in CFG.items():
        assert conf[k] == v, (k, conf[k], v)
    assert conf["layer_norm_epsilon"] == 1e-5 and conf["activation_function"] == "gelu_new" and conf["n_inner"] is None
    header, metadata, tensors = st_read(os.path.join(hf, "model.safetensors"))
    assert metadata == {"format": "pt"}, metadata
    assert set(tensors) == {"transformer." + k for k in stored}, sorted(set(tensors) ^ {"transformer." + k for k in stored})
    for k, v in stored.items():
        dtype, shape, raw = tensors["transformer." + k]
        assert dtype == "F32" and tuple(shape) == v.shape, (k, dtype, shape)
        assert raw == encode(v, "F32"), f"{k} differs from the imported folder's"
    run(["--mode", "import", "--data.input", hf, "--data.output", second])
    a, b = model_tensors(first), model_tensors(second)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    with open(os.path.join(hf, "merges.txt"), "rb") as x, open(os.path.join(TOKENIZER, "vocab.bpe"), "rb") as y:
        assert x.read() == y.read()
    # The folder exists now: a second export refuses to write into it.
    p = run(["--mode", "export", "--export.format", "hf", "--model.init", first, "--data.output", hf], check=False)
    assert p.returncode == 2 and "exists" in p.stderr, p.stderr


def test_export_bf16_reproduces_the_bf16_values():
    d, stored = make_folder("bf", "BF16", shards=2)
    model, hf = path("bf.h5"), path("bf-hf")
    shutil.rmtree(hf, ignore_errors=True)
    run(["--mode", "import", "--data.input", d, "--data.output", model])
    run(["--mode", "export", "--export.format", "hf", "--export.dtype", "bf16", "--model.init", model,
         "--data.output", hf])
    with open(os.path.join(hf, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    _, _, tensors = st_read(os.path.join(hf, "model.safetensors"))
    for k, v in stored.items():
        dtype, shape, raw = tensors["transformer." + k]
        assert dtype == "BF16" and raw == encode(v, "BF16"), k
    # f16 from float32 rounds as numpy does (to nearest even).
    hf16 = path("bf-hf16")
    shutil.rmtree(hf16, ignore_errors=True)
    run(["--mode", "export", "--export.format", "hf", "--export.dtype", "f16", "--model.init", model,
         "--data.output", hf16])
    _, _, tensors = st_read(os.path.join(hf16, "model.safetensors"))
    for k, v in stored.items():
        assert tensors["transformer." + k][2] == v.astype("<f2").tobytes(), k


def test_export_of_low_rank_and_lora_models_is_dense():
    d, stored = make_folder("lr", "F32")
    base = path("lr-base.h5")
    run(["--mode", "import", "--data.input", d, "--data.output", base])
    low, hf, back = path("lr-low.h5"), path("lr-hf"), path("lr-back.h5")
    shutil.rmtree(hf, ignore_errors=True)
    run(["--mode", "decompose", "--model.init", base, "--lowrank.rank", "8", "--lowrank.targets", "qkv,fc",
         "--data.output", low])
    p = run(["--mode", "export", "--export.format", "hf", "--model.init", low, "--data.output", hf])
    assert "W = B A" in p.stdout, p.stdout
    run(["--mode", "import", "--data.input", hf, "--data.output", back])
    tokens = write_tokens(path("lr.tokens.bin"), sampled_tokens(stored))
    a, b = eval_loss(low, tokens), eval_loss(back, tokens)
    assert abs(a - b) <= 1e-5 * abs(a), (a, b)
    W, L = model_tensors(back), model_tensors(low)
    ba = L["h.0/attn/qkv/B"].astype(np.float64) @ L["h.0/attn/qkv/A"].astype(np.float64)
    assert np.abs(W["h.0/attn/qkv/W"] - ba).max() < 1e-5
    # LoRA: a short finetune, exported merged; the merged HF model evaluates as the adapters do.
    rows = [{"instruction": "Sentiment?", "input": t, "output": o} for t, o in
            [("profits rose", "positive"), ("losses widened", "negative"), ("the board met", "neutral")] * 4]
    train = path("ft.jsonl")
    with open(train, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    ft = path("ft-run")
    shutil.rmtree(ft, ignore_errors=True)
    run(["--mode", "finetune", "--model.init", base, "--data.train", train, "--run.dir", ft, "--train.steps", "2",
         "--train.batch_size", "4", "--train.lr", "1e-2", "--train.warmup", "0", "--train.eval_batches", "1",
         "--lora.rank", "4", "--device", "cpu"])
    ckpt, hf2, back2 = os.path.join(ft, "ckpt_000002.h5"), path("ft-hf"), path("ft-back.h5")
    shutil.rmtree(hf2, ignore_errors=True)
    p = run(["--mode", "export", "--export.format", "hf", "--model.init", ckpt, "--data.output", hf2])
    assert "adapters merged" in p.stdout, p.stdout
    # The finetuning checkpoint carried the imported base's tokenizer folder on (relative to its own folder).
    with h5py.File(ckpt, "r") as f:
        assert f["config"].attrs["tokenizer_dir"] == "../lr-base.h5.tokenizer", f["config"].attrs["tokenizer_dir"]
    assert os.path.exists(os.path.join(hf2, "merges.txt"))
    run(["--mode", "import", "--data.input", hf2, "--data.output", back2])
    a, b, plain = eval_loss(ckpt, tokens), eval_loss(back2, tokens), eval_loss(base, tokens)
    assert abs(a - b) <= 1e-5 * abs(a) and abs(a - plain) > 1e-4, (a, b, plain)


def corrupt(name, edit):
    """A valid F32 folder, then edit(folder) applied to it."""
    d, _ = make_folder(name, "F32")
    edit(d)
    return d


def rewrite(d, fn):
    """Rewrites model.safetensors: fn(header dict, body bytes) -> (header bytes, body bytes)."""
    file = os.path.join(d, "model.safetensors")
    with open(file, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    text, body = fn(header, body)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + body)


def set_config(d, **fields):
    file = os.path.join(d, "config.json")
    with open(file) as f:
        conf = json.load(f)
    conf.update(fields)
    with open(file, "w") as f:
        json.dump(conf, f)


def drop(name):
    def fn(header, body):
        del header[name]
        return json.dumps(header).encode(), body
    return fn


def change(name, key, value):
    def fn(header, body):
        header[name][key] = value
        return json.dumps(header).encode(), body
    return fn


def truncate(d):
    file = os.path.join(d, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 100)


def header_past_end(d):
    file = os.path.join(d, "model.safetensors")
    with open(file, "r+b") as f:
        f.write(struct.pack("<Q", os.path.getsize(file)))


def append_garbage(d):
    with open(os.path.join(d, "model.safetensors"), "ab") as f:
        f.write(b"\0" * 8)


def swap_offsets(a, b):
    """a takes b's data_offsets (a tensor of the same size): the two ranges overlap."""
    def fn(header, body):
        header[a]["data_offsets"] = list(header[b]["data_offsets"])
        return json.dumps(header).encode(), body
    return fn


def untie(d):
    def fn(header, body):
        b, e = header["lm_head.weight"]["data_offsets"]
        return json.dumps(header).encode(), body[:b] + encode(np.ones((e - b) // 4, np.float32), "F32") + body[e:]
    rewrite(d, fn)


P = "transformer."
BAD = [
    ("missing tensor", lambda d: rewrite(d, drop_and_compact(P + "h.1.mlp.c_fc.bias")), "h.1.mlp.c_fc.bias is missing"),
    ("wrong shape", lambda d: rewrite(d, change(P + "h.0.attn.c_attn.weight", "shape", [96, 32])),
     "has shape [96, 32], but config.json's model needs [32, 96]"),
    ("shape against offsets", lambda d: rewrite(d, change(P + "h.0.attn.c_attn.weight", "shape", [32, 95])),
     "needs 12160 bytes, but data_offsets"),
    ("unknown dtype", lambda d: rewrite(d, change(P + "h.0.ln_1.bias", "dtype", "F33")), "unknown dtype 'F33'"),
    ("integer dtype", lambda d: rewrite(d, change(P + "h.0.ln_1.bias", "dtype", "I32")), "lrllm reads F32, F16 and BF16"),
    ("truncated file", truncate, "run past the end of the data"),
    ("header length past the end", header_past_end, "runs past the end of the file"),
    ("bad JSON", lambda d: rewrite(d, lambda h, b: (b"{\"a\": [1, 2" + b" " * 4, b)), "not valid JSON"),
    ("trailing garbage", append_garbage, "trailing data"),
    ("overlapping offsets", lambda d: rewrite(d, swap_offsets(P + "h.0.ln_1.bias", P + "h.0.ln_1.weight")), "overlap"),
    ("config contradicts the tensors", lambda d: set_config(d, n_embd=64, n_head=2), "has shape [50257, 32]"),
    ("config with more layers", lambda d: set_config(d, n_layer=3), "h.2.ln_1.weight is missing"),
    ("eps other than 1e-5", lambda d: set_config(d, layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
    ("other activation", lambda d: set_config(d, activation_function="relu"), "gelu_new"),
    ("another model", lambda d: set_config(d, model_type="bert"), "model_type \"bert\" is not supported"),
    ("untied lm_head", untie, "lm_head.weight differs"),
    ("no weights", lambda d: os.remove(os.path.join(d, "model.safetensors")), "neither model.safetensors"),
    ("bad tokenizer", lambda d: open(os.path.join(d, "vocab.json"), "w").write("[1, 2"), "tokenizer does not load"),
]


def drop_and_compact(name):
    """Removes a tensor and its bytes, keeping the file valid: the tensor alone is missing."""
    def fn(header, body):
        b, e = header.pop(name)["data_offsets"]
        for h in header.values():
            if isinstance(h, dict) and "data_offsets" in h and h["data_offsets"][0] >= e:
                h["data_offsets"] = [h["data_offsets"][0] - (e - b), h["data_offsets"][1] - (e - b)]
        text = json.dumps(header).encode()
        return text + b" " * (-len(text) % 8), body[:b] + body[e:]
    return fn


def test_bad_folders_exit_2_with_one_line_and_no_output():
    failures = []
    for i, (what, edit, expect) in enumerate(BAD):
        d = corrupt(f"bad{i}", edit)
        out = path(f"bad{i}.h5")
        p = run(["--mode", "import", "--data.input", d, "--data.output", out], check=False)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        left = [n for n in os.listdir(TMP) if n.startswith(f"bad{i}.h5")]
        if p.returncode != 2 or len(lines) != 1 or expect not in lines[0] or left:
            failures.append(f"{what}: exit {p.returncode}, stderr {p.stderr!r}, left {left}")
        shutil.rmtree(d)
    # Shards: the index names a tensor its shard does not hold.
    d, _ = make_folder("badshard", "F32", shards=2)
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index) as f:
        m = json.load(f)
    m["weight_map"][P + "wte.weight"] = "model-00002-of-00002.safetensors" if m["weight_map"][P + "wte.weight"].startswith("model-00001") else "model-00001-of-00002.safetensors"
    with open(index, "w") as f:
        json.dump(m, f)
    p = run(["--mode", "import", "--data.input", d, "--data.output", path("badshard.h5")], check=False)
    if p.returncode != 2 or "does not hold it" not in p.stderr or os.path.exists(path("badshard.h5")):
        failures.append(f"index naming the wrong shard: exit {p.returncode}, {p.stderr!r}")
    assert not failures, "\n".join(failures)


def test_bad_options():
    d, _ = make_folder("opts", "F32", tokenizer=None)
    cases = [(["--mode", "import", "--data.output", path("x.h5")], "--data.input"),
             (["--mode", "import", "--data.input", path("no-folder"), "--data.output", path("x.h5")], "not a folder"),
             (["--mode", "export", "--export.format", "onnx", "--data.output", path("x")], "--export.format"),
             (["--mode", "export", "--export.format", "hf", "--export.dtype", "f8", "--data.output", path("x")],
              "--export.dtype"),
             (["--mode", "export", "--export.dtype", "bf16", "--data.output", path("x.h5")], "--export.format hf"),
             (["--mode", "export", "--export.format", "hf", "--quant.bits", "4", "--data.output", path("x")],
              "--quant.bits"),
             (["--mode", "export", "--export.format", "hf", "--model.vocab_size", "512", "--data.tokenizer_dir",
               TOKENIZER, "--data.output", path("x")], "more than the model's vocabulary of 512")]
    # A folder of the user's where the export would build its own: refused, and left alone.
    os.makedirs(path("y.tmp"), exist_ok=True)
    open(path("y.tmp", "notes.txt"), "w").write("mine")
    cases.append((["--mode", "export", "--export.format", "hf", "--model.vocab_size", "512", "--data.output",
                   path("y")], "y.tmp exists and is not what an interrupted export leaves"))
    for args, expect in cases:
        p = run(args, check=False)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert p.returncode == 2 and len(lines) == 1 and expect in lines[0], (args, p.returncode, p.stderr)
    assert os.listdir(path("y.tmp")) == ["notes.txt"] and not os.path.exists(path("y"))
    # What an interrupted export leaves is replaced.
    shutil.rmtree(path("y.tmp"))
    os.makedirs(path("y.tmp"))
    open(path("y.tmp", "model.safetensors.tmp"), "wb").write(b"partial")
    run(["--mode", "export", "--export.format", "hf", "--model.vocab_size", "512", "--data.output", path("y")])
    assert sorted(os.listdir(path("y"))) == ["config.json", "model.safetensors"] and not os.path.exists(path("y.tmp"))


# ------------------------------------------------------------------------------------------ Llama folders

# Grouped-query attention (4 heads over 2 key/value heads), d_ff not 4 d_model, a small vocabulary; the
# tokenizer tests use Llama-2's 32000 pieces.
LCFG = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0}
LLAMA_TOKENIZER = os.path.join(ROOT, "input", "data", "tokenizer-llama", "tokenizer.json")


def llama_names(cfg, tied=False):
    C, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = C // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    shapes = {"model.embed_tokens.weight": (V, C)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        shapes.update({p + "input_layernorm.weight": (C,), p + "self_attn.q_proj.weight": (C, C),
                       p + "self_attn.k_proj.weight": (kv, C), p + "self_attn.v_proj.weight": (kv, C),
                       p + "self_attn.o_proj.weight": (C, C), p + "post_attention_layernorm.weight": (C,),
                       p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
                       p + "mlp.down_proj.weight": (C, F)})
    shapes["model.norm.weight"] = (C,)
    if not tied:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def llama_folder(name, dtype="F32", shards=1, seed=0, cfg=None, tied=False, tokenizer=False, extra=None,
                 config=None):
    """A LlamaForCausalLM folder; returns (folder, cfg, {HF name: float32 values as stored})."""
    cfg = dict(LCFG, **(cfg or {}))
    d = path(name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for k, shape in llama_names(cfg, tied).items():
        scale = 0.6 if k in ("model.embed_tokens.weight", "lm_head.weight") else 0.2
        v = 1 + 0.2 * torch.randn(shape, generator=g) if k.endswith("norm.weight") else scale * torch.randn(shape, generator=g)
        weights[k] = v.numpy().astype(np.float32)
    stored = {k: decode(encode(v, dtype), dtype, v.shape) for k, v in weights.items()}
    tensors = [(k, dtype, v.shape, encode(v, dtype)) for k, v in weights.items()] + (extra or [])
    conf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "tie_word_embeddings": tied, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
            "torch_dtype": "float32", **cfg}
    conf.update(config or {})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(conf, f)
    if shards == 1:
        st_write(os.path.join(d, "model.safetensors"), tensors, {"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            st_write(os.path.join(d, file), tensors[s::shards], {"format": "pt"})
            weight_map.update({t[0]: file for t in tensors[s::shards]})
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    if tokenizer:
        shutil.copy(LLAMA_TOKENIZER, os.path.join(d, "tokenizer.json"))
    if tied:
        stored["lm_head.weight"] = stored["model.embed_tokens.weight"]
    return d, cfg, stored


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def llama_logits(W, x, cfg):
    """LlamaForCausalLM's logits from HF tensors (modeling_llama.py): RMSNorm, rotate_half RoPE on q and k,
    repeat_kv for grouped-query attention, SwiGLU (silu(gate) * up), an untied lm_head; in float64."""
    g = {k: torch.tensor(v, dtype=torch.float64) for k, v in W.items()}
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV, hd, eps = cfg["num_key_value_heads"], C // cfg["num_attention_heads"], cfg["rms_norm_eps"]
    n, T = x.shape
    rms = lambda h, w: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    h = g["model.embed_tokens.weight"][x]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        a = rms(h, g[p + "input_layernorm.weight"])
        q = (a @ g[p + "self_attn.q_proj.weight"].T).reshape(n, T, H, hd).transpose(1, 2)
        k = (a @ g[p + "self_attn.k_proj.weight"].T).reshape(n, T, KV, hd).transpose(1, 2)
        v = (a @ g[p + "self_attn.v_proj.weight"].T).reshape(n, T, KV, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # repeat_kv
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).masked_fill(~mask, float("-inf")).softmax(-1)
        h = h + (att @ v).transpose(1, 2).reshape(n, T, C) @ g[p + "self_attn.o_proj.weight"].T
        m = rms(h, g[p + "post_attention_layernorm.weight"])
        gate, up = m @ g[p + "mlp.gate_proj.weight"].T, m @ g[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ g[p + "mlp.down_proj.weight"].T
    return rms(h, g["model.norm.weight"]) @ g["lm_head.weight"].T


def llama_tokens(stored, cfg, name):
    fn = lambda W, x: llama_logits(W, x, cfg)
    return write_tokens(path(name + ".tokens.bin"),
                        sampled_tokens(stored, logits=fn, T=cfg["max_position_embeddings"], V=cfg["vocab_size"]))


def llama_check_loss(model, stored, cfg, rel=1e-5, tokens=None):
    tokens = tokens or llama_tokens(stored, cfg, os.path.basename(model))
    with open(tokens, "rb") as f:
        ids = np.frombuffer(f.read()[1024:], np.uint16).astype(np.int64)
    ours = eval_loss(model, tokens)
    ref = torch_loss(stored, ids, lambda W, x: llama_logits(W, x, cfg), cfg["max_position_embeddings"])
    assert ref < math.log(cfg["vocab_size"]) - 1.5, f"the reference loss {ref} is ~ln V: the test would not tell"
    assert abs(ours - ref) <= rel * abs(ref), f"lrllm {ours} vs PyTorch {ref} (rel {abs(ours - ref) / ref:.2e})"
    return ours


def test_llama_import_f32_gqa_matches_torch_and_brings_tokenizer_json():
    d, cfg, stored = llama_folder("l32", "F32", cfg={"vocab_size": 32000}, tokenizer=True)
    out = path("l32.h5")
    p = run(["--mode", "import", "--data.input", d, "--data.output", out])
    assert "LlamaForCausalLM" in p.stdout and "n_kv_head 2" in p.stdout and out + ".tokenizer" in p.stdout, p.stdout
    llama_check_loss(out, stored, cfg)
    W = model_tensors(out)
    L = "model.layers.1."
    assert np.array_equal(W["h.1/attn/qkv/W"], np.concatenate([stored[L + "self_attn.q_proj.weight"],
                                                               stored[L + "self_attn.k_proj.weight"],
                                                               stored[L + "self_attn.v_proj.weight"]]))
    assert np.array_equal(W["h.1/mlp/fc/W"], np.concatenate([stored[L + "mlp.gate_proj.weight"],
                                                             stored[L + "mlp.up_proj.weight"]]))
    assert np.array_equal(W["lm_head"], stored["lm_head.weight"]) and "wpe" not in W
    with h5py.File(out, "r") as f:
        c = f["config"].attrs
        assert c["arch"] == "llama" and c["n_kv_head"] == 2 and c["d_ff"] == 48 and c["norm_eps"] == 1e-5, dict(c)
        assert c["tokenizer_dir"] == "l32.h5.tokenizer" and f.attrs["format_version"] == 4
    assert os.listdir(out + ".tokenizer") == ["tokenizer.json"]
    with open(os.path.join(out + ".tokenizer", "tokenizer.json"), "rb") as a, open(LLAMA_TOKENIZER, "rb") as b:
        assert a.read() == b.read()
    here = path("elsewhere")
    os.makedirs(here, exist_ok=True)
    p = run(["--mode", "generate", "--model.init", out, "--generate.prompt", "The market", "--generate.max_new_tokens",
             "3", "--device", "cpu"], cwd=here)
    assert p.stdout.startswith("The market"), p.stdout


def test_llama_import_bf16_sharded_tied_with_buffers_matches_torch():
    inv = np.zeros(4, np.float32)
    buffers = [(f"model.layers.{l}.self_attn.rotary_emb.inv_freq", "F32", (4,), encode(inv, "F32")) for l in range(2)]
    d, cfg, stored = llama_folder("lbf", "BF16", shards=3, tied=True, cfg={"rope_theta": 500.0}, extra=buffers)
    out = path("lbf.h5")
    p = run(["--mode", "import", "--data.input", d, "--data.output", out])
    assert "BF16" in p.stdout and "tokenizer none" in p.stdout, p.stdout
    llama_check_loss(out, stored, cfg)
    W = model_tensors(out)
    assert np.array_equal(W["lm_head"], W["wte"])
    # rope_theta is read: the same weights under the default base compute another loss.
    set_config(d, rope_theta=10000.0)
    other = path("lbf-theta.h5")
    run(["--mode", "import", "--data.input", d, "--data.output", other])
    tokens = path("lbf.h5.tokens.bin")
    assert abs(eval_loss(other, tokens) - eval_loss(out, tokens)) > 1e-4


def test_llama_export_then_import_is_bit_identical():
    d, cfg, stored = llama_folder("lrt", "F32", tokenizer=True, cfg={"vocab_size": 32000})
    first, hf, second = path("lrt1.h5"), path("lrt-hf"), path("lrt2.h5")
    run(["--mode", "import", "--data.input", d, "--data.output", first])
    p = run(["--mode", "export", "--export.format", "hf", "--model.init", first, "--data.output", hf])
    assert "LlamaForCausalLM" in p.stdout, p.stdout
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors", "tokenizer.json"], os.listdir(hf)
    with open(os.path.join(hf, "config.json")) as f:
        conf = json.load(f)
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["model_type"] == "llama", conf
    for k, v in dict(LCFG, vocab_size=32000).items():
        assert conf[k] == v, (k, conf[k], v)
    assert conf["hidden_act"] == "silu" and conf["rope_scaling"] is None and conf["tie_word_embeddings"] is False
    assert conf["torch_dtype"] == "float32"
    _, metadata, tensors = st_read(os.path.join(hf, "model.safetensors"))
    assert metadata == {"format": "pt"} and set(tensors) == set(stored), sorted(set(tensors) ^ set(stored))
    for k, v in stored.items():
        dtype, shape, raw = tensors[k]
        assert dtype == "F32" and tuple(shape) == v.shape and raw == encode(v, "F32"), k
    run(["--mode", "import", "--data.input", hf, "--data.output", second])
    a, b = model_tensors(first), model_tensors(second)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # BF16 in, bf16 out: the bytes come back.
    d, _, stored = llama_folder("lrtb", "BF16", shards=2)
    model, hfb = path("lrtb.h5"), path("lrtb-hf")
    run(["--mode", "import", "--data.input", d, "--data.output", model])
    run(["--mode", "export", "--export.format", "hf", "--export.dtype", "bf16", "--model.init", model,
         "--data.output", hfb])
    _, _, tensors = st_read(os.path.join(hfb, "model.safetensors"))
    for k, v in stored.items():
        assert tensors[k][0] == "BF16" and tensors[k][2] == encode(v, "BF16"), k


FT_ROWS = [{"instruction": "Sentiment?", "input": t, "output": o} for t, o in
           [("profits rose", "positive"), ("losses widened", "negative"), ("the board met", "neutral")] * 4]


def finetune(base, name, extra=()):
    train = path("ft.jsonl")
    with open(train, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in FT_ROWS)
    ft = path(name)
    shutil.rmtree(ft, ignore_errors=True)
    run(["--mode", "finetune", "--model.init", base, "--data.train", train, "--run.dir", ft, "--train.steps", "2",
         "--train.batch_size", "4", "--train.lr", "1e-2", "--train.warmup", "0", "--train.eval_batches", "1",
         "--lora.rank", "4", "--lora.alpha", "8", "--device", "cpu", *extra])
    return os.path.join(ft, "ckpt_000002.h5")


def peft_round_trip(base, ckpt, tokens, name, expect_keys, expect_targets, fan_in_fan_out):
    """PEFT export of a finetuned checkpoint, then --lora.init of it: the same adapters bit for bit and the
    same loss; returns the folder and its tensors."""
    peft = path(name)
    p = run(["--mode", "export", "--export.format", "peft", "--model.init", ckpt, "--data.output", peft])
    assert "PEFT LoRA" in p.stdout, p.stdout
    assert sorted(os.listdir(peft)) == ["adapter_config.json", "adapter_model.safetensors"], os.listdir(peft)
    with open(os.path.join(peft, "adapter_config.json")) as f:
        conf = json.load(f)
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8, conf
    assert conf["task_type"] == "CAUSAL_LM" and conf["bias"] == "none" and conf["base_model_name_or_path"] == base
    assert conf["target_modules"] == expect_targets and conf["fan_in_fan_out"] is fan_in_fan_out, conf
    _, meta, tensors = st_read(os.path.join(peft, "adapter_model.safetensors"))
    assert meta["format"] == "pt" and meta["lrllm_base_checksum"].startswith("fnv1a64:"), meta
    assert expect_keys <= set(tensors), sorted(expect_keys - set(tensors))
    back = path(name + ".h5")
    run(["--mode", "export", "--lora.only", "true", "--model.init", base, "--lora.init", peft, "--data.output", back])
    a, b = model_tensors(ckpt), model_tensors(back)
    lora = sorted(k for k in a if "lora_" in k)
    assert lora and lora == sorted(b), (lora, sorted(b))
    assert all(np.array_equal(a[k], b[k]) for k in lora), [k for k in lora if not np.array_equal(a[k], b[k])]
    ours = run(["--mode", "eval", "--model.init", base, "--lora.init", peft, "--data.val", tokens, "--device", "cpu"])
    assert float(ours.stdout.split("loss ")[1].split(",")[0]) == eval_loss(ckpt, tokens)
    return peft, {k: decode(t[2], t[0], t[1]) for k, t in tensors.items()}, a


def test_llama_lora_merged_export_and_peft_round_trip():
    d, cfg, stored = llama_folder("lft", "F32", tokenizer=True, cfg={"vocab_size": 32000})
    base = path("lft.h5")
    run(["--mode", "import", "--data.input", d, "--data.output", base])
    ckpt = finetune(base, "lft-run")
    tokens = llama_tokens(stored, cfg, "lft")
    # Merged into a dense LlamaForCausalLM, the model evaluates as the adapters do.
    hf, back = path("lft-hf"), path("lft-back.h5")
    p = run(["--mode", "export", "--export.format", "hf", "--model.init", ckpt, "--data.output", hf])
    assert "adapters merged" in p.stdout and os.path.exists(os.path.join(hf, "tokenizer.json")), p.stdout
    run(["--mode", "import", "--data.input", hf, "--data.output", back])
    a, b, plain = eval_loss(ckpt, tokens), eval_loss(back, tokens), eval_loss(base, tokens)
    assert abs(a - b) <= 1e-5 * abs(a) and abs(a - plain) > 1e-4, (a, b, plain)
    L = "base_model.model.model.layers.1."
    keys = {L + m + f for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
            for f in [".lora_A.weight", ".lora_B.weight"]}
    peft, t, W = peft_round_trip(base, ckpt, tokens, "lft-peft", keys,
                                 ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False)
    # The fused site's A is each module's; its B's rows are q's, k's, v's (gate's, up's).
    A, B = W["h.1/attn/qkv/lora_A"], W["h.1/attn/qkv/lora_B"]
    assert np.array_equal(t[L + "self_attn.k_proj.lora_A.weight"], A)
    assert np.array_equal(t[L + "self_attn.q_proj.lora_B.weight"], B[:32])
    assert np.array_equal(t[L + "self_attn.k_proj.lora_B.weight"], B[32:48])
    assert np.array_equal(t[L + "self_attn.v_proj.lora_B.weight"], B[48:])
    assert np.array_equal(t[L + "mlp.up_proj.lora_B.weight"], W["h.1/mlp/fc/lora_B"][48:])
    # The same adapters continue finetuning from the PEFT folder.
    run(["--mode", "finetune", "--model.init", base, "--lora.init", peft, "--data.train", path("ft.jsonl"),
         "--run.dir", path("lft-run2"), "--train.steps", "1", "--train.batch_size", "4", "--train.warmup", "0",
         "--train.eval_batches", "1", "--lora.rank", "4", "--lora.alpha", "8", "--device", "cpu"])


def test_gpt2_peft_round_trip():
    d, stored = make_folder("gft", "F32")
    base = path("gft.h5")
    run(["--mode", "import", "--data.input", d, "--data.output", base])
    ckpt = finetune(base, "gft-run", ["--lora.targets", "qkv,proj,fc"])
    tokens = write_tokens(path("gft.tokens.bin"), sampled_tokens(stored))
    L = "base_model.model.transformer.h.0."
    keys = {L + m + f for m in ["attn.c_attn", "attn.c_proj", "mlp.c_fc"] for f in [".lora_A.weight", ".lora_B.weight"]}
    # attn.c_proj has adapters and mlp.c_proj has none: "c_proj" would name both.
    _, t, W = peft_round_trip(base, ckpt, tokens, "gft-peft", keys, ["c_attn", "attn.c_proj", "c_fc"], True)
    assert not any("mlp.c_proj" in k for k in t)
    assert np.array_equal(t[L + "attn.c_attn.lora_B.weight"], W["h.0/attn/qkv/lora_B"])


def peft_folder(name, cfg, base_stored, seed=3, r=4, alpha=8.0, modules=("q_proj", "v_proj"), config=None):
    """A PEFT folder as PEFT writes one for a LlamaForCausalLM: a separate lora_A per module; returns it and the
    HF weights with each module's (alpha / r) B A added, in float64."""
    d = path(name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    g = torch.Generator().manual_seed(seed)
    where = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    merged = {k: v.astype(np.float64) for k, v in base_stored.items()}
    tensors = []
    for l in range(cfg["num_hidden_layers"]):
        for m in modules:
            w = f"model.layers.{l}.{where[m]}.{m}.weight"
            out, inp = base_stored[w].shape
            A = (0.3 * torch.randn(r, inp, generator=g)).numpy().astype(np.float32)
            B = (0.3 * torch.randn(out, r, generator=g)).numpy().astype(np.float32)
            merged[w] = merged[w] + (alpha / r) * (B.astype(np.float64) @ A.astype(np.float64))
            k = f"base_model.model.model.layers.{l}.{where[m]}.{m}"
            tensors += [(k + ".lora_A.weight", "F32", A.shape, encode(A, "F32")),
                        (k + ".lora_B.weight", "F32", B.shape, encode(B, "F32"))]
    st_write(os.path.join(d, "adapter_model.safetensors"), tensors, {"format": "pt"})
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.05,
            "target_modules": list(modules), "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
            "use_dora": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
            "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}
    conf.update(config or {})
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(conf, f)
    return d, merged


def test_peft_layout_folder_evaluates_as_torch():
    d, cfg, stored = llama_folder("lpe", "F32")
    base = path("lpe.h5")
    run(["--mode", "import", "--data.input", d, "--data.output", base])
    tokens = llama_tokens(stored, cfg, "lpe")
    for modules in [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "gate_proj", "down_proj")]:
        peft, merged = peft_folder("lpe-peft", cfg, stored, modules=modules)
        p = run(["--mode", "eval", "--model.init", base, "--lora.init", peft, "--data.val", tokens, "--device", "cpu"])
        ours = float(p.stdout.split("loss ")[1].split(",")[0])
        with open(tokens, "rb") as f:
            ids = np.frombuffer(f.read()[1024:], np.uint16).astype(np.int64)
        ref = torch_loss(merged, ids, lambda W, x: llama_logits(W, x, cfg), cfg["max_position_embeddings"])
        assert abs(ours - ref) <= 1e-5 * abs(ref) and abs(ours - eval_loss(base, tokens)) > 1e-3, (modules, ours, ref)
    # q and v's separate A's stack into one rank-8 A over the fused qkv; k's rows of B are zero.
    W = model_tensors(run_export_adapters(base, "lpe-peft", ("q_proj", "v_proj"), cfg, stored))
    assert W["h.0/attn/qkv/lora_A"].shape == (8, 32) and not W["h.0/attn/qkv/lora_B"][32:48].any()
    assert "h.0/mlp/fc/lora_A" not in W


def run_export_adapters(base, name, modules, cfg, stored):
    peft, _ = peft_folder(name, cfg, stored, modules=modules)
    out = path(name + ".h5")
    run(["--mode", "export", "--lora.only", "true", "--model.init", base, "--lora.init", peft, "--data.output", out])
    return out


def drop_key(d, name):
    file = os.path.join(d, "adapter_model.safetensors")
    _, meta, tensors = st_read(file)
    st_write(file, [(k, *t) for k, t in tensors.items() if k != name], meta)


def reshape_key(d, name):
    file = os.path.join(d, "adapter_model.safetensors")
    _, meta, tensors = st_read(file)
    st_write(file, [(k, t[0], [t[1][1], t[1][0]] if k == name else t[1], t[2]) for k, t in tensors.items()], meta)


def truncate_adapters(d):
    file = os.path.join(d, "adapter_model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 64)


def set_peft(d, **fields):
    file = os.path.join(d, "adapter_config.json")
    with open(file) as f:
        conf = json.load(f)
    conf.update(fields)
    with open(file, "w") as f:
        json.dump(conf, f)


Q = "base_model.model.model.layers.1.self_attn.q_proj"
BAD_PEFT = [
    ("truncated adapter file", truncate_adapters, "run past the end of the data"),
    ("missing lora_B", lambda d: drop_key(d, Q + ".lora_B.weight"), "has no " + Q + ".lora_B.weight"),
    ("wrong shape", lambda d: reshape_key(d, Q + ".lora_A.weight"), "needs [r, 32]"),
    ("unknown target module", lambda d: set_peft(d, target_modules=["q_proj", "lm_head"]), "target module \"lm_head\""),
    ("DoRA", lambda d: set_peft(d, use_dora=True), "use_dora"),
    ("rsLoRA", lambda d: set_peft(d, use_rslora=True), "use_rslora"),
    ("modules_to_save", lambda d: set_peft(d, modules_to_save=["lm_head"]), "modules_to_save"),
    ("fan_in_fan_out", lambda d: set_peft(d, fan_in_fan_out=True), "fan_in_fan_out is true"),
    ("rank against r", lambda d: set_peft(d, r=8), "has rank 4, but adapter_config.json has r 8"),
    ("no config", lambda d: os.remove(os.path.join(d, "adapter_config.json")), "adapter_config.json: cannot open"),
    ("another base", lambda d: set_metadata(d, lrllm_base_checksum="fnv1a64:0123456789abcdef"),
     "were exported over a base of checksum fnv1a64:0123456789abcdef"),
]


def set_metadata(d, **fields):
    file = os.path.join(d, "adapter_model.safetensors")
    _, meta, tensors = st_read(file)
    st_write(file, [(k, *t) for k, t in tensors.items()], dict(meta, **fields))


def test_bad_peft_folders_exit_2_with_one_line():
    d, cfg, stored = llama_folder("lbp", "F32")
    base = path("lbp.h5")
    run(["--mode", "import", "--data.input", d, "--data.output", base])
    tokens = write_tokens(path("lbp.tokens.bin"), list(range(40)))
    failures = []
    for what, edit, expect in BAD_PEFT:
        peft, _ = peft_folder("lbp-peft", cfg, stored)
        edit(peft)
        p = run(["--mode", "eval", "--model.init", base, "--lora.init", peft, "--data.val", tokens, "--device", "cpu"],
                check=False)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        if p.returncode != 2 or len(lines) != 1 or expect not in lines[0]:
            failures.append(f"{what}: exit {p.returncode}, stderr {p.stderr!r}")
    assert not failures, "\n".join(failures)


def test_bad_llama_folders_exit_2_with_one_line_and_no_output():
    extra = ("model.layers.0.self_attn.q_proj.bias", "F32", (32,), encode(np.zeros(32, np.float32), "F32"))
    cases = [
        ("missing tensor", {}, lambda d: rewrite(d, drop_and_compact("model.layers.1.mlp.up_proj.weight")),
         "model.layers.1.mlp.up_proj.weight is missing"),
        ("wrong shape", {}, lambda d: rewrite(d, change("model.layers.0.self_attn.k_proj.weight", "shape", [32, 16])),
         "has shape [32, 16], but config.json's model needs [16, 32]"),
        ("rope_scaling", {"rope_scaling": {"type": "linear", "factor": 2.0}}, None, "rope_scaling"),
        ("hidden_act", {"hidden_act": "gelu"}, None, "hidden_act is \"gelu\""),
        ("attention_bias", {"attention_bias": True}, None, "attention_bias"),
        ("heads against kv heads", {"num_key_value_heads": 3}, None, "must divide n_head"),
        ("a tensor lrllm has no place for", {"extra": [extra]}, None,
         "model.layers.0.self_attn.q_proj.bias is not part of the LlamaForCausalLM"),
        ("tied but different", {"tie": True}, None, "lm_head.weight differs from model.embed_tokens.weight"),
        # Larger than this machine's memory: the import streams it, so it is checked by its tensors, not refused.
        ("larger than memory", {"hidden_size": 8192, "intermediate_size": 65536, "num_hidden_layers": 64}, None,
         "model.embed_tokens.weight has shape [256, 32], but config.json's model needs [256, 8192]"),
    ]
    failures = []
    for i, (what, config, edit, expect) in enumerate(cases):
        config = dict(config)
        kw = {"extra": config.pop("extra")} if "extra" in config else {}
        tie = config.pop("tie", False)
        d, _, _ = llama_folder(f"lbad{i}", "F32", config=config, **kw)
        if tie:
            set_config(d, tie_word_embeddings=True)
        if edit:
            edit(d)
        out = path(f"lbad{i}.h5")
        p = run(["--mode", "import", "--data.input", d, "--data.output", out], check=False)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        left = [n for n in os.listdir(TMP) if n.startswith(f"lbad{i}.h5")]
        if p.returncode != 2 or len(lines) != 1 or expect not in lines[0] or left:
            failures.append(f"{what}: exit {p.returncode}, stderr {p.stderr!r}, left {left}")
    assert not failures, "\n".join(failures)


def main():
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
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
