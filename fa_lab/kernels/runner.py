"""The one adapter from the registry's canonical call (:mod:`fa_lab.registry`'s docstring)
to a jitted driver (:class:`Runner`), and the output arrays it allocates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from fa_lab.numerics import masks
from fa_lab.numerics.dropout import mix_seed
from fa_lab.numerics.scoremod import NONE as NO_MODS
from fa_lab.settings.config import num_threads
from fa_lab.kernels.common import Stage, no_bias
from fa_lab.kernels.ladder import flash, pv_product


def forward_outputs(arrays):
    q, v = arrays[0], arrays[-1]
    return np.empty(q.shape[:3] + v.shape[3:], v.dtype), np.empty(q.shape[:3], v.dtype)


def backward_outputs(arrays):
    return tuple(np.empty_like(x) for x in arrays[:3])


@dataclass(frozen=True)
class Runner:
    """The one adapter from the canonical call (:mod:`fa_lab.registry`) to a jitted driver::

        driver(*arrays, bias, has_bias, scale, causal, offset, [block_q, block_kv,]
               [dropout_p, seed_mixed,]  *outputs, [dropout_p, seed_mixed,] [stage, kv_len])

    ``keys``: the index of k in ``arrays`` (its length is Nk); the float dtype is that of
    the last array. ``dropout``: ``"before"`` or ``"after"`` the outputs, or ``""``.
    ``staged``: the driver ends with ``(stage, kv_len)`` (``flash``: stop each block
    after a stage; use only the first ``kv_len`` keys). ``split_driver``: the Flash-Decoding
    driver ``(..., block_q, block_kv, splits, *outputs, kv_len)``, used when ``splits``
    (given, or :func:`fa_lab.kernels.ladder.flash.plan_splits`) is above 1. ``warm``: called
    before every call (``flash``: BLAS on every thread). ``mods``: the driver (and the
    split driver) end with ``(left, right, softcap, slopes, has_alibi)``
    (:meth:`fa_lab.numerics.scoremod.ScoreMods.kernel_args`), from ``run(..., mods=ScoreMods)``.
    ``pv``: the driver (not the split driver) ends with ``pack``: ``run(..., pv=...)``
    picks the ``P V`` path (:mod:`fa_lab.kernels.ladder.pv_product`); a call that splits
    its keys runs BLAS, and refuses ``pv="microkernel"``.
    """

    driver: Callable
    outputs: Callable = forward_outputs
    keys: int = 1
    blocks: bool = True
    dropout: str = ""
    staged: bool = False
    split_driver: Callable | None = None
    warm: Callable | None = None
    mods: bool = False
    pv: bool = False

    def __call__(self, arrays, bias, scale, alignment, block_q=None, block_kv=None, *,
                 dropout_p=0.0, seed=0, splits=None, stage=Stage.FULL, kv_len=None, mods=None,
                 pv=None):
        if not self.staged and (stage != Stage.FULL or kv_len is not None):
            raise ValueError(f"stage and kv_len: {self.driver.__name__} runs whole calls only")
        if not Stage.LOOPS <= stage <= Stage.FULL:  # PACK, or an ablation (AMX only)
            raise ValueError(f"stage: {self.driver.__name__} takes LOOPS..FULL, got {stage!r}")
        if self.split_driver is None and splits not in (None, 1):
            raise ValueError(f"splits: {self.driver.__name__} does not split the keys")
        if not self.mods and mods is not None and mods.active:
            raise ValueError(f"window/softcap/alibi: {self.driver.__name__} has none")
        if pv is not None:
            why = (pv_product.serves(pv, arrays[-1].dtype, arrays[-1].shape[3]) if self.pv
                   else f"pv: {self.driver.__name__} has one P V path")
            if why:
                raise ValueError(why)
        if self.warm is not None:
            self.warm()
        dtype = arrays[-1].dtype
        B, H, Nq = arrays[0].shape[:3]
        Nk = arrays[self.keys].shape[2] if kv_len is None else int(kv_len)
        # query i at i + offset: for causal, and (without causal too) window and ALiBi
        offset = masks.feature_offset(Nq, Nk, alignment)
        has_bias = bias is not None
        args = [*arrays, bias if has_bias else no_bias(dtype), has_bias, dtype.type(scale),
                alignment is not None, offset]
        if self.blocks:
            args += [block_q or 1, block_kv or 1]
        drop = [float(dropout_p), np.uint64(mix_seed(np.uint64(seed)))]
        outputs = self.outputs(arrays)
        if self.split_driver is not None and splits is None:
            splits = flash.plan_splits(B, H, Nq, Nk, block_q or 1, block_kv or 1, num_threads())
        if pv == "microkernel" and splits is not None and splits > 1:
            raise ValueError(f"pv='microkernel': this call splits its keys ({splits} splits, "
                             "Flash-Decoding), whose P V runs on BLAS; pass splits=1 or pv='blas'")
        tail = [] if kv_len is None else [Nk]
        extra = list((mods or NO_MODS).kernel_args(dtype)) if self.mods else []
        if splits is not None and splits > 1:
            self.split_driver(*args, int(splits), *outputs, *(tail or [-1]), *extra)
            return outputs
        if self.dropout == "before":
            args += drop
        args += outputs
        if self.dropout == "after":
            args += drop
        if self.staged:
            args += [int(stage), *(tail or [-1])]
        self.driver(*args, *extra, *([pv == "microkernel"] if self.pv else []))
        return outputs
