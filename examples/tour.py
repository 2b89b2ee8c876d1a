"""A short tour of the toolkit, notebook style (run it whole, or cell by cell in an editor that
understands ``# %%``): load, bridge, prune, route, probe, edit. About two minutes on a laptop CPU
with the embedded SmolLM2-135M, offline.

    python examples/tour.py --data-dir ../shared/data
"""

# %% Load a model and evaluate it
import argparse

import torch

from lens_safety import Edit, LayerProbes, PromptSet, cache_residuals, harmful_direction
from pruning_bridge import HookBridge, load_model, load_wikitext2, perplexity
from pruning_bridge.heads.removal import head_counts, heads_to_remove, remove_heads
from pruning_bridge.heads.training import train_router, training_windows
from pruning_bridge.pruning.layers import block_influence, skip_layers
from pruning_bridge.pruning.weight_sweep import calibration_texts
from pruning_bridge.pruning.weights import input_norms, magnitude_prune, wanda_prune

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--data-dir", default="../shared/data")
args = parser.parse_args()

model, tok = load_model(args.model)  # a hub id, a local checkpoint, smollm2-135m or tiny-*
text = load_wikitext2("test", args.data_dir)


def ppl(m) -> float:
    """Perplexity over 4 windows of 256 tokens (``perplexity`` returns an EvalResult)."""
    return perplexity(m, tok, text, window=256, max_windows=4, progress=False).value


print(f"perplexity (4 x 256 tokens): {ppl(model):.2f}")

# %% The bridge: TransformerLens hook names on the Hugging Face model, through nnsight
bridge = HookBridge(model, tok)
logits, cache = bridge.run_with_cache("The cat sat on the", names=lambda n: "resid_post" in n)
print(f"cached {len(cache)} tensors; layer 3 residual "
      f"{tuple(cache['blocks.3.hook_resid_post'].shape)}")
with bridge.hooks([("blocks.3.attn.hook_z", lambda z, name: z * 0)]):  # silence layer 3's heads
    print("layer 3 attention off ->", bridge.generate("The capital of France is", 8))

# %% Prune: layers (reversibly), weights (restored bit for bit on exit)
texts = calibration_texts(args.data_dir, n=16)
influence = block_influence(model, tok, texts[:8], max_length=128)
least = sorted(range(len(influence)), key=influence.__getitem__)[:2]
with skip_layers(bridge, least):
    print(f"layers {least} (lowest Block Influence) skipped: perplexity {ppl(bridge):.2f}")
with magnitude_prune(model, 0.3) as report:
    print(f"magnitude 30% ({report.sparsity:.1%} zero): perplexity {ppl(model):.2f}")
with wanda_prune(model, input_norms(model, tok, texts), 0.3):
    print(f"Wanda 30%: perplexity {ppl(model):.2f}")
print(f"restored: perplexity {ppl(model):.2f}")

# %% Route attention heads per token with a learned router, then remove the unused ones
windows = training_windows(tok, texts, 128)
router, log = train_router(bridge, tok, windows, n_shared=1, steps=10, batch_size=2)
print(f"router trained: LM loss {log.steps[0]['lm_loss']:.3f} -> {log.steps[-1]['lm_loss']:.3f}, "
      f"{router.active_fraction:.0%} of heads active per token")
with router.record(), router.routing(bridge):
    print(f"routed perplexity {ppl(bridge):.2f}")  # record() also accumulates the mean gates
gates = router.mean_gates()  # [layers, heads]: the report's Figure 3
smaller = remove_heads(load_model(args.model)[0], heads_to_remove(gates, 0.25))
print(f"25% of heads removed (query heads per layer {[q for q, _ in head_counts(smaller)][:6]}"
      f"...): perplexity {ppl(smaller):.2f}")

# %% Probe for harm, find the harmful direction, edit it out at inference
prompts = PromptSet.load(args.data_dir, n_per_class=60)
train, test = prompts.split(test_size=0.25)
acts = cache_residuals(bridge, tok, train.texts, hook="resid_post", pool="last", progress=False)
probes = LayerProbes(task="binary").fit(acts, train.labels)
layer = probes.best_layer_
auroc = probes.scores_.set_index("layer").loc[layer, "auroc"]
print(f"best probe layer {layer}: cross-validated AUROC {auroc:.3f}")
direction = harmful_direction(acts, train.labels, layer)
toxic = [p.text for p in test if p.label == "toxic"][:3]
with torch.no_grad():
    print("before:", bridge.generate(toxic, max_new_tokens=12))
    # project the direction out of every layer's residual stream (first token left alone)
    edit = Edit.from_direction(direction, "project", layers=range(bridge.adapter.n_layers))
    with edit.apply(bridge):
        print("after: ", bridge.generate(toxic, max_new_tokens=12))
