"""Decoding: a preallocated KV cache, attention of new tokens against it
(:mod:`~fa_lab.features.decoding.cache`), RoPE (:mod:`~fa_lab.features.decoding.rope`), and a tiny
decoder-only model that shows cached decoding equals recomputation
(:mod:`~fa_lab.features.decoding.tinylm`). Their benchmarks are in :mod:`fa_lab.tools.bench.studies`,
their figures in :mod:`fa_lab.viz`.
"""

from fa_lab.features.decoding.cache import KVCache, decode
from fa_lab.features.decoding.rope import rope
from fa_lab.features.decoding.tinylm import TinyLM

__all__ = ["KVCache", "TinyLM", "decode", "rope"]
