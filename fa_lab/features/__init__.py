"""Layer 5, features: thin public layers over the API (`fa_lab.api`): backward, INT8,
varlen, KV cache, decoding, retrieval, and the MiniLM model in NumPy."""
