"""A model zoo: tiny random configurations of current architectures, each run with
transformers' ``eager`` attention and with fa_lab registered (lesson 11, the tests).

Every model is a 2-layer float32 model with random weights, scaled (x4 for matrices) so
that softcaps, windows and sinks change the answer; gpt-oss's sinks are drawn from
``N(1, 2^2)`` (its initialisation, ``N(0, 0.02^2)``, would leave them near 0). The batch is
left-padded, 30 tokens long, longer than every sliding window (6). :func:`compare`
gives the largest logit difference relative to the logits' range over the valid
tokens, and whether 8 greedy tokens agree; :func:`feature_effect` the same difference
between ``eager`` with and without the architecture's feature (0 for those without):
a zoo entry whose feature changed nothing would test nothing.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from fa_lab.integrations.torch import attention as torch_attention

#: Shared sizes (head_dim 16, GQA 4:2), the sliding window, the batch.
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
WINDOW, N_TOKENS, PAD, NEW_TOKENS = 6, 30, 5, 8
#: gpt-oss's YaRN scaling assumes its real context lengths: a plain RoPE at this size.
ROPE = {"rope_type": "default", "rope_theta": 150000.0}

#: architecture -> (model class name, config class name, config options, feature)
ZOO = {
    "Llama": ("LlamaForCausalLM", "LlamaConfig", dict(head_dim=16), "GQA, RoPE"),
    "Mistral": ("MistralForCausalLM", "MistralConfig", dict(head_dim=16, sliding_window=WINDOW),
                "sliding window"),
    "Qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(), "GQA, qkv biases"),
    "Qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=16), "q/k norm"),
    "Gemma": ("GemmaForCausalLM", "GemmaConfig", dict(head_dim=16), "GQA, RoPE"),
    "Gemma-2": ("Gemma2ForCausalLM", "Gemma2Config",
                dict(head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=0.5,
                     query_pre_attn_scalar=16), "softcap + sliding window"),
    "Gemma-3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
                dict(head_dim=16, sliding_window=WINDOW,
                     layer_types=["sliding_attention", "full_attention"]),
                "local / global layers"),
    "gpt-oss": ("GptOssForCausalLM", "GptOssConfig",
                dict(head_dim=16, intermediate_size=64, num_local_experts=4,
                     num_experts_per_tok=2, sliding_window=WINDOW, rope_parameters=ROPE,
                     layer_types=["full_attention", "full_attention"]), "attention sinks"),
    "gpt-oss (sliding)": ("GptOssForCausalLM", "GptOssConfig",
                          dict(head_dim=16, intermediate_size=64, num_local_experts=4,
                               num_experts_per_tok=2, sliding_window=WINDOW, rope_parameters=ROPE,
                               layer_types=["sliding_attention", "full_attention"]),
                          "sinks + sliding window"),
    "Phi-3": ("Phi3ForCausalLM", "Phi3Config", dict(pad_token_id=0, eos_token_id=1),
              "GQA, fused qkv"),
    "OLMo-2": ("Olmo2ForCausalLM", "Olmo2Config", dict(eos_token_id=1, pad_token_id=0),
               "q/k norm"),
    "DeepSeek-V3": ("DeepseekV3ForCausalLM", "DeepseekV3Config",
                    dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32,
                         qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                         n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                         first_k_dense_replace=1, moe_intermediate_size=32),
                    "MLA: d = 24, d_v = 16"),
    "GPT-2": ("GPT2LMHeadModel", "GPT2Config",
              dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                   eos_token_id=0), "learned positions, biases"),
}

#: The feature each architecture's "off" switch removes (config key -> value), or the
#: sinks (set to -inf) for gpt-oss.
FEATURE_OFF = {"Mistral": {"sliding_window": 4096},
               "Gemma-2": {"sliding_window": 4096, "attn_logit_softcapping": None},
               "Gemma-3": {"sliding_window": 4096},
               "gpt-oss": "sinks", "gpt-oss (sliding)": "sinks",
               "DeepSeek-V3": None}


def config(arch: str, attn: str):
    """The architecture's tiny config with attention implementation ``attn``."""
    import transformers

    if arch not in ZOO:
        raise ValueError(f"arch must be one of {sorted(ZOO)}, got {arch!r}")
    _, cfg_name, options, _ = ZOO[arch]
    sizes = {} if arch == "GPT-2" else dict(SMALL)
    cfg = getattr(transformers, cfg_name)(**{**sizes, **options})
    cfg._attn_implementation = attn
    return cfg


