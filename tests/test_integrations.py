"""fa_lab in real models: the torch adapter (autograd, half precision), transformers
registration (MiniLM, a GQA Llama with caches, GPT-2), half-precision NumPy inputs."""

import copy

import numpy as np
import pytest

import fa_lab
from fa_lab.numerics import reference
from fa_lab.numerics.testing import AWKWARD_CASES, Case, ToleranceError, assert_close

torch = pytest.importorskip("torch", reason="torch not installed (make test TORCH=0)")
from fa_lab.integrations import torch as ft  # noqa: E402

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes not installed (the models extra)")
HALF = [np.float16, ml_dtypes.bfloat16]


# --- half precision in fa_lab.attention -------------------------------------------------

@pytest.mark.parametrize("half", HALF, ids=["f16", "bf16"])
@pytest.mark.parametrize("case", AWKWARD_CASES[:8] + AWKWARD_CASES[-3:], ids=lambda c: c.id)
def test_half_inputs_meet_the_half_rule_in_every_kernel(half, case):
    q, k, v = (x.astype(half) for x in case.inputs(np.float64, seed=3))
    expected, _ = reference.attention(q, k, v, causal=case.causal)
    baseline, _ = reference.attention_half(q, k, v, dtype=half, causal=case.causal)
    for name in fa_lab.KERNELS:
        kw = {"block_q": case.block_q, "block_kv": case.block_kv} if (
            fa_lab.KERNELS[name].tiled and case.block_q) else {}
        out, lse = fa_lab.attention(q, k, v, causal=case.causal, kernel=name, return_lse=True, **kw)
        assert out.dtype == np.dtype(half) and lse.dtype == np.dtype(half)
        assert_close(out, expected, baseline=baseline, what=f"{name} {np.dtype(half).name}",
                     magnitude=np.abs(v.astype(np.float32)).max())


def test_half_rule_can_fail_and_mixed_halves_are_refused():
    q, k, v = (x.astype(np.float16) for x in Case(Nq=33, d=16).inputs(np.float64))
    expected, _ = reference.attention(q, k, v)
    baseline, _ = reference.attention_half(q, k, v, dtype=np.float16)
    out = fa_lab.attention(q, k, v)
    bad = out.copy()
    bad[0, 0, 5, 3] += np.float16(0.05)
    with pytest.raises(ToleranceError, match=r"index \(0, 0, 5, 3\)"):
        assert_close(bad, expected, baseline=baseline, magnitude=1.0)
    with pytest.raises(TypeError, match="k"):
        fa_lab.attention(q, k.astype(np.float32), v)
    assert fa_lab.plan(q, k, v)["kernel"] == "flash"


# --- the torch adapter ------------------------------------------------------------------

def _t(x, dtype=torch.float64, grad=False):
    return torch.tensor(x, dtype=dtype, requires_grad=grad)


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_gradcheck_float64_with_gqa_and_masks(causal):
    q, k, v = Case(B=1, H=4, H_kv=2, Nq=5, Nk=7, d=3).inputs(np.float64, seed=1)
    mask = np.ones((5, 7), bool)
    mask[2, :3] = False
    tq, tk, tv = (_t(x, grad=True) for x in (q, k, v))
    fn = lambda a, b, c: ft.attention(a, b, c, causal=causal, mask=torch.from_numpy(mask))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (tq, tk, tv))


