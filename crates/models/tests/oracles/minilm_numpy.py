#!/usr/bin/env python3
"""Independent NumPy forward of a sentence-transformers BERT (all-MiniLM-L6-v2).

Reads the weights with `safetensors.numpy`, tokenizes with the `tokenizers` Python package
(or takes token ids given on the command line with --ids), and computes in float64:
embeddings (BERT post-LN encoder, exact erf GELU, padding mask), mean pooling over the real
tokens, L2 normalisation. Written from the BERT paper / the HF config semantics, not from the
Rust code it checks.

Usage:
  minilm_numpy.py MODEL_DIR --sentences FILE.json [--max-len 256]   # tokenizes itself
  minilm_numpy.py MODEL_DIR --ids FILE.json                         # [[id, ...], ...]
Prints JSON {"tokenizer": "python-tokenizers" | "given-ids", "ids": [...], "embeddings": [...]}.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import load_file


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def forward(W, cfg, ids):
    """Last hidden states of one sequence (no padding needed: one sentence at a time)."""
    g = lambda k: W[k].astype(np.float64)
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    d = H // nh
    eps = cfg.get("layer_norm_eps", 1e-12)
    T = len(ids)
    x = g("embeddings.word_embeddings.weight")[ids]
    x = x + g("embeddings.position_embeddings.weight")[:T]
    x = x + g("embeddings.token_type_embeddings.weight")[0]
    x = layer_norm(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"), eps)
    for l in range(cfg["num_hidden_layers"]):
        p = "encoder.layer.%d." % l
        lin = lambda name, v: v @ g(p + name + ".weight").T + g(p + name + ".bias")
        q = lin("attention.self.query", x).reshape(T, nh, d).transpose(1, 0, 2)
        k = lin("attention.self.key", x).reshape(T, nh, d).transpose(1, 0, 2)
        v = lin("attention.self.value", x).reshape(T, nh, d).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = s - s.max(-1, keepdims=True)
        a = np.exp(s)
        a = a / a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(1, 0, 2).reshape(T, H)
        x = layer_norm(lin("attention.output.dense", ctx) + x,
                       g(p + "attention.output.LayerNorm.weight"),
                       g(p + "attention.output.LayerNorm.bias"), eps)
        h = gelu(lin("intermediate.dense", x))
        x = layer_norm(lin("output.dense", h) + x,
                       g(p + "output.LayerNorm.weight"), g(p + "output.LayerNorm.bias"), eps)
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--sentences")
    ap.add_argument("--ids")
    ap.add_argument("--max-len", type=int, default=256)
    a = ap.parse_args()
    cfg = json.load(open(os.path.join(a.model_dir, "config.json")))
    W = load_file(os.path.join(a.model_dir, "model.safetensors"))
    W = {k[5:] if k.startswith("bert.") else k: v for k, v in W.items()}
    if a.ids:
        ids = json.load(open(a.ids))
        how = "given-ids"
    else:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(a.model_dir, "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(max_length=a.max_len)
        ids = [tok.encode(s).ids for s in json.load(open(a.sentences))]
        how = "python-tokenizers"
    embs = []
    for seq in ids:
        h = forward(W, cfg, np.array(seq, dtype=np.int64))
        m = h.mean(0)
        embs.append((m / max(np.linalg.norm(m), 1e-12)).tolist())
    json.dump({"tokenizer": how, "ids": ids, "embeddings": embs}, sys.stdout)


if __name__ == "__main__":
    main()
