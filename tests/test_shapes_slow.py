"""The report's models at true size (GBs of memory, minutes on a CPU): every stage of the report
preset rehearsed on its real architectures, against independent references.

Marked ``true_size``, which the default run deselects (pyproject's ``addopts``); run with
``bash scripts/test.sh -m true_size tests/test_shapes_slow.py -s`` (``-s`` prints the seconds
and peak memory of each check). One true-size model is held at a time.

References: HF's own hidden states and forward, a deep copy with layers deleted by hand, heads
zeroed at ``o_proj``'s input by a plain PyTorch hook, TransformerLens. Exactness checks that need
float32 (removing heads reorders the sums) run at the true widths and head layouts with 4 layers;
everything else runs at full depth in the report's dtype (bf16 for Qwen3 / TinyLlama), except
training on a CPU: bf16 backward passes are ~50x slower there, so full-depth router training runs
in float32 on a CPU and bf16 training is checked at two layers.
"""

import copy
import gc
import hashlib
import importlib.util
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pruning_bridge.bridge import HookBridge, head_counts
from pruning_bridge.common.memory import PeakMemory
from pruning_bridge.heads import gradient_head_importance, heads_to_remove, remove_heads
from pruning_bridge.heads.training import train_router, training_windows
from pruning_bridge.models import load_model
from pruning_bridge.pruning.layers import drop_layers, skip_layers
from pruning_bridge.pruning.weights import (input_norms, magnitude_prune, prunable_linears,
                                            wanda_prune)

pytestmark = [pytest.mark.slow, pytest.mark.true_size]

# name, the report's dtype, published parameters, (query, kv) heads, layers
REPORT_MODELS = [
    ("qwen3-0.6b", torch.bfloat16, 596_049_920, (16, 8), 28),
    ("tinyllama-1.1b", torch.bfloat16, 1_100_048_384, (32, 4), 22),
    ("gpt2-large", torch.float32, 774_030_080, (20, 20), 36),
]
DTYPES = {name: dtype for name, dtype, *_ in REPORT_MODELS}
PROMPTS = ["The capital of France is Paris, and the capital of Italy is",
           "Grouped-query attention"]  # a padded batch
TEXT = ("Robert Boulter is an English film , television and theatre actor . He had a guest "
        "starring role on the television series The Bill in 2000 . This was followed by a "
        "starring role in the play Herons written by Simon Stephens , which was performed in "
        "2001 at the Royal Court Theatre . ") * 4

_held: dict = {}


def model_of(spec: str, dtype):
    """``(model, tokenizer)``, keeping only the latest true-size model in memory."""
    key = (spec, dtype)
    if key not in _held:
        _held.clear()
        gc.collect()
        _held[key] = load_model(spec, dtype=dtype)
    return _held[key]


@contextmanager
def measured(what: str):
    """Print the seconds and peak memory of a check (the closing note's table)."""
    tic = time.perf_counter()
    with PeakMemory() as peak:
        yield
    print(f"\n[true size] {what}: {time.perf_counter() - tic:.1f} s, {peak.summary()}")


def state_hash(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def padded(model, tok, prompts=PROMPTS):
    """``(ids, mask)`` of a padded batch, as the bridge pads it."""
    return HookBridge(model, tok).tokenize(prompts)


def hf_forward(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **kwargs)


def close_in(dtype):
    """Tolerances for two computations of the same thing in ``dtype`` (bf16: ~3 digits)."""
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)


def head_dim(model):
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


@contextmanager
def heads_zeroed(model, heads_by_layer):
    """The reference for head removal: those heads' slices of o_proj's input set to zero."""
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


# ---------------------------------------------------------------- every model


@pytest.mark.parametrize("name, dtype, n_params, heads, n_layers", REPORT_MODELS,
                         ids=[row[0] for row in REPORT_MODELS])
def test_true_size_model_builds_and_the_bridge_matches_hf(name, dtype, n_params, heads,
                                                         n_layers):
    with measured(f"{name} build ({dtype})"):
        model, tok = model_of(f"shape:{name}", dtype)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert all(p.dtype == dtype for p in model.parameters())
    assert head_counts(model) == [heads] * n_layers
    ids, mask = padded(model, tok)
    with measured(f"{name} HF forward, 2 prompts"):
        out = hf_forward(model, ids, mask, output_hidden_states=True)
    assert torch.isfinite(out.logits).all()
    bridge = HookBridge(model, tok)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    with measured(f"{name} bridge run_with_cache, {n_layers} residuals"):
        logits, cache = bridge.run_with_cache(PROMPTS, names=names)
    assert torch.equal(cache.attention_mask, mask)
    for layer in range(n_layers):
        torch.testing.assert_close(cache[names[layer]], out.hidden_states[layer],
                                   **close_in(dtype))
    torch.testing.assert_close(logits, out.logits, **close_in(dtype))


