"""INT8 attention: Q and K quantized to int8, QK^T in int32, softmax and P V in float.

:func:`attention_int8` is :func:`fa_lab.attention` with quantized scores. Conventions
are the same (shapes, GQA, both causal alignments, masks, fully masked rows -> zeros and
``lse = -inf``) and so are the input checks, plus one: ``q`` and ``k`` must be finite
(INT8 has no NaN or infinity; a ``ValueError`` names the argument). NaN in ``v``
propagates to the rows that see it, as in float attention.

Smoothing K (``smooth_k=True``, SageAttention's trick): K's per-channel mean over the
tokens is subtracted before quantizing. In exact arithmetic this changes nothing:
``q_i . (k_j - mean) = q_i . k_j - q_i . mean``, and the second term is the same for
every key of row ``i``, a constant shift that softmax removes. It matters for INT8
because real keys share a large per-channel offset: without smoothing the offset
dominates ``max|K|``, so the scale is large and the part that differs between keys is
rounded away. Only the LSE moves, by ``scale * q_i . mean``; it is added back when
``return_lse=True`` (with the unquantized ``q``), so the LSE is that of the original
scores.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from fa_lab.settings import cpu_features
from fa_lab.numerics import quant
from fa_lab.numerics.buffers import aligned, empty64
from fa_lab.api import effective_blocks, prepare
from fa_lab.numerics.merge import apply_sinks
from fa_lab.numerics.checks import check_bool, check_choice
from fa_lab.registry import INT8_KERNELS, INT8_QUANTIZERS
from fa_lab.settings.tuning_file import measured_choice, measured_reason

#: ``pv_dtype`` values of :func:`attention_int8`.
PV_DTYPES = ("float32", "bfloat16")


def quantize_inputs(q4, k4, granularity, block_q, block_kv, smooth):
    """Quantize (B, H, N, d) ``q4`` and ``k4`` as :func:`attention_int8` does.

    Returns ``q8, sq, k8, sk, mean`` with per-row scales ``sq`` (B, H, Nq) and ``sk``
    (B, H_kv, Nk) as float64 and ``mean`` the subtracted K mean (or ``None``).
    Per block and per token run compiled and parallel (:data:`fa_lab.registry.INT8_QUANTIZERS`,
    the same values as :func:`fa_lab.numerics.quant.quantize`); per tensor uses NumPy.
    """
    def finite(name, x):
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: must be finite to quantize (INT8 has no NaN or "
                             f"infinity)")

    compiled = granularity != "per_tensor"  # checks finiteness while quantizing
    for name, x in (("q", q4), ("k", k4)):
        if not compiled or not x.size:
            finite(name, x)
    mean, k_in, k_mean = None, k4, None
    if smooth:
        if k4.shape[2] == 0:  # no key: nothing to smooth (and no mean of nothing)
            mean = np.zeros(k4.shape[:2] + (1, k4.shape[3]), k4.dtype)
        elif granularity == "per_tensor":
            k4, mean = quant.smooth_k(k4)
        else:  # the compiled quantizer subtracts the mean group by group
            B, Hk, Nk, d = k4.shape
            k4 = np.ascontiguousarray(k4)
            k_mean = np.empty((B * Hk, d), k4.dtype)
            INT8_QUANTIZERS.mean(k4.reshape(B * Hk, Nk, d), k_mean)
            mean = k_mean.reshape(B, Hk, 1, d)
    out = []
    for name, x, block in (("q", q4, block_q), ("k", k4, block_kv)):
        if granularity != "per_tensor" and x.size:
            B, Hx, N, d = x.shape
            xq, s = empty64(x.size, np.int8).reshape(x.shape), np.empty((B, Hx, N))
            rows = 1 if granularity == "per_token" else int(min(block, N))
            sub = k_mean if name == "k" and k_mean is not None else np.empty((0, d), x.dtype)
            under, bad = INT8_QUANTIZERS.blocks(np.ascontiguousarray(x).reshape(B * Hx, N, d),
                                                rows, xq.reshape(B * Hx, N, d),
                                                s.reshape(B * Hx, N), sub)
            if bad:
                finite(name, q4 if name == "q" else k_in)
                raise ValueError("k: overflows to infinity once its mean is subtracted; "
                                 "use smooth_k=False")
            if not under:
                out += [xq, s]
                continue  # else: the NumPy path below raises the scale error
            if sub.size:
                x = (x - mean).astype(x.dtype)
        try:
            xq, s = quant.quantize(x, granularity,
                                   block if granularity == "per_block" else None,
                                   scale_dtype=np.float64)  # beyond float32's range too
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        rows = np.ascontiguousarray(np.broadcast_to(s, x.shape[:-1] + (1,))[..., 0],
                                    dtype=np.float64)
        out += [aligned(xq), rows]
    return (*out, mean)


def _choose_int8(kernel, call, pv_dtype):
    """``(kernel, pv_dtype to run, why)`` for this call. An explicit kernel without
    bf16 P V refuses ``pv_dtype='bfloat16'`` (``NotImplementedError``). ``"auto"`` with
    ``pv_dtype='bfloat16'`` runs the INT8 kernel and ``P V`` precision measured fastest
    on this machine (:func:`fa_lab.tools.tune.tune_paths`; fp32 ``P V`` is allowed, it
    is the more accurate), else the rule (AMX tiles where the CPU has them)."""
    why = "given" if kernel != "auto" else "the fastest kernel that serves the call"
    if kernel == "auto" and pv_dtype == "bfloat16":
        serves = lambda c: c["kernel"] in INT8_KERNELS and not (  # noqa: E731
            INT8_KERNELS[c["kernel"]].unsupported(call.request)) and not (
            c["pv_dtype"] == "float32" and "bf16_pv" in INT8_KERNELS[c["kernel"]].tags) and (
            c["pv_dtype"] == "float32" or "pv_dtype" in INT8_KERNELS[c["kernel"]].tags)
        best = measured_choice("int8_pv", serves)
        if best:
            chosen = call.choose(best["kernel"], INT8_KERNELS)
            return chosen, best["pv_dtype"], measured_reason("int8_pv", best, serves)
    table = INT8_KERNELS
    if kernel == "auto" and pv_dtype == "float32":  # never a bf16-only P V unasked
        table = {n: k for n, k in INT8_KERNELS.items() if "bf16_pv" not in k.tags}
    chosen = call.choose(kernel, table)
    if pv_dtype != "float32" and "pv_dtype" not in chosen.tags and kernel != "auto":
        raise NotImplementedError(f"kernel {chosen.name!r} does not support "
                                  f"pv_dtype={pv_dtype!r} (only 'sage' and 'amx' do)")
    if pv_dtype == "float32" and "bf16_pv" in chosen.tags:
        raise NotImplementedError(f"kernel {chosen.name!r} computes P V in bf16 only: "
                                  "pass pv_dtype='bfloat16'")
    return chosen, pv_dtype, why


def plan_int8(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool | str = False,
              scale: float | None = None, mask: ArrayLike | None = None,
              kernel: str = "auto", block_q: int | None = None, block_kv: int | None = None,
              pv_dtype: str = "float32") -> dict:
    """What :func:`attention_int8` would run, without running it: the kernel, its
    tiles, the instruction paths this CPU gets (:mod:`fa_lab.settings.cpu_features`) and a note
    on any fallback (no VNNI: vpmaddwd; no AVX512-BF16: fp32 ``P V``; no AVX-512: the
    plain-loop ``simd`` kernel) and ``why`` this kernel and ``pv_dtype`` (the one that
    runs: ``"auto"`` may run fp32 ``P V`` where it was measured faster)."""
    check_choice("pv_dtype", pv_dtype, PV_DTYPES)
    call = prepare(q, k, v, causal=causal, scale=scale, mask=mask, block_q=block_q,
                   block_kv=block_kv)
    chosen, pv_dtype, why = _choose_int8(kernel, call, pv_dtype)
    bq, bk = effective_blocks(call.Nq, call.Nk, call.block_q, call.block_kv,
                              chosen.default_blocks)
    features = cpu_features.detect()
    uses = "pv_dtype" in chosen.tags
    score, pv = (features.score_path, features.pv_path(pv_dtype)) if uses else ("loops", "fp32")
    note = features.note(pv_dtype) if uses else (
        f"kernel {chosen.name!r}: plain loops, P V in the input dtype"
        + ("" if kernel != "auto" else f"; {features.note(pv_dtype)}"))
    if "bf16_pv" in chosen.tags:
        score, pv = "amx_int8", "amx_bf16"
        note = "Q K^T with tdpbssd, P V with tdpbf16ps (AMX tiles), the softmax in fp32 zmm"
    return {"kernel": chosen.name, "block_q": bq, "block_kv": bk, "score_path": score,
            "pv_path": pv, "pv_dtype": pv_dtype, "note": note, "why": why}


def attention_int8(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool | str = False,
                   scale: float | None = None, mask: ArrayLike | None = None,
                   granularity: str = "per_block", smooth_k: bool = True,
                   kernel: str = "auto", block_q: int | None = None,
                   block_kv: int | None = None, return_lse: bool = False,
                   pv_dtype: str = "float32",
                   sinks: ArrayLike | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention with INT8 ``Q`` and ``K`` (symmetric, see :mod:`fa_lab.numerics.quant`).

    Parameters as :func:`fa_lab.attention`, plus:

    granularity : "per_tensor", "per_token" or "per_block" (default)
        Scale groups of Q and K. ``"per_block"`` uses the kernel's tiles: ``block_q``
        rows of Q and ``block_kv`` rows of K per scale (``Br``, ``Bc``; for the untiled
        ``naive`` kernel, the :mod:`fa_lab.settings.config` defaults).
    smooth_k : bool
        Subtract K's per-channel mean before quantizing (exact for the output; LSE
        corrected).
    kernel : "auto" or a name in :data:`fa_lab.INT8_KERNELS`
        ``"auto"``: for ``pv_dtype="bfloat16"``, the kernel and ``P V`` precision measured
        fastest on this machine if ``python -m fa_lab tune`` ran here (fp32 ``P V`` where
        bf16 is slower), else ``amx`` (AMX tiles) on a CPU with AMX,
        else ``sage`` (micro-kernels) for float32 on a CPU with AVX-512, else ``simd`` (a
        ``KernelFallbackWarning`` says why); :func:`plan_int8` tells.
    pv_dtype : "float32" (default) or "bfloat16"
        Precision of ``P V`` in ``sage``: ``P`` rounded to bf16 after the softmax and
        ``V`` stored bf16, products accumulated in fp32 (``vdpbf16ps``). On a CPU
        without AVX512-BF16 it runs in fp32 (see :func:`plan_int8`). ``amx`` computes
        ``P V`` in bf16 only (``tdpbf16ps``) and refuses ``"float32"``. Other kernels
        compute ``P V`` in the input dtype: an explicit one refuses ``"bfloat16"``.

    sinks : (H,) or (..., H), optional: attention sinks (:func:`fa_lab.attention`),
        merged with the true LSE (after the smoothing's correction)

    Returns ``out`` (q's dtype) and, with ``return_lse``, ``lse``.
    """
    call = prepare(q, k, v, causal=causal, scale=scale, mask=mask, block_q=block_q,
                   block_kv=block_kv, sinks=sinks)
    return_lse = check_bool("return_lse", return_lse)
    check_choice("pv_dtype", pv_dtype, PV_DTYPES)
    chosen, pv_dtype, _ = _choose_int8(kernel, call, pv_dtype)
    check_choice("granularity", granularity, quant.GRANULARITIES)
    smooth_k = check_bool("smooth_k", smooth_k)
    if call.empty:
        out, lse = np.zeros(call.q.shape, call.q.dtype), np.zeros(call.q.shape[:-1], call.q.dtype)
        return (out, lse) if return_lse else out
    bq, bk = effective_blocks(call.Nq, call.Nk, call.block_q, call.block_kv,
                              chosen.default_blocks)
    q8, sq, k8, sk, mean = quantize_inputs(call.q4, call.k4, granularity, bq, bk, smooth_k)
    extra = {"pv_dtype": pv_dtype} if "pv_dtype" in chosen.tags else {}
    out, lse = call.run(chosen.name, table=INT8_KERNELS, arrays=(q8, sq, k8, sk, call.v4),
                        block_q=bq, block_kv=bk, warn=False, with_sinks=False, **extra)
    with_sinks = call.sinks is not None
    if (return_lse or with_sinks) and mean is not None and call.Nk:
        group = call.H // call.H_kv
        shift = np.einsum("bhnd,bhd->bhn", call.q4.astype(np.float64),
                          np.repeat(mean[:, :, 0, :].astype(np.float64), group, axis=1))
        lse = (lse + call.scale * shift.reshape(lse.shape)).astype(lse.dtype)
    if with_sinks:
        B, H = call.sinks.shape
        out, lse = apply_sinks(out.reshape(B, H, call.Nq, -1), lse.reshape(B, H, call.Nq),
                               call.sinks[:, :, None])
    out, lse = out.reshape(call.q.shape), lse.reshape(call.q.shape[:-1])
    return (out, lse) if return_lse else out
