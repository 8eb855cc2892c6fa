#!/usr/bin/python3
"""Plain PyTorch reference for `make bench-train`: the same Qwen2/Qwen3/Llama decoder and LoRA as
lorakit (hand-written, a few dozen lines; transformers itself is not used), trained on the same
pre-tokenized rows with AdamW, timed the same way (tokens per second over steps 2..N). Reads the
model's safetensors itself (Debian's torch 1.13 has no safetensors package; bf16 weights are
widened to float32, torch's fast path on this CPU). The formulas follow transformers:
Qwen3's q_norm / k_norm (Qwen3RMSNorm over each head of q and k, after the projections and
before the rotary embedding, modeling_qwen3.py) and the rotary frequencies of
modeling_rope_utils.py (default, linear, llama3; dynamic is the default below
max_position_embeddings), in float32 as there. Prints one JSON line with first_loss, the loss of
step 1 (before any update), for comparison with lorakit's on the same weights and tokens."""
import argparse, json, math, resource, struct, time
import numpy as np
import torch

p = argparse.ArgumentParser()
p.add_argument("--model"); p.add_argument("--data"); p.add_argument("--steps", type=int)
p.add_argument("--batch", type=int); p.add_argument("--seq", type=int); p.add_argument("--threads", type=int)
p.add_argument("--mode", default="lora"); p.add_argument("--rank", type=int, default=8)
p.add_argument("--no-qk-norm", action="store_true", help="leave q_norm / k_norm out (to see what the loss check catches)")
p.add_argument("--no-rope-scaling", action="store_true", help="leave rope_scaling out (likewise)")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

cfg = json.load(open(f"{a.model}/config.json"))
raw = open(f"{a.model}/model.safetensors", "rb").read()
hl = struct.unpack("<Q", raw[:8])[0]
hdr = json.loads(raw[8:8 + hl])
W = {}
for k, v in hdr.items():
    if k == "__metadata__":
        continue
    assert v["dtype"] in ("F32", "BF16"), "bench models are float32 or bf16"
    b, e = v["data_offsets"]
    if v["dtype"] == "F32":
        a32 = np.frombuffer(raw, dtype=np.float32, count=(e - b) // 4, offset=8 + hl + b).copy()
    else:  # bf16 is the high half of a float32: widened exactly, torch trains in float32
        a32 = (np.frombuffer(raw, dtype=np.uint16, count=(e - b) // 2, offset=8 + hl + b).astype(np.uint32) << 16).view(np.float32)
    W[k] = torch.from_numpy(a32).reshape(v["shape"])
full = a.mode == "full"
for t in W.values():
    t.requires_grad_(full)
C, L = cfg["hidden_size"], cfg["num_hidden_layers"]
NH, NKV = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
HS = cfg.get("head_dim", C // NH)
eps, theta = cfg.get("rms_norm_eps", 1e-6), cfg.get("rope_theta", 10000.0)
tied = cfg.get("tie_word_embeddings", False)
mods = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
lora = {}
if not full:
    for l in range(L):
        for m in mods:
            part = "self_attn" if m in mods[:4] else "mlp"
            w = W[f"model.layers.{l}.{part}.{m}.weight"]
            A = (torch.rand(a.rank, w.shape[1]) * 2 - 1) / math.sqrt(w.shape[1])
            lora[(l, m)] = (A.requires_grad_(), torch.zeros(w.shape[0], a.rank, requires_grad=True))
scale = 16.0 / a.rank


def rope_inv_freq():
    # _compute_default_rope_parameters: 1 / base^(arange(0, dim, 2) / dim), in float32
    inv = 1.0 / (theta ** (torch.arange(0, HS, 2, dtype=torch.int64).float() / HS))
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if a.no_rope_scaling or kind == "default":
        return inv
    if kind == "linear":  # _compute_linear_scaling_rope_parameters
        return inv / rs["factor"]
    if kind == "dynamic":  # the default frequencies until a sequence passes max_position_embeddings
        assert a.seq <= cfg["max_position_embeddings"], "dynamic rope beyond max_position_embeddings"
        return inv
    assert kind == "llama3", f"rope type {kind} is not implemented here"
    # _compute_llama3_parameters
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    inv_l = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv_l)


inv = rope_inv_freq()
pos = torch.arange(a.seq).float()
ang = torch.outer(pos, inv); cos = torch.cat([ang.cos()] * 2, -1); sin = torch.cat([ang.sin()] * 2, -1)
mask = torch.full((a.seq, a.seq), float("-inf")).triu(1)

def lin(x, l, m, part):
    y = x @ W[f"model.layers.{l}.{part}.{m}.weight"].t()
    b = W.get(f"model.layers.{l}.{part}.{m}.bias")
    if b is not None:
        y = y + b
    if (l, m) in lora:
        A, B = lora[(l, m)]
        y = y + scale * ((x @ A.t()) @ B.t())
    return y

def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

def rot(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)

def forward(ids):
    Bn, T = ids.shape
    x = W["model.embed_tokens.weight"][ids]
    for l in range(L):
        h = rms(x, W[f"model.layers.{l}.input_layernorm.weight"])
        q = lin(h, l, "q_proj", "self_attn").view(Bn, T, NH, HS)
        k = lin(h, l, "k_proj", "self_attn").view(Bn, T, NKV, HS)
        qn = W.get(f"model.layers.{l}.self_attn.q_norm.weight")
        if qn is not None and not a.no_qk_norm:  # Qwen3: RMSNorm over each head, before rope
            q, k = rms(q, qn), rms(k, W[f"model.layers.{l}.self_attn.k_norm.weight"])
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = lin(h, l, "v_proj", "self_attn").view(Bn, T, NKV, HS).transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(NH // NKV, 1), v.repeat_interleave(NH // NKV, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HS) + mask, -1)
        y = (att @ v).transpose(1, 2).reshape(Bn, T, NH * HS)
        x = x + lin(y, l, "o_proj", "self_attn")
        h = rms(x, W[f"model.layers.{l}.post_attention_layernorm.weight"])
        g = lin(h, l, "gate_proj", "mlp"); u = lin(h, l, "up_proj", "mlp")
        x = x + lin(torch.nn.functional.silu(g) * u, l, "down_proj", "mlp")
    x = rms(x, W["model.norm.weight"])
    head = W["model.embed_tokens.weight"] if tied else W["lm_head.weight"]
    return x @ head.t()

rows = [json.loads(s)["input_ids"] for s in open(a.data)]
params = list(W.values()) if full else [t for pair in lora.values() for t in pair]
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
t1 = first = None
for step in range(a.steps):
    ids = torch.tensor(rows[(step * a.batch) % len(rows):][:a.batch])
    logits = forward(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step == 0:
        t1, first = time.perf_counter(), loss.item()
dt = time.perf_counter() - t1
tok = (a.steps - 1) * a.batch * a.seq
print(json.dumps({"tokens_per_s": tok / dt, "first_loss": first, "loss": loss.item(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
