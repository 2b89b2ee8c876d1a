"""collect_activations against plain PyTorch forward hooks on the HF GPT-2 modules, each text run
alone (no padding), with left and right padding in the batched bridge runs."""

import pytest
import torch

from lens_safety.edits.activation_stats import (
    ActivationStatsError,
    TokenReservoir,
    collect_activations,
    pool_activations,
)
from pruning_bridge.bridge import HookBridge

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Hello world",
         "A much longer sentence, with commas, numbers like 42 and 7, and more words at the end.",
         "Short one.",
         "Yet another text about nothing in particular",
         "x y"]
LAYER = 1


@pytest.fixture(scope="module")
def gpt2(tiny):
    model, tokenizer = tiny("tiny-gpt2")
    return model.eval(), tokenizer, HookBridge(model, tokenizer)


def reference(model, tokenizer, texts, what: str) -> list[torch.Tensor]:
    """Per text (run alone): the activation a plain forward hook sees, [pos, ...]."""
    block = model.transformer.h[LAYER]
    out = []
    got = {}

    def keep_output(module, args, output):
        got["x"] = output

    def keep_input(module, args):
        got["x"] = args[0]

    if what == "mlp.hook_post":
        handle = block.mlp.act.register_forward_hook(keep_output)
    elif what == "hook_mlp_out":
        handle = block.mlp.register_forward_hook(keep_output)
    elif what == "attn.hook_z":  # c_proj's input is the heads' outputs side by side
        handle = block.attn.c_proj.register_forward_pre_hook(keep_input)
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            with torch.no_grad():
                model(input_ids=ids)
            x = got["x"][0].float()
            if what == "attn.hook_z":
                x = x.reshape(x.shape[0], model.config.n_head, -1)
            out.append(x)
    finally:
        handle.remove()
    return out


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("what", ["mlp.hook_post", "hook_mlp_out", "attn.hook_z"])
def test_pooling_matches_plain_hooks(gpt2, side, what):
    model, tokenizer, bridge = gpt2
    name = f"blocks.{LAYER}.{what}"
    ref = reference(model, tokenizer, TEXTS, what)
    for skip in (True, False):
        s = 1 if skip else 0
        got = {pool: collect_activations(bridge, TEXTS, [name], pool=pool, skip_first=skip,
                                         batch_size=4, padding_side=side)[name]
               for pool in ("tokens", "mean", "max", "last")}
        torch.testing.assert_close(got["tokens"], torch.cat([r[s:] for r in ref]),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["mean"], torch.stack([r[s:].mean(0) for r in ref]),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["max"], torch.stack([r[s:].amax(0) for r in ref]),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["last"], torch.stack([r[-1] for r in ref]),
                                   atol=1e-5, rtol=1e-5)
    assert got["tokens"].shape[1:] == ref[0].shape[1:]
    assert got["mean"].shape[0] == len(TEXTS)


def test_first_token_excluded_and_several_names(gpt2):
    model, tokenizer, bridge = gpt2
    names = [f"blocks.{LAYER}.mlp.hook_post", f"blocks.{LAYER}.attn.hook_z"]
    with_first = collect_activations(bridge, TEXTS, names, pool="tokens", skip_first=False)
    without = collect_activations(bridge, TEXTS, names, pool="tokens")
    lengths = [len(tokenizer(t).input_ids) for t in TEXTS]
    assert with_first[names[0]].shape[0] == sum(lengths)
    assert without[names[0]].shape[0] == sum(lengths) - len(TEXTS)
    assert without[names[1]].shape == (sum(lengths) - len(TEXTS), model.config.n_head,
                                       model.config.n_embd // model.config.n_head)
    firsts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    rest = torch.ones(sum(lengths), dtype=torch.bool)
    rest[firsts] = False
    torch.testing.assert_close(without[names[0]], with_first[names[0]][rest])


def test_token_cap_is_a_seeded_subsample(gpt2):
    _, _, bridge = gpt2
    name = f"blocks.{LAYER}.mlp.hook_post"
    full = collect_activations(bridge, TEXTS, name, pool="tokens", batch_size=2)[name]
    capped = collect_activations(bridge, TEXTS, name, pool="tokens", batch_size=2,
                                 max_tokens=10, seed=3)[name]
    again = collect_activations(bridge, TEXTS, name, pool="tokens", batch_size=2,
                                max_tokens=10, seed=3)[name]
    other = collect_activations(bridge, TEXTS, name, pool="tokens", batch_size=2,
                                max_tokens=10, seed=4)[name]
    assert capped.shape == (10, full.shape[1])
    torch.testing.assert_close(capped, again)
    assert not torch.equal(capped, other)
    # every kept row is one of the full rows, each at most once, in stream order
    dist = torch.cdist(capped, full, compute_mode="donot_use_mm_for_euclid_dist")
    index = dist.argmin(dim=1)
    assert torch.all(dist.min(dim=1).values < 1e-5)
    assert index.unique().numel() == 10 and torch.all(index.diff() > 0)
    big = collect_activations(bridge, TEXTS, name, pool="tokens", batch_size=2,
                              max_tokens=10_000)[name]
    torch.testing.assert_close(big, full)


def test_reservoir_is_uniform():
    """Over many seeds every token of a 40-token stream is kept with probability cap / 40."""
    n, cap, seeds = 40, 10, 600
    counts = torch.zeros(n)
    for seed in range(seeds):
        reservoir = TokenReservoir(cap, seed)
        for start in range(0, n, 7):  # uneven batches
            kept = reservoir.add({"x": torch.arange(start, min(n, start + 7)).float()[:, None]})
        counts[kept["x"].long().flatten()] += 1
    expected = seeds * cap / n  # 150; binomial sd ~10.6
    assert counts.sum() == seeds * cap
    assert torch.all((counts - expected).abs() < 5 * 10.6), counts


def test_pool_activations_masks_by_hand():
    x = torch.tensor([[[1.0], [5.0], [3.0], [0.0]],     # right padded: 3 real
                      [[0.0], [9.0], [-2.0], [4.0]]])   # left padded: 3 real
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    assert pool_activations(x, mask, "tokens").flatten().tolist() == [5.0, 3.0, -2.0, 4.0]
    assert pool_activations(x, mask, "mean").flatten().tolist() == [4.0, 1.0]
    assert pool_activations(x, mask, "max").flatten().tolist() == [5.0, 4.0]
    assert pool_activations(x, mask, "max", skip_first=False).flatten().tolist() == [5.0, 9.0]
    assert pool_activations(x, mask, "last").flatten().tolist() == [3.0, 4.0]


def test_bad_inputs(gpt2):
    _, _, bridge = gpt2
    name = f"blocks.{LAYER}.mlp.hook_post"
    with pytest.raises(ActivationStatsError, match="one-token text"):
        collect_activations(bridge, ["Hello world", "a"], name, pool="mean")
    with pytest.raises(ActivationStatsError, match="Unknown pooling"):
        collect_activations(bridge, TEXTS, name, pool="median")
    with pytest.raises(ActivationStatsError, match="max_tokens caps"):
        collect_activations(bridge, TEXTS, name, pool="max", max_tokens=5)
    with pytest.raises(ValueError, match="Unknown hook name"):
        collect_activations(bridge, TEXTS, "blocks.1.mlp.hook_postt")
    with pytest.raises(ActivationStatsError, match="No texts"):
        collect_activations(bridge, [], name)
