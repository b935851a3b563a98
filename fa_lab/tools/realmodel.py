"""Lesson 11's studies: fa_lab's kernels inside real transformers models.

* :func:`load_minilm` loads all-MiniLM-L6-v2 (:func:`fa_lab.features.minilm.model_dir`) with any
  attention implementation; :func:`embed` gives sentence-transformers' embeddings
  (mean pooling over valid tokens, L2-normalized).
* :func:`pydoc_paragraphs`: a real corpus that needs no download, the paragraphs of
  Python's own help topics (``pydoc_data.topics``).
* :func:`retrieval_agreement`: how far the nearest neighbours found with one set of
  embeddings (INT8 attention) agree with those of another (float32): recall@k and MRR.
* :func:`tiny_llama`: a small Llama-architecture decoder (random weights, GQA, RoPE) as
  two copies with identical weights, one on SDPA and one on fa_lab.
* :func:`time_forward`, :func:`attention_per_layer`, :func:`time_per_token`: timed by
  the benchmark harness (validated first, interleaved, the machine's load recorded).
"""

from __future__ import annotations

import copy
import re

import numpy as np
import torch

from fa_lab.api import attention
from fa_lab.tools import bench
from fa_lab.features import minilm as minilm_files
from fa_lab.integrations.torch import attention as torch_attention
from fa_lab.integrations.transformers import register
from fa_lab.numerics.verdict import quartiles


def pydoc_paragraphs(min_chars=200, limit=None) -> list[str]:
    """Prose paragraphs of Python's help topics (code examples and lists left out),
    whitespace normalized, in a fixed order; at most ``limit``."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for p in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(p.split())
            if len(text) >= min_chars and not text.startswith((">>>", "*", "-", "=")):
                out.append(text)
    return out[:limit] if limit else out


def load_minilm(attn_implementation="sdpa"):
    """(tokenizer, model) of all-MiniLM-L6-v2 with the given attention implementation
    (``"sdpa"``, ``"eager"``, or a name registered with :func:`register`)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weights-loading bar per model clutters the lesson
    path = minilm_files.model_dir()
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation).eval()
    return AutoTokenizer.from_pretrained(path), model


def embed(tok, model, texts, *, batch=32, max_length=128) -> np.ndarray:
    """Sentence embeddings (mean pooling over valid tokens, L2-normalized), float32."""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)


