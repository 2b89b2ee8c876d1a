"""Small contracts that hold across the toolkit: layer indices, what ``names`` selects, errors."""

import copy

import pytest
import torch

from lens_safety import cache_residuals
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common import OutOfRangeError, UsageError, check_layers
from pruning_bridge.evals import DataNotFoundError, load_gsm8k
from pruning_bridge.models import ModelLoadError, load_model
from pruning_bridge.pruning import drop_layers, skip_layers

PROMPTS = ["The quick brown fox jumps over", "Hello"]


def test_check_layers_reads_negative_indices_from_the_end():
    assert check_layers(None, 4) == [0, 1, 2, 3]
    assert check_layers([-1, 0, 3, 0], 4) == [0, 3]  # sorted, de-duplicated
    assert check_layers(-2, 4) == [2]
    with pytest.raises(OutOfRangeError, match=r"\[4, -5\] are out of range.*0..3"):
        check_layers([4, -5], 4)
    with pytest.raises(IndexError):  # an OutOfRangeError is an IndexError and a UsageError
        check_layers([9], 4)
    with pytest.raises(UsageError, match="keep at least one"):
        check_layers([0, 1, 2, 3], 4, allow_all=False)
    with pytest.raises(UsageError, match="No layers"):
        check_layers([], 4)


def test_negative_layers_mean_the_same_everywhere(tiny):
    model, tok = tiny("tiny-llama")
    bridge = HookBridge(model, tok)
    ids, mask = bridge.tokenize(PROMPTS)
    with skip_layers(bridge, [-1]):
        last = bridge(ids, mask)
    with skip_layers(bridge, [3]):
        torch.testing.assert_close(last, bridge(ids, mask))
    dropped = drop_layers(copy.deepcopy(model), [-1])
    assert dropped.config.num_hidden_layers == 3
    acts = cache_residuals(bridge, tok, PROMPTS, layers=[-1], progress=False)
    torch.testing.assert_close(acts[0], cache_residuals(bridge, tok, PROMPTS, layers=[3],
                                                        progress=False)[0])


def test_names_none_selects_every_hook_and_empty_selects_none(tiny):
    model, tok = tiny("tiny-gpt2")
    bridge = HookBridge(model, tok)
    _, everything = bridge.forward(PROMPTS, names=None)
    _, nothing = bridge.forward(PROMPTS)
    _, cached = bridge.run_with_cache(PROMPTS)
    assert set(everything) == set(cached) == set(bridge.hook_names)
    assert len(nothing) == 0
    assert bridge.resolve([]) == []
    with pytest.raises(UsageError, match="No hook names"):
        bridge.run_with_cache(PROMPTS, names=[])


def test_named_errors_are_usage_errors_and_keep_their_builtin_class(tmp_path):
    with pytest.raises(ModelLoadError) as error:
        load_model("tiny-lama")
    assert isinstance(error.value, UsageError) and isinstance(error.value, RuntimeError)
    assert "tiny-llama" in str(error.value)
    with pytest.raises(DataNotFoundError) as error:
        load_gsm8k("test", data_dir=tmp_path)
    assert isinstance(error.value, UsageError) and isinstance(error.value, FileNotFoundError)