def build(arch: str, attn: str, state=None, cfg=None):
    """The model (eval mode) with ``state`` loaded, or the zoo's scaled random weights."""
    import transformers

    cfg = config(arch, attn) if cfg is None else cfg
    torch.manual_seed(0)
    model = getattr(transformers, ZOO[arch][0])(cfg).eval()
    if state is not None:
        model.load_state_dict(state)
        return model
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(4.0)
            if name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=gen) * 2 + 1)
    return model


def batch():
    """A left-padded batch: 2 x 30 token ids and its attention mask."""

    ids = torch.randint(3, 96, (2, N_TOKENS), generator=torch.Generator().manual_seed(3))
    att = torch.ones_like(ids)
    att[0, :PAD] = 0
    return ids, att


def relative(a, b, att) -> float:
    """max |a - b| / max |a| over the valid tokens' logits."""
    a, b = a[att.bool()], b[att.bool()]
    return float((a - b).abs().max() / a.abs().max())


def run(model, ids, att):
    """Logits and 8 greedy tokens."""

    with torch.no_grad():
        logits = model(ids, attention_mask=att).logits
        tokens = model.generate(ids, attention_mask=att, max_new_tokens=NEW_TOKENS,
                                do_sample=False, pad_token_id=0)
    return logits, tokens


def compare(arch: str, attn: str) -> dict:
    """``eager`` against ``attn`` on the zoo's batch: the table row of lesson 11."""

    ids, att = batch()
    ref = build(arch, "eager")
    mine = build(arch, attn, state=ref.state_dict())
    t0 = time.perf_counter()
    la, ta = run(ref, ids, att)
    lb, tb = run(mine, ids, att)
    return {"architecture": arch, "feature": ZOO[arch][3],
            "max_rel_logit_diff": relative(la, lb, att),
            "same_tokens": bool(torch.equal(ta, tb)),
            "seconds": time.perf_counter() - t0}


def feature_effect(arch: str) -> float:
    """How much ``eager``'s logits move when the architecture's feature is switched off
    (relative, as :func:`compare`); 0.0 where the zoo switches nothing off."""

    off = FEATURE_OFF.get(arch)
    if not off:
        return 0.0
    ids, att = batch()
    ref = build(arch, "eager")
    state = ref.state_dict()
    if off == "sinks":
        state = {k: (torch.full_like(v, float("-inf")) if k.endswith("sinks") else v)
                 for k, v in state.items()}
        cfg = config(arch, "eager")
    else:
        cfg = copy.deepcopy(config(arch, "eager"))
        for key, value in off.items():
            setattr(cfg, key, value)
    other = build(arch, "eager", state=state, cfg=cfg)
    with torch.no_grad():
        a = ref(ids, attention_mask=att).logits
        b = other(ids, attention_mask=att).logits
    return relative(a, b, att)


def sink_mass(arch: str = "gpt-oss") -> np.ndarray:
    """The probability mass each head's sink takes, per layer (rows) and head (columns),
    averaged over the valid query rows of the zoo's batch: ``exp(sink - lse)`` with the
    LSE fa_lab computes inside the model (a recording attention function registered
    beside fa_lab's)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if "sinks" not in ZOO[arch][3]:
        raise ValueError(f"arch must have attention sinks, got {arch!r}")
    ids, att = batch()
    rows = []

    def recording(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                  s_aux=None, sliding_window=None, **_):
        window = None if sliding_window is None else (sliding_window - 1, sliding_window - 1)
        out, lse = torch_attention(query, key, value, mask=attention_mask, scale=scaling,
                                   sinks=s_aux, window=window, return_lse=True)
        mass = torch.exp(s_aux.detach()[None, :, None] - lse)  # (B, H, N)
        valid = att.bool()[:, None, -mass.shape[2]:].expand_as(mass)
        rows.append([float(mass[:, h][valid[:, h]].mean()) for h in range(mass.shape[1])])
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("fa_lab_sink_mass", recording)
    AttentionMaskInterface.register("fa_lab_sink_mass", sdpa_mask)
    ref = build(arch, "eager")
    model = build(arch, "fa_lab_sink_mass", state=ref.state_dict())
    with torch.no_grad():
        model(ids, attention_mask=att)
    return np.array(rows)


__all__ = ["ZOO", "SMALL", "config", "build", "batch", "compare", "feature_effect",
           "relative", "run", "sink_mass"]
