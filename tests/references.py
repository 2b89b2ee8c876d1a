"""The independent TransformerLens-style reference the tests compare HookBridge with, on either
TransformerLens line (the one place the tests switch on the version).

``tl_reference(model, tok)`` runs ``model``'s weights through code that shares nothing with
HookBridge or with ``model``'s own modules, and answers ``run_with_cache(ids) -> (logits,
{name: activation})`` and ``run_with_hooks(ids, fwd_hooks=[(name, fn)]) -> logits`` (``fn(x,
hook=...)`` returns the replacement) with TransformerLens's hook names and semantics:

- TransformerLens 3.x: ``HookedTransformer`` (TransformerLens's reimplementation of the model);
- TransformerLens 4.x: TransformerLens's own native transformer (``TransformerBridge.boot_native``)
  with the HF weights copied in, for the families it implements (GPT-2, Llama, Mistral, Qwen2)
  and the hook names it implements with HookedTransformer's semantics (see ``NATIVE_MISSING``
  and ``NATIVE_NOT_EDITABLE``); everything else goes to :class:`PlainReference`, a forward pass
  written here in plain PyTorch (Qwen3's q/k norms and GPT-NeoX's parallel residual are beyond
  the native model). A ``TransformerBridge`` booted on the same HF modules is not independent.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lens_safety.backend.transformer_lens import transformer_lens_4

TL4 = transformer_lens_4()
NATIVE_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
# names HookBridge offers that the native model does not give HookedTransformer's values at:
# its rotary is internal (no hook_rot_q / hook_rot_k), and TransformerLens 4.3 fires its
# hook_attn_scores with the softmaxed pattern
NATIVE_MISSING = ("attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores")
# names whose edit does not act as in HookedTransformer on the native bridge: hook_resid_mid is
# an alias of the MLP's input there (an edit misses the residual stream carried forward)
NATIVE_NOT_EDITABLE = ("hook_resid_mid",)
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu,
    "relu": F.relu}


def tl_reference(model, tok):
    """The independent reference for ``model`` on the installed TransformerLens (module doc)."""
    if not TL4:
        from lens_safety.backend.transformer_lens import hooked_from_hf
        return hooked_from_hf(model, tok)
    if model.config.model_type in NATIVE_FAMILIES:
        return NativeReference(model)
    return PlainReference(model)


def _suffix_in(name: str, suffixes) -> bool:
    return any(name.endswith(s) for s in suffixes)


def by_transformer_lens(reference, name: str, edit: bool = False) -> bool:
    """Whether ``reference`` computes (``edit``: applies an edit of) ``name`` with
    TransformerLens's own code, not with :class:`PlainReference`."""
    if isinstance(reference, PlainReference):
        return False
    if isinstance(reference, NativeReference):
        return not _suffix_in(name, NATIVE_MISSING + (NATIVE_NOT_EDITABLE if edit else ()))
    return True


# TransformerBridge's own hook points, which HookedTransformer never had: every component's
# hook_in / hook_out (but the unembedding's) and a few helpers
BRIDGE_ONLY = re.compile(r"(^|\.)hook_(in|out)$|hook_(cos|sin|hidden_states|unembed)$|_normed$")


def tl_hook_names(model, tok) -> set[str]:
    """The hook names TransformerLens fires in a plain ``run_with_cache`` on ``model``: a
    HookedTransformer's (3.x); a compatibility-mode TransformerBridge's HookedTransformer names
    (4.x: its own component-level names left out)."""
    from lens_safety.backend.transformer_lens import hooked_from_hf

    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        _, cache = hooked_from_hf(model, tok).run_with_cache(ids)
    return {n for n in cache.keys() if not (TL4 and BRIDGE_ONLY.search(n)
                                            and not n.startswith("unembed."))}


# ---------------------------------------------------------------- weights, read by hand


