"""The report's models at true size, offline: published configs, parameter counts, and seeded
random-weight builds (two layers here; full size in test_shapes_slow.py)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning_bridge.bridge import head_counts, model_dims
from pruning_bridge.models import ModelLoadError, load_model
from pruning_bridge.random_models import SHAPES, gpt2_tokenizer, parse_shape_spec, shape_config

# Published parameter counts (embeddings counted once where tied): Qwen3-0.6B's model card and
# technical report (0.6B; 596,049,920 as counted by transformers), TinyLlama 1,100,048,384,
# GPT-2 Large 774,030,080 (the "774M" of the GPT-2 release).
PUBLISHED_PARAMETERS = {"qwen3-0.6b": 596_049_920, "tinyllama-1.1b": 1_100_048_384,
                        "gpt2-large": 774_030_080}

# (layers, d_model, query heads, kv heads, d_head, d_mlp, context, vocab, tied) as published
LAYOUTS = {
    "qwen3-0.6b": (28, 1024, 16, 8, 128, 3072, 40960, 151936, True),
    "tinyllama-1.1b": (22, 2048, 32, 4, 64, 5632, 2048, 32000, False),
    "gpt2-large": (36, 1280, 20, 20, 64, 5120, 1024, 50257, True),
}


def test_every_shape_is_covered():
    assert set(SHAPES) == set(PUBLISHED_PARAMETERS) == set(LAYOUTS)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_published_layout(name):
    config = shape_config(name)
    dims = model_dims(config)
    *sizes, vocab, tied = LAYOUTS[name]
    assert [dims.n_layers, dims.d_model, dims.n_heads, dims.n_kv_heads, dims.d_head, dims.d_mlp,
            dims.context] == sizes
    assert config.vocab_size == vocab and config.tie_word_embeddings is tied


def test_published_details():
    qwen = shape_config("qwen3-0.6b")
    assert qwen.model_type == "qwen3" and qwen.architectures == ["Qwen3ForCausalLM"]
    assert qwen.rope_parameters["rope_theta"] == 1_000_000 and qwen.rms_norm_eps == 1e-6
    assert qwen.num_attention_heads * qwen.head_dim == 2048 != qwen.hidden_size  # wider attention
    assert (qwen.bos_token_id, qwen.eos_token_id, qwen.dtype) == (151643, 151645, torch.bfloat16)
    assert qwen.layer_types == ["full_attention"] * 28 and not qwen.attention_bias
    llama = shape_config("tinyllama-1.1b")
    assert llama.model_type == "llama" and llama.architectures == ["LlamaForCausalLM"]
    assert llama.rope_parameters["rope_theta"] == 10000.0 and llama.rms_norm_eps == 1e-5
    assert (llama.bos_token_id, llama.eos_token_id, llama.hidden_act) == (1, 2, "silu")
    gpt2 = shape_config("gpt2-large")
    assert gpt2.architectures == ["GPT2LMHeadModel"] and gpt2.activation_function == "gelu_new"
    assert gpt2.n_inner is None and gpt2.layer_norm_epsilon == 1e-5


def _arithmetic_count(name: str) -> int:
    """Parameters from the sizes alone: embeddings, blocks, final norm, untied head."""
    n_layers, d, n_q, n_kv, d_head, d_mlp, context, vocab, tied = LAYOUTS[name]
    if name == "gpt2-large":  # LayerNorms with bias, biased fused qkv / out / MLP, learned positions
        block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * d_mlp + d_mlp) + (d_mlp * d + d)
        return vocab * d + context * d + n_layers * block + 2 * d
    attention = d * n_q * d_head + 2 * d * n_kv * d_head + n_q * d_head * d
    qk_norm = 2 * d_head if name == "qwen3-0.6b" else 0
    block = attention + qk_norm + 3 * d * d_mlp + 2 * d  # gated MLP, two RMSNorms
    return vocab * d * (1 if tied else 2) + n_layers * block + d


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_parameter_counts_match_the_published_ones(name):
    """Counted on the meta device (no memory), and by arithmetic from the sizes."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]
    assert _arithmetic_count(name) == PUBLISHED_PARAMETERS[name]


def test_overrides_rebuild_derived_fields_and_accept_gpt2_aliases():
    qwen = shape_config("qwen3-0.6b", num_hidden_layers=2)
    assert qwen.num_hidden_layers == 2 and qwen.layer_types == ["full_attention"] * 2
    assert qwen.head_dim == 128  # everything else as published
    gpt2 = shape_config("gpt2-large", num_hidden_layers=3)
    assert gpt2.n_layer == gpt2.num_hidden_layers == 3 and gpt2.n_embd == 1280
    assert shape_config("qwen3-0.6b").num_hidden_layers == 28  # nothing is cached or mutated


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_two_layer_shape_builds_runs_and_is_seeded(name):
    spec = f"shape:{name}?num_hidden_layers=2"
    rng_before = torch.random.get_rng_state()
    model, tok = load_model(spec, dtype="bfloat16")
    assert torch.equal(rng_before, torch.random.get_rng_state())  # the global RNG is untouched
    n_layers, d, n_q, n_kv, d_head, *_ = LAYOUTS[name]
    assert head_counts(model) == [(n_q, n_kv)] * 2
    assert model_dims(model).d_head == d_head
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    again, _ = load_model(spec, dtype="bfloat16")
    for (key, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), key
    del again
    other, _ = load_model(f"{spec}&seed=1", dtype="bfloat16")
    embedding = other.get_input_embeddings().weight
    assert not torch.equal(embedding, model.get_input_embeddings().weight)  # another seed


def test_tinyllama_tokenizer_fits_its_vocabulary():
    """GPT-2's BPE cut to 32,000 tokens: every id fits, and text round-trips."""
    tok = gpt2_tokenizer(32000)
    assert len(tok) == 32000 and tok.eos_token_id == tok.pad_token_id == 31999
    text = "Grouped-query attention: 32 query heads share 4 key-value heads. Zürich, 東京 🙂"
    ids = tok(text)["input_ids"]
    assert max(ids) < 32000 and tok.decode(ids) == text
    assert len(ids) >= len(gpt2_tokenizer()(text)["input_ids"])
    assert tok("Hello world")["input_ids"] == [15496, 995]  # frequent tokens keep their GPT-2 ids


def test_spec_parsing():
    assert parse_shape_spec("shape:qwen3-0.6b") == ("qwen3-0.6b", {})
    assert parse_shape_spec("shape:gpt2-large?n_layer=2&layer_norm_epsilon=1e-6&seed=3") == (
        "gpt2-large", {"n_layer": 2, "layer_norm_epsilon": 1e-6, "seed": 3})


def test_clear_errors():
    with pytest.raises(ModelLoadError, match="Did you mean 'qwen3-0.6b'.*tinyllama-1.1b"):
        shape_config("qwen3-06b")
    with pytest.raises(ModelLoadError, match="no field num_layers"):
        shape_config("qwen3-0.6b", num_layers=2)
    with pytest.raises(ModelLoadError, match="field=value"):
        load_model("shape:qwen3-0.6b?num_hidden_layers")
    with pytest.raises(ModelLoadError, match="shape:gpt2-large"):
        load_model("shape-gpt2-large")
