#!/usr/bin/python3
"""The mini models of moecpt written as idiomatic PyTorch eager code, timed on the
same training step as bench/train_bench.cpp: forward, LM + aux + z loss, backward,
grad-norm clip, AdamW, on random tokens. For Debian's python3-torch (1.13, CPU), and
for a CUDA PyTorch (`--device cuda`: bf16 autocast, scaled_dot_product_attention,
fused AdamW: the peer of `moecpt bench train --device cuda`, scripts/gpu-check.sh).

Same shapes and maths as src/model: RMSNorm (fp32), causal attention with RoPE
(rotate-half), GeGLU MLP, untied head; MoE = fp32 linear router, softmax top-k with
aux + z loss (or Sinkhorn-balanced choice), dropless dispatch by a stable sort of
the token slots, one matmul per expert group, index_add combine, shared experts.

  pytorch_eager.py granular-aux [--threads N] [--steps N] [--batch N] [--bf16]
  pytorch_eager.py dense --recipes paper --device cuda --bf16 --batch 8 [--layers N]
prints one JSON object: tokens_per_s and step_ms (median step), peak_rss_mib, ...
"""
import argparse
import json
import math
import os
import resource
import statistics
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_recipe(path):
    """TOML with moecpt's `base = "other.toml"` inheritance (deep merge)."""
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    merged = load_recipe(os.path.join(os.path.dirname(path), base))
    for section, values in cfg.items():
        merged.setdefault(section, {}).update(values)
    return merged


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def rotary(T, head_dim, theta, device):
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if hasattr(F, "scaled_dot_product_attention"):  # torch >= 2.0: fused kernels
            # (RoPE's fp32 cos/sin promote q, k under autocast: back to v's dtype)
            y = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, is_causal=True)
        else:  # torch 1.13: the usual masked softmax
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            y = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class GatedMLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)) * self.w3(x))


def sinkhorn(logits, tol, max_iters, eps=1e-8):
    with torch.no_grad():
        C = torch.exp(logits - logits.max(-1, keepdim=True).values)
        T, E = C.shape
        d0, d1 = logits.new_ones(T), logits.new_ones(E)
        for _ in range(max_iters):
            d0 = (1.0 / T) / (C @ d1 + eps)
            d1_new = (1.0 / E) / (C.t() @ d0 + eps)
            err = (d1_new - d1).abs().mean().item()
            d1 = d1_new
            if err < tol:
                break
        return d0[:, None] * C * d1[None, :]


class MoE(nn.Module):
    def __init__(self, d, m, r):
        super().__init__()
        E, H = m["n_experts"], m["expert_hidden"]
        self.E, self.k = E, m["top_k"]
        self.router_type = r.get("type", "topk")
        self.alpha, self.beta = r.get("aux_alpha", 0.01), r.get("z_beta", 0.001)
        self.tol, self.max_iters = r.get("sinkhorn_tol", 0.01), r.get("sinkhorn_max_iters", 100)
        self.router = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, d, H) * 0.02)
        self.w3 = nn.Parameter(torch.randn(E, d, H) * 0.02)
        self.w2 = nn.Parameter(torch.randn(E, H, d) * 0.02)
        S = m.get("n_shared_experts", 0)
        self.shared = GatedMLP(d, S * H) if S > 0 else None

    def forward(self, x):
        B, T, D = x.shape
        x = x.reshape(-1, D)
        with torch.autocast(x.device.type, enabled=False):  # router in fp32 under bf16 autocast
            logits = self.router(x.float())
        probs = logits.softmax(-1)
        zero = logits.new_zeros(())
        if self.router_type == "sinkhorn" and self.training:
            ids = sinkhorn(logits, self.tol, self.max_iters).topk(self.k, -1).indices
            gates = (logits.sigmoid() if self.k == 1 else probs).gather(1, ids)
            aux, z = zero, zero
        else:
            gates, ids = probs.topk(self.k, -1)
        counts = torch.bincount(ids.flatten(), minlength=self.E)
        if self.router_type == "topk":
            f = counts.float() / (self.k * x.shape[0])
            aux = self.alpha * self.E * (f * probs.mean(0)).sum()
            z = self.beta * torch.logsumexp(logits, -1).pow(2).mean()
        # Dropless dispatch: group the token slots by expert, one matmul per group.
        order = ids.flatten().argsort(stable=True)
        token_idx = order // self.k
        xs = x[token_idx]
        ys = []
        for e, (start, n) in enumerate(zip(counts.cumsum(0).tolist(), counts.tolist())):
            if n == 0:
                continue
            xe = xs[start - n:start]
            ys.append((F.gelu(xe @ self.w1[e]) * (xe @ self.w3[e])) @ self.w2[e])
        ys = torch.cat(ys) * gates.flatten()[order, None].to(x.dtype)
        y = torch.zeros_like(x).index_add(0, token_idx, ys)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(B, T, D), aux, z


