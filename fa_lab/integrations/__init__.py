"""fa_lab inside other frameworks (imported only when asked for; each needs its extra).

* :mod:`fa_lab.integrations.torch` -- :func:`~fa_lab.integrations.torch.attention` on
  CPU torch tensors (float32, float64, float16, bfloat16) with autograd
  (``pip install fa_lab[torch]``).
* :mod:`fa_lab.integrations.transformers` --
  :func:`~fa_lab.integrations.transformers.register` makes fa_lab an attention
  implementation of Hugging Face transformers (``pip install fa_lab[models]``).
"""
