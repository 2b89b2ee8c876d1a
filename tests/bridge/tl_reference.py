"""TransformerLens's own models of a tiny HF model, the references of the TransformerLens-surface
tests (imported by test_extra_hooks.py and test_tl_surface.py).

``independent(model, tokenizer)``: TransformerLens's own forward pass on the HF weights.
- TransformerLens 3.9: ``HookedTransformer`` built offline by
  ``lens_safety.backend.transformer_lens.hooked_from_hf`` (every family in the table);
- TransformerLens 4.x: ``TransformerBridge.boot_native``, TransformerLens's reimplementation,
  loaded with the HF weights here (GPT-2, Llama and Mistral; it has no q/k norms and no parallel
  residual, so the other families are skipped). Its rotary embedding rotates adjacent pairs,
  HF's rotates halves: each head's q/k rows are permuted to match (q.k and the output are
  unchanged; ``attn.hook_q`` / ``hook_k`` themselves then differ by that permutation).

``with_flags(model, tokenizer, flags)``: TransformerLens with ``use_attn_result`` /
``use_split_qkv_input`` / ``use_attn_in`` / ``use_hook_mlp_in`` set, for the hook points they add.
3.9: the ``HookedTransformer`` above. 4.x: boot_native's attention has none of them, so this is
``TransformerBridge.boot_transformers`` on a copy of the HF model (compatibility mode, raw
weights): TransformerLens's definition of those hooks, computed around the HF modules (the
plain-PyTorch tests in test_extra_hooks.py are their independent check).
"""

from __future__ import annotations

import copy
from importlib.metadata import version

import pytest
import torch

TL_VERSION = version("transformer-lens")
TL4 = int(TL_VERSION.split(".")[0]) >= 4
NATIVE = {"tiny-gpt2", "tiny-llama", "tiny-mistral"}  # what boot_native can rebuild


def covered(names) -> list:
    """The tiny models the installed TransformerLens can rebuild independently."""
    return [name for name in names if not TL4 or name in NATIVE]


def independent(model, tokenizer):
    """TransformerLens's own forward pass with ``model``'s weights, in eval mode."""
    return (_native(model, tokenizer) if TL4 else _hooked(model, tokenizer)).eval()


def with_flags(model, tokenizer, flags: tuple[str, ...]):
    """TransformerLens's model of ``model`` with the hook flags ``flags`` on, in eval mode."""
    if TL4:
        from transformer_lens.model_bridge import TransformerBridge

        tl = TransformerBridge.boot_transformers(
            model.config.model_type, hf_model=copy.deepcopy(model), tokenizer=tokenizer,
            device="cpu", dtype=torch.float32)
        tl.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    else:
        tl = _hooked(model, tokenizer)
    for flag in flags:
        getattr(tl, f"set_{flag}")(True)
    return tl.eval()


def _hooked(model, tokenizer):
    from lens_safety.backend.transformer_lens import hooked_from_hf

    return hooked_from_hf(model, tokenizer)


def get_act_name(*args):
    from transformer_lens.utilities import get_act_name as tl_get_act_name

    return tl_get_act_name(*args)