def _weights(model) -> tuple[dict, list[dict]]:
    """The HF weights as ``nn.Linear``-style matrices ``[out, in]``: global and per layer
    (keys ``ln1 ln2 q k v o pre lin out q_norm k_norm``, each ``(weight, bias or None)``).
    Module paths are written out here by hand, not taken from the architecture table."""
    kind = model.config.model_type
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    get = sd.get

    def pair(prefix, transpose=False):
        w = sd[prefix + ".weight"]
        return (w.T if transpose else w), get(prefix + ".bias")

    if kind == "gpt2":
        top = {"embed": sd["transformer.wte.weight"], "pos": sd["transformer.wpe.weight"],
               "final": pair("transformer.ln_f"), "unembed": sd["lm_head.weight"]}
        layers = []
        for i in range(model.config.num_hidden_layers):
            p = f"transformer.h.{i}."
            qkv_w, qkv_b = pair(p + "attn.c_attn", transpose=True)
            q, k, v = qkv_w.chunk(3, 0)
            qb, kb, vb = qkv_b.chunk(3, 0)
            layers.append({"ln1": pair(p + "ln_1"), "ln2": pair(p + "ln_2"), "q": (q, qb),
                           "k": (k, kb), "v": (v, vb), "o": pair(p + "attn.c_proj", True),
                           "pre": pair(p + "mlp.c_fc", True), "out": pair(p + "mlp.c_proj", True)})
        return top, layers
    if kind == "gpt_neox":
        top = {"embed": sd["gpt_neox.embed_in.weight"], "final": pair("gpt_neox.final_layer_norm"),
               "unembed": sd["lm_head.weight"]}
        n_heads = model.config.num_attention_heads
        layers = []
        for i in range(model.config.num_hidden_layers):
            p = f"gpt_neox.layers.{i}."
            w, b = pair(p + "attention.query_key_value")  # rows: [head, (q, k, v), d_head]
            w = w.view(n_heads, 3, -1, w.shape[-1])
            b = b.view(n_heads, 3, -1)
            qkv = {name: (w[:, j].reshape(-1, w.shape[-1]), b[:, j].reshape(-1))
                   for j, name in enumerate("qkv")}
            layers.append({"ln1": pair(p + "input_layernorm"),
                           "ln2": pair(p + "post_attention_layernorm"), **qkv,
                           "o": pair(p + "attention.dense"), "pre": pair(p + "mlp.dense_h_to_4h"),
                           "out": pair(p + "mlp.dense_4h_to_h")})
        return top, layers
    # Llama layout: llama, mistral, qwen2 (q/k/v biases), qwen3 (q/k norms)
    top = {"embed": sd["model.embed_tokens.weight"], "final": pair("model.norm"),
           "unembed": sd["lm_head.weight"]}
    layers = []
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {"ln1": pair(p + "input_layernorm"), "ln2": pair(p + "post_attention_layernorm"),
                 "pre": pair(p + "mlp.gate_proj"), "lin": pair(p + "mlp.up_proj"),
                 "out": pair(p + "mlp.down_proj"),
                 **{n: pair(p + f"self_attn.{n}_proj") for n in "qkvo"}}
        if p + "self_attn.q_norm.weight" in sd:
            layer |= {"q_norm": pair(p + "self_attn.q_norm"),
                      "k_norm": pair(p + "self_attn.k_norm")}
        layers.append(layer)
    return top, layers


def _sizes(config) -> SimpleNamespace:
    params = getattr(config, "rope_parameters", None) or {}
    d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    eps = next(getattr(config, n) for n in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")
               if getattr(config, n, None) is not None)
    return SimpleNamespace(
        n_layers=config.num_hidden_layers, d_model=config.hidden_size, d_head=d_head,
        n_heads=config.num_attention_heads,
        n_kv=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        d_mlp=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        or 4 * config.hidden_size, eps=eps,
        act=getattr(config, "hidden_act", None) or config.activation_function,
        theta=float(params.get("rope_theta") or getattr(config, "rope_theta", 10000.0)),
        rotary_dim=int(d_head * float(params.get("partial_rotary_factor") or 1.0)),
        layer_norm=config.model_type in ("gpt2", "gpt_neox"),
        rotary=config.model_type != "gpt2",
        parallel=bool(getattr(config, "use_parallel_residual", False)))


# ---------------------------------------------------------------- plain PyTorch


