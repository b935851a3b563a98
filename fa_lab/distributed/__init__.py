"""Attention beyond one process: ring attention over ``torch.distributed`` (gloo on CPUs).

* :func:`ring_attention` -- a sequence sharded across ranks, K/V passed round a ring
* :func:`shard`, :func:`unshard` -- split and reassemble along the sequence axis
  (``"contiguous"`` or ``"zigzag"``)
* :func:`causal_work` -- the causal work per rank and ring step of each layout

Needs the optional torch extra (``pip install 'fa_lab[torch]'``); :func:`shard` and
:func:`unshard` work without it. ``python -m fa_lab ring`` launches local processes.
"""

from fa_lab.distributed.ring import LAYOUTS, causal_work, ring_attention, shard, unshard

__all__ = ["ring_attention", "shard", "unshard", "causal_work", "LAYOUTS"]
