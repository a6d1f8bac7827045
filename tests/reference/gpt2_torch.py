"""Independent PyTorch GPT-2 used to check lrllm (tests/reference/).

Everything here is written from the specification in docs/design.md (The seams, File formats), with plain
torch ops, so that it is an outside reference for lrllm's C++ model:

  * pre-LayerNorm GPT-2 blocks (eps 1e-5), learned positions, tanh-approximate GELU,
    causal softmax attention scaled by 1/sqrt(head_dim), lm_head tied to wte,
    loss = mean cross-entropy over all B*T positions;
  * linear layers in nn.Linear orientation: dense y = x W^T + b, low-rank y = (x A^T) B^T + b,
    chosen per layer from which tensors exist (W, or A and B);
  * the lrllm HDF5 checkpoint layout (docs/design.md, Checkpoint format), read and written with h5py;
  * llm.c token files (256 int32 header, then uint16 tokens);
  * LoRA adapters y = base(x) + (alpha/r) (x lora_A^T) lora_B^T over a frozen base, and the
    block-wise int8 / NF4 (optionally double-quantized) storage of frozen dense W, quantized and
    dequantized in numpy from the rules in include/lrllm/model/quant.h's header comment;
  * the lrllm pretraining step: warmup + cosine lr, global-norm clipping, torch AdamW with
    weight decay on 2-D tensors only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import h5py
import numpy as np
import torch

LINEAR_SITES = ("qkv", "proj", "fc", "mlp_proj")
TOKEN_MAGIC = 20240520
TOKEN_VERSION = 1


@dataclass
class Config:
    vocab_size: int = 512
    seq_len: int = 32
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_ff: int = 256
    lowrank_rank: int = 0
    lowrank_targets: tuple = field(default_factory=tuple)  # subset of LINEAR_SITES
    lowrank_activation: str = "none"  # silu: a low-rank site is B silu(A x) + b (CoLA's form)
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple = field(default_factory=tuple)  # sites with adapters
    quant: str = "none"  # how the checkpoint stores the frozen dense W: none | int8 | nf4
    quant_block: int = 64
    trainable_tokens: tuple = field(default_factory=tuple)  # ids of trainable_tokens/delta's rows

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank > 0 else 0.0


def site_path(i: int, site: str) -> str:
    """Checkpoint path (under /model) of linear site `site` of block i."""
    return {
        "qkv": f"h.{i}/attn/qkv",
        "proj": f"h.{i}/attn/proj",
        "fc": f"h.{i}/mlp/fc",
        "mlp_proj": f"h.{i}/mlp/proj",
    }[site]


def site_shape(cfg: Config, site: str) -> tuple[int, int]:
    """(out, in) of a linear site."""
    C, F = cfg.d_model, cfg.d_ff
    return {"qkv": (3 * C, C), "proj": (C, C), "fc": (F, C), "mlp_proj": (C, F)}[site]


# ----------------------------------------------------------------------------------------------
# Parameters


def init_params(cfg: Config, seed: int) -> dict[str, np.ndarray]:
    """Random float32 parameters keyed by their path under /model.

    Scaled so that every non-linearity works away from its linear regime (a test with GPT-2's
    usual std 0.02 leaves attention nearly uniform and GELU nearly linear, and would not tell
    an erf GELU or a wrong attention scale from the right one): wte, wpe ~ N(0, 0.1); a dense
    W [out,in] ~ N(0, 1/in); a low-rank pair with B@A of that same scale; biases 0.02*N(0,1);
    LayerNorm w = 1 + 0.1*N(0,1), b = 0.05*N(0,1), so that every gradient is non-trivial.
    """
    rng = np.random.default_rng(seed)
    C, r = cfg.d_model, cfg.lowrank_rank

    def normal(std, *shape):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def ln(prefix):
        p[prefix + "/w"] = (1.0 + normal(0.1, C)).astype(np.float32)
        p[prefix + "/b"] = normal(0.05, C)

    p: dict[str, np.ndarray] = {}
    p["wte"] = normal(0.1, cfg.vocab_size, C)
    p["wpe"] = normal(0.1, cfg.seq_len, C)
    for i in range(cfg.n_layer):
        ln(f"h.{i}/ln_1")
        ln(f"h.{i}/ln_2")
        for site in LINEAR_SITES:
            out, inp = site_shape(cfg, site)
            base = site_path(i, site)
            if r > 0 and site in cfg.lowrank_targets:
                # A and B of equal scale with std(B@A) = 1/sqrt(in).
                s = (inp * r) ** -0.25
                p[base + "/A"] = normal(s, r, inp)
                p[base + "/B"] = normal(s, out, r)
            else:
                p[base + "/W"] = normal(inp ** -0.5, out, inp)
            p[base + "/b"] = normal(0.02, out)
    ln("ln_f")
    return p


def is_decayed(name: str) -> bool:
    """lrllm applies weight decay to 2-D tensors only (wte, wpe, W, A, B)."""
    return name.split("/")[-1] in ("wte", "wpe", "W", "A", "B")


# ----------------------------------------------------------------------------------------------
# Files


def save_checkpoint(path: str, cfg: Config, params: dict[str, np.ndarray], mode: str = "pretrain"):
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "lrllm"
        # lrllm's version rule: a silu model is version 5, as an older reader would run it as B A x.
        f.attrs["format_version"] = np.int64(5 if cfg.lowrank_activation == "silu" else 1)
        f.attrs["lrllm_version"] = "tests/reference"
        f.attrs["mode"] = mode
        f.attrs["created"] = "1970-01-01T00:00:00Z"
        c = f.create_group("config")
        c.attrs["arch"] = "gpt2"
        for k in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "d_ff"):
            c.attrs[k] = np.int64(getattr(cfg, k))
        c.attrs["tied_embeddings"] = np.int64(1)
        c.attrs["lowrank_rank"] = np.int64(cfg.lowrank_rank)
        c.attrs["lowrank_targets"] = ",".join(cfg.lowrank_targets) if cfg.lowrank_rank else ""
        if cfg.lowrank_rank:
            c.attrs["lowrank_activation"] = cfg.lowrank_activation
        c.attrs["lora_rank"] = np.int64(cfg.lora_rank)
        c.attrs["lora_alpha"] = np.float64(cfg.lora_alpha)
        c.attrs["lora_targets"] = ",".join(cfg.lora_targets) if cfg.lora_rank else ""
        c.attrs["quant"] = "none"
        c.attrs["quant_block"] = np.int64(cfg.quant_block)
        m = f.create_group("model")
        for name, arr in params.items():
            m.create_dataset(name, data=np.ascontiguousarray(arr, dtype=np.float32))


def read_group_tensors(f: h5py.File, group: str) -> dict[str, np.ndarray]:
    """All datasets under `group`, keyed by their path relative to it."""
    out: dict[str, np.ndarray] = {}
    if group not in f:
        return out
    g = f[group]

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            out[name] = obj[()]

    g.visititems(visit)
    return out


def _attr_str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_config(f: h5py.File) -> Config:
    c = f["config"].attrs

    def targets(key):
        return tuple(t for t in _attr_str(c.get(key, "")).split(",") if t)

    return Config(vocab_size=int(c["vocab_size"]), seq_len=int(c["seq_len"]),
                  n_layer=int(c["n_layer"]), n_head=int(c["n_head"]),
                  d_model=int(c["d_model"]), d_ff=int(c["d_ff"]),
                  lowrank_rank=int(c.get("lowrank_rank", 0)),
                  lowrank_targets=targets("lowrank_targets"),
                  lowrank_activation=_attr_str(c.get("lowrank_activation", "none")),
                  lora_rank=int(c.get("lora_rank", 0)),
                  lora_alpha=float(c.get("lora_alpha", 0.0)),
                  lora_targets=targets("lora_targets"),
                  quant=_attr_str(c.get("quant", "none")),
                  quant_block=int(c.get("quant_block", 64)),
                  trainable_tokens=tuple(int(i) for i in c.get("trainable_tokens", ())))


def load_checkpoint(path: str):
    """(Config, params, attrs) from an lrllm checkpoint; params keyed by path under /model.

    params holds the datasets as stored: a quantized W appears as W_q, W_absmax, ... (see
    load_model for float weights).
    """
    with h5py.File(path, "r") as f:
        cfg = read_config(f)
        params = read_group_tensors(f, "model")
        attrs = {k: f.attrs[k] for k in f.attrs}
    return cfg, params, attrs


def load_model(path: str, read_config_fn=None):
    """(Config, params) with every quantized tensor (a W, A or B, or the tied wte) replaced by its
    float32 dequantization. read_config_fn: /config's reader (default this GPT-2's)."""
    with h5py.File(path, "r") as f:
        cfg = (read_config_fn or read_config)(f)
        params = read_group_tensors(f, "model")
        stems = sorted(k[:-len("_q")] for k in params if k.endswith("_q") and not k.endswith("_absmax_q"))
        for stem in stems:
            q = read_quantized(f["model"], stem)
            for k in [k for k in params if k.startswith(stem + "_")]:
                del params[k]
            params[stem] = dequantize(q)
    return cfg, params


def write_tokens(path: str, tokens: np.ndarray):
    """llm.c token file: 256 int32 header (magic, version, count), then uint16 tokens."""
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1 and tokens.min() >= 0 and tokens.max() < 65536
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = TOKEN_MAGIC, TOKEN_VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())


def read_tokens(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(256 * 4), dtype=np.int32)
        assert header[0] == TOKEN_MAGIC and header[1] == TOKEN_VERSION, "bad token file header"
        toks = np.frombuffer(f.read(), dtype=np.uint16)
    assert len(toks) == header[2], "token count mismatch"
    return toks.astype(np.int64)


def batch(tokens: np.ndarray, T: int, seq_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs/targets for sequences `seq_ids`: sequence i = tokens[i*T : i*T+T] -> [+1]."""
    x = np.stack([tokens[i * T:i * T + T] for i in seq_ids])
    y = np.stack([tokens[i * T + 1:i * T + T + 1] for i in seq_ids])
    return torch.from_numpy(x), torch.from_numpy(y)