def _native(model, tokenizer):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources import native  # noqa: F401 (adds boot_native)

    c = model.config
    kind = c.model_type
    if kind not in ("gpt2", "llama", "mistral"):
        pytest.skip(f"TransformerLens {TL_VERSION}'s boot_native cannot rebuild {kind}")
    d_model, n_heads = c.hidden_size, c.num_attention_heads
    d_head = getattr(c, "head_dim", None) or d_model // n_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    if kind == "gpt2":
        cfg = TransformerBridgeConfig(
            d_model=d_model, n_layers=c.n_layer, n_heads=n_heads, d_head=d_head,
            d_mlp=c.n_inner or 4 * d_model, d_vocab=c.vocab_size, n_ctx=c.n_positions,
            act_fn=c.activation_function, normalization_type="LN",
            positional_embedding_type="standard", eps=c.layer_norm_epsilon)
    else:
        theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or c.rope_theta
        cfg = TransformerBridgeConfig(
            d_model=d_model, n_layers=c.num_hidden_layers, n_heads=n_heads, d_head=d_head,
            n_key_value_heads=n_kv if n_kv != n_heads else None, d_mlp=c.intermediate_size,
            d_vocab=c.vocab_size, n_ctx=c.max_position_embeddings, act_fn=c.hidden_act,
            normalization_type="RMS", final_rms=True, gated_mlp=True,
            positional_embedding_type="rotary", rotary_dim=d_head, rotary_base=float(theta),
            eps=c.rms_norm_eps)
    bridge = TransformerBridge.boot_native(cfg, tokenizer=tokenizer)
    weights = _gpt2_weights(model, d_model) if kind == "gpt2" else _llama_weights(
        model, n_heads, n_kv, d_head)
    params = bridge.original_model.state_dict(keep_vars=True)  # some under two names
    loaded, used = set(), set()
    with torch.no_grad():
        for key, param in params.items():
            plain = key.replace("._original_component", "")
            if plain in weights:
                param.copy_(weights[plain])
                loaded.add(param.data_ptr())
                used.add(plain)
        for key, param in params.items():  # biases the HF model does not have: zero
            if param.data_ptr() not in loaded:
                assert key.endswith("bias"), key
                param.zero_()
    assert used == set(weights), set(weights) - used
    return bridge


def _gpt2_weights(model, d_model: int) -> dict:
    t = model.transformer
    weights = {"tok_embed.weight": t.wte.weight, "pos.weight": t.wpe.weight,
               "ln_out.weight": t.ln_f.weight, "ln_out.bias": t.ln_f.bias,
               "head.weight": model.lm_head.weight}
    for i, block in enumerate(t.h):
        p = f"layers.{i}."
        for name, norm in (("ln1", block.ln_1), ("ln2", block.ln_2)):
            weights[p + name + ".weight"], weights[p + name + ".bias"] = norm.weight, norm.bias
        w, b = block.attn.c_attn.weight.T, block.attn.c_attn.bias  # Conv1D: [in, out]
        for j, part in enumerate("qkv"):
            weights[p + f"attn.{part}.weight"] = w[j * d_model:(j + 1) * d_model]
            weights[p + f"attn.{part}.bias"] = b[j * d_model:(j + 1) * d_model]
        for name, conv in (("attn.o", block.attn.c_proj), ("mlp.fc_in", block.mlp.c_fc),
                           ("mlp.fc_out", block.mlp.c_proj)):
            weights[p + name + ".weight"], weights[p + name + ".bias"] = conv.weight.T, conv.bias
    return weights


def _llama_weights(model, n_heads: int, n_kv: int, d_head: int) -> dict:
    # native rotary dims (2i, 2i+1) <- HF's (i, i + d_head / 2)
    perm = torch.arange(d_head).view(2, d_head // 2).T.flatten()

    def rotated(weight, heads):
        return weight.view(heads, d_head, -1)[:, perm].reshape(weight.shape)

    m = model.model
    weights = {"tok_embed.weight": m.embed_tokens.weight, "ln_out.weight": m.norm.weight,
               "head.weight": model.lm_head.weight}
    for i, layer in enumerate(m.layers):
        p, attn, mlp = f"layers.{i}.", layer.self_attn, layer.mlp
        weights.update({
            p + "ln1.weight": layer.input_layernorm.weight,
            p + "ln2.weight": layer.post_attention_layernorm.weight,
            p + "attn.q.weight": rotated(attn.q_proj.weight, n_heads),
            p + "attn.k.weight": rotated(attn.k_proj.weight, n_kv),
            p + "attn.v.weight": attn.v_proj.weight, p + "attn.o.weight": attn.o_proj.weight,
            p + "mlp.gate.weight": mlp.gate_proj.weight, p + "mlp.in.weight": mlp.up_proj.weight,
            p + "mlp.out.weight": mlp.down_proj.weight})
    return weights
