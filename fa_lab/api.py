"""The public entry point: :func:`attention` validates, normalizes and dispatches.

Below every tool and feature sits one sequence, :func:`prepare` -> :meth:`Call.run`:
validate and normalize the arguments once (a :class:`Call`), then pick a kernel
(``"auto"`` or a name), pick its tiles (given, tuned, or default) and run it through the
registry's adapter. :func:`attention` is exactly that; benchmarks, the backward, INT8
and decoding use the same two calls instead of rebuilding the dispatch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from fa_lab.numerics.checks import (HALF_DTYPES, as_array, as_float_array, bias_view,  # noqa: F401
                                    check_block, check_bool, check_choice, check_scale,
                                    check_shapes, half_dtype, refuse_masked, widen)
from fa_lab.settings.config import num_threads
from fa_lab.numerics.dropout import check_dropout
from fa_lab.kernels.ladder.flash import plan_splits
from fa_lab.kernels.ladder.pv_product import serves as pv_serves
from fa_lab.kernels.lowprec.amx_pack import from_bf16, to_bf16
from fa_lab.numerics.masks import causal_alignment
from fa_lab.numerics.merge import apply_sinks, check_sinks
from fa_lab.registry import (BF16_KERNELS, KERNELS, Kernel, Request, Stage,  # noqa: F401
                             choose_kernel, effective_blocks)
from fa_lab.numerics.scoremod import NONE as NO_MODS, ScoreMods, check_mods
from fa_lab.settings.tuning_file import (measured_bf16_tiles, measured_pv, measured_splits,
                                        tuned_blocks)


class KernelFallbackWarning(UserWarning):
    """``kernel="auto"`` skipped a faster kernel that cannot serve the call (reason inside)."""


@dataclass
class Call:
    """A validated, normalized attention call (from :func:`prepare`): the arrays as
    ``(B, H, N, d)`` (``q4``, ``k4``, ``v4``), the additive ``bias`` view or None, the
    ``scale``, the causal ``alignment``, the requested tiles, dropout, and the
    :class:`fa_lab.registry.Request` that kernels are matched against. Shared by the
    forward, the backward, INT8 and every tool: none of them re-implements dispatch."""

    q: np.ndarray
    lead: tuple
    H: int
    H_kv: int
    Nq: int
    Nk: int
    d: int
    q4: np.ndarray
    k4: np.ndarray
    v4: np.ndarray
    bias: np.ndarray | None
    scale: float
    alignment: str | None
    block_q: int | None
    block_kv: int | None
    dropout_p: float
    seed: int
    request: Request
    mods: ScoreMods = NO_MODS  # window, softcap, ALiBi (fa_lab.numerics.scoremod)
    sinks: np.ndarray | None = None  # (B, H) sink logits (fa_lab.numerics.merge)

    @property
    def B(self) -> int:
        return math.prod(self.lead)

    @property
    def out_shape(self) -> tuple:
        """``out``'s shape: q's with v's head dimension ``d_v`` last."""
        return self.q.shape[:-1] + self.v4.shape[-1:]

    @property
    def empty(self) -> bool:
        return self.B == 0 or self.Nq == 0

    def to4(self, name, x, heads):
        """Validate a companion array (out, dout, lse) and reshape it like q or k."""
        x = as_float_array(name, x)
        if x.dtype != self.q.dtype:
            raise TypeError(f"{name} must have q's dtype {self.q.dtype}, got {x.dtype}")
        return np.ascontiguousarray(x.reshape(heads))

    def choose(self, kernel="auto", table=None, *, warn=True) -> Kernel:
        """The kernel for this call (:func:`choose_kernel`); with ``kernel="auto"``, a
        :class:`KernelFallbackWarning` says why faster kernels were skipped."""
        chosen, skipped = choose_kernel(kernel, self.request, table)
        if skipped and warn:
            warnings.warn(f"kernel='auto' chose {chosen.name!r}: " + "; ".join(skipped),
                          KernelFallbackWarning, stacklevel=3)
        return chosen

    def blocks(self, kernel: str, chosen: Kernel, block_q=None, block_kv=None):
        """``(block_q, block_kv, source)`` for ``chosen``: the tiles given here or to
        :func:`prepare` (``"given"``), the autotuner's (``"tuned"``, only for
        ``kernel="auto"``, :mod:`fa_lab.settings.tuning_file`), the kernel's defaults
        (``"default"``), or ``"n/a"`` for untiled kernels."""
        bq = check_block("block_q", block_q) or self.block_q
        bk = check_block("block_kv", block_kv) or self.block_kv
        if not chosen.tiled:
            return bq, bk, "n/a"
        source = "given" if (bq or bk) else "default"
        if kernel == "auto" and source == "default":
            tuned = tuned_blocks(chosen.name, self.Nq)
            if tuned:
                (bq, bk), source = tuned, "tuned"
        bq, bk = effective_blocks(self.Nq, self.Nk, bq, bk, chosen.default_blocks)
        return bq, bk, source

    def splits(self, kernel: str, chosen: Kernel, block_kv: int, splits=None) -> tuple:
        """``(splits, why)``: those given, those measured fastest here for ``flash``
        decoding with ``kernel="auto"`` (:func:`fa_lab.settings.tuning_file.measured_splits`),
        or ``None`` (the kernel's rule)."""
        if splits is not None:
            return splits, "given"
        best = measured_splits(self.B, self.H, self.H_kv, self.Nq, self.Nk, block_kv) if (
            kernel == "auto" and chosen.name == "flash") else None
        if best:
            return best
        return None, "the rule: split only when the (head, query block) tasks leave threads idle"

    def pv(self, kernel: str, options: dict, splits: int) -> tuple:
        """``(pv, why)``: ``flash``'s ``P V`` path given in ``options``; with ``kernel=
        "auto"`` the one measured fastest here, for a call like the measured one that it
        serves (:func:`~fa_lab.settings.tuning_file.measured_pv`); else BLAS, as always when
        the keys split (``splits`` > 1)."""
        if "pv" in options:
            return options["pv"], "given"
        if splits > 1:
            return "blas", "split-KV (Flash-Decoding) runs P V through BLAS"
        dtype, d = self.q4.dtype, self.v4.shape[3]
        best = measured_pv(self.Nq, d, dtype == np.float32) if kernel == "auto" else None
        if best and pv_serves(best[0], dtype, d) is None:
            return best
        return "blas", "the default: not measured here, or not a call it measured"

    def run(self, kernel="auto", *, table=None, arrays=None, block_q=None, block_kv=None,
            splits=None, stage=Stage.FULL, kv_len=None, warn=True, with_sinks=True,
            **options):
        """Run a forward kernel of ``table`` (default :data:`fa_lab.KERNELS`): ``(out,
        lse)`` in q's layout (``(..., H, Nq, d)`` and ``(..., H, Nq)``).

        ``arrays`` replaces ``(q4, k4, v4)`` for tables whose kernels take other operands
        (:data:`fa_lab.INT8_KERNELS`: the quantized ``(q8, sq, k8, sk, v)``). ``splits``
        (Flash-Decoding key splits), ``stage`` (a :class:`Stage`: stop each block after
        a stage, for timing its parts) and ``kv_len`` (use only the first ``kv_len``
        keys: a preallocated KV cache) are options of the staged kernels; ``options``
        are a kernel's own (its ``tags``, e.g. ``pv_dtype`` of ``sage``): any other is
        refused, never dropped. The sinks (if any) are merged into every kernel's finished
        state (:func:`fa_lab.numerics.merge.apply_sinks`) unless ``with_sinks=False`` (a
        caller that corrects the LSE first) or a partial ``stage``."""
        chosen = self.choose(kernel, KERNELS if table is None else table, warn=warn)
        unknown = sorted(set(options) - set(chosen.tags))
        if unknown:
            raise TypeError(f"{unknown[0]}: not an option of kernel {chosen.name!r}")
        if self.empty:
            return np.zeros(self.out_shape, self.q.dtype), np.zeros(self.q.shape[:-1], self.q.dtype)
        bq, bk, _ = self.blocks(kernel, chosen, block_q, block_kv)
        if not chosen.tiled:
            bq = bk = None
        splits, _ = self.splits(kernel, chosen, bk, splits)
        if "pv" in chosen.tags:
            options["pv"] = self.pv(kernel, options, splits or plan_splits(
                self.B, self.H, self.Nq, self.Nk if kv_len is None else int(kv_len), bq or 1,
                bk or 1, num_threads()))[0]
        extra = {k: v for k, v in (("splits", splits), ("kv_len", kv_len)) if v is not None}
        if stage != Stage.FULL:
            extra["stage"] = Stage(stage)
        if chosen.dropout:
            extra.update(dropout_p=self.dropout_p, seed=self.seed)
        if self.mods.active:
            extra["mods"] = self.mods
        arrays = (self.q4, self.k4, self.v4) if arrays is None else arrays
        out, lse = chosen.run(arrays, self.bias, self.scale, self.alignment, bq, bk, **extra,
                              **options)
        if self.sinks is not None and with_sinks and stage == Stage.FULL:
            out, lse = apply_sinks(out, lse, self.sinks[:, :, None])
        return out.reshape(self.out_shape), lse.reshape(self.q.shape[:-1])

    def plan(self, kernel="auto") -> dict:
        """What :meth:`run` would do (see :func:`plan`)."""
        chosen, skipped = choose_kernel(kernel, self.request, KERNELS)
        bq, bk, source = self.blocks(kernel, chosen)
        splits, why, pv, pv_why = 1, "n/a", "n/a", "n/a"
        if chosen.name == "flash" and not self.empty:
            splits, why = self.splits(kernel, chosen, bk)
            splits = splits or plan_splits(self.B, self.H, self.Nq, self.Nk, bq, bk, num_threads())
            pv, pv_why = self.pv(kernel, {}, splits)
        return {"kernel": chosen.name, "block_q": bq, "block_kv": bk, "blocks_from": source,
                "splits": splits, "splits_from": why, "pv": pv, "pv_from": pv_why,
                "skipped": skipped}