# ----------------------------------------------------------------------------------------------
# Model (functional: a dict of tensors keyed like the checkpoint)


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def linear(P, base, x, lora_scale=0.0, silu=False):
    """Dense (W) or low-rank (A, B) linear layer, decided by which tensors exist, plus the LoRA
    term lora_scale * (x lora_A^T) lora_B^T where the site has adapters. silu: a low-rank site is
    B silu(A x) + b."""
    if base + "/W" in P:
        y = x @ P[base + "/W"].T + P[base + "/b"]
    else:
        mid = x @ P[base + "/A"].T
        if silu:
            mid = mid / (1.0 + torch.exp(-mid))
        y = mid @ P[base + "/B"].T + P[base + "/b"]
    if base + "/lora_A" in P:
        y = y + lora_scale * ((x @ P[base + "/lora_A"].T) @ P[base + "/lora_B"].T)
    return y


def segment_ids(positions):
    """Packed rows: a new example starts wherever the position restarts at 0."""
    return torch.cumsum((positions == 0).to(torch.long), dim=1)


def attention(qkv, n_head, positions=None):
    """Causal; with positions [B, T] (packed rows) a query sees only keys of its own example."""
    Bsz, T, C3 = qkv.shape
    C = C3 // 3
    hd = C // n_head
    q, k, v = qkv.split(C, dim=-1)

    def heads(t):
        return t.reshape(Bsz, T, n_head, hd).transpose(1, 2)  # [B, H, T, hd]

    q, k, v = heads(q), heads(k), heads(v)
    att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    if positions is not None:
        seg = segment_ids(positions)
        mask = mask & (seg[:, :, None] == seg[:, None, :])  # [B, T, T]
        mask = mask[:, None]  # over the heads
    att = att.masked_fill(~mask, float("-inf"))
    att = att - att.amax(dim=-1, keepdim=True)
    att = torch.exp(att)
    att = att / att.sum(dim=-1, keepdim=True)
    y = att @ v
    return y.transpose(1, 2).reshape(Bsz, T, C)


