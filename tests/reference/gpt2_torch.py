"""Independent PyTorch GPT-2 used to check lrllm (tests/reference/).

Everything here is written from the specification in DESIGN.md (sections 3 and 4), with plain
torch ops, so that it is an outside reference for lrllm's C++ model:

  * pre-LayerNorm GPT-2 blocks (eps 1e-5), learned positions, tanh-approximate GELU,
    causal softmax attention scaled by 1/sqrt(head_dim), lm_head tied to wte,
    loss = mean cross-entropy over all B*T positions;
  * linear layers in nn.Linear orientation: dense y = x W^T + b, low-rank y = (x A^T) B^T + b,
    chosen per layer from which tensors exist (W, or A and B);
  * the lrllm HDF5 checkpoint layout (DESIGN.md section 4), read and written with h5py;
  * llm.c token files (256 int32 header, then uint16 tokens);
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
        f.attrs["format_version"] = np.int64(1)
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
        c.attrs["lora_rank"] = np.int64(0)
        c.attrs["lora_alpha"] = np.float64(0.0)
        c.attrs["lora_targets"] = ""
        c.attrs["quant"] = "none"
        c.attrs["quant_block"] = np.int64(64)
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


def load_checkpoint(path: str):
    """(Config, params, attrs) from an lrllm checkpoint; params keyed by path under /model."""
    with h5py.File(path, "r") as f:
        c = f["config"].attrs

        def s(v):
            return v.decode() if isinstance(v, bytes) else str(v)

        targets = tuple(t for t in s(c.get("lowrank_targets", "")).split(",") if t)
        cfg = Config(vocab_size=int(c["vocab_size"]), seq_len=int(c["seq_len"]),
                     n_layer=int(c["n_layer"]), n_head=int(c["n_head"]),
                     d_model=int(c["d_model"]), d_ff=int(c["d_ff"]),
                     lowrank_rank=int(c.get("lowrank_rank", 0)), lowrank_targets=targets)
        params = read_group_tensors(f, "model")
        attrs = {k: f.attrs[k] for k in f.attrs}
    return cfg, params, attrs


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


def linear(P, base, x):
    """Dense (W) or low-rank (A, B) linear layer, decided by which tensors exist."""
    if base + "/W" in P:
        return x @ P[base + "/W"].T + P[base + "/b"]
    return (x @ P[base + "/A"].T) @ P[base + "/B"].T + P[base + "/b"]


def attention(qkv, n_head):
    Bsz, T, C3 = qkv.shape
    C = C3 // 3
    hd = C // n_head
    q, k, v = qkv.split(C, dim=-1)

    def heads(t):
        return t.reshape(Bsz, T, n_head, hd).transpose(1, 2)  # [B, H, T, hd]

    q, k, v = heads(q), heads(k), heads(v)
    att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    att = att.masked_fill(~mask, float("-inf"))
    att = att - att.amax(dim=-1, keepdim=True)
    att = torch.exp(att)
    att = att / att.sum(dim=-1, keepdim=True)
    y = att @ v
    return y.transpose(1, 2).reshape(Bsz, T, C)


def forward(P, cfg: Config, idx, targets=None):
    """Logits [B,T,V], and the mean cross-entropy if targets are given."""
    T = idx.shape[1]
    x = P["wte"][idx] + P["wpe"][:T]
    for i in range(cfg.n_layer):
        h = layer_norm(x, P[f"h.{i}/ln_1/w"], P[f"h.{i}/ln_1/b"])
        h = attention(linear(P, f"h.{i}/attn/qkv", h), cfg.n_head)
        x = x + linear(P, f"h.{i}/attn/proj", h)
        h = layer_norm(x, P[f"h.{i}/ln_2/w"], P[f"h.{i}/ln_2/b"])
        h = gelu_tanh(linear(P, f"h.{i}/mlp/fc", h))
        x = x + linear(P, f"h.{i}/mlp/proj", h)
    x = layer_norm(x, P["ln_f/w"], P["ln_f/b"])
    logits = x @ P["wte"].T
    if targets is None:
        return logits, None
    z = logits - logits.amax(dim=-1, keepdim=True)
    logp = z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logits, nll.mean()


def to_torch(params: dict[str, np.ndarray], dtype=torch.float64, requires_grad=True):
    return {k: torch.tensor(np.asarray(v), dtype=dtype, requires_grad=requires_grad)
            for k, v in params.items()}


def loss_and_grads(params, cfg: Config, x, y, dtype=torch.float64):
    """Mean loss (float) and gradients (numpy, float64) of every parameter."""
    P = to_torch(params, dtype)
    _, loss = forward(P, cfg, x, y)
    loss.backward()
    return loss.item(), {k: t.grad.detach().numpy().astype(np.float64) for k, t in P.items()}


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


def train(params, cfg: Config, tokens: np.ndarray, tc: TrainConfig, dtype=torch.float64):
    """Run tc.steps AdamW steps; returns (history, final params, optimizer state).

    history: dict of lists 'loss' (before the step's update), 'lr', 'grad_norm' (before
    clipping). Step k uses sequences k*B .. k*B+B-1, modulo the number of sequences.
    """
    T = cfg.seq_len
    n_seq = (len(tokens) - 1) // T
    P = to_torch(params, dtype)
    names = list(P.keys())
    decay = [P[n] for n in names if is_decayed(n)]
    no_decay = [P[n] for n in names if not is_decayed(n)]
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
        _, loss = forward(P, cfg, x, y)
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
