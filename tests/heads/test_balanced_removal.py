"""The balanced head selection: every layer keeps a uniform kv layout and shrinks.

References are independent of the implementation: a brute-force search over every removal of
small layouts, parameter counts computed by hand from the chosen heads, and the full model with
those heads zeroed at o_proj's input by a plain PyTorch hook.
"""

import copy
import itertools
import math
import warnings
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from pruning_bridge.common.errors import UsageError
from pruning_bridge.heads.removal import (
    LayerGrowthWarning,
    head_counts,
    heads_to_remove,
    kv_copies,
    remove_heads,
)

SMALL = dict(vocab_size=1000, intermediate_size=96, num_hidden_layers=3,
             max_position_embeddings=128)
# name: config of a GQA model; (query, kv) heads as in the report's layouts
CONFIGS = {
    "llama-8-over-2": lambda: LlamaConfig(hidden_size=64, num_attention_heads=8,  # TinyLlama-like
                                          num_key_value_heads=2, **SMALL),
    "qwen3-6-over-3": lambda: Qwen3Config(hidden_size=64, num_attention_heads=6,  # Qwen3-like:
                                          num_key_value_heads=3, head_dim=16,  # 96 != 64 wide
                                          **SMALL),
    "llama-9-over-3": lambda: LlamaConfig(hidden_size=72, num_attention_heads=9,  # SmolLM2-like
                                          num_key_value_heads=3, **SMALL),
}


@pytest.fixture(scope="module")
def gqa():
    built = {}

    def get(name):
        if name not in built:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                built[name] = AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
        return built[name]

    return get


def get_model(name, tiny, gqa):
    return tiny(name)[0] if name.startswith("tiny-") else gqa(name)


def head_dim(model):
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


@contextmanager
def heads_zeroed(model, heads_by_layer):
    """The reference: those heads' slices of the output projection's input set to zero."""
    handles = []
    for layer, heads in heads_by_layer.items():
        def zero(module, args, heads=list(heads), d=head_dim(model)):
            z = args[0].unflatten(-1, (-1, d)).clone()
            z[..., heads, :] = 0
            return (z.flatten(-2), *args[1:])

        proj = model.model.layers[layer].self_attn.o_proj
        handles.append(proj.register_forward_pre_hook(zero))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def groups_of(n_q, n_kv):
    size = n_q // n_kv
    return [set(range(j * size, (j + 1) * size)) for j in range(n_kv)]


def is_uniform(removed, n_q, n_kv):
    """Every kv group that keeps a head keeps the same number of them."""
    kept = [len(g - set(removed)) for g in groups_of(n_q, n_kv)]
    return len({k for k in kept if k}) <= 1 and any(kept)


def random_importance(n_layers, n_heads, seed=0):
    return torch.rand(n_layers, n_heads, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- on models


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", *CONFIGS])
def test_balanced_removal_shrinks_every_layer_and_is_exact(tiny, gqa, name, fraction):
    model = get_model(name, tiny, gqa)
    counts = head_counts(model)
    n_q, n_kv = counts[0]
    importance = random_importance(len(counts), n_q)
    removal = heads_to_remove(importance, fraction, model)
    assert removal, "something is removed"
    assert all(is_uniform(heads, n_q, n_kv) for heads in removal.values())
    # by hand: each query head removed saves its q rows and o columns; each kv group emptied
    # saves its k and v rows (Llama / Qwen3 here have no projection biases)
    d, hd = model.config.hidden_size, head_dim(model)
    emptied = {layer: sum(g <= set(heads) for g in groups_of(n_q, n_kv))
               for layer, heads in removal.items()}
    saved = sum(2 * d * hd * (len(heads) + emptied[layer]) for layer, heads in removal.items())

    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with heads_zeroed(model, removal):
        reference = logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayerGrowthWarning)
        pruned = remove_heads(copy.deepcopy(model), removal)
    assert n_params(model) - n_params(pruned) == saved > 0
    for layer in range(len(counts)):  # every pruned layer strictly smaller, the others equal
        before, after = n_params(model.model.layers[layer]), n_params(pruned.model.layers[layer])
        assert after < before if layer in removal else after == before
    for layer, (q, kv) in enumerate(head_counts(pruned)):
        assert q % kv == 0 and kv_copies(pruned, layer) == list(range(kv))  # no replicas
        assert q == n_q - len(removal.get(layer, []))
        assert kv == n_kv - emptied.get(layer, 0)
    torch.testing.assert_close(logits(pruned, ids), reference, atol=1e-4, rtol=0)


def test_without_gqa_balanced_is_the_plain_least_important_selection(tiny):
    model, _ = tiny("tiny-gpt2")  # 4 heads, each its own kv head
    importance = random_importance(4, 4, seed=3)
    for fraction in (0.25, 0.5, 0.75):
        assert heads_to_remove(importance, fraction, model) == \
            heads_to_remove(importance, fraction, mode="uneven")