def forward(P, cfg: Config, idx, targets=None, positions=None):
    """Logits [B,T,V], and the mean cross-entropy if targets are given. positions [B, T]: each
    token's position inside its example when rows pack several (None: 0 .. T-1)."""
    T = idx.shape[1]
    s = cfg.lora_scale
    # Trainable tokens (PEFT's): a delta over chosen rows of the tied wte, embedding and lm_head alike.
    E = P["wte"]
    if "trainable_tokens/delta" in P:
        ids = torch.tensor(cfg.trainable_tokens, dtype=torch.long)
        E = E.index_add(0, ids, P["trainable_tokens/delta"])
    x = E[idx] + (P["wpe"][:T] if positions is None else P["wpe"][positions])
    u = cfg.lowrank_activation == "silu"
    for i in range(cfg.n_layer):
        h = layer_norm(x, P[f"h.{i}/ln_1/w"], P[f"h.{i}/ln_1/b"])
        h = attention(linear(P, f"h.{i}/attn/qkv", h, s, u), cfg.n_head, positions)
        x = x + linear(P, f"h.{i}/attn/proj", h, s, u)
        h = layer_norm(x, P[f"h.{i}/ln_2/w"], P[f"h.{i}/ln_2/b"])
        h = gelu_tanh(linear(P, f"h.{i}/mlp/fc", h, s, u))
        x = x + linear(P, f"h.{i}/mlp/proj", h, s, u)
    x = layer_norm(x, P["ln_f/w"], P["ln_f/b"])
    logits = x @ E.T
    if targets is None:
        return logits, None
    z = logits - logits.amax(dim=-1, keepdim=True)
    logp = z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logits, nll.mean()


