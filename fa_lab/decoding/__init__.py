"""Decoding: a preallocated KV cache, attention of new tokens against it
(:mod:`~fa_lab.decoding.cache`), RoPE (:mod:`~fa_lab.decoding.rope`), and a tiny
decoder-only model that shows cached decoding equals recomputation
(:mod:`~fa_lab.decoding.tinylm`). Their benchmarks are in :mod:`fa_lab.bench.studies`,
their figures in :mod:`fa_lab.viz`.
"""

from fa_lab.decoding.cache import KVCache, decode
from fa_lab.decoding.rope import rope
from fa_lab.decoding.tinylm import TinyLM

__all__ = ["KVCache", "TinyLM", "decode", "rope"]
