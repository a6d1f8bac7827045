"""Independent PyTorch Llama-2 used to check lrllm's `arch = llama` (tests/reference/).

Written from the lrllm Llama file layout (docs/design.md, Checkpoint format and Architectures) and the
conventions of Hugging Face's `transformers/models/llama/modeling_llama.py` (cited below by class or
function name), with plain torch ops and no `transformers`:

  * pre-norm blocks without biases: h = x + o(attention(RMSNorm_1(x))), then
    x = h + down(silu(gate) * up) of RMSNorm_2(h) (LlamaDecoderLayer, LlamaMLP);
  * RMSNorm x * rsqrt(mean(x^2) + eps) * w (LlamaRMSNorm);
  * rotary embeddings on q and k with rotate_half's pairing: value i of a head rotates with value
    i + hd/2 by angle position * theta^(-2i/hd) (LlamaRotaryEmbedding, rotate_half, apply_rotary_pos_emb);
  * causal attention scaled by 1/sqrt(hd) with NKV kv heads: query head h reads kv head h // (NH/NKV)
    (repeat_kv); packed rows (positions restarting at 0) restart the rotary positions and keep attention
    inside each example;
  * an untied lm_head; loss = mean cross-entropy over the targets >= 0;
  * GPT-2's four linear sites under the same paths (dense W, low-rank A/B, LoRA adapters, int8/NF4 storage
    of frozen weights), the fused ones being qkv [(NH + 2 NKV) hd, C] (q's heads, k's, v's) and the
    gate-up fc [2F, C] (gate_proj's rows, then up_proj's).

Token files, batches, quantizers, `to_torch` and the AdamW loop are gpt2_torch's.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import h5py
import numpy as np
import torch

import gpt2_torch as ref

FORMAT_VERSION = 4  # the checkpoint format version that introduces arch = llama


@dataclasses.dataclass
class Config(ref.Config):
    """GPT-2's Config (shape, low-rank, LoRA and quantization fields) plus Llama's own. d_ff is the
    SwiGLU hidden width F (HF's intermediate_size)."""
    d_ff: int = 160
    n_kv_head: int = 2
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def site_shape(cfg: Config, site: str) -> tuple[int, int]:
    """(out, in) of a linear site; the paths are GPT-2's (gpt2_torch.site_path)."""
    C, F, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    return {"qkv": ((cfg.n_head + 2 * cfg.n_kv_head) * hd, C), "proj": (C, cfg.n_head * hd),
            "fc": (2 * F, C), "mlp_proj": (C, F)}[site]


# ----------------------------------------------------------------------------------------------
# Parameters


def init_params(cfg: Config, seed: int) -> dict[str, np.ndarray]:
    """Random float32 parameters keyed by their path under /model.

    As gpt2_torch.init_params, scaled so that the non-linearities work away from their linear
    regime: lm_head ~ N(0, 0.1) (logits of std ~0.1 sqrt(C) over the unit-rms final norm); a dense
    W [out,in] ~ N(0, 1/in), so that q.k/sqrt(hd) and the SwiGLU gate are of order 1; a low-rank pair
    with B@A of that scale; RMSNorm w = 1 + 0.1 N(0,1). wte ~ N(0, 0.03) makes mean(x^2) ~ 1e-3 at the
    first norm, where norm_eps 1e-5 against 1e-6 moves the loss by ~2e-4, 20 times its tolerance.
    """
    assert cfg.n_head % cfg.n_kv_head == 0 and cfg.d_model % cfg.n_head == 0 and cfg.head_dim % 2 == 0
    rng = np.random.default_rng(seed)
    C, r = cfg.d_model, cfg.lowrank_rank

    def normal(std, *shape):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    p: dict[str, np.ndarray] = {"wte": normal(0.03, cfg.vocab_size, C),
                                "lm_head": normal(0.1, cfg.vocab_size, C)}
    for i in range(cfg.n_layer):
        p[f"h.{i}/ln_1/w"] = 1.0 + normal(0.1, C)
        p[f"h.{i}/ln_2/w"] = 1.0 + normal(0.1, C)
        for site in ref.LINEAR_SITES:
            out, inp = site_shape(cfg, site)
            base = ref.site_path(i, site)
            if r > 0 and site in cfg.lowrank_targets:
                s = (inp * r) ** -0.25  # A and B of equal scale with std(B@A) = 1/sqrt(in)
                p[base + "/A"] = normal(s, r, inp)
                p[base + "/B"] = normal(s, out, r)
            else:
                p[base + "/W"] = normal(inp ** -0.5, out, inp)
    p["ln_f/w"] = 1.0 + normal(0.1, C)
    return p


def add_adapters(params: dict[str, np.ndarray], cfg: Config, seed: int) -> dict[str, np.ndarray]:
    """params plus lora_A [r, in], lora_B [out, r] on cfg.lora_targets, as if trained: lora_B is not
    zero, and (alpha/r) lora_B@lora_A is ~0.3 of the base W's scale, so the adapters move the loss."""
    rng = np.random.default_rng(seed)
    r = cfg.lora_rank
    b_std = 0.3 / (cfg.lora_scale * math.sqrt(r))
    out = dict(params)
    for i in range(cfg.n_layer):
        for site in cfg.lora_targets:
            o, inp = site_shape(cfg, site)
            base = ref.site_path(i, site)
            out[base + "/lora_A"] = (inp ** -0.5 * rng.standard_normal((r, inp))).astype(np.float32)
            out[base + "/lora_B"] = (b_std * rng.standard_normal((o, r))).astype(np.float32)
    return out


def is_decayed(name: str) -> bool:
    """Weight decay on the 2-D tensors (wte, lm_head, W, A, B), as lrllm's GPT-2; not on RMSNorm w."""
    return name.split("/")[-1] in ("wte", "lm_head", "W", "A", "B")


def is_quantizable(name: str) -> bool:
    """The frozen base tensors held quantized under cfg.quant: the linear sites' weights."""
    return name.split("/")[-1] in ("W", "A", "B")


# ----------------------------------------------------------------------------------------------
# Files


def save_checkpoint(path: str, cfg: Config, params: dict[str, np.ndarray], mode: str = "pretrain"):
    """The lrllm Llama layout. Under cfg.quant (int8 | nf4, NF4 double-quantized) every linear-site
    weight is stored as its quantized codes (gpt2_torch.quantize); wte and lm_head stay float32."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "lrllm"
        f.attrs["format_version"] = np.int64(FORMAT_VERSION)
        f.attrs["lrllm_version"] = "tests/reference"
        f.attrs["mode"] = mode
        f.attrs["created"] = "1970-01-01T00:00:00Z"
        c = f.create_group("config")
        c.attrs["arch"] = "llama"
        for k in ("vocab_size", "seq_len", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff"):
            c.attrs[k] = np.int64(getattr(cfg, k))
        c.attrs["rope_theta"] = np.float64(cfg.rope_theta)
        c.attrs["norm_eps"] = np.float64(cfg.norm_eps)
        c.attrs["tied_embeddings"] = np.int64(0)
        c.attrs["lowrank_rank"] = np.int64(cfg.lowrank_rank)
        c.attrs["lowrank_targets"] = ",".join(cfg.lowrank_targets) if cfg.lowrank_rank else ""
        c.attrs["lora_rank"] = np.int64(cfg.lora_rank)
        c.attrs["lora_alpha"] = np.float64(cfg.lora_alpha)
        c.attrs["lora_targets"] = ",".join(cfg.lora_targets) if cfg.lora_rank else ""
        c.attrs["quant"] = cfg.quant
        c.attrs["quant_block"] = np.int64(cfg.quant_block)
        c.attrs["quant_double"] = np.int64(cfg.quant == "nf4")
        m = f.create_group("model")
        for name, arr in params.items():
            if cfg.quant != "none" and is_quantizable(name):
                ref.write_quantized(m, name, quantize(arr, cfg))
            else:
                m.create_dataset(name, data=np.ascontiguousarray(arr, dtype=np.float32))


def read_config(f: h5py.File) -> Config:
    """gpt2_torch.read_config's fields plus Llama's."""
    c = f["config"].attrs
    return Config(**dataclasses.asdict(ref.read_config(f)), n_kv_head=int(c["n_kv_head"]),
                  rope_theta=float(c["rope_theta"]), norm_eps=float(c["norm_eps"]))


# (Config, params) of a Llama file, its quantized tensors (lm_head's too) dequantized.
load_model = functools.partial(ref.load_model, read_config_fn=read_config)


def quantize(w: np.ndarray, cfg: Config) -> dict:
    """cfg.quant's storage of w (NF4 with double quantization, lrllm's default)."""
    return ref.quantize(w, cfg.quant, cfg.quant_block, double_quant=cfg.quant == "nf4")


def as_stored(params: dict[str, np.ndarray], cfg: Config) -> dict[str, np.ndarray]:
    """The float32 weights a checkpoint of save_checkpoint holds: quantized tensors dequantized."""
    if cfg.quant == "none":
        return dict(params)
    return {k: ref.dequantize(quantize(v, cfg)) if is_quantizable(k) else v for k, v in params.items()}


# ----------------------------------------------------------------------------------------------
# Model (functional: a dict of tensors keyed like the checkpoint)


def rms_norm(x, w, eps):
    """LlamaRMSNorm: x / sqrt(mean(x^2) + eps) * w over the last dimension."""
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def silu(x):
    return x * torch.sigmoid(x)


def linear(P, base, x, lora_scale=0.0):
    """Dense (W) or low-rank (A, B) linear layer without bias, decided by which tensors exist, plus
    lora_scale * (x lora_A^T) lora_B^T where the site has adapters."""
    if base + "/W" in P:
        y = x @ P[base + "/W"].T
    else:
        y = (x @ P[base + "/A"].T) @ P[base + "/B"].T
    if base + "/lora_A" in P:
        y = y + lora_scale * ((x @ P[base + "/lora_A"].T) @ P[base + "/lora_B"].T)
    return y


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos and sin [B, T, hd] of the rotary angles at integer positions [B, T].

    LlamaRotaryEmbedding: inv_freq[i] = theta^(-2i/hd) for i < hd/2, angle = position * inv_freq,
    and the hd/2 angles repeated (cat(freqs, freqs)) so that value i and value i + hd/2 share angle i.
    HF (and lrllm) evaluate these in float32; here they are float64, the exact rotation.
    """
    inv_freq = theta ** (-2.0 * torch.arange(head_dim // 2, dtype=dtype) / head_dim)
    ang = positions.to(dtype)[..., None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)
    return torch.cos(ang), torch.sin(ang)


def rotate_half(x):
    """HF's rotate_half: (x1, x2) -> (-x2, x1) for the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x, cos, sin):
    """apply_rotary_pos_emb on one of q, k: x [B, H, T, hd]; cos, sin [B, T, hd] (shared by the heads)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def attention(qkv, cfg: Config, positions=None):
    """Grouped-query causal attention of the fused qkv [B, T, (NH + 2 NKV) hd] -> [B, T, NH hd].

    Rotary embeddings on q and k at `positions` [B, T] (None: 0 .. T-1 in every row); with positions,
    a row packs examples (a new one wherever the position is 0) and a query sees only keys of its own.
    """
    Bsz, T, _ = qkv.shape
    NH, NKV, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    q, k, v = qkv.split([NH * hd, NKV * hd, NKV * hd], dim=-1)

    def heads(t, n):
        return t.reshape(Bsz, T, n, hd).transpose(1, 2)  # [B, n, T, hd]: contiguous heads

    q, k, v = heads(q, NH), heads(k, NKV), heads(v, NKV)
    pos = torch.arange(T).expand(Bsz, T) if positions is None else positions
    cos, sin = rope_cos_sin(pos, hd, cfg.rope_theta, qkv.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # repeat_kv: each kv head serves NH/NKV consecutive query heads.
    kv_of = torch.arange(NH) // (NH // NKV)
    k, v = k[:, kv_of], v[:, kv_of]
    att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    if positions is not None:
        seg = ref.segment_ids(positions)
        mask = (mask & (seg[:, :, None] == seg[:, None, :]))[:, None]  # [B, 1, T, T]
    att = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
    return (att @ v).transpose(1, 2).reshape(Bsz, T, NH * hd)


def cross_entropy(logits, targets):
    """Mean -log p(target) over the positions whose target is >= 0 (HF's ignore_index -100 is any
    negative id here)."""
    valid = targets >= 0
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll[valid].mean()


def forward(P, cfg: Config, idx, targets=None, positions=None):
    """Logits [B,T,V], and the loss if targets are given. positions [B, T]: each token's position
    inside its example when rows pack several (None: 0 .. T-1)."""
    s, eps, F = cfg.lora_scale, cfg.norm_eps, cfg.d_ff
    x = P["wte"][idx]
    for i in range(cfg.n_layer):
        h = rms_norm(x, P[f"h.{i}/ln_1/w"], eps)
        h = attention(linear(P, f"h.{i}/attn/qkv", h, s), cfg, positions)
        x = x + linear(P, f"h.{i}/attn/proj", h, s)
        h = rms_norm(x, P[f"h.{i}/ln_2/w"], eps)
        gate, up = linear(P, f"h.{i}/mlp/fc", h, s).split(F, dim=-1)
        x = x + linear(P, f"h.{i}/mlp/proj", silu(gate) * up, s)
    logits = rms_norm(x, P["ln_f/w"], eps) @ P["lm_head"].T
    return logits, (None if targets is None else cross_entropy(logits, targets))


loss_and_grads = functools.partial(ref.loss_and_grads, forward_fn=forward)
train = functools.partial(ref.train, forward_fn=forward, is_decayed_fn=is_decayed)