def to_torch(params: dict[str, np.ndarray], dtype=torch.float64, requires_grad=True):
    """requires_grad: True, False, or a predicate on the parameter name."""
    rg = requires_grad if callable(requires_grad) else (lambda _k: bool(requires_grad))
    return {k: torch.tensor(np.asarray(v), dtype=dtype, requires_grad=rg(k))
            for k, v in params.items()}


def is_lora(name: str) -> bool:
    return name.split("/")[-1] in ("lora_A", "lora_B")


def loss_and_grads(params, cfg: Config, x, y, dtype=torch.float64, trainable=None, positions=None,
                   forward_fn=None):
    """Mean loss (float) and gradients (numpy, float64) of every parameter, or only of those
    for which the predicate `trainable` holds (the rest are frozen constants). forward_fn: the
    model (default this GPT-2's forward; llama_torch passes its own)."""
    P = to_torch(params, dtype, True if trainable is None else trainable)
    _, loss = (forward_fn or forward)(P, cfg, x, y, positions)
    loss.backward()
    return loss.item(), {k: t.grad.detach().numpy().astype(np.float64) for k, t in P.items()
                         if t.requires_grad}


# ----------------------------------------------------------------------------------------------
# Block-wise quantization (numpy), written from the rules in include/lrllm/model/quant.h's header:
# blocks of `block` consecutive values of the flattened row-major tensor (last one may be
# short), each scaled by its absmax = max |x|.


def _round_half_away(t: np.ndarray) -> np.ndarray:
    return np.sign(t) * np.floor(np.abs(t) + 0.5)


def _f32_nearest(x) -> np.float32:
    """x (a Fraction, or anything Fraction accepts) rounded to float32 once, ties to even."""
    from fractions import Fraction
    x = Fraction(x)
    f = np.float32(float(x))  # within one float32 ulp of x; pick the nearest neighbour exactly
    cands = [f, np.nextafter(f, np.float32(-np.inf)), np.nextafter(f, np.float32(np.inf))]
    cands = [c for c in cands if np.isfinite(c)]
    best = min(cands, key=lambda c: (abs(Fraction(float(c)) - x),
                                     int(np.array(c, np.float32).view(np.uint32)) & 1))
    return np.float32(best)


