"""flex_attention: score_mod / mask_mod in Python, compiled into flash's tiles; block
masks checked tile by tile; the hand-written variants against their function forms;
PyTorch's FlexAttention (eager) on the same functions when torch is installed."""

import math

import numpy as np
import pytest

import fa_lab
from fa_lab.numerics.flex import EMPTY, FULL, PARTIAL, reference_flex_attention

B, H, H_KV, N, D = 2, 4, 2, 77, 16
RNG = np.random.default_rng(0)
SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])
DOCS = np.repeat(np.arange(5), [10, 30, 1, 20, 16])  # packed documents, ragged
REL = RNG.standard_normal((H, 2 * N - 1))  # a learned relative-position bias table
WINDOW, PREFIX = 9, 13


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(b, h, q_idx, kv_idx):
    return q_idx - kv_idx <= WINDOW and q_idx >= kv_idx


def prefix_lm(b, h, q_idx, kv_idx):
    return kv_idx < PREFIX or q_idx >= kv_idx


def documents(b, h, q_idx, kv_idx):
    return DOCS[q_idx] == DOCS[kv_idx] and q_idx >= kv_idx


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * abs(q_idx - kv_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return 2.0 * math.tanh(score / 2.0)


def relative(score, b, h, q_idx, kv_idx):
    return score + REL[h, q_idx - kv_idx + N - 1]


def per_batch(score, b, h, q_idx, kv_idx):
    return score * (1.0 + b) if q_idx % 3 == 0 else score


CASES = [  # (score_mod, mask_mod): at least eight functions, several closing over arrays
    (None, None), (None, causal), (alibi, None), (alibi, causal), (softcap, window),
    (relative, prefix_lm), (None, documents), (per_batch, documents), (softcap, None),
]


def _inputs(dtype=np.float64, d_v=D, seed=1):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, N, D)).astype(dtype)
    k = rng.standard_normal((B, H_KV, N, D)).astype(dtype)
    v = rng.standard_normal((B, H_KV, N, d_v)).astype(dtype)
    return q, k, v


def _name(case):
    return "-".join(getattr(f, "__name__", "none") for f in case)


@pytest.mark.parametrize("case, block", [(c, 16) for c in CASES] + [(CASES[7], (8, 32))],
                         ids=lambda x: _name(x) if isinstance(x, tuple) and len(x) == 2 and
                         not isinstance(x[0], int) else str(x))
def test_flex_matches_the_float64_reference(case, block):
    score_mod, mask_mod = case
    q, k, v = _inputs()
    mask = None if mask_mod is None else fa_lab.create_block_mask(mask_mod, None, None, N, N,
                                                                  BLOCK_SIZE=block)
    out, lse = fa_lab.flex_attention(q, k, v, score_mod=score_mod, block_mask=mask,
                                     enable_gqa=True, return_lse=True)
    exp, exp_lse = reference_flex_attention(q, k, v, score_mod, mask_mod)
    np.testing.assert_allclose(out, exp, atol=1e-12, rtol=1e-12)
    np.testing.assert_allclose(lse, exp_lse, atol=1e-12, rtol=1e-12)


def test_flex_in_float32_with_a_value_head_dim_of_its_own():
    q, k, v = _inputs(np.float32, d_v=5)
    mask = fa_lab.create_block_mask(documents, None, None, N, N, BLOCK_SIZE=16)
    out = fa_lab.flex_attention(q, k, v, score_mod=alibi, block_mask=mask, enable_gqa=True)
    exp, _ = reference_flex_attention(q, k, v, alibi, documents)
    assert out.shape == (B, H, N, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out, exp, atol=2e-6)


