"""Other data layouts on flash's tiles: packed varlen batches and a paged KV cache."""