class Block(nn.Module):
    def __init__(self, m, r):
        super().__init__()
        d, eps = m["d_model"], m.get("norm_eps", 1e-5)
        self.attn_norm, self.ffn_norm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.attn = Attention(d, m["n_heads"])
        self.is_moe = m.get("ffn", "dense") == "moe"
        self.ffn = MoE(d, m, r) if self.is_moe else GatedMLP(d, m["ffn_hidden"])

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if self.is_moe:
            y, aux, z = self.ffn(self.ffn_norm(x))
            return x + y, aux, z
        return x + self.ffn(self.ffn_norm(x)), 0.0, 0.0


class Transformer(nn.Module):
    def __init__(self, m, r):
        super().__init__()
        self.m = m
        self.tok_emb = nn.Embedding(m["vocab_size"], m["d_model"])
        self.blocks = nn.ModuleList(Block(m, r) for _ in range(m["n_layers"]))
        self.norm = RMSNorm(m["d_model"], m.get("norm_eps", 1e-5))
        self.head = nn.Linear(m["d_model"], m["vocab_size"], bias=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens):
        cos, sin = rotary(tokens.shape[1], self.m["d_model"] // self.m["n_heads"], self.m.get("rope_theta", 1e4),
                          tokens.device)
        x = self.tok_emb(tokens)
        aux_total, z_total = 0.0, 0.0
        for block in self.blocks:
            x, aux, z = block(x, cos, sin)
            aux_total, z_total = aux_total + aux, z_total + z
        return self.head(self.norm(x)), aux_total, z_total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", help="name under recipes/<--recipes>/, e.g. granular-aux")
    ap.add_argument("--recipes", default="mini", help="recipe folder: mini (default) or paper")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--layers", type=int, default=0, help="override n_layers (0 = the recipe's)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=0, help="sequences (0 = the recipe's)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (router in fp32)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_recipe(os.path.join(ROOT, "recipes", args.recipes, args.recipe + ".toml"))
    m, r, o = cfg["model"], cfg.get("router", {}), cfg["optim"]
    if args.layers > 0:
        m["n_layers"] = args.layers
    B, T, V = args.batch or cfg["train"]["batch_size"], m["seq_len"], m["vocab_size"]
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    model = Transformer(m, r).to(dev).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok_emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "tok_emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o["lr"], betas=(o["beta1"], o["beta2"]), **({"fused": True} if cuda else {}))
    tokens = torch.randint(V, (B, T + 1), device=dev)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits, aux, z = model(inputs)
        lm = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (lm + aux + z).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.get("grad_clip", 1.0))
        opt.step()
        return lm.item()

    for _ in range(args.warmup):  # warm-up, as in train_bench.cpp
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, cpu, faults = [], [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss = step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start)
    elapsed = sum(times)
    med = statistics.median(times)
    print(json.dumps({
        "impl": "pytorch_eager", "model": args.recipe, "recipes": args.recipes, "device": args.device,
        "n_layers": m["n_layers"], "torch": torch.__version__,
        "threads": args.threads, "batch_tokens": B * T, "steps": args.steps,
        "dtype": "bfloat16" if args.bf16 else "float32",
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "step_ms": 1000 * med, "step_ms_mean": 1000 * elapsed / args.steps,
        "cpu_ms_per_step": 1000 * statistics.median(cpu), "tokens_per_s": B * T / med,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loss": loss,
        "page_faults_per_step": statistics.median(faults),
        "gpu_peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }))


if __name__ == "__main__":
    main()