def _block_absmax(x: np.ndarray, block: int) -> np.ndarray:
    n = x.size
    nb = -(-n // block)
    pad = np.zeros(nb * block, np.float32)
    pad[:n] = np.abs(x.reshape(-1))
    return pad.reshape(nb, block).max(axis=1).astype(np.float32)


def _per_value(a: np.ndarray, n: int, block: int) -> np.ndarray:
    return np.repeat(a, block)[:n]


NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
NF4_ABSMAX_BLOCK = 256


def quantize(x: np.ndarray, kind: str, block: int = 64, double_quant: bool = True) -> dict:
    """The stored form of float32 x: dict with kind, block, shape, codes (int8 codes, or packed
    NF4 bytes), and absmax (float32) or absmax_q/absmax_scale/absmax_mean (NF4 double quant)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    flat = x.reshape(-1)
    n = flat.size
    amax = _block_absmax(flat, block)
    per = _per_value(amax, n, block)
    q = {"kind": kind, "block": block, "shape": tuple(x.shape), "double_quant": False}
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "int8":
            t = (127.0 * flat.astype(np.float64)) / per.astype(np.float64)
            code = np.where(per > 0, _round_half_away(t), 0.0)
            q["codes"] = code.astype(np.int8)
            q["absmax"] = amax
            return q
        assert kind == "nf4"
        v = np.where(per > 0, flat / per, np.float32(0)).astype(np.float32)
    lv = NF4_LEVELS.astype(np.float64)
    mids = (lv[:-1] + lv[1:]) / 2  # exact in float64
    # nearest level in exact arithmetic; a value exactly on a midpoint goes to the lower code
    code = (v.astype(np.float64)[:, None] > mids[None, :]).sum(axis=1).astype(np.uint8)
    code[per == 0] = 7
    if n % 2:
        code = np.concatenate([code, np.zeros(1, np.uint8)])
    q["codes"] = ((code[0::2] << 4) | code[1::2]).astype(np.uint8)
    if not double_quant:
        q["absmax"] = amax
        return q
    from fractions import Fraction
    mean = _f32_nearest(sum(Fraction(float(a)) for a in amax) / len(amax))
    c = amax.astype(np.float64) - np.float64(mean)  # exact: both float32
    nbq = -(-len(amax) // NF4_ABSMAX_BLOCK)
    scale = np.zeros(nbq, np.float32)
    aq = np.zeros(len(amax), np.int8)
    for j in range(nbq):
        cj = c[j * NF4_ABSMAX_BLOCK:(j + 1) * NF4_ABSMAX_BLOCK]
        scale[j] = np.float32(np.abs(cj).max() / 127.0)
        if scale[j] > 0:
            aq[j * NF4_ABSMAX_BLOCK:(j + 1) * NF4_ABSMAX_BLOCK] = \
                _round_half_away(cj / np.float64(scale[j])).astype(np.int8)
    q.update(double_quant=True, absmax_q=aq, absmax_scale=scale, absmax_mean=float(mean))
    return q


def block_absmax(q: dict) -> np.ndarray:
    """The float32 absmax per block that dequantization uses (fma(q, scale, mean) in float32
    under double quantization: one rounding of the exact q*scale + mean)."""
    if not q["double_quant"]:
        return np.asarray(q["absmax"], np.float32)
    from fractions import Fraction
    mean = Fraction(float(np.float32(q["absmax_mean"])))
    out = np.empty(len(q["absmax_q"]), np.float32)
    for j, code in enumerate(np.asarray(q["absmax_q"], np.int64)):
        sc = Fraction(float(q["absmax_scale"][j // NF4_ABSMAX_BLOCK]))
        out[j] = _f32_nearest(int(code) * sc + mean)
    return out


def dequantize(q: dict) -> np.ndarray:
    """float32 tensor of q's shape."""
    n = int(np.prod(q["shape"])) if len(q["shape"]) else 0
    per = _per_value(block_absmax(q), n, q["block"])
    if q["kind"] == "int8":
        scale = (per / np.float32(127)).astype(np.float32)  # absmax/127 rounded to float once
        vals = np.asarray(q["codes"], np.int8).astype(np.float32) * scale
    else:
        b = np.asarray(q["codes"], np.uint8)
        codes = np.empty(2 * b.size, np.uint8)
        codes[0::2], codes[1::2] = b >> 4, b & 15  # earlier value in the high nibble
        vals = NF4_LEVELS[codes[:n]] * per
    return vals.astype(np.float32).reshape(q["shape"])


def read_quantized(g: h5py.Group, stem: str = "W") -> dict:
    """A quantized tensor stored beside its float path `stem` under group g: <stem>_q with attrs, and
    <stem>_absmax or <stem>_absmax_q / _absmax_scale."""
    d = g[stem + "_q"]
    kind = _attr_str(d.attrs["quant"])
    q = {"kind": kind, "block": int(d.attrs["block_size"]),
         "shape": tuple(int(s) for s in d.attrs["shape"]), "codes": d[()],
         "double_quant": stem + "_absmax_q" in g}
    if q["double_quant"]:
        assert int(d.attrs["absmax_block_size"]) == NF4_ABSMAX_BLOCK
        q.update(absmax_q=g[stem + "_absmax_q"][()], absmax_scale=g[stem + "_absmax_scale"][()],
                 absmax_mean=float(d.attrs["absmax_mean"]))
    else:
        q["absmax"] = g[stem + "_absmax"][()]
    return q


def write_quantized(g: h5py.Group, stem: str, q: dict):
    """q (as quantize returns it) stored beside the float path `stem` under group g, in the layout
    read_quantized reads (docs/design.md, Quantized tensors)."""
    d = g.create_dataset(stem + "_q", data=np.asarray(q["codes"]))
    d.attrs["quant"] = q["kind"]
    d.attrs["block_size"] = np.int64(q["block"])
    d.attrs["shape"] = np.asarray(q["shape"], dtype=np.int64)
    if q["double_quant"]:
        d.attrs["absmax_mean"] = np.float64(q["absmax_mean"])
        d.attrs["absmax_block_size"] = np.int64(NF4_ABSMAX_BLOCK)
        g.create_dataset(stem + "_absmax_q", data=np.asarray(q["absmax_q"], np.int8))
        g.create_dataset(stem + "_absmax_scale", data=np.asarray(q["absmax_scale"], np.float32))
    else:
        g.create_dataset(stem + "_absmax", data=np.asarray(q["absmax"], np.float32))


# ----------------------------------------------------------------------------------------------
# Training (what `lrllm --mode pretrain` does on one rank with grad_accum 1)


@dataclass
class TrainConfig:
    steps: int = 10
    batch_size: int = 4
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


def lr_at(tc: TrainConfig, k: int) -> float:
    """Learning rate of 0-based step k: linear warmup, then cosine down to min_lr."""
    if k < tc.warmup:
        return tc.lr * (k + 1) / tc.warmup
    frac = (k - tc.warmup) / (tc.steps - tc.warmup)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1.0 + math.cos(math.pi * frac))