class PlainReference:
    """A from-scratch forward pass of the table's families (GPT-2, Llama, Mistral, Qwen2, Qwen3,
    GPT-NeoX) on the HF weights, unbatched positions (no padding), with HookedTransformer's hook
    names and semantics: an edit replaces the activation and everything after sees it."""

    def __init__(self, model):
        self.s = _sizes(model.config)
        self.top, self.layers = _weights(model)

    def run_with_cache(self, ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        cache: dict[str, Tensor] = {}
        return self._forward(ids, {}, cache), cache

    def run_with_hooks(self, ids: Tensor, fwd_hooks=()) -> Tensor:
        return self._forward(ids, dict(fwd_hooks), None)

    @torch.no_grad()
    def _forward(self, ids: Tensor, hooks: dict, cache: dict | None) -> Tensor:
        s, top = self.s, self.top
        batch, n = ids.shape

        def hook(name: str, x: Tensor) -> Tensor:
            if name in hooks:
                x = hooks[name](x, hook=SimpleNamespace(name=name))
            if cache is not None:
                cache[name] = x
            return x

        def norm(name: str, x: Tensor, weight_bias) -> Tensor:
            weight, bias = weight_bias
            if s.layer_norm:
                x = x - x.mean(-1, keepdim=True)
            scale = hook(f"{name}.hook_scale", (x.pow(2).mean(-1, keepdim=True) + s.eps).sqrt())
            x = hook(f"{name}.hook_normalized", x / scale) * weight
            return x if bias is None else x + bias

        def linear(x: Tensor, weight_bias) -> Tensor:
            return F.linear(x, *weight_bias)

        def rope(x: Tensor) -> Tensor:  # half-split pairs (i, i + rotary_dim / 2), as HF stores
            rd = s.rotary_dim
            inv = 1.0 / s.theta ** (torch.arange(0, rd, 2).float() / rd)
            angles = torch.outer(torch.arange(n).float(), inv)
            cos = torch.cat([angles.cos()] * 2, -1)[:, None]
            sin = torch.cat([angles.sin()] * 2, -1)[:, None]
            rot, rest = x[..., :rd], x[..., rd:]
            half = torch.cat([-rot[..., rd // 2:], rot[..., :rd // 2]], -1)
            return torch.cat([rot * cos + half * sin, rest], -1)

        x = hook("hook_embed", top["embed"][ids])
        if "pos" in top:
            x = x + hook("hook_pos_embed", top["pos"][:n].expand(batch, n, -1))
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)
        act = ACTIVATIONS[s.act]
        for i, w in enumerate(self.layers):
            b = f"blocks.{i}."
            x = hook(b + "hook_resid_pre", x)
            h = norm(b + "ln1", x, w["ln1"])
            q = hook(b + "attn.hook_q", linear(h, w["q"]).view(batch, n, s.n_heads, s.d_head))
            k = hook(b + "attn.hook_k", linear(h, w["k"]).view(batch, n, s.n_kv, s.d_head))
            v = hook(b + "attn.hook_v", linear(h, w["v"]).view(batch, n, s.n_kv, s.d_head))
            if "q_norm" in w:  # Qwen3: RMSNorm of each head's query and key
                q = q * (q.pow(2).mean(-1, keepdim=True) + s.eps).rsqrt() * w["q_norm"][0]
                k = k * (k.pow(2).mean(-1, keepdim=True) + s.eps).rsqrt() * w["k_norm"][0]
            if s.rotary:
                q, k = hook(b + "attn.hook_rot_q", rope(q)), hook(b + "attn.hook_rot_k", rope(k))
            group = s.n_heads // s.n_kv
            k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(s.d_head)
            scores = hook(b + "attn.hook_attn_scores", scores.masked_fill(causal, float("-inf")))
            pattern = hook(b + "attn.hook_pattern", scores.softmax(-1))
            z = hook(b + "attn.hook_z", torch.einsum("bhqk,bkhd->bqhd", pattern, v))
            attn_out = hook(b + "hook_attn_out", linear(z.reshape(batch, n, -1), w["o"]))
            mid = x if s.parallel else hook(b + "hook_resid_mid", x + attn_out)
            h = norm(b + "ln2", mid, w["ln2"])
            pre = hook(b + "mlp.hook_pre", linear(h, w["pre"]))
            post = act(pre)
            if "lin" in w:
                post = post * hook(b + "mlp.hook_pre_linear", linear(h, w["lin"]))
            post = hook(b + "mlp.hook_post", post)
            mlp_out = hook(b + "hook_mlp_out", linear(post, w["out"]))
            x = hook(b + "hook_resid_post", (x + attn_out if s.parallel else mid) + mlp_out)
        x = hook("unembed.hook_in", norm("ln_final", x, top["final"]))
        return hook("unembed.hook_out", F.linear(x, top["unembed"]))


# ---------------------------------------------------------------- TransformerLens 4 native


class NativeReference:
    """TransformerLens 4's native transformer (``boot_native``) on the HF weights, with
    :class:`PlainReference` for the names it does not cover. The native model rotates
    adjacent pairs ``(2i, 2i+1)`` where HF rotates ``(i, i + d_head/2)``: the query and key rows
    are permuted on the way in, and ``hook_q`` / ``hook_k`` are permuted back for the caller."""

    def __init__(self, model):
        from transformer_lens.model_bridge import TransformerBridge

        self.plain = PlainReference(model)
        s = self.s = self.plain.s
        if s.rotary and s.rotary_dim != s.d_head:
            raise ValueError("the native model rotates whole heads only")
        config = dict(
            d_model=s.d_model, d_head=s.d_head, n_heads=s.n_heads, n_layers=s.n_layers,
            n_key_value_heads=s.n_kv if s.n_kv != s.n_heads else None, d_mlp=s.d_mlp,
            d_vocab=model.config.vocab_size, n_ctx=512, eps=s.eps, act_fn=s.act,
            normalization_type="LN" if s.layer_norm else "RMS", final_rms=not s.layer_norm,
            gated_mlp=not s.layer_norm,
            positional_embedding_type="rotary" if s.rotary else "standard",
            **(dict(rotary_dim=s.d_head, rotary_base=s.theta) if s.rotary else {}))
        self.bridge = TransformerBridge.boot_native(config)
        self._load(self.plain.top, self.plain.layers)

    def _rows_to_pairs(self, w: Tensor) -> Tensor:
        """Query / key weight rows (or bias entries), per head, from HF's half-split order to
        the native adjacent-pair order."""
        halves = w.reshape(-1, 2, self.s.d_head // 2, *w.shape[1:])
        return halves.transpose(1, 2).reshape(w.shape) if self.s.rotary else w

    def _to_pairs(self, x: Tensor) -> Tensor:
        """A ``[..., d_head]`` activation from HF's order to the native one."""
        return torch.stack(x.chunk(2, -1), -1).flatten(-2) if self.s.rotary else x

    def _to_halves(self, x: Tensor) -> Tensor:
        """A ``[..., d_head]`` activation from the native order back to HF's."""
        return torch.cat([x[..., 0::2], x[..., 1::2]], -1) if self.s.rotary else x

    @torch.no_grad()
    def _load(self, top: dict, layers: list[dict]) -> None:
        def zeros_if_none(bias, rows):
            return torch.zeros(rows) if bias is None else bias

        values = {"tok_embed.weight": top["embed"], "head.weight": top["unembed"],
                  "ln_out.weight": top["final"][0]}
        if top["final"][1] is not None:
            values["ln_out.bias"] = top["final"][1]
        if "pos" in top:
            values["pos.weight"] = top["pos"][:512]
        mlp = ({"pre": "gate", "lin": "in", "out": "out"} if not self.s.layer_norm else
               {"pre": "fc_in", "out": "fc_out"})
        for i, w in enumerate(layers):
            p = f"layers.{i}."
            for norm in ("ln1", "ln2"):
                values[p + norm + ".weight"] = w[norm][0]
                if w[norm][1] is not None:
                    values[p + norm + ".bias"] = w[norm][1]
            for name in "qkvo":
                weight, bias = w[name]
                bias = zeros_if_none(bias, weight.shape[0])
                if name in "qk":
                    weight, bias = self._rows_to_pairs(weight), self._rows_to_pairs(bias)
                values[p + f"attn.{name}.weight"], values[p + f"attn.{name}.bias"] = weight, bias
            for ours, native in mlp.items():
                values[p + f"mlp.{native}.weight"] = w[ours][0]
                if w[ours][1] is not None:
                    values[p + f"mlp.{native}.bias"] = w[ours][1]
        params = dict(self.bridge.original_model.named_parameters())
        loaded = set()
        for full, param in params.items():
            name = full.replace("._original_component", "")
            if name in values:
                param.copy_(values[name])
                loaded.add(name)
        missing = set(values) - loaded
        assert not missing, f"native parameters not found: {sorted(missing)}"
        self.bridge.eval()

    def _edits_natively(self, name: str) -> bool:
        return not _suffix_in(name, NATIVE_MISSING + NATIVE_NOT_EDITABLE)

    def run_with_cache(self, ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        _, cache = self.plain.run_with_cache(ids)
        with torch.no_grad():
            logits, native = self.bridge.run_with_cache(ids)
        for name in cache:
            if not _suffix_in(name, NATIVE_MISSING):
                x = native[name]
                cache[name] = self._to_halves(x) if _suffix_in(name, ("hook_q", "hook_k")) else x
        return logits, cache

    def run_with_hooks(self, ids: Tensor, fwd_hooks=()) -> Tensor:
        if not all(self._edits_natively(name) for name, _ in fwd_hooks):
            return self.plain.run_with_hooks(ids, fwd_hooks)

        def in_pairs(fn):  # the caller's function sees (and returns) HF's order
            return lambda x, hook: self._to_pairs(fn(self._to_halves(x), hook=hook))
        hooks = [(name, in_pairs(fn) if _suffix_in(name, ("hook_q", "hook_k")) else fn)
                 for name, fn in fwd_hooks]
        with torch.no_grad():
            return self.bridge.run_with_hooks(ids, fwd_hooks=hooks)