def retrieval_agreement(reference, candidate, k=10) -> dict:
    """Every row as a query against all other rows (cosine): how well ``candidate``'s
    neighbours reproduce ``reference``'s.

    ``recall@k``: mean share of the reference's top-k found in the candidate's top-k;
    ``mrr``: mean of 1 / (rank of the reference's nearest neighbour in the candidate's
    ranking); ``cosine``: per-row cosine of the two embeddings (min and mean)."""
    n = len(reference)
    if n < k + 1:
        raise ValueError(f"need more than k={k} rows, got {n}")
    sims = []
    for e in (reference, candidate):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)  # a row is not its own neighbour
        sims.append(s)
    ref_rank = np.argsort(-sims[0], axis=1, kind="stable")
    cand_rank = np.argsort(-sims[1], axis=1, kind="stable")
    recall = np.mean([len(set(ref_rank[i, :k]) & set(cand_rank[i, :k])) / k for i in range(n)])
    first = ref_rank[:, 0]
    pos = np.array([int(np.flatnonzero(cand_rank[i] == first[i])[0]) for i in range(n)])
    cos = np.sum(reference * candidate, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1))
    return {"queries": n, f"recall@{k}": float(recall), "mrr": float(np.mean(1.0 / (pos + 1))),
            "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}


def time_forward(models: dict, tok, texts, *, repeats=5, max_length=128):
    """Median time of one batched forward per model (same inputs), interleaved; a row
    per model with ms per layer (the model's time / its layer count)."""
    import pandas as pd

    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    cs = [bench.Contender(name, lambda m=m: _forward(m, enc), "kernel") for name, m in models.items()]
    times = bench.time_calls(cs, (), repeats=repeats, warmup=1)
    rows = []
    for name, m in models.items():
        q25, med, q75 = quartiles(times[name])
        layers = m.config.num_hidden_layers
        rows.append({"attention": name, "tokens": int(enc["attention_mask"].sum()),
                     "forward_ms": med * 1e3, "q25_ms": q25 * 1e3, "q75_ms": q75 * 1e3,
                     "ms_per_layer": med * 1e3 / layers, **times.load.columns()})
    return pd.DataFrame(rows)


def _forward(model, enc):
    with torch.no_grad():
        return model(**enc).last_hidden_state


def attention_per_layer(B, T, *, H=12, d=32, kernels=("flash", "tiled_simd"), repeats=9, seed=0):
    """One MiniLM-shaped attention call ``(B, H, T, d)`` (what each layer runs): fa_lab
    kernels through the torch adapter vs torch SDPA, validated against SDPA, then timed."""
    import pandas as pd

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fns = {f"fa_lab {n}": (lambda n=n: torch_attention(q, k, v, kernel=n)) for n in kernels}
    fns["torch SDPA"] = lambda: sdpa(q, k, v)
    with torch.no_grad():
        expected = sdpa(q, k, v)
        for name, fn in fns.items():
            err = (fn() - expected).abs().max().item()
            if err > 1e-4:
                raise AssertionError(f"{name} differs from SDPA by {err:.2e}")
    cs = [bench.Contender(n, fn, "kernel") for n, fn in fns.items()]
    times = bench.time_calls(cs, (), repeats=repeats, warmup=1)
    return pd.DataFrame([{"contender": c.name, "name": c.name, "B": B, "H": H, "T": T, "d": d,
                          **times.summary(c.name)} for c in cs])


def tiny_llama(name: str, *, vocab=256, hidden=128, layers=2, heads=4, kv_heads=2, seed=0,
               init=0.3):
    """(sdpa model, fa_lab model): one random Llama (GQA ``heads / kv_heads``, RoPE) twice,
    identical weights, the second on the attention implementation ``name``. Weights are
    drawn with standard deviation ``init`` (transformers' default 0.02 makes an untrained
    model repeat a few tokens; 0.3 gives varied greedy output)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      initializer_range=init)
    models = []
    for impl in ("sdpa", name):
        c = copy.deepcopy(cfg)
        c._attn_implementation = impl
        torch.manual_seed(seed)
        models.append(LlamaForCausalLM(c).eval())
    models[1].load_state_dict(models[0].state_dict())
    return tuple(models)


def time_per_token(models: dict, ids, attention_mask, *, steps=16, repeats=3):
    """Greedy generation of ``steps`` tokens per model (same prompt); the tokens of every
    model must equal the first's. Returns ms per generated token (interleaved timing)."""
    import pandas as pd

    kw = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False,
          "pad_token_id": 0}
    out = {n: m.generate(ids, attention_mask=attention_mask, **kw) for n, m in models.items()}
    first = next(iter(out.values()))
    for n, o in out.items():
        if not torch.equal(o, first):
            raise AssertionError(f"{n} generated other tokens than {next(iter(out))}")
    cs = [bench.Contender(n, lambda m=m: m.generate(ids, attention_mask=attention_mask, **kw),
                          "kernel") for n, m in models.items()]
    times = bench.time_calls(cs, (), repeats=repeats, warmup=0)
    rows = []
    for c in cs:
        q25, med, q75 = quartiles(times[c.name])
        rows.append({"attention": c.name, "prompt": ids.shape[1], "batch": ids.shape[0],
                     "steps": steps, "ms_per_token": med * 1e3 / steps,
                     "q25_ms": q25 * 1e3 / steps, "q75_ms": q75 * 1e3 / steps,
                     **times.load.columns()})
    return pd.DataFrame(rows), first


def decode_call_costs(B=2, H=4, H_kv=2, Nk=40, d=32, repeats=9):
    """One decode step's attention call (``Nq = 1``, a padding mask) three ways, timed
    side by side: PyTorch's SDPA, fa_lab through the torch adapter, and
    ``fa_lab.attention`` on NumPy arrays; microseconds per call (median, quartiles).
    Where a tiny model's time per token goes beyond the kernels: the calls' own cost."""
    import pandas as pd

    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, 1, d, generator=g)
    k, v = torch.randn(B, H_kv, Nk, d, generator=g), torch.randn(B, H_kv, Nk, d, generator=g)
    mask = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
    mask[0, ..., : Nk // 4] = False
    qn, kn, vn, mn = q.numpy(), k.numpy(), v.numpy(), mask.numpy()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = {"torch SDPA": lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=True),
             "fa_lab, torch adapter": lambda: torch_attention(q, k, v, mask=mask),
             "fa_lab.attention (NumPy)": lambda: attention(qn, kn, vn, mask=mn)}
    batch = 200  # calls per timed sample (one call is a few microseconds)

    def many(fn):
        return lambda: [fn() for _ in range(batch)]
    cs = [bench.Contender(n, many(fn), "kernel") for n, fn in calls.items()]
    times = bench.time_calls(cs, (), repeats=repeats)
    rows = [{"call": c.name, **times.ms(c.name, per=batch / 1e3)} for c in cs]
    table = pd.DataFrame(rows).rename(columns={"median_ms": "median_us", "q25_ms": "q25_us",
                                               "q75_ms": "q75_us"})
    return table


__all__ = ["pydoc_paragraphs", "decode_call_costs", "load_minilm", "embed", "retrieval_agreement", "time_forward",
           "attention_per_layer", "tiny_llama", "time_per_token", "register"]
