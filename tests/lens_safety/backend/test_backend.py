"""The backend dispatch: a TransformerLens model measured through ``as_lm`` gives the Hugging
Face model's perplexity, unedited and under an Edit (against the HookBridge under the same
edit), and is left as it was."""

import hashlib

import pytest
import torch

from lens_safety.backend import as_lm, dims
from lens_safety.backend.transformer_lens import load_hooked
from lens_safety.edits.edit import RESIDUAL, Edit
from pruning_bridge.bridge import HookBridge
from pruning_bridge.evals import perplexity
from pruning_bridge.evals.data import load_wikitext2


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_transformer_lens_perplexity_through_as_lm(tiny, data_dir):
    model, tok = tiny("tiny-llama")
    hooked, bridge = load_hooked((model, tok)), HookBridge(model, tok)
    assert dims(hooked) == dims(bridge) == dims(model) == (4, 64)
    text = load_wikitext2(data_dir=data_dir)[:20000]
    d = torch.randn(64, generator=torch.Generator().manual_seed(2))

    def ppl(lm):
        return perplexity(lm, tok, text, window=64, max_windows=2, batch_size=2,
                          progress=False).value

    state = _state_hash(hooked)
    assert ppl(as_lm(hooked)) == pytest.approx(ppl(model), rel=1e-4)
    baked = Edit.from_direction(d, "orthogonalize")
    everywhere = Edit.from_direction(d, "project", layers=range(4), where=RESIDUAL,
                                     skip_first=False)
    with baked.apply(hooked):
        edited = ppl(as_lm(hooked))
    with everywhere.apply(bridge):
        expected = ppl(bridge)
    assert edited == pytest.approx(expected, rel=1e-4)
    assert abs(edited - ppl(model)) > 1e-3 * ppl(model)  # the edit is visible
    assert _state_hash(hooked) == state
