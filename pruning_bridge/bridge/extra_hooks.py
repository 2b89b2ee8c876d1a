"""The TransformerLens hook points a Hugging Face model never computes, made on request.

TransformerLens computes these only when a flag asks for them (they cost memory); the bridge
computes them only in a trace that names them, and its other traces are unchanged:

- ``blocks.L.hook_attn_in`` (``use_attn_in``): ``[batch, pos, head, d_model]``, a copy of
  ``hook_resid_pre`` per query head. Query head ``h`` reads ``ln1(copy h)``; key/value head
  ``g`` reads copy ``g`` (TransformerLens 4's convention under grouped-query attention).
- ``blocks.L.hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` (``use_split_qkv_input``): a
  copy of ``hook_resid_pre`` (or of an edited ``hook_attn_in``) per query head, per key/value
  head and per key/value head; each head's projection reads ``ln1`` of its own copy. The copies
  are taken *before* ``ln1``, as in TransformerLens.
- ``blocks.L.attn.hook_result`` (``use_attn_result``): ``[batch, pos, head, d_model]``, head
  ``h``'s ``z_h @ W_O[h]``; the attention output is their sum plus the output bias.
- ``blocks.L.hook_mlp_in`` (``use_hook_mlp_in``): a copy of the MLP branch's input before
  ``ln2`` (``hook_resid_mid``; ``hook_resid_pre`` with a parallel residual); editing it changes
  only what the MLP reads, not the residual stream carried on.
- ``unembed.hook_in`` / ``unembed.hook_out``: the LM head's input and output (``traced.py``).

Reading them never changes the model's own computation (the bridge stays bit-exact to the HF
model). An edit recomputes only what depends on it: the q/k/v projections of the edited per-head
inputs (with ``ln1``'s weights; an edit of ``ln1``'s own hooks in that layer then does not reach
q/k/v, as in TransformerLens 4), or the attention output from the edited head results.

Like ``adapters`` and ``traced``, this module runs inside traces (on an NDIF server too): torch
and builtins only; ``ctx["block"]`` is the decoder layer's module.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .adapters import _first, _replace_first, denormalize, norm_parts

QKV_INPUTS = (("q", "hook_q_input"), ("k", "hook_k_input"), ("v", "hook_v_input"))
# the hook names TransformerLens computes only behind a config flag, with that flag
GATED = {"hook_attn_in": "use_attn_in", "hook_q_input": "use_split_qkv_input",
         "hook_k_input": "use_split_qkv_input", "hook_v_input": "use_split_qkv_input",
         "attn.hook_result": "use_attn_result", "hook_mlp_in": "use_hook_mlp_in"}


def _out_in(module, in_out: bool) -> Tensor:
    """A projection's weight as ``[out, in]`` (GPT-2's ``Conv1D`` stores it ``[in, out]``)."""
    return module.weight.T if in_out else module.weight


def _copies(x: Tensor, n: int) -> Tensor:
    """``[..., d]`` as ``n`` independent copies ``[..., n, d]``."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).clone()


def qkv_weight(block, qkv: tuple, layout: str, in_out: bool, part: int, d_head: int
               ) -> tuple[Tensor, Tensor | None]:
    """Head-split weight ``[head, d_head, d_model]`` and bias ``[head, d_head]`` (or None) of q
    (``part`` 0), k (1) or v (2) in a layer, whatever the family's q/k/v layout."""
    proj = block.get_submodule(qkv[0 if layout != "separate" else part])
    w, b = _out_in(proj, in_out), proj.bias
    d_in = w.shape[-1]
    if layout == "separate":
        return w.view(-1, d_head, d_in), None if b is None else b.view(-1, d_head)
    if layout == "stacked":  # [q | k | v]
        return (w.view(3, -1, d_head, d_in)[part],
                None if b is None else b.view(3, -1, d_head)[part])
    # per head: [head, (q, k, v), d_head]
    return (w.view(-1, 3, d_head, d_in)[:, part],
            None if b is None else b.view(-1, 3, d_head)[:, part])


