"""TinyLM: a tiny decoder-only model that shows cached decoding equals recomputation."""

from __future__ import annotations

import math

import numpy as np

from fa_lab.api import attention
from fa_lab.features.decoding.cache import KVCache, decode
from fa_lab.features.decoding.rope import rope


class TinyLM:
    """A small decoder-only transformer in NumPy with random weights (a fixed seed):
    token embedding, ``layers`` pre-LayerNorm blocks (GQA attention with RoPE, a GELU
    MLP), a final LayerNorm and an output projection of its own. Big enough to show that
    cached decoding gives exactly what recomputing full causal attention gives; not
    trained. (Tied output weights made greedy decoding repeat the prompt's last token
    forever: the residual stream still holds that token's embedding, which scores
    itself highest; "the same tokens" then proved little.)
    """

    def __init__(self, vocab=96, d_model=128, heads=4, kv_heads=2, layers=2, seed=0,
                 dtype=np.float32):
        if d_model % heads or heads % kv_heads:
            raise ValueError("d_model must be a multiple of heads, heads of kv_heads")
        rng = np.random.default_rng(seed)
        self.vocab, self.d_model, self.heads, self.kv_heads = vocab, d_model, heads, kv_heads
        self.head_dim = d_model // heads
        self.layers = layers
        self.dtype = np.dtype(dtype)
        s = 1 / math.sqrt(d_model)
        w = lambda *shape, scale=s: (rng.standard_normal(shape) * scale).astype(dtype)  # noqa: E731
        self.emb = w(vocab, d_model, scale=1.0)
        kv = kv_heads * self.head_dim
        self.blocks = [{"wq": w(d_model, d_model), "wk": w(d_model, kv), "wv": w(d_model, kv),
                        "wo": w(d_model, d_model), "w1": w(d_model, 4 * d_model),
                        "w2": w(4 * d_model, d_model, scale=1 / math.sqrt(4 * d_model))}
                       for _ in range(layers)]
        self.out = w(d_model, vocab)

    @staticmethod
    def _norm(x):
        mu = x.mean(axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + 1e-5)

    def _split(self, x, heads):
        T = x.shape[0]
        return np.ascontiguousarray(x.reshape(T, heads, self.head_dim).transpose(1, 0, 2))[None]

    def forward(self, tokens, start, caches=None):
        """Logits ``(T, vocab)`` for ``tokens`` at positions ``start .. start + T - 1``.

        With ``caches`` (one :class:`KVCache` per layer) the new keys and values are
        appended and attention runs through :func:`decode`; without, ``tokens`` must be
        the whole sequence (``start = 0``) and attention is full causal
        :func:`fa_lab.attention`.
        """
        x = self.emb[np.asarray(tokens)]
        T = x.shape[0]
        pos = np.arange(start, start + T)
        for i, blk in enumerate(self.blocks):
            h = self._norm(x)
            q = rope(self._split(h @ blk["wq"], self.heads), pos)
            k = rope(self._split(h @ blk["wk"], self.kv_heads), pos)
            v = self._split(h @ blk["wv"], self.kv_heads)
            if caches is None:
                a = attention(q, k, v, causal=True, kernel="flash")
            else:
                caches[i].append(k, v)
                a = decode(q, caches[i])
            x = x + a[0].transpose(1, 0, 2).reshape(T, self.d_model) @ blk["wo"]
            h = self._norm(x)
            u = h @ blk["w1"]
            x = x + (0.5 * u * (1 + np.tanh(0.7978845608 * (u + 0.044715 * u ** 3)))) @ blk["w2"]
        return self._norm(x) @ self.out

    def new_caches(self, max_len, B=1, **fmt):
        """One :class:`KVCache` per layer (``fmt``: KVCache's ``kv_dtype``, ``group``,
        ``smooth_k``)."""
        return [KVCache(B, self.kv_heads, max_len, self.head_dim, self.dtype, **fmt)
                for _ in range(self.layers)]

    def generate(self, prompt, steps, *, use_cache=True, **fmt):
        """Greedy decoding: ``(tokens, logits per generated step)``.

        ``use_cache=True``: one prefill pass over the prompt, then one token per step
        through the caches. ``False``: every step recomputes the whole sequence with full
        causal attention (the reference the cache must reproduce). ``fmt``: the caches'
        format (``kv_dtype="int8"`` or ``"int4"``, ``group``, ``smooth_k``: as
        :class:`KVCache` takes them).
        """
        tokens = [int(t) for t in prompt]
        if not tokens:
            raise ValueError("prompt must hold at least one token")
        logits_out = []
        if not use_cache and fmt:
            raise ValueError(f"{sorted(fmt)} need use_cache=True")
        caches = self.new_caches(len(tokens) + steps, **fmt) if use_cache else None
        if use_cache:
            logits = self.forward(tokens, 0, caches)[-1]
        for step in range(steps):
            if not use_cache:
                logits = self.forward(tokens, 0)[-1]
            logits_out.append(logits)
            nxt = int(np.argmax(logits))
            tokens.append(nxt)
            if use_cache and step < steps - 1:
                logits = self.forward([nxt], len(tokens) - 1, caches)[-1]
        return np.array(tokens), np.array(logits_out)

