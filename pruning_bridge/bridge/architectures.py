"""The architecture table: every fact the toolkit needs about a model family, in one place.

One ``Architecture`` entry per family, as data (in the style of nnterp's rename tables): where the
decoder blocks, attention, MLP and norms live, how the query/key/value projections are laid out,
which parameters write to the residual stream, where a layer's input enters, and how
TransformerLens names the family. The rest of the toolkit asks this module (``architecture_of``,
``model_dims``, ``head_counts``, ``residual_writers``; ``heads.removal`` reshapes the attention
projections from the same entries) and never checks ``model_type`` itself. Adding a family = one entry in ``ARCHITECTURES`` plus its tests.

Paths are attribute paths: ``blocks``, ``embed``, ``pos_embed``, ``layer_input``,
``final_norm`` and ``unembed`` from the model; the others from one decoder block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor, nn

from ..common.errors import UnsupportedArchitectureError

QKV_LAYOUTS = ("separate", "stacked", "per_head")


@dataclass(frozen=True)
class Architecture:
    """Where things are in one model family, and how its attention heads are laid out.

    ``qkv_layout``: ``"separate"`` (``q_proj``/``k_proj``/``v_proj``, grouped-query attention
    allowed), ``"stacked"`` (one projection whose output is ``[q | k | v]``, GPT-2) or
    ``"per_head"`` (one projection whose output is ``[head, (q, k, v), d_head]``, GPT-NeoX).
    """

    family: str
    blocks: str  # the decoder blocks' ModuleList
    embed: str  # token embedding
    layer_input: str  # the module whose output is block 0's input
    final_norm: str
    attention: str  # the attention module, from a block
    qkv: tuple[str, ...]  # its q, k, v projections (or the one fused projection), from a block
    qkv_layout: str
    attn_out: str  # the output projection, from a block: its input is hook_z
    mlp: str  # the MLP module, from a block: its output is hook_mlp_out
    mlp_in: str  # the MLP's first projection, from a block: its output is mlp.hook_pre
    mlp_out: str  # the MLP's output projection, from a block: its input is mlp.hook_post
    ln1: str  # the norm before attention, from a block
    ln2: str  # the norm before the MLP, from a block
    mlp_in_linear: str | None = None  # gated MLPs: the linear (up) projection, mlp.hook_pre_linear
    unembed: str = "lm_head"  # the LM head, from the model: its input and output are unembed.*
    norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm)
    pos_embed: str | None = None  # learned absolute positions
    parallel_flag: str | None = None  # config flag: attention and MLP both read resid_pre
    weights_in_out: bool = False  # weights stored [in, out] (GPT-2's Conv1D), not [out, in]
    qk_norm: bool = False
    tl_architecture: str | None = None  # TransformerLens's original_architecture
    tl_converter: str | None = None  # its weight converter in transformer_lens.pretrained

    @property
    def gated_mlp(self) -> bool:
        """Whether the MLP multiplies an activated and a linear projection (Llama's SwiGLU)."""
        return self.mlp_in_linear is not None

    def parallel(self, config) -> bool:
        """Whether attention and MLP read the same input (then there is no ``hook_resid_mid``)."""
        return bool(self.parallel_flag and getattr(config, self.parallel_flag, False))


_LLAMA = Architecture(
    family="llama", blocks="model.layers", embed="model.embed_tokens",
    layer_input="model.embed_tokens", final_norm="model.norm", attention="self_attn",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), qkv_layout="separate",
    attn_out="self_attn.o_proj", mlp="mlp", mlp_in="mlp.gate_proj", mlp_out="mlp.down_proj",
    mlp_in_linear="mlp.up_proj", ln1="input_layernorm", ln2="post_attention_layernorm",
    tl_architecture="LlamaForCausalLM", tl_converter="convert_llama_weights")

