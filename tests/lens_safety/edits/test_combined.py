"""CombinedEdit: two edits at once equal both formulas written as one plain PyTorch forward hook
on the HF decoder layer (in the parts' order, first token untouched); saving and loading keeps
the logits; the model is exactly as before afterwards; bad input says what to do."""

import pytest
import torch

from lens_safety.edits.combined import CombinedEdit
from lens_safety.edits.edit import Edit
from lens_safety.edits.peers import PeerEdit
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common import UsageError

TEXTS = ["The weather today is", "You are such a"]


@pytest.fixture(scope="module")
def parts(tiny):
    model, tokenizer = tiny("tiny-llama")
    d_model = model.config.hidden_size
    g = torch.Generator().manual_seed(3)
    d = torch.nn.functional.normalize(torch.randn(d_model, generator=g), dim=0)
    v = torch.randn(d_model, generator=g)
    clamp = Edit.from_direction(d, "clamp", layers=[1], threshold=-0.05)
    caa = PeerEdit("caa", {"blocks.1.hook_resid_post.v": v}, strength=0.7)
    return model.eval(), tokenizer, clamp, caa, d, v


def plain_logits(model, tokenizer, fn=None):
    """Each text alone through the HF model, ``fn`` replacing layer 1's output after the first
    position."""
    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        new = x.clone()
        new[:, 1:] = fn(x[:, 1:])
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.model.layers[1].register_forward_hook(hook) if fn else None
    try:
        with torch.no_grad():
            return [model(**tokenizer(t, return_tensors="pt")).logits[0] for t in TEXTS]
    finally:
        if handle is not None:
            handle.remove()


def bridge_logits(bridge, tokenizer, edit):
    with edit.apply(bridge):
        return [bridge.forward(tokenizer(t, return_tensors="pt").input_ids)[0][0] for t in TEXTS]


def test_both_parts_in_order_equal_plain_hooks(parts):
    model, tokenizer, clamp, caa, d, v = parts
    bridge = HookBridge(model, tokenizer)
    before = plain_logits(model, tokenizer)

    def clamp_then_steer(x):
        excess = (x @ d + 0.05).clamp(min=0)
        return x - excess[..., None] * d + 0.7 * v

    def steer_then_clamp(x):
        y = x + 0.7 * v
        return y - (y @ d + 0.05).clamp(min=0)[..., None] * d

    for edit, formula in ((CombinedEdit([clamp, caa]), clamp_then_steer),
                          (CombinedEdit([caa, clamp]), steer_then_clamp)):
        expected = plain_logits(model, tokenizer, formula)
        got = bridge_logits(bridge, tokenizer, edit)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-5)
    # the two orders differ (the test can tell them apart), and the model is back as it was
    a, b = (plain_logits(model, tokenizer, f) for f in (clamp_then_steer, steer_then_clamp))
    assert not torch.allclose(a[1], b[1], atol=1e-4)
    nothing = CombinedEdit([caa.with_strength(0), caa.with_strength(0)])
    for x, y in zip(before, bridge_logits(bridge, tokenizer, nothing)):
        assert torch.equal(x, y)


def test_save_load_and_describe(parts, tmp_path):
    model, tokenizer, clamp, caa, *_ = parts
    bridge = HookBridge(model, tokenizer)
    both = CombinedEdit([clamp, CombinedEdit([caa, clamp])])  # nested: flattened
    assert len(both.parts) == 3 and str(both) == f"{clamp} + {caa} + {clamp}"
    assert both.config == {"how": "combined", "parts": [clamp.config, caa.config, clamp.config]}
    loaded = Edit.load(both.save(tmp_path / "edit"))
    assert isinstance(loaded, CombinedEdit) and loaded.config == both.config
    for x, y in zip(bridge_logits(bridge, tokenizer, both),
                    bridge_logits(bridge, tokenizer, loaded)):
        assert torch.equal(x, y)


def test_bad_input(parts, tmp_path):
    _, _, clamp, *_ = parts
    with pytest.raises(UsageError, match="at least two parts"):
        CombinedEdit([clamp])
    with pytest.raises(UsageError, match="Combine Edit or PeerEdit"):
        CombinedEdit([clamp, "clamp"])
    (tmp_path / "combined.json").write_text("{}")
    with pytest.raises(UsageError, match="how many parts"):
        Edit.load(tmp_path)