def test_float32_gradients_equal_sdpa():
    q, k, v = Case(B=2, H=4, H_kv=2, Nq=33, Nk=33, d=16).inputs(np.float32, seed=2)
    dout = torch.randn(2, 4, 33, 16, generator=torch.Generator().manual_seed(0))
    grads = []
    for impl in ("fa_lab", "sdpa"):
        tq, tk, tv = (_t(x, torch.float32, True) for x in (q, k, v))
        if impl == "fa_lab":
            out = ft.attention(tq, tk, tv, causal=True)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                                   enable_gqa=True)
        out.backward(dout)
        grads.append([t.grad for t in (tq, tk, tv)])
    for mine, theirs in zip(*grads):
        assert (mine - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_dtypes_in_and_out(dtype):
    q, k, v = Case(B=1, H=2, Nq=17, Nk=9, d=8).inputs(np.float64, seed=4)
    tq, tk, tv = (_t(x, dtype) for x in (q, k, v))
    out, lse = ft.attention(tq, tk, tv, causal="bottom_right", return_lse=True)
    assert out.dtype == dtype and lse.dtype == dtype and out.shape == tq.shape
    expected, _ = reference.attention(*(t.to(torch.float64).numpy() for t in (tq, tk, tv)),
                                      causal="bottom_right")
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    assert np.abs(out.to(torch.float64).numpy() - expected).max() <= tol


def test_float32_inputs_are_shared_not_copied():
    q = torch.randn(1, 2, 8, 4)
    assert np.shares_memory(ft.to_numpy(q), q.numpy())


def test_torch_adapter_bad_input_names_the_argument():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        ft.attention(q, q.numpy(), q)
    with pytest.raises(TypeError, match="q must be float32"):
        ft.attention(q.to(torch.int32), q, q)
    with pytest.raises(TypeError, match="v torch.float64"):
        ft.attention(q, q, q.double())
    with pytest.raises(TypeError, match="mask must be a bool or float"):
        ft.attention(q, q, q, mask=torch.ones(8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="scale|mask|causal"):
        ft.attention(q, q, q, causal="sideways")


# --- transformers -----------------------------------------------------------------------

transformers = pytest.importorskip("transformers", reason="transformers not installed "
                                   "(the models extra; make test MODELS=0 skips it)")
from fa_lab.integrations.transformers import register  # noqa: E402


@pytest.fixture(scope="module")
def registered():
    return register()


def _pair(cls, config, name):
    a, b = copy.deepcopy(config), copy.deepcopy(config)
    a._attn_implementation, b._attn_implementation = "sdpa", name
    torch.manual_seed(0)
    ref = cls(a).eval()
    mine = cls(b).eval()
    mine.load_state_dict(ref.state_dict())
    return ref, mine


@pytest.mark.parametrize("cache", [None, "static"])
def test_gqa_llama_generates_sdpas_tokens_with_left_padding(registered, cache):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    ref, mine = _pair(transformers.LlamaForCausalLM, cfg, registered)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    att = torch.ones_like(ids)
    att[0, :3] = 0  # left padding
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    if cache:
        kw["cache_implementation"] = cache
    a = ref.generate(ids, attention_mask=att, **kw)
    b = mine.generate(ids, attention_mask=att, **kw)
    assert torch.equal(a, b)
    assert len(set(a[:, 10:].flatten().tolist())) > 2  # varied tokens, not one repeated


def test_gpt2_padded_logits_match_sdpa(registered):
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    ref, mine = _pair(transformers.GPT2LMHeadModel, cfg, registered)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    att = torch.ones_like(ids)
    att[1, :4] = 0
    with torch.no_grad():
        a, b = ref(ids, attention_mask=att).logits, mine(ids, attention_mask=att).logits
    assert (a - b)[att.bool()].abs().max().item() <= 1e-4


def test_output_attentions_is_refused(registered):
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    _, mine = _pair(transformers.GPT2LMHeadModel, cfg, registered)
    with pytest.raises(ValueError, match="output_attentions"):
        mine(torch.randint(0, 50, (1, 5)), output_attentions=True)


def test_minilm_padded_batch_matches_sdpa(registered):
    from fa_lab.features import minilm

    try:
        path = minilm.model_dir()
    except ImportError as exc:
        pytest.skip(str(exc))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ref = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    mine = transformers.AutoModel.from_pretrained(path, attn_implementation=registered).eval()
    batch = tok(["a short one", "FlashAttention computes exact attention without storing the "
                 "full score matrix, one tile at a time."], padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all()  # really padded
    with torch.no_grad():
        a, b = ref(**batch).last_hidden_state, mine(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    assert (a - b)[valid].abs().max().item() <= 1e-4
    # the mask function is registered: padding is not ignored (without it, the short
    # sentence's valid tokens would attend to padding and differ by far more)
    int8 = register("fa_lab_int8_test", int8=True)
    q8 = transformers.AutoModel.from_pretrained(path, attn_implementation=int8).eval()
    with torch.no_grad():
        c = q8(**batch).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(a[valid], c[valid], dim=-1)
    assert cos.min().item() > 0.99


def test_register_refuses_names_transformers_reserves():
    with pytest.raises(ValueError, match="name must not contain 'flash'"):
        register("my_flash")
    with pytest.raises(TypeError, match="name"):
        register("")


# ---------------------------------------------------------------- what transformers passes

def _logits_and_tokens(model, ids, att):
    with torch.no_grad():
        logits = model(ids, attention_mask=att).logits
        tokens = model.generate(ids, attention_mask=att, max_new_tokens=8, do_sample=False,
                                pad_token_id=0)
    return logits, tokens


def _relative(a, b, att):
    a, b = a[att.bool()], b[att.bool()]
    return ((a - b).abs().max() / a.abs().max()).item()


SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256)


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_and_softcap_pass_through(registered, arch):
    # a left-padded batch of 30 tokens, longer than the window of 6: the window changes
    # the answer (checked below with the window switched off), and so does the softcap
    if arch == "mistral":
        cls, cfg = transformers.MistralForCausalLM, transformers.MistralConfig(
            **SMALL, sliding_window=6)
    else:
        cls, cfg = transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
            **SMALL, sliding_window=6, attn_logit_softcapping=0.5, query_pre_attn_scalar=16)
    eager_cfg = cfg.__class__(**cfg.to_dict())
    eager_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = cls(eager_cfg).eval()
    with torch.no_grad():  # weights large enough that the softcap and the window matter
        for p in ref.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    mine_cfg = cfg.__class__(**cfg.to_dict())
    mine_cfg._attn_implementation = registered
    mine = cls(mine_cfg).eval()
    mine.load_state_dict(ref.state_dict())
    ids = torch.randint(3, 96, (2, 30), generator=torch.Generator().manual_seed(3))
    att = torch.ones_like(ids)
    att[0, :5] = 0
    a, ta = _logits_and_tokens(ref, ids, att)
    b, tb = _logits_and_tokens(mine, ids, att)
    assert _relative(a, b, att) <= 1e-4
    assert torch.equal(ta, tb)
    # the features are live: without the window (and softcap), eager reads differently
    off_cfg = cfg.__class__(**{**cfg.to_dict(), "sliding_window": 4096,
                               **({"attn_logit_softcapping": None} if arch == "gemma2" else {})})
    off_cfg._attn_implementation = "eager"
    off = cls(off_cfg).eval()
    off.load_state_dict(ref.state_dict())
    with torch.no_grad():
        c = off(ids, attention_mask=att, use_cache=False).logits
    assert _relative(a, c, att) > 1e-2


def test_refused_and_unknown_keywords_raise(registered):
    from fa_lab.integrations.transformers import make_attention

    fn = make_attention()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="position_bias"):
        fn(None, q, q, q, None, position_bias=torch.zeros(2))
    with pytest.raises(TypeError, match="made_up_option"):
        fn(None, q, q, q, None, made_up_option=1)
    out, _ = fn(None, q, q, q, None, position_ids=torch.arange(4)[None], use_cache=False)
    assert out.shape == (1, 4, 2, 8)
