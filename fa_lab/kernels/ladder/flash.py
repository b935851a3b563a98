"""Rung 5, ``flash``: tiled_simd's algorithm with BLAS block products and a vector exp.

What changes against ``tiled_simd`` (same online softmax, same causal block skipping):

* ``Sij = Qi Kj^T`` and ``Pij Vj`` are ``np.dot`` calls on the tiles (SciPy's BLAS,
  sgemm/dgemm) into buffers reused by every key block (``Pij Vj`` may instead run on
  fa_lab's own float32 micro-kernel, ``pack=True``: :mod:`.pv_product`), with larger default tiles
  (``Br x Bc`` = 256 x 256: a BLAS call needs work to amortize its overhead; the
  autotuner, :mod:`fa_lab.tools.tune`, picks per machine). BLAS inside ``prange`` must run
  single-threaded, so the kernel's first call sets SciPy's bundled OpenBLAS (the library
  numba's ``np.dot`` calls) to 1 thread (:func:`ensure_blas_threads`, recorded in
  :data:`BLAS_LIMITED`; importing this module changes nothing). NumPy's
  own OpenBLAS is a separate library in the PyPI wheels and keeps its threads (the
  NumPy baseline of the benchmarks stays multi-threaded). Where both share one BLAS
  (some conda builds), NumPy is limited too. Limiting per call with
  ``threadpool_limits`` cost ~150 KB of Python objects and a library scan on every call.
* The softmax of a block is one fused function (:func:`softmax_block`), two vectorized
  passes per row: the row max on order-preserving int32 keys of the floats (a float
  max reduction stays scalar without ``nnan``; the integer one becomes ``vpmaxsd``),
  then ``p = 2^x`` and the row sum together. For float32, ``2^x`` is branch-free: range
  reduction, a degree-6 polynomial on [0, 1), ``2^floor(x)`` built from exponent bits
  (an LLVM bitcast, :func:`bits_f32`). Scores below -87 (``exp < 1.2e-38``) give exactly
  0, so fully masked rows still give zeros, and NaN stays NaN. float64 uses libm's
  ``exp`` (``@overload`` picks at compile time). Measured on one core, 33.5M scores in
  128 x 256 blocks: 19.5 ms for the previous three-pass version (scalar max), 7.5 ms
  fused.
* Decoding (few query rows, long keys): when the ``(b, h, query block)`` tasks cannot
  keep the threads busy, :func:`plan_splits` also splits the keys, and
  :func:`flash_splitkv_forward` merges the partial results exactly through their LSEs
  (Flash-Decoding).
* NaN rule (:mod:`fa_lab.numerics.reference`): BLAS would compute ``0 * NaN = NaN`` for a hidden
  key whose value is NaN, so a masked block (causal diagonal, or a mask) first checks
  its ``Vj`` in one vectorized pass (:func:`all_finite`, ``O(Bc d)`` against the block's
  ``O(Br Bc d)``) and, only when it holds NaN or inf, multiplies ``P Vj`` with a loop
  that skips the hidden keys (:func:`pv_select`). Unmasked blocks are untouched.
* ``stage`` (default: the whole kernel) stops each block early, so
  :func:`fa_lab.tools.bench.studies.breakdown` can time the parts with the real code.

Measured results (against PyTorch's CPU SDPA, the matrix-product peak, the time
breakdown, decoding) are in lesson ``06_performance`` and ``docs/RESULTS.md``; dropout is not
supported (``tiled_simd`` is).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from fa_lab.settings import config
from fa_lab.settings.config import CACHE, FASTMATH
from fa_lab.kernels.common import (LOG2E, NEG_INF, NRT_ARRAY_OVERHEAD, exp2_poly,
                                   finalize_row, mask_block, softcap_alibi_block,
                                   task_coords, window_block, window_cuts, window_keys)
from fa_lab.numerics.merge import merge_splits
from fa_lab.kernels.ladder.blas_threads import (BLAS_LIMITED, ensure_blas_threads,  # noqa: F401
                                                limit_scipy_blas, tile_gemms)
from fa_lab.kernels.ladder.pv_product import pv_product, rescale_add



def scratch_bytes(*, B, H, Nq, Nk, d, itemsize, block_q, block_kv, threads, pv="blas", **_):
    """Byte model per running task (checked with memray), plus the split-KV partials.

    Per task, alive throughout: the scaled ``Qi``, ``PV`` and ``acc`` (Br x d), the
    ``S`` and ``P`` buffers (Br x Bc, reused by every key block), three row vectors, and
    with ``pv="microkernel"`` V's packed tile (Bc x d). When :func:`plan_splits` splits the keys, the partial outputs and LSEs of every
    split are kept for the merge: ``splits x B x H x Nq x (d + 1)``.
    """
    a = NRT_ARRAY_OVERHEAD
    tasks = B * H * -(-Nq // block_q)
    splits = plan_splits(B, H, Nq, Nk, block_q, block_kv, threads)
    live = max(1, min(threads, tasks * splits))
    per = (3 * block_q * d + 2 * block_q * block_kv + 3 * block_q) * itemsize + 9 * a
    per += block_kv * d * itemsize if pv == "microkernel" and splits == 1 else 0  # Vpack
    items = {f"tiles (Qi, S, P, PV, acc, row state) x {live} threads": live * per}
    if splits > 1:
        items[f"split-KV partials ({splits} splits)"] = (
            splits * B * H * Nq * (d + 1) * itemsize + 2 * a)
    return items


@intrinsic
def f32_bits(typingctx, x):
    """The int32 whose bits are the float32 ``x`` (an LLVM bitcast; free in registers)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.int32))

    return types.int32(x), codegen


