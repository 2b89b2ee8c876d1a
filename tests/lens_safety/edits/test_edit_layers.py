"""An Edit keeps each direction (strength, eraser) with its own layer, whatever order the layers
are given in, negative layers included: checked against hand-written PyTorch forward hooks on a
3-layer Hugging Face GPT-2 (issue 27, item 5)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from lens_safety.edits.edit import Edit
from lens_safety.edits.leace import LeaceEraser
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common import OutOfRangeError, UsageError

D_MODEL = 64


@pytest.fixture(scope="module")
def gpt2_3(tiny):
    """``(hf_model, bridge, ids)``: a seeded random 3-layer GPT-2, its bridge, and token ids."""
    base, tok = tiny("tiny-gpt2")
    config = copy.deepcopy(base.config)
    config.n_layer = 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    return model, HookBridge(model, tok), ids


def unit(seed: int) -> torch.Tensor:
    d = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


def fitted_eraser(seed: int) -> LeaceEraser:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, D_MODEL, generator=g)
    y = torch.arange(64) % 2
    x[y == 1] += 3 * unit(seed + 100)  # a concept along one direction
    return LeaceEraser().fit(x, y)


D = {0: unit(10), 1: unit(11), 2: unit(12)}
ALPHA = {0: 1.5, 1: -0.7, 2: 3.0}  # subtract: alpha per layer
T = {0: -0.03, 1: 0.0, 2: -0.05}  # clamp: threshold per layer (projections are ~0.03)
ERASERS = {layer: fitted_eraser(layer) for layer in (0, 1, 2)}


def reference(how: str, layer: int):
    """The edit of block ``layer``'s output, in plain PyTorch."""
    d = D[layer]
    if how == "project":
        return lambda x: x - (x @ d)[..., None] * d
    if how == "subtract":
        return lambda x: x - ALPHA[layer] * d
    if how == "clamp":
        return lambda x: x - (x @ d - T[layer]).clamp(min=0)[..., None] * d
    eraser = ERASERS[layer]
    return lambda x: x - (x.double() - eraser.mean_) @ eraser.P.T


@torch.no_grad()
def reference_logits(model, ids, how: str, layers) -> torch.Tensor:
    """Logits with a forward hook on each HF block of ``layers`` (block output = resid_post)."""
    def hook(f):
        def edit(module, args, output):
            if isinstance(output, tuple):
                return (f(output[0]).to(output[0].dtype), *output[1:])
            return f(output).to(output.dtype)
        return edit

    handles = [model.transformer.h[layer].register_forward_hook(hook(reference(how, layer)))
               for layer in layers]
    try:
        return model(ids).logits
    finally:
        for handle in handles:
            handle.remove()


def make_edit(how: str, given: list[int], blocks: list[int]) -> Edit:
    """An Edit at ``given`` layers (in that order) with, for each, the values of its block."""
    kw = {"skip_first": False}
    if how == "leace":
        return Edit(how, given, erasers=[ERASERS[b] for b in blocks], **kw)
    strengths = {"subtract": ALPHA, "clamp": T}.get(how)
    return Edit(how, given, directions=torch.stack([D[b] for b in blocks]),
                strengths=None if strengths is None else [strengths[b] for b in blocks], **kw)


@torch.no_grad()
def edited_logits(bridge, ids, edit: Edit) -> torch.Tensor:
    with edit.apply(bridge):
        return bridge(ids)


@pytest.mark.parametrize("how", ["project", "subtract", "clamp", "leace"])
def test_unsorted_and_negative_layers_keep_their_directions(gpt2_3, how):
    model, bridge, ids = gpt2_3
    expected = reference_logits(model, ids, how, [0, 2])
    clean = model(ids).logits
    assert (expected - clean).abs().max() > 1e-3  # the edit changes the logits
    for given, blocks in (([0, 2], [0, 2]), ([2, 0], [2, 0]), ([-1, 0], [2, 0]),
                          ([0, -1], [0, 2]), ([-3, 2], [0, 2])):
        edit = make_edit(how, given, blocks)
        torch.testing.assert_close(edited_logits(bridge, ids, edit), expected, atol=1e-5,
                                   rtol=1e-5, msg=f"{how} at {given}")
    torch.testing.assert_close(model(ids).logits, clean, atol=0, rtol=0)  # restored


def test_unsorted_layers_are_stored_sorted_with_their_values():
    edit = make_edit("subtract", [2, 0, 1], [2, 0, 1])
    assert edit.layers == [0, 1, 2]
    assert edit.strengths == [ALPHA[0], ALPHA[1], ALPHA[2]]
    for row, layer in zip(edit.directions, edit.layers):
        torch.testing.assert_close(row, D[layer])
    sorted_edit = make_edit("subtract", [0, 1, 2], [0, 1, 2])
    assert edit.config == sorted_edit.config and str(edit) == str(sorted_edit)
    leace = make_edit("leace", [1, 0], [1, 0])
    assert leace.layers == [0, 1] and leace.erasers == [ERASERS[0], ERASERS[1]]


@pytest.mark.parametrize("how", ["clamp", "leace"])
def test_save_and_load_keep_each_layer_with_its_values(gpt2_3, how, tmp_path):
    model, bridge, ids = gpt2_3
    edit = make_edit(how, [-1, 0], [2, 0])
    loaded = Edit.load(edit.save(tmp_path / "edit"))
    assert loaded.layers == edit.layers and loaded.config == edit.config
    torch.testing.assert_close(edited_logits(bridge, ids, loaded),
                               reference_logits(model, ids, how, [0, 2]), atol=1e-5, rtol=1e-5)


def test_duplicate_and_out_of_range_layers_are_usage_errors(gpt2_3):
    _, bridge, ids = gpt2_3
    with pytest.raises(UsageError, match=r"Layer\(s\) \[1\] given more than once"):
        make_edit("project", [1, 1], [1, 1])
    same_block = make_edit("project", [-1, 2], [2, 0])  # -1 is block 2 here too
    with pytest.raises(UsageError, match=r"block\(s\) \[2\] twice in this 3-layer model"):
        edited_logits(bridge, ids, same_block)
    with pytest.raises(OutOfRangeError, match=r"\[3\] are out of range"):
        edited_logits(bridge, ids, make_edit("project", [3, 0], [0, 1]))
    with pytest.raises(OutOfRangeError, match=r"\[-4\] are out of range"):
        edited_logits(bridge, ids, make_edit("project", [-4], [0]))
