"""Weight pruning against independent references: torch.nn.utils.prune, plain hooks, plain torch."""

import copy
import hashlib

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from transformers.pytorch_utils import Conv1D

from pruning_bridge.bridge import UnsupportedArchitectureError
from pruning_bridge.evals.data import load_wikitext2
from pruning_bridge.evals import perplexity
from pruning_bridge.pruning.weights import (apply_masks, input_norms, magnitude_masks, magnitude_prune,
                                    nm_masks, nm_prune, prunable_linears, prune_permanently,
                                    sparsity_report, wanda_masks, wanda_prune)

ARCHS = ["tiny-gpt2", "tiny-qwen3", "tiny-llama"]
TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Pruning removes weights.",
         "In 1905 Einstein published four papers that changed physics, among them special "
         "relativity and the photoelectric effect.",
         "Hello",
         "A sparse network keeps the few weights that matter most for its outputs."]


def state_hash(model) -> str:
    """sha256 over every tensor's bytes (and name) of the state dict."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def block_linears(model):
    """The reference selection, written out: Linear/Conv1D modules under the block list."""
    prefix = "transformer.h." if hasattr(model, "transformer") else "model.layers."
    return {name: m for name, m in model.named_modules()
            if name.startswith(prefix) and isinstance(m, (nn.Linear, Conv1D))}


def out_in(module) -> torch.Tensor:
    """Weight as [out, in]: Conv1D computes x @ W (W is [in, out]), Linear x @ W.T."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