def test_a_model_with_replicated_kv_heads_becomes_uniform_again(tiny):
    """An uneven removal replicates kv heads; a balanced one afterwards counts replicas as one
    kv head, removes them, and stays exact (indices are the pruned model's own)."""
    model, _ = tiny("tiny-llama")  # 4 query / 2 kv heads
    first = remove_heads(copy.deepcopy(model), {i: [0] for i in range(4)})
    assert head_counts(first) == [(3, 3)] * 4  # kept 1 + 2 per kv head: kv 1 replicated
    # current heads 0, 1, 2 = original 1, 2, 3; current 1 and 2 share a kv head
    importance = torch.tensor([[0.9, 0.1, 0.5]] * 3 + [[0.9, 0.4, 0.5]])
    removal = heads_to_remove(importance, 0.25, first)
    assert removal == {0: [1], 1: [1], 2: [1]}  # the least important of kv 1's two heads
    pruned = remove_heads(copy.deepcopy(first), removal)
    assert head_counts(pruned) == [(2, 2)] * 3 + [(3, 3)]
    assert n_params(pruned) < n_params(first)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    original = {i: [0] + [h + 1 for h in removal.get(i, [])] for i in range(4)}
    with heads_zeroed(model, original):
        reference = logits(model, ids)
    torch.testing.assert_close(logits(pruned, ids), reference, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- the selection itself


def brute_force(importance, layout, k):
    """Among all removals keeping every layer uniform and non-empty, those of total nearest
    ``k`` (the fewer on a tie); of them, the least summed importance."""
    per_layer = []
    for scores, (n_q, n_kv) in zip(importance.tolist(), layout):
        per_layer.append([(len(r), math.fsum(scores[h] for h in r), r)
                          for size in range(n_q) for r in itertools.combinations(range(n_q), size)
                          if is_uniform(r, n_q, n_kv)])
    best = None
    for combo in itertools.product(*per_layer):
        total, cost = sum(c[0] for c in combo), sum(c[1] for c in combo)
        key = (abs(total - k), total, cost)
        if best is None or key < best[0]:
            best = (key, {layer: list(c[2]) for layer, c in enumerate(combo) if c[0]})
    return best[1]


@pytest.mark.parametrize("layout", [[(4, 2)] * 3, [(6, 2)] * 2, [(9, 3)] * 2, [(6, 3), (6, 6)]])
def test_balanced_selection_equals_a_brute_force_search(layout):
    n_heads = layout[0][0]
    for seed in range(3):
        importance = random_importance(len(layout), n_heads, seed)
        for fraction in (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9):
            k = math.floor(fraction * importance.numel() + 0.5)
            if k > sum(n_q - 1 for n_q, _ in layout):  # would empty a layer: said, not clamped
                with pytest.raises(UsageError, match="empty a layer"):
                    heads_to_remove(importance, fraction, layout)
                continue
            expected = brute_force(importance, layout, k)
            assert heads_to_remove(importance, fraction, layout) == expected, (seed, fraction)


def test_within_a_group_the_least_important_heads_go():
    importance = torch.tensor([[3.0, 1.0, 0.9, 9.0, 8.0, 7.0],   # groups [0 1 2] [3 4 5]
                               [5.0, 6.0, 0.2, 9.0, 8.5, 0.3]])
    # 4 of 12: one head from each group of both layers, each group's least important (summed
    # 0.9 + 7 + 0.2 + 0.3; the best four from one layer would cost 11.5 or 11.9)
    assert heads_to_remove(importance, 4 / 12, [(6, 2)] * 2) == {0: [2, 5], 1: [2, 5]}
    # the uneven selection takes the globally least important instead: 0.2, 0.3, 0.9, 1
    assert heads_to_remove(importance, 4 / 12, mode="uneven") == {0: [1, 2], 1: [2, 5]}
    # ties go the way the uneven selection breaks them: lower heads first
    assert heads_to_remove(torch.ones(1, 6), 2 / 6, [(6, 2)]) == {0: [0, 3]}


def test_total_is_the_nearest_that_uniform_layouts_allow():
    # 9 query over 3 kv heads (SmolLM2): a layer can lose 0, 3, 5, 6, 7 or 8 heads
    importance = random_importance(2, 9)
    removed = {k: sum(map(len, heads_to_remove(importance, k / 18, [(9, 3)] * 2).values()))
               for k in range(17)}
    assert removed == {0: 0, 1: 0, 2: 3, 3: 3, 4: 3, 5: 5, 6: 6, 7: 7, 8: 8, 9: 9, 10: 10,
                       11: 11, 12: 12, 13: 13, 14: 14, 15: 15, 16: 16}


def test_selection_modes_and_layout_forms_agree(tiny):
    model, _ = tiny("tiny-llama")
    importance = random_importance(4, 4)
    from pruning_bridge.bridge import HookBridge

    by_model = heads_to_remove(importance, 0.5, model)
    assert by_model == heads_to_remove(importance, 0.5, head_counts(model))
    assert by_model == heads_to_remove(importance, 0.5, HookBridge(model, tiny("tiny-llama")[1]))
    assert by_model == heads_to_remove(importance, 0.5, model, mode="balanced")
    groups = heads_to_remove(importance, 0.5, model, mode="groups")
    assert groups == heads_to_remove(importance, 0.5, kv_groups=2)
    assert all(heads in ([0, 1], [2, 3]) for heads in groups.values())


# ---------------------------------------------------------------- the growth warning


def test_uneven_removal_that_grows_a_layer_warns_with_the_numbers(gqa):
    model = gqa("llama-9-over-3")  # SmolLM2's layout: remove_heads(model, {7: [4]}) grew it
    d, hd = 72, 8
    block = n_params(model.model.layers[1])
    # 8 query heads kept as 3 + 2 + 3: kv heads replicated to 8 (5 replicas)
    after = block - 2 * d * hd + 5 * 2 * d * hd
    with pytest.warns(LayerGrowthWarning) as caught:
        pruned = remove_heads(copy.deepcopy(model), {1: [4], 2: [0, 1, 2]})  # layer 2: balanced
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"layer 1: {block:,} -> {after:,} parameters" in message
    assert "query heads 9 -> 8, kv heads 3 -> 8, 5 of them replicas" in message
    assert "layer 2" not in message and "heads_to_remove(importance, fraction, model)" in message
    assert n_params(pruned.model.layers[1]) == after
    assert head_counts(pruned)[1:3] == [(8, 8), (6, 2)]


def test_no_warning_when_no_layer_grows(tiny, gqa):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayerGrowthWarning)
        # tiny-llama, 4 over 2: kept 1 + 2 -> 3 kv heads, as many parameters as before
        model = tiny("tiny-llama")[0]
        pruned = remove_heads(copy.deepcopy(model), {0: [0]})
        assert n_params(pruned) == n_params(model)
        remove_heads(copy.deepcopy(gqa("llama-9-over-3")), {0: [0, 3, 6], 1: [0, 1, 2]})