@pytest.mark.parametrize("mask_mod", [causal, window, prefix_lm, documents], ids=lambda f: f.__name__)
@pytest.mark.parametrize("block", [16, (8, 32), 128])
def test_block_masks_are_classified_tile_by_tile(mask_mod, block):
    Nk = N if mask_mod is documents else N + 3  # DOCS has N entries
    bm = fa_lab.create_block_mask(mask_mod, None, None, N, Nk, BLOCK_SIZE=block)
    dense = np.array([[mask_mod(0, 0, i, j) for j in range(Nk)] for i in range(N)])
    np.testing.assert_array_equal(bm.dense()[0, 0], dense)
    bq, bk = (block, block) if isinstance(block, int) else block
    for t in range(bm.shape[2]):
        for u in range(bm.shape[3]):
            tile = dense[t * bq:(t + 1) * bq, u * bk:(u + 1) * bk]
            want = EMPTY if not tile.any() else (FULL if tile.all() else PARTIAL)
            assert bm.kinds[0, 0, t, u] == want, (t, u)
    assert bm.sparsity() == pytest.approx(100 * np.mean(bm.kinds == EMPTY))


def test_block_masks_per_batch_and_head_and_their_combinators():
    def by_head(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + h

    bm = fa_lab.create_block_mask(by_head, None, H, N, N, BLOCK_SIZE=16)
    assert bm.shape[:2] == (1, H)
    assert not np.array_equal(bm.kinds[0, 0], bm.kinds[0, 3])
    q, k, v = _inputs()
    out = fa_lab.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    np.testing.assert_allclose(out, reference_flex_attention(q, k, v, None, by_head)[0],
                               atol=1e-12)
    both = fa_lab.and_masks(causal, window)
    either = fa_lab.or_masks(prefix_lm, causal)
    for fn, want in ((both, window), (either, prefix_lm)):
        got = fa_lab.create_block_mask(fn, None, None, N, N, BLOCK_SIZE=16).dense()
        ref = fa_lab.create_block_mask(want, None, None, N, N, BLOCK_SIZE=16).dense()
        np.testing.assert_array_equal(got, ref)


def test_the_hand_written_variants_equal_their_function_forms():
    q, k, v = _inputs()
    w = fa_lab.create_block_mask(window, None, None, N, N, BLOCK_SIZE=16)
    c = fa_lab.create_block_mask(causal, None, None, N, N, BLOCK_SIZE=16)
    pairs = [
        (fa_lab.attention(q, k, v, causal=True),
         fa_lab.flex_attention(q, k, v, block_mask=c, enable_gqa=True)),
        (fa_lab.attention(q, k, v, causal=True, window=(WINDOW, 0)),
         fa_lab.flex_attention(q, k, v, block_mask=w, enable_gqa=True)),
        (fa_lab.attention(q, k, v, softcap=2.0),
         fa_lab.flex_attention(q, k, v, score_mod=softcap, enable_gqa=True)),
        (fa_lab.attention(q, k, v, causal=True, alibi_slopes=SLOPES),
         fa_lab.flex_attention(q, k, v, score_mod=alibi, block_mask=c, enable_gqa=True)),
    ]
    for hand, flex in pairs:
        np.testing.assert_allclose(flex, hand, atol=1e-12)


def test_a_read_past_a_captured_array_raises_instead_of_reading_garbage():
    with pytest.raises(IndexError):
        fa_lab.create_block_mask(documents, None, None, N, N + 3, BLOCK_SIZE=16)


def test_a_row_that_sees_nothing_is_zero():
    def nothing_for_row_5(b, h, q_idx, kv_idx):
        return q_idx != 5

    q, k, v = _inputs()
    bm = fa_lab.create_block_mask(nothing_for_row_5, None, None, N, N, BLOCK_SIZE=16)
    out, lse = fa_lab.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
    assert np.all(out[:, :, 5] == 0) and np.all(lse[:, :, 5] == -np.inf)


@pytest.mark.parametrize("kw, error, match", [
    (dict(score_mod=3), TypeError, "score_mod must be a function"),
    (dict(score_mod=lambda s, b, h: s), TypeError, r"score_mod must take 5 arguments"),
    (dict(score_mod=lambda s, b, h, i, j: {"x": s}["x"] + "a"), TypeError,
     "score_mod: numba cannot compile"),
    (dict(block_mask="causal"), TypeError, "block_mask must come from"),
    (dict(enable_gqa=False), ValueError, "enable_gqa=True"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(windw=3), TypeError, "windw"),
])
def test_bad_input_names_the_argument(kw, error, match):
    q, k, v = _inputs()
    kw = {"enable_gqa": True, **kw}
    with pytest.raises(error, match=match):
        fa_lab.flex_attention(q, k, v, **kw)


def test_a_block_mask_for_other_lengths_is_refused():
    q, k, v = _inputs()
    bm = fa_lab.create_block_mask(causal, None, None, N + 1, N)
    with pytest.raises(ValueError, match="block_mask was made for Q_LEN"):
        fa_lab.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    with pytest.raises(TypeError, match="mask_mod must take 4 arguments"):
        fa_lab.create_block_mask(alibi, None, None, N, N)
    with pytest.raises(ValueError, match="Q_LEN must be a positive int"):
        fa_lab.create_block_mask(causal, None, None, 0, N)


def test_pytorch_flex_attention_agrees_on_the_same_functions():
    torch = pytest.importorskip("torch")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def t_alibi(score, b, h, q_idx, kv_idx):  # arithmetic only: runs on tensors and scalars
        return score - (h + 1) * 0.125 * abs(q_idx - kv_idx)

    q, k, v = _inputs(np.float32)
    bm = fa_lab.create_block_mask(causal, None, None, N, N, BLOCK_SIZE=16)
    mine = fa_lab.flex_attention(q, k, v, score_mod=t_alibi, block_mask=bm, enable_gqa=True)
    tbm = create_block_mask(causal, None, None, N, N, device="cpu")
    theirs = flex_attention(*(torch.from_numpy(x) for x in (q, k, v)), score_mod=t_alibi,
                            block_mask=tbm, enable_gqa=True).numpy()
    np.testing.assert_allclose(mine, theirs, atol=2e-5)


# --- lesson 15's checked exercises: the solutions, and what a wrong attempt is told -----

SOLUTIONS = {
    "t5_bias": lambda score, b, h, q_idx, kv_idx: (score - 0.1 * (q_idx - kv_idx)
                                                   if kv_idx <= q_idx else score),
    "chunked_causal": lambda b, h, q_idx, kv_idx: (q_idx // 8 == kv_idx // 8
                                                   and kv_idx <= q_idx),
    "tanh_softcap": lambda score, b, h, q_idx, kv_idx: 5.0 * math.tanh(score / 5.0),
}


@pytest.mark.parametrize("name", list(SOLUTIONS))
def test_the_exercises_accept_their_solutions_and_explain_a_wrong_attempt(name):
    from fa_lab.lessons import flex_exercises

    assert flex_exercises.check(name, SOLUTIONS[name]).startswith("correct")
    arity = flex_exercises.EXERCISES[name][1]
    wrong = (lambda s, b, h, i, j: s) if arity == 5 else (lambda b, h, i, j: j <= i)
    said = flex_exercises.check(name, wrong)
    assert said.startswith("not yet: ") and ("expected" in said or "differs" in said)
    assert "not yet: " in flex_exercises.check(name, lambda: 0)  # wrong arity, explained


def test_stored_partial_tiles_and_per_element_calls_agree(monkeypatch):
    import dataclasses

    from fa_lab.numerics import flex as nflex

    q, k, v = _inputs()
    stored = fa_lab.create_block_mask(documents, None, None, N, N, BLOCK_SIZE=16)
    assert stored.partial_masks.shape[0] == stored.counts()["partial"] > 0
    monkeypatch.setattr(nflex, "STORED_MASK_BYTES", 0)  # too big to store: call mask_mod
    called = fa_lab.create_block_mask(documents, None, None, N, N, BLOCK_SIZE=16)
    assert called.partial_masks.shape[0] == 0 and np.all(called.partial_index == -1)
    bare = dataclasses.replace(stored, partial_masks=None, partial_index=None)
    outs = [fa_lab.flex_attention(q, k, v, score_mod=alibi, block_mask=m, enable_gqa=True)
            for m in (stored, called, bare)]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