# ---------------------------------------------------------------- magnitude


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.8])
def test_per_matrix_mask_equals_l1_unstructured(tiny, arch, sparsity):
    model, _ = tiny(arch)
    masks = magnitude_masks(model, sparsity)
    assert set(masks) == set(block_linears(model))
    for name, module in block_linears(model).items():
        holder = nn.Module()
        holder.weight = nn.Parameter(module.weight.detach().clone())
        prune.l1_unstructured(holder, "weight", amount=sparsity)
        torch.testing.assert_close(masks[name], holder.weight_mask == 0, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_achieved_sparsity_within_one_weight(tiny, arch):
    model, _ = tiny(arch)
    for sparsity in [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.73]:
        for scope in ["per_matrix", "global"]:
            with magnitude_prune(model, sparsity, scope=scope) as report:
                if scope == "per_matrix":
                    for m in report.matrices:
                        assert abs(m.zeros - sparsity * m.total) <= 1, (m, sparsity)
                        assert m.zeros == int((model.get_submodule(m.name).weight == 0).sum())
                else:  # one threshold: the overall count is exact
                    assert abs(report.zeros - sparsity * report.total) <= 1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_global_mask_equals_concatenated_threshold(tiny, arch, sparsity):
    model, _ = tiny(arch)
    weights = {name: m.weight.detach() for name, m in block_linears(model).items()}
    everything = torch.cat([w.abs().flatten() for w in weights.values()])
    k = round(sparsity * everything.numel())
    threshold = everything.sort().values[k - 1]
    masks = magnitude_masks(model, sparsity, scope="global")
    for name, w in weights.items():
        assert torch.equal(masks[name], w.abs() <= threshold), name
    # and the same as torch's own global pruning
    other = copy.deepcopy(model)
    params = [(m, "weight") for m in block_linears(other).values()]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    for name, m in block_linears(other).items():
        assert torch.equal(masks[name], m.weight_mask == 0), name


def test_ties_give_exact_counts_deterministically(tiny):
    model = copy.deepcopy(tiny("tiny-llama")[0])
    with torch.no_grad():
        for m in block_linears(model).values():
            m.weight.copy_((m.weight * 50).round() / 50)  # a handful of levels: many ties
    for scope in ["per_matrix", "global"]:
        first = magnitude_masks(model, 0.37, scope=scope)
        second = magnitude_masks(model, 0.37, scope=scope)
        assert all(torch.equal(first[n], second[n]) for n in first)
        if scope == "per_matrix":
            for name, mask in first.items():
                assert int(mask.sum()) == round(0.37 * mask.numel()), name
        else:  # one threshold: exact overall count, even with ties at the threshold
            total = sum(mask.numel() for mask in first.values())
            assert sum(int(mask.sum()) for mask in first.values()) == round(0.37 * total)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_global_threshold_in_half_precision(tiny, dtype):
    model = copy.deepcopy(tiny("tiny-qwen3")[0]).to(dtype)  # 16-bit: many ties
    weights = {name: m.weight.detach() for name, m in block_linears(model).items()}
    everything = torch.cat([w.abs().flatten() for w in weights.values()])
    k = round(0.45 * everything.numel())
    threshold = everything.sort().values[k - 1]
    masks = magnitude_masks(model, 0.45, scope="global")
    assert sum(int(mask.sum()) for mask in masks.values()) == k
    for name, w in weights.items():
        assert torch.equal(masks[name] & (w.abs() != threshold), w.abs() < threshold), name


# ---------------------------------------------------------------- Wanda and N:M


def reference_norms(model, tokenizer, texts):
    """||X_j|| per layer input, one unpadded text at a time, with plain forward hooks."""
    sums, handles = {}, []
    for name, module in block_linears(model).items():
        def hook(module, inputs, output, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    for handle in handles:
        handle.remove()
    return {name: s.sqrt() for name, s in sums.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_wanda_mask_equals_hand_computation(tiny, arch):
    model, tok = tiny(arch)
    expected_norms = reference_norms(model, tok, TEXTS)
    norms = input_norms(model, tok, TEXTS, batch_size=3)  # padded batches: padding masked out
    assert set(norms) == set(expected_norms)
    for name in norms:
        torch.testing.assert_close(norms[name], expected_norms[name], rtol=1e-5, atol=1e-6)
    sparsity = 0.4
    masks = wanda_masks(model, norms, sparsity)
    for name, module in block_linears(model).items():
        weight = module.weight.detach()
        if isinstance(module, Conv1D):  # [in, out]: input feature j is row j, output i column i
            score = weight.abs() * expected_norms[name].float()[:, None]
            k = round(sparsity * weight.shape[0])
            order = score.argsort(dim=0)[:k]  # per output column
            expected = torch.zeros_like(weight, dtype=torch.bool).scatter_(0, order, True)
        else:  # [out, in]
            score = weight.abs() * expected_norms[name].float()[None, :]
            k = round(sparsity * weight.shape[1])
            order = score.argsort(dim=1)[:, :k]
            expected = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, order, True)
        assert torch.equal(masks[name], expected), name


def test_gpt2_conv1d_rows_are_output_features(tiny):
    model, tok = tiny("tiny-gpt2")
    norms = input_norms(model, tok, TEXTS[:2])
    fc = model.transformer.h[0].mlp.c_fc  # Conv1D weight [64 in, 256 out]
    assert norms["transformer.h.0.mlp.c_fc"].shape == (64,)
    mask = wanda_masks(model, norms, 0.25, include="h.0.mlp.c_fc")["transformer.h.0.mlp.c_fc"]
    assert mask.shape == fc.weight.shape == (64, 256)
    assert (mask.sum(dim=0) == 16).all()  # 25 % of the 64 inputs of every output
    groups = nm_masks(model, 2, 4, include="h.0.mlp.c_fc")["transformer.h.0.mlp.c_fc"]
    assert (groups.reshape(16, 4, 256).sum(dim=1) == 2).all()  # groups run along the inputs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("calibrated", [False, True])
def test_nm_pattern(tiny, arch, n, m, calibrated):
    model, tok = tiny(arch)
    norms = reference_norms(model, tok, TEXTS[:2]) if calibrated else None
    masks = nm_masks(model, n, m, norms=norms)
    for name, module in block_linears(model).items():
        weight, mask = out_in(module).detach(), masks[name]
        mask = mask.T if isinstance(module, Conv1D) else mask
        score = weight.abs() * (norms[name].float() if calibrated else 1)
        groups, pruned = score.reshape(-1, m), mask.reshape(-1, m)
        assert (pruned.sum(dim=1) == m - n).all(), name
        largest_pruned = groups.masked_fill(~pruned, -1).max(dim=1).values
        smallest_kept = groups.masked_fill(pruned, float("inf")).min(dim=1).values
        assert (largest_pruned <= smallest_kept).all(), name


# ---------------------------------------------------------------- restoring


@pytest.mark.parametrize("arch", ARCHS)
def test_bit_exact_restore_after_exit_and_exception(tiny, arch):
    model, tok = tiny(arch)
    before = state_hash(model)
    norms = input_norms(model, tok, TEXTS[:2])
    contexts = [lambda: magnitude_prune(model, 0.5), lambda: magnitude_prune(model, 0.3, "global"),
                lambda: wanda_prune(model, norms, 0.5), lambda: nm_prune(model, 2, 4, norms)]
    for make in contexts:
        with make() as report:
            assert report.sparsity > 0.25
            assert state_hash(model) != before
        assert state_hash(model) == before
        with pytest.raises(KeyError, match="boom"):
            with make():
                raise KeyError("boom")
        assert state_hash(model) == before


def test_restore_keeps_negative_zero_and_existing_zeros(tiny):
    model = copy.deepcopy(tiny("tiny-llama")[0])
    weight = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight[0, :3] = torch.tensor([0.0, -0.0, 0.0])
    before = state_hash(model)
    with magnitude_prune(model, 0.6):
        pass
    assert state_hash(model) == before and torch.signbit(weight[0, 1])


def test_defaults_leave_embeddings_norms_and_head_alone(tiny):
    for arch in ARCHS:
        model, _ = tiny(arch)
        names = set(prunable_linears(model))
        assert names == set(block_linears(model))
        assert not any(k in n for n in names for k in ("embed", "wte", "wpe", "lm_head", "norm",
                                                        "ln_"))
        others = {n: p.detach().clone() for n, p in model.named_parameters()
                  if not any(n.startswith(f"{linear}.weight") for linear in names)}
        with magnitude_prune(model, 0.5, scope="global"):
            for n, p in model.named_parameters():
                if n in others:
                    assert torch.equal(p, others[n]), n


def test_include_exclude_are_regexes(tiny):
    model, _ = tiny("tiny-llama")
    mlp = prunable_linears(model, include="mlp")
    assert mlp and all(".mlp." in n for n in mlp)
    no_first = prunable_linears(model, exclude=[r"layers\.0\."])
    assert len(no_first) == 21 and not any(n.startswith("model.layers.0.") for n in no_first)
    masks = magnitude_masks(model, 0.5, include=r"\.(q|k)_proj$")
    assert sorted({n.rsplit(".", 1)[1] for n in masks}) == ["k_proj", "q_proj"]


def test_permanent_pruning_and_report(tiny):
    model = copy.deepcopy(tiny("tiny-qwen3")[0])
    report = prune_permanently(model, magnitude_masks(model, 0.3))
    assert report.sparsity == pytest.approx(0.3, abs=1e-3)
    assert sparsity_report(model).to_dict() == report.to_dict()
    frame = report.to_pandas()
    assert list(frame.columns) == ["name", "shape", "zeros", "total", "sparsity"]
    assert len(frame) == 28 and frame["zeros"].sum() == report.zeros


# ---------------------------------------------------------------- errors


def test_clear_errors(tiny):
    model, tok = tiny("tiny-llama")
    for bad in [-0.1, 1.0, 50, float("nan")]:
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            magnitude_masks(model, bad)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        wanda_masks(model, {}, 1.5)
    with pytest.raises(ValueError, match=r"did you mean 0\.5"):
        magnitude_prune(model, 50)
    with pytest.raises(ValueError, match="per_matrix"):
        magnitude_masks(model, 0.5, scope="layer")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*64 input"):
        nm_masks(model, 2, 3)
    with pytest.raises(ValueError, match="1 <= n < m"):
        nm_masks(model, 4, 4)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj"):
        prunable_linears(model, include="attention")
    with pytest.raises(ValueError, match="No input norms"):
        wanda_masks(model, {}, 0.5)
    with pytest.raises(UnsupportedArchitectureError, match="Supported: gpt2, gpt_neox, llama"):
        prunable_linears(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        apply_masks(model, {"model.layers.0.mlp.up_proj": torch.zeros(3, 3, dtype=torch.bool)})


# ---------------------------------------------------------------- the real model


def test_smollm2_perplexity_rises_with_sparsity(smollm2, data_dir):
    model, tok = smollm2
    text = load_wikitext2(data_dir=data_dir)

    def ppl():
        return perplexity(model, tok, text, window=256, max_windows=2, progress=False).value

    before_hash, base = state_hash(model), ppl()
    with magnitude_prune(model, 0.1) as low:
        low_ppl = ppl()
    with magnitude_prune(model, 0.5) as high:
        high_ppl = ppl()
    assert low.sparsity == pytest.approx(0.1, abs=1e-6)
    assert high.sparsity == pytest.approx(0.5, abs=1e-6)
    assert all(map(torch.isfinite, torch.tensor([base, low_ppl, high_ppl])))
    assert base * 0.9 < low_ppl < high_ppl
    assert state_hash(model) == before_hash