ARCHITECTURES: dict[str, Architecture] = {  # by config.model_type
    "llama": _LLAMA,
    "mistral": replace(_LLAMA, family="mistral", tl_architecture="MistralForCausalLM",
                       tl_converter="convert_mistral_weights"),
    "qwen2": replace(_LLAMA, family="qwen2", tl_architecture="Qwen2ForCausalLM",
                     tl_converter="convert_qwen2_weights"),
    "qwen3": replace(_LLAMA, family="qwen3", qk_norm=True, tl_architecture="Qwen3ForCausalLM",
                     tl_converter="convert_qwen3_weights"),
    "gpt2": Architecture(
        family="gpt2", blocks="transformer.h", embed="transformer.wte",
        pos_embed="transformer.wpe", layer_input="transformer.drop",
        final_norm="transformer.ln_f", attention="attn", qkv=("attn.c_attn",),
        qkv_layout="stacked", attn_out="attn.c_proj", mlp="mlp", mlp_in="mlp.c_fc",
        mlp_out="mlp.c_proj", ln1="ln_1", ln2="ln_2", norm="layer", weights_in_out=True,
        tl_architecture="GPT2LMHeadModel", tl_converter="convert_gpt2_weights"),
    "gpt_neox": Architecture(
        family="gpt_neox", blocks="gpt_neox.layers", embed="gpt_neox.embed_in",
        layer_input="gpt_neox.emb_dropout", final_norm="gpt_neox.final_layer_norm",
        attention="attention", qkv=("attention.query_key_value",), qkv_layout="per_head",
        attn_out="attention.dense", mlp="mlp", mlp_in="mlp.dense_h_to_4h",
        mlp_out="mlp.dense_4h_to_h", ln1="input_layernorm", ln2="post_attention_layernorm",
        norm="layer", parallel_flag="use_parallel_residual",
        tl_architecture="GPTNeoXForCausalLM", tl_converter="convert_neox_weights"),
}

def architecture_of(model_or_config) -> Architecture:
    """The table entry for a model (or its config), by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"No architecture entry for model_type {model_type!r}. Supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. To add a family, add one Architecture entry "
            f"(module paths, q/k/v layout, norm kind) to "
            f"pruning_bridge.bridge.architectures.ARCHITECTURES.")
    return ARCHITECTURES[model_type]


# ---------------------------------------------------------------- sizes


@dataclass(frozen=True)
class ModelDims:
    """The sizes a config declares (a model with heads removed may have fewer per layer: see
    ``head_counts``)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    context: int | None


def model_dims(model_or_config) -> ModelDims:
    """Sizes from the config's standard names (GPT-2's ``n_embd``... are aliases of them)."""
    config = getattr(model_or_config, "config", model_or_config)
    d_model, n_heads = config.hidden_size, config.num_attention_heads
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    d_mlp = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
             or 4 * d_model)
    return ModelDims(
        n_layers=config.num_hidden_layers, d_model=d_model, n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads, d_head=d_head,
        d_mlp=d_mlp, context=getattr(config, "max_position_embeddings", None))


# ---------------------------------------------------------------- modules


def blocks_of(model) -> nn.ModuleList:
    """The model's ``ModuleList`` of decoder blocks."""
    return model.get_submodule(architecture_of(model).blocks)


def _out_in(module: nn.Module, weights_in_out: bool) -> Tensor:
    """A projection's weight as ``[out, in]`` (a view of GPT-2's ``Conv1D``, stored ``[in,
    out]``)."""
    return module.weight.T if weights_in_out else module.weight


def head_counts(model) -> list[tuple[int, int]]:
    """``(query heads, key/value heads)`` of every layer, read from the projection shapes."""
    arch, d_head = architecture_of(model), model_dims(model).d_head
    counts = []
    for block in blocks_of(model):
        first = _out_in(block.get_submodule(arch.qkv[0]), arch.weights_in_out)
        if arch.qkv_layout == "separate":
            k_proj = block.get_submodule(arch.qkv[1])
            counts.append((first.shape[0] // d_head, k_proj.weight.shape[0] // d_head))
        else:  # one fused projection, as many kv heads as query heads
            n = first.shape[0] // (3 * d_head)
            counts.append((n, n))
    return counts


# ---------------------------------------------------------------- the residual stream


def residual_writers(model) -> list[tuple[nn.Parameter, int]]:
    """Every parameter that writes to the residual stream, with its d_model axis.

    The token (and learned position) embeddings, and each block's attention and MLP output
    projections with their biases. Shared parameters are listed once.
    """
    arch = architecture_of(model)
    writers = [(model.get_submodule(arch.embed).weight, -1)]
    if arch.pos_embed:
        writers.append((model.get_submodule(arch.pos_embed).weight, -1))
    for block in blocks_of(model):
        for path in (arch.attn_out, arch.mlp_out):
            module = block.get_submodule(path)
            writers.append((module.weight, -1 if arch.weights_in_out else 0))
            if module.bias is not None:
                writers.append((module.bias, -1))
    seen: set[int] = set()
    return [(p, axis) for p, axis in writers if not (id(p) in seen or seen.add(id(p)))]