@intrinsic
def bits_f32(typingctx, x):
    """The float32 whose bits are the low 32 bits of the integer ``x``."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        value = args[0]
        if sig.args[0].bitwidth > 32:
            value = builder.trunc(value, context.get_value_type(types.int32))
        return builder.bitcast(value, context.get_value_type(types.float32))

    return types.float32(x), codegen


def softmax_block(S, m, l, alpha, P):
    """One block of the online softmax, in place, for rows ``r`` of ``S`` (br, bc):

    ``m_new = max(m, max_c S)``; ``alpha = exp(m - m_new)``; ``P = exp(S - m_new)``;
    ``l = alpha l + rowsum(P)``; ``m = m_new``. A row that saw only ``-inf`` so far
    uses 0 as its max (so ``P = 0`` and ``alpha = 1``, never NaN).

    This Python body runs only with ``NUMBA_DISABLE_JIT=1``; compiled code uses the
    ``@overload`` below (fused float32 version, or libm for float64).
    """
    mx = np.maximum(m, S.max(axis=1, initial=NEG_INF))
    nan_rows = np.isnan(S).any(axis=1)
    mx[nan_rows] = np.nan
    m_use = np.where(mx == NEG_INF, 0, mx).astype(S.dtype)
    alpha[:] = np.exp(m - m_use)
    P[...] = np.exp(S - m_use[:, None])
    l[:] = alpha * l + P.sum(axis=1)
    m[:] = mx


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _softmax_block_f32(S, m, l, alpha, P):
    """Two vectorized passes per row (16 float32 lanes with AVX-512).

    1. The max, as the max of order-preserving int32 keys of the floats (integer max
       reductions vectorize; a float max reduction does not without ``nnan``). A NaN
       score has the largest key, so it becomes the row's max and the row turns NaN,
       as in the reference.
    2. ``p = 2^x`` with ``x = (s - m) log2 e``: ``2^floor(x)`` from exponent bits,
       ``2^frac`` from the polynomial :data:`~fa_lab.kernels.common.EXP2_COEFFS`; scores below -87 give exactly
       0 (masked keys). The row sum is taken in the same pass.
    """
    br, bc = S.shape
    for r in range(br):
        Sr, Pr = S[r], P[r]
        top = np.int32(-2147483648)
        for c in range(bc):
            i = f32_bits(Sr[c])
            top = max(top, np.int32(i ^ ((i >> np.int32(31)) & np.int32(0x7FFFFFFF))))
        x = bits_f32(top ^ ((top >> np.int32(31)) & np.int32(0x7FFFFFFF)))
        mx = x if (x > m[r] or x != x) else m[r]
        m_use = mx if mx != NEG_INF else np.float32(0)
        a = math.exp(m[r] - m_use)
        s = np.float32(0)
        for c in range(bc):
            y = Sr[c] - m_use
            t = max(y * LOG2E, np.float32(-126.0))
            ti = np.floor(t)
            f = t - ti
            p = exp2_poly(f) * bits_f32((np.int32(ti) + np.int32(127)) << np.int32(23))
            p = p if y >= np.float32(-87.0) else (np.float32(0) if y < np.float32(-87.0) else y)
            Pr[c] = p
            s += p
        l[r] = a * l[r] + s
        alpha[r] = a
        m[r] = mx


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _softmax_block_libm(S, m, l, alpha, P):
    br, bc = S.shape
    for r in range(br):
        Sr, Pr = S[r], P[r]
        mx = m[r]
        for c in range(bc):
            if Sr[c] > mx or Sr[c] != Sr[c]:
                mx = Sr[c]
        m_use = mx if mx != NEG_INF else S.dtype.type(0)
        a = math.exp(m[r] - m_use)
        s = S.dtype.type(0)
        for c in range(bc):
            Pr[c] = math.exp(Sr[c] - m_use)
            s += Pr[c]
        l[r] = a * l[r] + s
        alpha[r] = a
        m[r] = mx


@overload(softmax_block)
def _softmax_block_overload(S, m, l, alpha, P):
    if S.dtype.name == "float32":
        return lambda S, m, l, alpha, P: _softmax_block_f32(S, m, l, alpha, P)
    return lambda S, m, l, alpha, P: _softmax_block_libm(S, m, l, alpha, P)


@njit(cache=CACHE, error_model="numpy")
def all_finite(X):
    """True if the 2-D block ``X`` holds no NaN or inf: counts the elements that fail
    ``|x| < inf`` (false for both). An integer reduction, so it vectorizes without
    fastmath flags (with ``reassoc``, a float ``sum(x - x)`` version was folded to 0)."""
    inf = X.dtype.type(np.inf)
    bad = 0
    for r in range(X.shape[0]):
        Xr = X[r]
        for t in range(X.shape[1]):
            bad += 0 if abs(Xr[t]) < inf else 1
    return bad == 0


@njit(cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def pv_select(S, P, Vj, PV):
    """``PV = P Vj`` skipping the keys whose score is ``-inf`` (hidden), row by row: the
    fallback for a masked block whose ``Vj`` holds NaN or inf, where BLAS would compute
    ``0 * NaN = NaN`` for rows that cannot see that key."""
    br, bc = P.shape
    for r in range(br):
        Sr, Pr, PVr = S[r], P[r], PV[r]
        PVr[:] = 0
        for c in range(bc):
            if Sr[c] == NEG_INF:
                continue
            p = Pr[c]
            Vc = Vj[c]
            for t in range(PVr.shape[0]):
                PVr[t] += p * Vc[t]


@njit(cache=CACHE)
def kv_tile(Qi, Kj, Vj, j0, bias, has_bias, b, h, i0, causal, offset, mods, state, scratch,
            stage):
    """One key tile ``Kj, Vj`` (keys ``j0 ..``) of FlashAttention-2's loop for the (already
    scaled) query block ``Qi`` (rows ``i0 ..``): ``S = Qi Kj^T`` (BLAS, into a reused
    buffer), the score modifiers and masks, the online softmax, ``acc = alpha acc + P Vj``.
    The tile step of :func:`q_block` and of the paged and varlen layouts.

    ``mods = (left, right, softcap, slopes, has_alibi)`` (:mod:`fa_lab.numerics.scoremod`),
    ``state = (m, l, alpha, acc)`` (the running row state), ``scratch = (S_buf, P_buf,
    PV, Vpack)`` (this task's buffers, ``Br x Bc``, ``Br x d`` and, for the ``P V``
    micro-kernel only, ``Bc x d``: :mod:`.pv_product`). ``stage`` < ``Stage.FULL``
    (:class:`~fa_lab.kernels.common.Stage`) stops the tile early, for the time breakdown
    only: 0 = nothing, 1 = + ``S`` and masking, 2 = + softmax, 3 = + ``P Vj``.
    """
    left, right, softcap, slopes, has_alibi = mods
    m, l, alpha, acc = state
    S_buf, P_buf, PV, Vpack = scratch
    br, bc = Qi.shape[0], Kj.shape[0]
    if stage < 1:
        return
    S = S_buf[:br * bc].reshape((br, bc))
    np.dot(Qi, Kj.T, S)  # BLAS, into a reused buffer
    if softcap > 0 or has_alibi:
        softcap_alibi_block(S, softcap, slopes, has_alibi, b, h, i0, j0, offset,
                            S_buf[:0].reshape((0, 0)))
    diagonal = causal and j0 + bc > i0 + offset + 1
    if has_bias or diagonal:
        mask_block(S, bias, has_bias, b, h, i0, j0, diagonal, offset)
    cut = window_cuts(i0, br, j0, bc, offset, left, right)
    if cut:
        window_block(S, i0, j0, offset, left, right)
    if stage < 2:
        return
    P = P_buf[:br * bc].reshape((br, bc))
    softmax_block(S, m, l, alpha, P)
    if stage < 3:
        return
    if (has_bias or diagonal or cut) and not all_finite(Vj):
        pv_select(S, P, Vj, PV)  # a hidden NaN/inf value must not reach any row
        rescale_add(acc, alpha, PV)
    else:  # BLAS, or the micro-kernel when Vpack is allocated (pv_product)
        pv_product(P_buf, P, Vj, PV, Vpack, alpha, acc)


@njit(cache=CACHE)
def row_state(br, d, dtype_of, block_kv, pack=False):
    """A query block's running state ``(m, l, alpha, acc)`` and scratch ``(S_buf, P_buf,
    PV, Vpack)`` for :func:`kv_tile`, in ``dtype_of``'s dtype (counted by
    :func:`scratch_bytes`); ``Vpack`` (``Bc x d``) only with ``pack`` (the ``P V``
    micro-kernel: :mod:`.pv_product`), else empty (BLAS)."""
    state = (np.full(br, NEG_INF, dtype=dtype_of.dtype), np.zeros(br, dtype=dtype_of.dtype),
             np.empty(br, dtype=dtype_of.dtype), np.zeros((br, d), dtype=dtype_of.dtype))
    scratch = (np.empty(br * block_kv, dtype=dtype_of.dtype),
               np.empty(br * block_kv, dtype=dtype_of.dtype),
               np.empty((br, d), dtype=dtype_of.dtype),
               np.empty(block_kv * d if pack else 0, dtype=dtype_of.dtype))
    return state, scratch


@njit(cache=CACHE)
def q_block(Qi, K, V, bias, has_bias, b, h, i0, causal, offset, j_begin, j_end, block_kv,
            Oi, lse_i, stage, left=-1, right=-1, softcap=0.0, slopes=None, has_alibi=False,
            pack=False):
    """Key blocks ``j_begin .. j_end`` (clipped to what causal lets the block see) for one
    (already scaled) query block ``Qi``; writes ``O = acc / l`` and ``lse``.

    ``stage`` < ``Stage.FULL`` (:class:`~fa_lab.kernels.common.Stage`) stops each block early, for the time breakdown only
    (:func:`fa_lab.tools.bench.studies.breakdown`; the output is then meaningless): 0 = the loop
    alone, 1 = + ``S = Qi Kj^T`` and masking, 2 = + softmax, 3 = + ``P Vj`` and the
    rescale (the kernel).

    ``left, right, softcap, slopes, has_alibi``: :mod:`fa_lab.numerics.scoremod`; key blocks
    outside the window band are skipped, as those past the causal diagonal.
    """
    br = Qi.shape[0]
    state, scratch = row_state(br, V.shape[1], Qi, block_kv, pack)  # acc: d_v columns
    mods = (left, right, softcap, slopes, has_alibi)
    j_lo, j_hi = window_keys(i0, br, K.shape[0], causal, offset, left, right, block_kv)
    for j0 in range(max(j_begin, j_lo), min(j_end, j_hi), block_kv):
        bc = min(block_kv, j_end - j0)
        kv_tile(Qi, K[j0:j0 + bc], V[j0:j0 + bc], j0, bias, has_bias, b, h, i0, causal, offset,
                mods, state, scratch, stage)
    m, l, _, acc = state
    for r in range(br):
        lse_i[r] = finalize_row(acc[r], m[r], l[r], Oi[r])


@njit(cache=CACHE, parallel=True, nogil=True)
def flash_forward(q, k, v, bias, has_bias, scale, causal, offset, block_q, block_kv, out, lse,
                  stage=3, kv_len=-1, left=-1, right=-1, softcap=0.0, slopes=None,
                  has_alibi=False, pack=False):
    """Parallel driver over (b, h, query block), as ``tiled_simd`` (``stage``: see
    :func:`q_block`; ``kv_len`` >= 0 uses only the first ``kv_len`` keys of ``k`` and
    ``v``, e.g. the filled part of a preallocated KV cache, without copying; ``pack``:
    ``P V`` by fa_lab's micro-kernel instead of BLAS, :mod:`.pv_product`)."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2] if kv_len < 0 else kv_len
    group = H // k.shape[1]
    Tr = (Nq + block_q - 1) // block_q
    for task in prange(B * H * Tr):
        b, h, i0 = task_coords(task, H, Tr, block_q)
        i1 = min(i0 + block_q, Nq)
        Qi = q[b, h, i0:i1] * scale  # scores = (q * scale) k^T: one multiply per q element
        q_block(Qi, k[b, h // group, :Nk], v[b, h // group, :Nk], bias, has_bias, b, h, i0,
                 causal, offset, 0, Nk, block_kv, out[b, h, i0:i1], lse[b, h, i0:i1], stage,
                 left, right, softcap, slopes, has_alibi, pack)


@njit(cache=CACHE, parallel=True, nogil=True)
def flash_splitkv_forward(q, k, v, bias, has_bias, scale, causal, offset, block_q, block_kv,
                          splits, out, lse, kv_len=-1, left=-1, right=-1, softcap=0.0,
                          slopes=None, has_alibi=False):
    """Flash-Decoding: each (b, h, query block) is also split along the keys.

    Pass 1 (prange over ``B * H * Tr * splits``): split ``s`` attends to its own range
    of key blocks and writes a normalized partial output ``O_s`` and its ``lse_s``.
    Pass 2 (prange over rows): the exact merge ``lse = log sum_s exp(lse_s)``,
    ``O = sum_s exp(lse_s - lse) O_s``. A split that sees no key has ``lse_s = -inf``
    and weight 0; a row that sees none at all gets ``O = 0``, ``lse = -inf``.
    """
    B, H, Nq, _ = q.shape
    Nk = k.shape[2] if kv_len < 0 else kv_len
    group = H // k.shape[1]
    Tr = (Nq + block_q - 1) // block_q
    Tc = (Nk + block_kv - 1) // block_kv
    per = (Tc + splits - 1) // splits  # key blocks per split
    part_o = np.empty((splits, B, H, Nq, v.shape[3]), dtype=q.dtype)
    part_lse = np.empty((splits, B, H, Nq), dtype=q.dtype)
    for task in prange(B * H * Tr * splits):
        s = task % splits
        b, h, i0 = task_coords(task // splits, H, Tr, block_q)
        i1 = min(i0 + block_q, Nq)
        q_block(q[b, h, i0:i1] * scale, k[b, h // group, :Nk], v[b, h // group, :Nk], bias,
                 has_bias, b, h, i0, causal, offset, min(s * per * block_kv, Nk),
                 min((s + 1) * per * block_kv, Nk), block_kv, part_o[s, b, h, i0:i1],
                 part_lse[s, b, h, i0:i1], 3, left, right, softcap, slopes, has_alibi)
    merge_splits(part_o, part_lse, out, lse)


def plan_splits(B, H, Nq, Nk, block_q, block_kv, threads) -> int:
    """How many key ranges Flash-Decoding uses: 1 (no split) when the (b, h, query
    block) tasks already give every thread ``config.SPLIT_TASKS_PER_THREAD`` of them, else
    enough splits for that, each at least ``config.SPLIT_MIN_KEYS`` keys long (both read
    at each call, so a lesson can change them)."""
    tasks = B * H * -(-Nq // block_q)
    want = config.SPLIT_TASKS_PER_THREAD * threads
    if tasks == 0 or tasks >= want:
        return 1
    most = max(1, Nk // max(config.SPLIT_MIN_KEYS, block_kv))
    return int(max(1, min(-(-want // tasks), most)))
