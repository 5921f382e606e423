#!/usr/bin/python3
"""Independent reference forward pass of an exported Hugging Face model directory.

Written from the conventions of transformers' modeling_llama.py,
modeling_mixtral.py and modeling_qwen2_moe.py (eager attention path), NOT from
moecpt's C++ code: it reads config.json and model.safetensors (header parsed
with json, tensors with torch.frombuffer; no safetensors/transformers package)
and writes the logits of the given token sequences.

usage: hf_reference.py TOKENS_JSON MODEL_DIR OUT_BIN [MODEL_DIR OUT_BIN ...]
  TOKENS_JSON: [[t, t, ...], ...]   (B sequences of equal length T)
  OUT_BIN:     float32 little-endian logits [B, T, vocab], row-major
(several models per call: importing torch is the slow part)
Exit status 0 on success; prints 'SKIP: ...' and exits 77 when torch is missing.
"""
import json
import math
import struct
import sys

try:
    import torch
    import torch.nn.functional as F
except Exception as e:  # pragma: no cover - environment dependent
    print("SKIP: python3 cannot import torch (%s)" % e)
    sys.exit(77)

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    assert meta.get("format") == "pt", "transformers requires __metadata__.format == 'pt', got %r" % meta
    base = 8 + n
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        buf = bytearray(data[base + b: base + e])
        t = torch.frombuffer(buf, dtype=DTYPES[info["dtype"]]) if e > b else torch.zeros(0, dtype=DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"]).to(torch.float32)
    return out


ACT = {"silu": F.silu, "gelu": lambda x: F.gelu(x)}  # transformers ACT2FN: gelu = exact erf GELU


def rms_norm(x, w, eps):
    # LlamaRMSNorm: fp32 variance, x * rsqrt(var + eps), then weight *
    var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(T, head_dim, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def linear(x, W, b=None):
    y = x @ W.t()
    return y if b is None else y + b


def mlp(x, W, prefix, act):
    return linear(act(linear(x, W[prefix + "gate_proj.weight"])) * linear(x, W[prefix + "up_proj.weight"]),
                  W[prefix + "down_proj.weight"])


def mixtral_expert(x, W, prefix, act):
    return linear(act(linear(x, W[prefix + "w1.weight"])) * linear(x, W[prefix + "w3.weight"]), W[prefix + "w2.weight"])


def sparse_moe(x, W, prefix, cfg, kind, act):
    """MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock forward on x [N, D]."""
    E, K = (cfg["num_local_experts"], cfg["num_experts_per_tok"]) if kind == "mixtral" else \
        (cfg["num_experts"], cfg["num_experts_per_tok"])
    logits = linear(x, W[prefix + ("block_sparse_moe.gate.weight" if kind == "mixtral" else "mlp.gate.weight")])
    probs = F.softmax(logits, dim=1, dtype=torch.float)
    weights, chosen = torch.topk(probs, K, dim=-1)
    if kind == "mixtral" or cfg.get("norm_topk_prob", False):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(E):
        tok, slot = torch.where(chosen == e)
        if tok.numel() == 0:
            continue
        if kind == "mixtral":
            y = mixtral_expert(x[tok], W, prefix + "block_sparse_moe.experts.%d." % e, act)
        else:
            y = mlp(x[tok], W, prefix + "mlp.experts.%d." % e, act)
        out.index_add_(0, tok, y * weights[tok, slot, None])
    if kind == "qwen2_moe":
        shared = mlp(x, W, prefix + "mlp.shared_expert.", act)
        out = out + torch.sigmoid(linear(x, W[prefix + "mlp.shared_expert_gate.weight"])) * shared
    return out


def forward(model_dir, tokens):
    cfg = json.load(open(model_dir + "/config.json"))
    W = read_safetensors(model_dir + "/model.safetensors")
    kind = cfg["model_type"]
    assert kind in ("llama", "mixtral", "qwen2_moe"), kind
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads", H)
    hd = cfg.get("head_dim") or D // H
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    act = ACT[cfg["hidden_act"]]
    ids = torch.tensor(tokens, dtype=torch.int64)
    B, T = ids.shape
    x = W["model.embed_tokens.weight"][ids]
    cos, sin = rope(T, hd, theta)
    mask = torch.full((T, T), float("-inf")).triu(1)
    for l in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % l
        h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        bias = (lambda n: W.get(p + "self_attn.%s.bias" % n)) if kind == "qwen2_moe" else (lambda n: None)
        q = linear(h, W[p + "self_attn.q_proj.weight"], bias("q_proj")).view(B, T, H, hd).transpose(1, 2)
        k = linear(h, W[p + "self_attn.k_proj.weight"], bias("k_proj")).view(B, T, KV, hd).transpose(1, 2)
        v = linear(h, W[p + "self_attn.v_proj.weight"], bias("v_proj")).view(B, T, KV, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if KV != H:
            k = k.repeat_interleave(H // KV, dim=1)
            v = v.repeat_interleave(H // KV, dim=1)
        att = q @ k.transpose(2, 3) / math.sqrt(hd) + mask
        att = F.softmax(att, dim=-1, dtype=torch.float32)
        a = (att @ v).transpose(1, 2).reshape(B, T, H * hd)
        x = x + linear(a, W[p + "self_attn.o_proj.weight"])
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        if kind == "llama":
            f = mlp(h, W, p + "mlp.", act)
        elif kind == "mixtral":
            f = sparse_moe(h.reshape(-1, D), W, p, cfg, kind, act).view(B, T, D)
        else:
            sparse = l not in cfg.get("mlp_only_layers", []) and cfg["num_experts"] > 0 and \
                (l + 1) % cfg.get("decoder_sparse_step", 1) == 0
            f = sparse_moe(h.reshape(-1, D), W, p, cfg, kind, act).view(B, T, D) if sparse else mlp(h, W, p + "mlp.", act)
        x = x + f
    x = rms_norm(x, W["model.norm.weight"], eps)
    head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", False) else W["lm_head.weight"]
    return linear(x, head)


def main():
    if len(sys.argv) < 4 or len(sys.argv) % 2 != 0:
        print(__doc__)
        sys.exit(2)
    torch.set_grad_enabled(False)
    tokens = json.load(open(sys.argv[1]))
    for model_dir, out_path in zip(sys.argv[2::2], sys.argv[3::2]):
        logits = forward(model_dir, tokens).contiguous().to(torch.float32)
        with open(out_path, "wb") as f:
            f.write(logits.numpy().astype("<f4").tobytes())
        print("ok", model_dir, tuple(logits.shape))


if __name__ == "__main__":
    main()