def prepare(q, k, v, *, causal=False, scale=None, mask=None, block_q=None, block_kv=None,
            dropout_p=0.0, seed=None, window=None, softcap=0.0, alibi_slopes=None,
            sinks=None) -> Call:
    """Validate every argument (as :func:`attention` documents them) and normalize the
    arrays to ``(B, H, N, d)``: the :class:`Call` that :meth:`Call.run` dispatches.

    float32 and float64 only (half precision is widened by :func:`attention`)."""
    q = as_float_array("q", q)
    k = as_float_array("k", k)
    v = as_float_array("v", v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    lead, H, H_kv, Nq, Nk, d = check_shapes(q, k, v)
    alignment = causal_alignment(causal)
    scale = check_scale(scale, d)
    block_q = check_block("block_q", block_q)
    block_kv = check_block("block_kv", block_kv)
    dropout_p, seed = check_dropout(dropout_p, seed)
    B = math.prod(lead)
    full_shape = (*lead, H, Nq, Nk) if q.ndim > 2 else (Nq, Nk)
    bias = None if mask is None else bias_view(mask, q.dtype, full_shape, B, H, Nq, Nk)
    mods = check_mods(window, softcap, alibi_slopes, lead, H, q.dtype)
    sinks = check_sinks(sinks, lead, H, q.dtype)
    req = Request(dtype=q.dtype, causal=alignment is not None, mask=bias is not None,
                  gqa=H != H_kv, blocks=block_q is not None or block_kv is not None,
                  dropout=dropout_p > 0, window=mods.window, softcap=mods.softcap > 0,
                  alibi=mods.slopes is not None, dv=v.shape[-1] != d)
    q4 = np.ascontiguousarray(q.reshape(B, H, Nq, d))
    k4 = np.ascontiguousarray(k.reshape(B, H_kv, Nk, d))
    v4 = np.ascontiguousarray(v.reshape(B, H_kv, Nk, v.shape[-1]))
    return Call(q, lead, H, H_kv, Nq, Nk, d, q4, k4, v4, bias, scale, alignment,
                block_q, block_kv, dropout_p, seed, req, mods, sinks)


#: Array layouts :func:`attention` accepts: heads before tokens (fa_lab's and PyTorch's),
#: or tokens before heads (flash-attn's).
LAYOUTS = ("bhnd", "bnhd")


def _heads_first(name, x):
    x = as_array(name, x)
    if x.ndim < 3:
        raise ValueError(f"{name}: layout='bnhd' needs (..., N, H, d) arrays, got shape "
                         f"{x.shape}")
    return np.swapaxes(x, -3, -2)


def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool | str = False,
              scale: float | None = None, mask: ArrayLike | None = None, kernel: str = "auto",
              block_q: int | None = None, block_kv: int | None = None,
              return_lse: bool = False, dropout_p: float = 0.0, seed: int | None = None,
              window: tuple[int, int] | None = None, softcap: float = 0.0,
              alibi_slopes: ArrayLike | None = None, sinks: ArrayLike | None = None,
              layout: str = "bhnd", pv: str | None = None
              ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Scaled dot-product attention ``softmax(Q K^T * scale + mask) V``.

    Parameters
    ----------
    q : array (..., H, Nq, d) or (Nq, d), float32 or float64
    k, v : arrays (..., H_kv, Nk, d) or (Nk, d), the same dtype and leading dims as q.
        ``H % H_kv == 0``: query head ``h`` uses kv head ``h // (H // H_kv)``
        (grouped-query / multi-query attention, as PyTorch's ``enable_gqa``).
        Strided (non-contiguous) views are accepted (copied to contiguous memory).
        ``v`` may have its own head dimension ``d_v`` (MLA: DeepSeek's 192 / 128):
        ``out`` then has ``d_v`` columns (``reference``, ``tiled_simd``, ``flash``; the
        teaching rungs refuse it by name).
    causal : False, True, "top_left" or "bottom_right"
        ``True``/``"top_left"``: query ``i`` sees keys ``j <= i`` (PyTorch ``is_causal``).
        ``"bottom_right"``: query ``i`` sees keys ``j <= i + Nk - Nq`` (flash-attn >= 2.1;
        decoding with a KV cache).
    scale : float, optional
        Multiplies ``Q K^T``; defaults to ``1 / sqrt(d)``.
    mask : bool or float array broadcastable to (..., H, Nq, Nk), optional
        bool: True = attend (PyTorch's meaning). float: added to the scaled scores
        (e.g. an ALiBi bias; ``-inf`` hides a key). Combines with ``causal``.
    kernel : str
        A name in :data:`fa_lab.KERNELS` or ``"auto"`` (the highest rung that supports
        the call; if it has to skip one it says why with a :class:`KernelFallbackWarning`).
    block_q, block_kv : int, optional
        Tile sizes ``Br``, ``Bc`` for tiled kernels (defaults: the kernel's own or
        :mod:`fa_lab.settings.config`'s; with ``kernel="auto"``, the autotuner's stored choice
        for this machine when there is one, see :mod:`fa_lab.tools.tune` and :func:`plan`).
    return_lse : bool
        Also return ``lse``, the natural-log logsumexp of each row of the scaled,
        masked scores.
    dropout_p : float in [0, 1)
        Attention dropout on the probabilities (kept ones scaled by ``1/(1-p)``); the
        mask is a hash of ``(seed, b, h, i, j)`` (:mod:`fa_lab.numerics.dropout`), so
        :func:`fa_lab.attention_backward` regenerates it. ``lse`` is not affected.
    seed : int, required when ``dropout_p > 0``
    window : (left, right), optional
        flash-attn's sliding window: query ``i`` (at position ``i + offset``, ``offset =
        0`` for ``causal=True``/``"top_left"``, else ``Nk - Nq``) sees keys ``i + offset
        - left <= j <= i + offset + right``; ``-1`` = unbounded on that side. Combines
        with ``causal`` and ``mask``; key tiles outside the band are skipped.
    softcap : float >= 0
        Scores ``c * tanh(scale * q.k / c)`` (Gemma-2), before any bias or mask; 0 = off.
    alibi_slopes : array (H,) or (..., H), optional
        ALiBi: adds ``-slope * |i + offset - j|`` to the (softcapped) scores, computed
        in the kernel (no ``N x N`` bias).
    sinks : array (H,) or (..., H), optional
        Attention sinks (gpt-oss, StreamingLLM): one learned logit per query head, a
        virtual key with that score and a zero value in every row's softmax: it takes
        probability mass and adds nothing to the output; ``lse`` includes it. Merged
        into the kernel's finished state (:func:`fa_lab.numerics.merge.apply_sinks`),
        so every kernel serves it; ``-inf`` = no sink.
    layout : "bhnd" (default) or "bnhd"
        ``"bnhd"``: q, k, v and ``out`` are ``(..., N, H, d)``, flash-attn's layout (a
        mask, ALiBi slopes and ``lse`` keep their head-major shapes). fa_lab cannot tell
        the two layouts apart from the shapes alone: say which.
    pv : "blas" or "microkernel", optional
        How ``flash`` computes ``P V``: SciPy's BLAS, or fa_lab's own float32
        micro-kernel (float32, ``d_v`` a multiple of 32). By default BLAS, or with
        ``kernel="auto"`` the one measured faster on this machine (``python -m fa_lab
        tune``; :func:`plan` says which). Other kernels refuse it by name; a call that
        splits its keys (Flash-Decoding) runs BLAS and refuses ``"microkernel"``; a
        bfloat16 call with ``pv`` runs the float32 kernels (not the AMX tiles).

    Returns
    -------
    out : (..., H, Nq, d_v) (``(..., Nq, H, d_v)`` with ``layout="bnhd"``), q's dtype
    lse : (..., H, Nq), q's dtype, only with ``return_lse``

    Notes
    -----
    A row with no visible key (fully masked) returns zeros and ``lse = -inf``, never
    NaN. NaN in a query row makes that output row NaN and leaves the others exact; NaN
    in a key or value reaches exactly the rows that can see that key (hidden keys are
    selected away, see :mod:`fa_lab.numerics.reference`). ``scale`` must be finite; NumPy masked
    arrays are refused.
    ``Nq = 0`` returns an empty result; ``Nk = 0`` gives zeros and ``lse = -inf``.

    Half precision: float16 (and ``ml_dtypes.bfloat16``) inputs are computed in
    float32 by the same kernels and the results rounded to the input dtype; their
    tolerance is the 2x rule against :func:`fa_lab.numerics.reference.attention_half`. On a CPU
    with AMX, ``bfloat16`` inputs instead run both products in bf16 on the matrix engine
    (fp32 softmax and accumulation, as PyTorch's bf16 SDPA; ``kernel="amx"`` asks for it,
    :data:`fa_lab.registry.BF16_KERNELS`) unless an option it lacks (dropout, window,
    softcap, ALiBi) sends the call to the float32 kernels, or (``kernel="auto"``, a
    decode step) the float32 path was measured faster here (``python -m fa_lab tune``).
    """
    if check_choice("layout", layout, LAYOUTS) == "bnhd":
        res = attention(*(_heads_first(n, x) for n, x in (("q", q), ("k", k), ("v", v))),
                        causal=causal, scale=scale, mask=mask, kernel=kernel,
                        block_q=block_q, block_kv=block_kv, return_lse=return_lse,
                        dropout_p=dropout_p, seed=seed, window=window, softcap=softcap,
                        alibi_slopes=alibi_slopes, sinks=sinks, pv=pv)
        out, lse = res if isinstance(res, tuple) else (res, None)
        out = np.ascontiguousarray(np.swapaxes(out, -3, -2))
        return (out, lse) if lse is not None else out
    half = half_dtype(q)
    if half is not None:
        if isinstance(mask, np.ndarray) and mask.dtype == half:
            mask = mask.astype(np.float32)
        if half.name == "bfloat16" and pv is None and bf16_kernels_serve(kernel, q):
            res = attention_bf16_bits(*_same(half, q=q, k=k, v=v), kernel, causal=causal,
                                  scale=scale, mask=mask, block_q=block_q, block_kv=block_kv,
                                  dropout_p=dropout_p, seed=seed, window=window,
                                  softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
            if res is not None:
                out, lse = (to_bf16(x, half) for x in res)
                return (out, lse) if check_bool("return_lse", return_lse) else out
        res = attention(_wide("q", q, half), _wide("k", k, half),
                        _wide("v", v, half), causal=causal, scale=scale, mask=mask,
                        kernel=kernel, block_q=block_q, block_kv=block_kv,
                        return_lse=return_lse, dropout_p=dropout_p, seed=seed,
                        window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                        pv=pv)
        narrow = ((lambda x: to_bf16(x, half)) if half.name == "bfloat16"  # in parallel
                  else (lambda x: x.astype(half)))
        return tuple(narrow(x) for x in res) if return_lse else narrow(res)
    call = prepare(q, k, v, causal=causal, scale=scale, mask=mask, block_q=block_q,
                   block_kv=block_kv, dropout_p=dropout_p, seed=seed, window=window,
                   softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    return_lse = check_bool("return_lse", return_lse)
    out, lse = call.run(kernel, **({} if pv is None else {"pv": pv}))
    return (out, lse) if return_lse else out


def _wide(name, x, half):
    """A half-precision input as float32 (:func:`widen`'s checks and messages); bfloat16
    exactly and in parallel (:func:`~fa_lab.kernels.lowprec.amx_pack.from_bf16`)."""
    x = as_array(name, x)  # float16, or a dtype mismatch: widen (raises, naming it)
    return from_bf16(x) if x.dtype == half and half.name == "bfloat16" else widen(name, x, half)


def _same(half, **arrays):
    """The arrays, checked to share q's half-precision dtype (:func:`widen`'s message)."""
    xs = [(name, as_array(name, x)) for name, x in arrays.items()]
    return [x if x.dtype == half else widen(name, x, half) for name, x in xs]  # widen raises


def bf16_kernels_serve(kernel: str, q) -> bool:
    """Whether a bfloat16 call (``q`` or its shape) goes to the bf16 kernels: named, or
    ``"auto"`` unless a decode step was measured faster in float32 on this machine."""
    shape = q if isinstance(q, tuple) else np.shape(q)  # an array, or a shape
    tiles = measured_bf16_tiles(shape[-2]) if kernel == "auto" and len(shape) >= 2 else None
    return kernel in BF16_KERNELS if kernel != "auto" else tiles is None or tiles[0]


def attention_bf16_bits(q, k, v, kernel="auto", **options):
    """bfloat16 inputs on a kernel of :data:`fa_lab.registry.BF16_KERNELS` (both products
    in bf16, fp32 softmax and accumulation), given as ``ml_dtypes.bfloat16`` arrays or as
    their bits (any 2-byte dtype, e.g. a torch bf16 tensor's ``int16`` view; the kernel packs them
    as they are, nothing is widened): ``(out, lse)`` in float32, or None when
    ``kernel="auto"`` finds none that serves the call (the caller then computes in
    float32). :func:`prepare` checks the shapes and options on untouched float32
    stand-ins (``np.empty``: no memory is written)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if np.dtype(getattr(x, "dtype", None)).name not in ("bfloat16", "int16", "uint16"):
            raise TypeError(f"{name} must be bfloat16 (or its bits as int16 / uint16), got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
    call = prepare(*(np.empty(x.shape, np.float32) for x in (q, k, v)), **options)
    try:
        chosen, _ = choose_kernel(kernel, call.request, BF16_KERNELS)
    except NotImplementedError:
        if kernel != "auto":
            raise
        return None
    bits = tuple(np.ascontiguousarray(x).view(np.uint16).reshape(y.shape)
                 for x, y in ((q, call.q4), (k, call.k4), (v, call.v4)))
    return call.run(chosen.name, table=BF16_KERNELS, arrays=bits, warn=False)


def plan(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool | str = False,
         scale: float | None = None, mask: ArrayLike | None = None, kernel: str = "auto",
         block_q: int | None = None, block_kv: int | None = None, dropout_p: float = 0.0,
         seed: int | None = None, window: tuple[int, int] | None = None, softcap: float = 0.0,
         alibi_slopes: ArrayLike | None = None, sinks: ArrayLike | None = None) -> dict:
    """What :func:`attention` would run for these arguments, without running it.

    Returns ``kernel``, ``block_q``, ``block_kv``, ``blocks_from`` (``"given"``,
    ``"tuned"``, ``"default"`` or ``"n/a"``), ``splits`` (key splits of the ``flash``
    kernel's Flash-Decoding path, 1 = none), ``splits_from`` (the rule, or the times
    measured on this machine that chose them), ``pv`` and ``pv_from`` (``flash``'s ``P V``
    path, BLAS or ``"microkernel"``, and why: the default, or the times measured here)
    and ``skipped`` (why faster kernels could not serve the call). Validates the
    arguments exactly as :func:`attention` does.
    """
    half = half_dtype(q)
    if half is not None:  # computed in float32, as attention() does
        q, k, v = np.asarray(q).astype(np.float32), widen("k", k, half), widen("v", v, half)
    return prepare(q, k, v, causal=causal, scale=scale, mask=mask, block_q=block_q,
                   block_kv=block_kv, dropout_p=dropout_p, seed=seed, window=window,
                   softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks).plan(kernel)