# ---------------------------------------------------------------- layers and weights (Qwen3)


def test_qwen3_layer_skip_equals_deleting_the_layer():
    model, tok = model_of("shape:qwen3-0.6b", torch.bfloat16)
    ids, mask = padded(model, tok)
    with measured("qwen3-0.6b skip layer 13 (bridge)"):
        with skip_layers(model, [13], tok) as bridge:
            skipped = bridge(ids, mask)
    with measured("qwen3-0.6b drop layer 13 (deep copy)"):
        dropped = drop_layers(copy.deepcopy(model), [13])
        reference = hf_forward(dropped, ids, mask).logits
    del dropped
    torch.testing.assert_close(skipped, reference, **close_in(torch.bfloat16))


def test_qwen3_magnitude_and_wanda_prune_and_restore_exactly():
    model, tok = model_of("shape:qwen3-0.6b", torch.bfloat16)
    before = state_hash(model)
    linears = prunable_linears(model)
    with measured("qwen3-0.6b magnitude 50%"):
        with magnitude_prune(model, 0.5) as report:
            zeros = {n: int((m.weight == 0).sum()) for n, m in linears.items()}
    assert state_hash(model) == before
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    for name, module in linears.items():  # per matrix: half of every weight
        assert zeros[name] == pytest.approx(module.weight.numel() / 2, abs=1)
    with measured("qwen3-0.6b Wanda input norms (2 texts)"):
        norms = input_norms(model, tok, [TEXT, TEXT[:300]])
    with measured("qwen3-0.6b Wanda 50%"):
        with wanda_prune(model, norms, 0.5) as report:
            rows_ok = all(bool(((m.weight == 0).sum(dim=1) == m.weight.shape[1] // 2).all())
                          for m in linears.values())
    assert rows_ok  # Wanda: half of every output row
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert state_hash(model) == before


# ---------------------------------------------------------------- heads (TinyLlama, Qwen3)


def training_dtype(name: str) -> torch.dtype:
    """The report's dtype on a GPU; float32 on a CPU, where bf16 backward passes are ~50x
    slower (one full-depth bf16 router step would take ~20 min; bf16 training is checked at
    two layers below)."""
    return DTYPES[name] if torch.cuda.is_available() else torch.float32


@pytest.mark.parametrize("name", ["tinyllama-1.1b", "qwen3-0.6b"])
def test_router_training_in_bf16_at_the_true_widths(name):
    """bf16 through the router's backward pass: true widths and head layout, 2 layers."""
    model, tok = model_of(f"shape:{name}?num_hidden_layers=2", torch.bfloat16)
    windows = training_windows(tok, [TEXT] * 2, 16)
    with measured(f"{name} router training in bf16, 1 step x 1 x 16 tokens, 2 layers"):
        router, log = train_router(model, tok, windows, steps=1, batch_size=1, seq_len=16,
                                   progress=False)
    assert math.isfinite(log.steps[0]["lm_loss"])
    assert all(torch.isfinite(p).all() for p in router.parameters())


@pytest.mark.parametrize("name", ["tinyllama-1.1b", "qwen3-0.6b"])
def test_router_training_and_head_importance_at_true_size(name):
    model, tok = model_of(f"shape:{name}", training_dtype(name))
    before = state_hash(model)
    windows = training_windows(tok, [TEXT] * 4, 64)
    with measured(f"{name} router training ({training_dtype(name)}), 3 steps x 2 x 64 "
                  f"tokens"):
        router, log = train_router(model, tok, windows, steps=3, batch_size=2, seq_len=64,
                                   progress=False)
    losses = [step["lm_loss"] for step in log.steps]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    with measured(f"{name} gradient head importance, 2 windows"):
        importance = gradient_head_importance(model, tok, windows[:2], batch_size=2,
                                              progress=False)
    n_q, _ = head_counts(model)[0]
    assert importance.shape == (model.config.num_hidden_layers, n_q)
    assert torch.isfinite(importance).all()
    assert state_hash(model) == before  # the model is frozen and unchanged


@pytest.mark.parametrize("name", ["tinyllama-1.1b", "qwen3-0.6b"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_balanced_head_removal_on_the_true_layouts_equals_zeroing(name, fraction):
    """float32, true widths and head layout, 4 layers: removal equals zeroing the heads, and
    every pruned layer shrinks."""
    spec = f"shape:{name}?num_hidden_layers=4"
    model, tok = model_of(spec, torch.float32)
    n_q, n_kv = head_counts(model)[0]
    importance = torch.rand(4, n_q, generator=torch.Generator().manual_seed(1))
    removal = heads_to_remove(importance, fraction, model)
    assert sum(map(len, removal.values())) == pytest.approx(fraction * 4 * n_q, abs=n_kv)
    ids, mask = padded(model, tok)
    with heads_zeroed(model, removal):
        reference = hf_forward(model, ids, mask).logits
    pruned = remove_heads(copy.deepcopy(model), removal)
    for layer in range(4):
        size = sum(p.numel() for p in model.model.layers[layer].parameters())
        after = sum(p.numel() for p in pruned.model.layers[layer].parameters())
        assert after < size if layer in removal else after == size
    torch.testing.assert_close(hf_forward(pruned, ids, mask).logits, reference, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("name", ["tinyllama-1.1b", "qwen3-0.6b"])
def test_balanced_head_removal_at_full_size_shrinks_and_runs(name):
    model, tok = model_of(f"shape:{name}", DTYPES[name])
    n_layers = model.config.num_hidden_layers
    n_q, n_kv = head_counts(model)[0]
    importance = torch.rand(n_layers, n_q, generator=torch.Generator().manual_seed(2))
    removal = heads_to_remove(importance, 0.5, model)
    with measured(f"{name} remove half the heads (deep copy)"):
        pruned = remove_heads(copy.deepcopy(model), removal)
    removed = sum(map(len, removal.values()))
    assert removed == pytest.approx(n_layers * n_q / 2, abs=n_kv)
    saved = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in pruned.parameters())
    # every removed query head takes its q rows and o columns along (kv heads may go as well)
    assert saved >= removed * 2 * model.config.hidden_size * head_dim(model)
    ids, mask = padded(model, tok)
    assert torch.isfinite(hf_forward(pruned, ids, mask).logits).all()


# ---------------------------------------------------------------- safety (GPT-2 Large)


def test_gpt2_large_hooked_transformer_equals_the_bridge_and_edits_agree():
    from lens_safety.backend.transformer_lens import hooked_from_hf
    from lens_safety.edits.edit import Edit

    model, tok = model_of("shape:gpt2-large", torch.float32)
    bridge = HookBridge(model, tok)
    with measured("gpt2-large hooked_from_hf"):
        hooked = hooked_from_hf(model, tok)
    ids, mask = padded(model, tok, PROMPTS[:1])
    with torch.no_grad():
        torch.testing.assert_close(hooked(ids), bridge(ids, mask), rtol=1e-4, atol=1e-4)
    names = [f"blocks.{i}.hook_resid_post" for i in range(36)]
    _, cache = bridge.run_with_cache(PROMPTS * 4, names=names)
    last = cache.attention_mask.sum(-1) - 1 if tok.padding_side == "right" else torch.full((8,), -1)
    acts = torch.stack([cache[name][torch.arange(8), last] for name in names])
    labels = ["toxic", "neutral"] * 4
    edit = Edit.fit(acts.numpy(), labels, "clamp", layers=[18, 19, 20])
    with measured("gpt2-large clamp edit, bridge vs TransformerLens"):
        with edit.apply(bridge), torch.no_grad():
            through_bridge = bridge(ids, mask)
        with edit.apply(hooked), torch.no_grad():
            through_hooked = hooked(ids)
    torch.testing.assert_close(through_hooked, through_bridge, rtol=1e-4, atol=1e-4)
    del hooked


# ---------------------------------------------------------------- the whole rehearsal


def test_rehearsal_preset_runs_every_stage(tmp_path, data_dir):
    """``--preset rehearsal``: the main job's every stage on the three true-size models."""
    _held.clear()
    gc.collect()
    script = Path(__file__).resolve().parents[1] / "examples" / "reproduce_report.py"
    spec = importlib.util.spec_from_file_location("reproduce_report", script)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with measured("rehearsal preset, every stage"):
        path = job.main(["--preset", "rehearsal", "--data-dir", str(data_dir),
                         "--out", str(tmp_path / "results"), "--figures",
                         str(tmp_path / "figures")])
    assert path.exists()

    record = json.loads((tmp_path / "results" / "run_rehearsal.json").read_text())
    attempts = record["attempts"]
    assert {a["stage"] for a in attempts} == {"baseline", "layers", "weights", "heads",
                                              "attention", "safety"}
    print("\n[true size] rehearsal stages:", attempts)
