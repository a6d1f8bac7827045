"""Hugging Face import and export at full model sizes (part of `make bench`): wall time and peak RSS of
`--mode import` of a random-weight BF16 folder and of `--mode export --export.format hf --export.dtype bf16`
of the imported file, for GPT-2 1.5B and Llama-2 7B shapes.

The folders are written here tensor by tensor (a tensor's bytes in chunks of 16M values), never the whole
model in memory; Llama-2 7B in BF16 is 13.5 GB on disk, its imported float32 file 27 GB. Import and the
export of a dense float file both stream tensor by tensor, so they run anywhere the disk holds the files.

Usage: /usr/bin/python3 tools/bench_hf.py BUILD_DIR [gpt2-1.5B] [llama2-7B]   (default: gpt2-1.5B)
Writes bench-out/hf.md. BENCH_HF_DIR: where the folders go (default /tmp).
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_report import cpu_name  # noqa: E402

SHAPES = {
    "gpt2-1.5B": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 1600, "n_layer": 48,
                  "n_head": 25, "n_positions": 1024, "vocab_size": 50257},
    "llama2-7B": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
                  "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "max_position_embeddings": 4096, "vocab_size": 32000,
                  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False},
}


def tensors(c):
    """(name, shape) of the HF model, in file order."""
    if c["model_type"] == "gpt2":
        C, V, T = c["n_embd"], c["vocab_size"], c["n_positions"]
        out = [("transformer.wte.weight", (V, C)), ("transformer.wpe.weight", (T, C))]
        for l in range(c["n_layer"]):
            p = f"transformer.h.{l}."
            out += [(p + "ln_1.weight", (C,)), (p + "ln_1.bias", (C,)), (p + "attn.c_attn.weight", (C, 3 * C)),
                    (p + "attn.c_attn.bias", (3 * C,)), (p + "attn.c_proj.weight", (C, C)),
                    (p + "attn.c_proj.bias", (C,)), (p + "ln_2.weight", (C,)), (p + "ln_2.bias", (C,)),
                    (p + "mlp.c_fc.weight", (C, 4 * C)), (p + "mlp.c_fc.bias", (4 * C,)),
                    (p + "mlp.c_proj.weight", (4 * C, C)), (p + "mlp.c_proj.bias", (C,))]
        return out + [("transformer.ln_f.weight", (C,)), ("transformer.ln_f.bias", (C,))]
    C, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = C // c["num_attention_heads"] * c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (V, C)), ("lm_head.weight", (V, C))]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (C,)), (p + "self_attn.q_proj.weight", (C, C)),
                (p + "self_attn.k_proj.weight", (kv, C)), (p + "self_attn.v_proj.weight", (kv, C)),
                (p + "self_attn.o_proj.weight", (C, C)), (p + "post_attention_layernorm.weight", (C,)),
                (p + "mlp.gate_proj.weight", (F, C)), (p + "mlp.up_proj.weight", (F, C)),
                (p + "mlp.down_proj.weight", (C, F))]
    return out + [("model.norm.weight", (C,))]


def write_folder(d, c):
    """config.json and one BF16 model.safetensors, written tensor by tensor; returns its bytes."""
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(dict(c, torch_dtype="bfloat16"), f)
    header, offset = {}, 0
    names = tensors(c)
    for name, shape in names:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(0)
    chunk = 1 << 24
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in names:
            left = int(np.prod(shape))
            while left:
                k = min(left, chunk)
                v = (0.02 * rng.standard_normal(k, dtype=np.float32)).view(np.uint32)
                f.write((v >> 16).astype("<u2").tobytes())  # BF16: the upper half (truncated; random anyway)
                left -= k
    return 8 + len(text) + offset


def measured(args):
    """(seconds, peak RSS in GB) of one lrllm run."""
    start = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.monotonic() - start
    out, err = p.stdout.read(), p.stderr.read()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"bench_hf: {' '.join(args)} exited {p.returncode}:\n{out[-2000:]}\n{err[-2000:]}")
    return seconds, usage.ru_maxrss / 1e6  # ru_maxrss is in KB on Linux


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build"
    lrllm = os.path.abspath(os.path.join(build, "lrllm"))
    labels = sys.argv[2:] or ["gpt2-1.5B"]
    rows = []
    for label in labels:
        c = SHAPES[label]
        params = sum(int(np.prod(s)) for _, s in tensors(c))
        work = tempfile.mkdtemp(prefix=f"lrllm-bench-hf-{label}-", dir=os.environ.get("BENCH_HF_DIR", "/tmp"))
        need = params * (2 + 4 + 2) / 1e9
        free = shutil.disk_usage(work).free / 1e9
        if free < need * 1.05:
            rows.append(f"| {label} | {params / 1e9:.2f} | skipped: {need:.1f} GB of disk needed, {free:.1f} free | | | |")
            shutil.rmtree(work)
            continue
        try:
            hf, model, out = os.path.join(work, "hf"), os.path.join(work, "model.h5"), os.path.join(work, "out")
            size = write_folder(hf, c)
            t_in, rss_in = measured([lrllm, "--mode", "import", "--data.input", hf, "--data.output", model])
            shutil.rmtree(hf)  # the disk holds two of the three at a time
            t_out, rss_out = measured([lrllm, "--mode", "export", "--export.format", "hf", "--export.dtype", "bf16",
                                       "--model.init", model, "--data.output", out])
            export = f"{t_out:.1f} | {rss_out:.2f}"
            rows.append(f"| {label} | {params / 1e9:.2f} | {size / 1e9:.2f} | {t_in:.1f} | {rss_in:.2f} | {export} |")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    table = "\n".join([f"Hugging Face import and export (BF16 folders of random weights), on {cpu_name()}, "
                       f"{os.environ.get('OMP_NUM_THREADS', 'all')} threads", "",
                       "| model | parameters (B) | BF16 folder GB | import s | import peak RSS GB | export s | "
                       "export peak RSS GB |", "|---|---|---|---|---|---|---|", *rows])
    os.makedirs("bench-out", exist_ok=True)
    with open(os.path.join("bench-out", "hf.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
