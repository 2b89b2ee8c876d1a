"""The toolkit on either TransformerLens line (3.x HookedTransformer, 4.x TransformerBridge):
where TransformerBridge differs from HookedTransformer in a way that changes a result, the
toolkit's path gives HookedTransformer's result, checked against the plain-PyTorch reference
and the Hugging Face model."""

import pytest
import torch

from lens_safety.backend import edited, greedy_continuations
from lens_safety.hooked import hooked_from_hf, load_hooked, transformer_lens_4
from lens_safety.protocol import ProtocolSettings, continuations
from pruning_bridge.bridge import HookBridge
from references import TL4, PlainReference

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
    toolkit's correction (lens_safety.hooked.edit_hooks) must go."""
    model, tok = tiny(name)
    tl, bridge = hooked_from_hf(model, tok), HookBridge(model, tok)
    d = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(5)),
                                      dim=0)
    hook = "blocks.1.hook_resid_mid"

    def edit(x):
        return x - 3.0 * d

    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    expected = PlainReference(model).run_with_hooks(ids, [(hook, lambda x, hook: edit(x))])
    with torch.no_grad():
        with edited(tl, [hook], edit):
            got = tl(ids, return_type="logits")
        raw = tl.run_with_hooks(ids, fwd_hooks=[(hook, lambda x, hook: edit(x))])
    with edited(bridge, [hook], edit):
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
    texts = greedy_continuations(tl, tok, PROMPTS, max_new_tokens=8)
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        expected.append(tok.decode(_greedy_uncached(model, ids, 8)[0, ids.shape[1]:],
                                   skip_special_tokens=True))
    assert texts == expected == greedy_continuations(bridge, tok, PROMPTS, max_new_tokens=8)
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
    assert greedy_continuations(tl, tok, PROMPTS[:1], max_new_tokens=20) == [
        tok.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)]
