"""The toolkit on either TransformerLens line (3.x HookedTransformer, 4.x TransformerBridge):
where TransformerBridge differs from HookedTransformer in a way that changes a result, the
toolkit's path gives HookedTransformer's result, checked against the plain-PyTorch reference
and the Hugging Face model."""

import pytest
import torch
from references import TL4, PlainReference

from lens_safety.backend.transformer_lens import hooked_from_hf, load_hooked, transformer_lens_4
from lens_safety.edits.edit import Edit
from lens_safety.evaluation.protocol import ProtocolSettings, continuations
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common import UsageError
from pruning_bridge.models import ModelLoadError

PROMPTS = ["The old house on the hill", "Cats sleep"]


def _greedy_uncached(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Plain HF greedy decoding, the whole sequence each step (no KV cache)."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


def test_the_line_is_detected():
    """transformer_lens_4() is True exactly when HookedTransformer is gone."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
        removed = False
    except ImportError:
        removed = True
    assert transformer_lens_4() == removed


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_converting_leaves_the_hf_model_alone(tiny, name):
    """hooked_from_hf converts (3.x) or boots a copy (4.x): the model keeps its modules, its
    attention kernel and its outputs, and a HookBridge on it stays exact."""
    model, tok = tiny(name)
    modules = {n: id(m) for n, m in model.named_modules()}
    kernel = model.config._attn_implementation
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    tl = hooked_from_hf(model, tok)
    assert type(tl).__name__ == ("TransformerBridge" if TL4 else "HookedTransformer")
    assert {n: id(m) for n, m in model.named_modules()} == modules
    assert model.config._attn_implementation == kernel
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
        torch.testing.assert_close(tl(ids, return_type="logits"), before, atol=1e-5, rtol=0)
    assert torch.equal(HookBridge(model, tok)(ids), before)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_resid_mid_edit_reaches_the_residual_stream(tiny, name):
    """An edit of hook_resid_mid through the toolkit changes the residual stream carried
    forward, as in HookedTransformer and on HookBridge. TransformerLens 4's own hook there
    (an alias of ln2.hook_in) changes only the MLP's input: if it ever stops doing so, the
    toolkit's correction (lens_safety.backend.transformer_lens.edit_hooks) must go."""
    model, tok = tiny(name)
    tl, bridge = hooked_from_hf(model, tok), HookBridge(model, tok)
    d = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(5)),
                                      dim=0)
    hook = "blocks.1.hook_resid_mid"
    toolkit = Edit.from_direction(d, "subtract", layers=[1], alpha=3.0, where=("resid_mid",),
                                  skip_first=False)

    def edit(x):
        return x - 3.0 * d

    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    expected = PlainReference(model).run_with_hooks(ids, [(hook, lambda x, hook: edit(x))])
    with torch.no_grad():
        with toolkit.apply(tl):
            got = tl(ids, return_type="logits")
        raw = tl.run_with_hooks(ids, fwd_hooks=[(hook, lambda x, hook: edit(x))])
    with toolkit.apply(bridge):
        on_bridge = bridge(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(on_bridge, expected, atol=1e-4, rtol=0)
    assert torch.allclose(raw, expected, atol=1e-4) == (not TL4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_generation_equals_uncached_decoding_and_the_bridge(tiny, name):
    """Greedy continuations through the toolkit (HookedTransformer with its KV cache,
    TransformerBridge without) equal plain uncached HF decoding and HookBridge; the protocol's
    greedy and sampled continuations run on the TransformerLens model too."""
    model, tok = tiny(name)
    tl, bridge = hooked_from_hf(model, tok), HookBridge(model, tok)
    def greedy_texts(model):
        settings = ProtocolSettings(max_new_tokens=8)
        return [t for (t,) in continuations(model, tok, PROMPTS, 1, settings, sample=False).texts]

    texts = greedy_texts(tl)
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        expected.append(tok.decode(_greedy_uncached(model, ids, 8)[0, ids.shape[1]:],
                                   skip_special_tokens=True))
    assert texts == expected == greedy_texts(bridge)
    settings = ProtocolSettings(k=2, max_new_tokens=6, batch_size=4, seed=3)
    greedy = continuations(tl, tok, PROMPTS, 1, settings, sample=False)
    assert greedy.tokens == continuations(bridge, tok, PROMPTS, 1, settings, sample=False).tokens
    sampled = continuations(tl, tok, PROMPTS, 2, settings)
    assert [[len(row) for row in rows] for rows in sampled.tokens] == [[6, 6], [6, 6]]
    assert sampled.tokens == continuations(tl, tok, PROMPTS, 2, settings).tokens  # seeded


@pytest.mark.slow
def test_smollm2_through_transformer_lens_equals_hf(smollm2):
    """The real SmolLM2 on the installed line: logits within 2e-4 of HF's (sdpa; |logit| ~ 30)
    and the same 20 greedy tokens."""
    model, tok = smollm2
    tl = load_hooked((model, tok))
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        assert (tl(ids, return_type="logits") - model(input_ids=ids).logits).abs().max() < 2e-4
    generated = model.generate(input_ids=ids, max_new_tokens=20, min_new_tokens=20,
                               do_sample=False, pad_token_id=tok.eos_token_id)
    settings = ProtocolSettings(max_new_tokens=20)
    assert continuations(tl, tok, PROMPTS[:1], 1, settings, sample=False).texts[0] == [
        tok.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)]


# ---------------------------------------------------------------- load_hooked


@pytest.mark.parametrize("how", ["spec", "object", "pair"])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-qwen3"])
def test_load_hooked_matches_hf_logits(tiny, name, how):
    """HookedTransformer on TransformerLens 3.x, TransformerBridge on 4.x: HF's logits."""
    model, tok = tiny(name)
    if how == "spec":
        hooked = load_hooked(name)
    elif how == "object" and TL4:  # booting without a tokenizer would fetch one from the hub
        with pytest.raises(UsageError, match="needs the tokenizer"):
            load_hooked(model)
        return
    elif how == "object":
        hooked = load_hooked(model)
    else:
        hooked = load_hooked((model, tok))
    assert type(hooked).__name__ == ("TransformerBridge" if TL4 else "HookedTransformer")
    ids = torch.tensor([tok("The old house on the hill was quiet")["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = hooked(ids, return_type="logits")
    assert (got - expected).abs().max().item() <= 1e-4
    if how != "object":
        assert hooked.tokenizer is not None


def test_load_hooked_hub_name_offline_says_local_directory():
    with pytest.raises(ModelLoadError, match="local directory"):
        load_hooked("gpt2-large")


def test_load_hooked_local_directory(tiny, tmp_path):
    model, tok = tiny("tiny-gpt2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    hooked = load_hooked(tmp_path)
    ids = torch.tensor([tok("A short test")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(hooked(ids, return_type="logits"), model(input_ids=ids).logits,
                              atol=1e-4)