def attention_inputs(arch, d_head: int) -> dict:
    """Functions of the per-head input points and of the q/k/v rebuild, for one family.

    ``attn_in`` and ``qkv_in`` are ``(split, merge)`` pairs read at the layer input: their merge
    writes nothing but keeps the edited copies in ``ctx["qkv_in"]``; ``rebuild_separate(i)`` and
    ``rebuild_fused(merge)`` turn them into the output of a q/k/v projection point (None while
    nothing was edited). The closures hold plain values only (they are sent to servers).
    """
    qkv, layout, in_out, ln1, norm_kind = (arch.qkv, arch.qkv_layout, arch.weights_in_out,
                                           arch.ln1, arch.norm)
    fused = layout != "separate"

    def counts(block) -> tuple[int, int]:
        """(query heads, key/value heads) of this layer, from its weights (heads may be pruned)."""
        width = _out_in(block.get_submodule(qkv[0]), in_out).shape[0]
        if fused:
            return width // (3 * d_head), width // (3 * d_head)
        return width // d_head, _out_in(block.get_submodule(qkv[1]), in_out).shape[0] // d_head

    def split_attn_in(raw, ctx):
        return {"hook_attn_in": _copies(ctx["resid_pre"], counts(ctx["block"])[0])}

    def merge_attn_in(raw, views, ctx):
        x, n_kv = views["hook_attn_in"], counts(ctx["block"])[1]
        ctx["qkv_in"] = {"q": x, "k": x[..., :n_kv, :], "v": x[..., :n_kv, :]}
        return None  # nothing to write here: the projections are rebuilt from ctx["qkv_in"]

    def split_qkv_in(raw, ctx):
        n_heads, n_kv = counts(ctx["block"])
        given = ctx.get("qkv_in", {})
        return {name: given[part].clone() if part in given
                else _copies(ctx["resid_pre"], n_heads if part == "q" else n_kv)
                for part, name in QKV_INPUTS}

    def merge_qkv_in(raw, views, ctx):
        given = ctx.setdefault("qkv_in", {})
        for part, name in QKV_INPUTS:
            if name in views:
                given[part] = views[name]
        return None

    def project(block, part: int, x: Tensor) -> Tensor:
        """Per head ``ln1(x_h) @ W[h] + b[h]`` of q (part 0), k (1) or v (2): ``[b, p, h, d_head]``."""
        norm = block.get_submodule(ln1)
        eps = getattr(norm, "variance_epsilon", None) or norm.eps
        centred, scale = norm_parts(x, norm_kind, eps)
        normed = denormalize(norm, centred / scale, x.dtype)
        w, b = qkv_weight(block, qkv, layout, in_out, part, d_head)
        out = torch.einsum("bphi,hoi->bpho", normed, w.to(normed.dtype))
        return out if b is None else out + b

    def rebuild_separate(part: int):
        def rebuild(raw, ctx):
            x = ctx.get("qkv_in", {}).get("qkv"[part])
            if x is None:
                return None
            out = _first(raw)
            return _replace_first(raw, project(ctx["block"], part, x).reshape(out.shape)
                                  .to(out.dtype))
        return rebuild

    def rebuild_fused(merge):
        names = ("attn.hook_q", "attn.hook_k", "attn.hook_v")

        def rebuild(raw, ctx):
            given = ctx.get("qkv_in", {})
            new = {names[i]: project(ctx["block"], i, given[part])
                   for i, part in enumerate("qkv") if part in given}
            return merge(raw, new, ctx) if new else None
        return rebuild

    return {"attn_in": (split_attn_in, merge_attn_in), "qkv_in": (split_qkv_in, merge_qkv_in),
            "rebuild_separate": rebuild_separate, "rebuild_fused": rebuild_fused}


def head_results(arch, d_head: int):
    """``(split, merge)`` of ``attn.hook_result``, read at the output projection's output from
    its input ``ctx["z"]``; an edit replaces the output by the results' sum plus the bias."""
    attn_out, in_out = arch.attn_out, arch.weights_in_out

    def split(raw, ctx):
        z = ctx["z"]
        w = _out_in(ctx["block"].get_submodule(attn_out), in_out).T  # [heads * d_head, d_model]
        return {"attn.hook_result": torch.einsum(
            "bphd,hdm->bphm", z.reshape(*z.shape[:-1], -1, d_head),
            w.reshape(-1, d_head, w.shape[-1]).to(z.dtype))}

    def merge(raw, views, ctx):
        out, bias = _first(raw), ctx["block"].get_submodule(attn_out).bias
        summed = views["attn.hook_result"].sum(-2)
        return _replace_first(raw, (summed if bias is None else summed + bias).to(out.dtype))

    return split, merge


def mlp_in():
    """``(split, merge)`` of ``hook_mlp_in`` at ``ln2``'s input: a copy, so that an in-place
    edit reaches only the MLP (as TransformerLens's ``resid_mid.clone()``)."""

    def split(raw, ctx):
        return {"hook_mlp_in": _first(raw).clone()}

    def merge(raw, views, ctx):
        return _replace_first(raw, views["hook_mlp_in"].to(_first(raw).dtype))

    return split, merge