# ---------------------------------------------------------------- bad input


def test_balanced_selection_errors(tiny):
    model, _ = tiny("tiny-llama")
    importance = torch.ones(4, 4)
    with pytest.raises(UsageError, match=r"needs the model's kv layout.*heads_to_remove"
                                         r"\(importance, 0.5, model\).*mode='uneven'"):
        heads_to_remove(importance, 0.5)
    with pytest.raises(UsageError, match="mode must be one of 'balanced', 'uneven', 'groups'"):
        heads_to_remove(importance, 0.5, model, mode="even")
    with pytest.raises(UsageError, match="not both"):
        heads_to_remove(importance, 0.5, model, kv_groups=2)
    with pytest.raises(UsageError, match="kv_groups selects whole kv groups"):
        heads_to_remove(importance, 0.5, kv_groups=2, mode="uneven")
    with pytest.raises(UsageError, match="layout has 3 layers but the importance has 4"):
        heads_to_remove(importance, 0.5, [(4, 2)] * 3)
    with pytest.raises(UsageError, match="Layer 1 has 3 query heads but the importance has 4"):
        heads_to_remove(importance, 0.5, [(4, 2), (3, 1), (4, 2), (4, 2)])
    with pytest.raises(UsageError, match="6 query heads over 4 kv heads"):
        heads_to_remove(torch.ones(1, 6), 0.5, [(6, 4)])
    with pytest.raises(UsageError, match=r"\(n_query, n_kv\) heads per layer"):
        heads_to_remove(importance, 0.5, [4, 4, 4, 4])
    with pytest.raises(UsageError, match="at most 12 can go"):
        heads_to_remove(importance, 1.0, model)
    with pytest.raises(UsageError, match="fraction"):
        heads_to_remove(importance, -0.1, model)


@pytest.mark.slow
def test_smollm2_balanced_removal_shrinks_where_the_uneven_one_grew(smollm2):
    model, _ = smollm2
    before = n_params(model)
    with pytest.warns(LayerGrowthWarning, match=r"layer 7: .* kv heads 3 -> 8"):
        grown = remove_heads(copy.deepcopy(model), {7: [4]})
    assert n_params(grown) - before == 294_912  # 5 kv replicas minus one query head
    del grown
    importance = torch.ones(30, 9)
    importance[7, 4] = 0.0  # head 4 is the least important; a layer can lose 3 heads at least
    assert heads_to_remove(importance, 1 / 270, model) == {}  # 0 is nearer 1 than 3 is
    removal = heads_to_remove(importance, 3 / 270, model)
    assert removal == {7: [0, 4, 6]}  # one from each kv group (ties: lower heads)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayerGrowthWarning)
        pruned = remove_heads(copy.deepcopy(model), removal)
    assert before - n_params(pruned) == 3 * 2 * 576 * 64
    assert head_counts(pruned)[7] == (6, 3)