def train(params, cfg: Config, tokens: np.ndarray, tc: TrainConfig, dtype=torch.float64,
          forward_fn=None, is_decayed_fn=None):
    """Run tc.steps AdamW steps; returns (history, final params, optimizer state).

    history: dict of lists 'loss' (before the step's update), 'lr', 'grad_norm' (before
    clipping). Step k uses sequences k*B .. k*B+B-1, modulo the number of sequences.
    forward_fn / is_decayed_fn: the model and its weight-decay rule (default this GPT-2's).
    """
    forward_fn = forward_fn or forward
    is_decayed_fn = is_decayed_fn or is_decayed
    T = cfg.seq_len
    n_seq = (len(tokens) - 1) // T
    P = to_torch(params, dtype)
    names = list(P.keys())
    decay = [P[n] for n in names if is_decayed_fn(n)]
    no_decay = [P[n] for n in names if not is_decayed_fn(n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    hist = {"loss": [], "lr": [], "grad_norm": []}
    B = tc.batch_size
    for k in range(tc.steps):
        seq_ids = [(k * B + j) % n_seq for j in range(B)]
        x, y = batch(tokens, T, seq_ids)
        lr = lr_at(tc, k)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        _, loss = forward_fn(P, cfg, x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([P[n] for n in names], tc.grad_clip)
        opt.step()
        hist["loss"].append(loss.item())
        hist["lr"].append(lr)
        hist["grad_norm"].append(float(norm))
    final = {n: P[n].detach().numpy().astype(np.float64) for n in names}
    state = {"m": {n: opt.state[P[n]]["exp_avg"].numpy().astype(np.float64) for n in names},
             "v": {n: opt.state[P[n]]["exp_avg_sq"].numpy().astype(np.float64) for n in names}}
    return hist, final, state
