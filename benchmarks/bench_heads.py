"""Head pruning speed: half the query heads physically removed vs the full model, and the cost
of routing heads per token (masked, through the bridge) vs the plain model.

Two ways to pick the half, by a stand-in importance (the norm of each head's slice of o_proj):
whole kv groups (``heads_to_remove(..., kv_groups=...)``: q, k, v and o all shrink) and single
heads (uneven layouts replicate kv heads, so k/v can even grow). Before timing, each pruned
model's logits are checked against the full model with those heads zeroed at o_proj's input:
in float32 on the timed batch (30 layers of rounding in different kernels: atol 1e-2), and in
float64 on a short prompt (atol 1e-9).
Reported: the whole forward, and the attention modules alone (timed with forward hooks). Then
the routed model (a router per layer, gates on hook_z through the HookBridge) vs the plain
model: masking computes every head, so routing costs time until heads are removed; a uniform
router with every head selected is checked to give the plain model's logits.

    python benchmarks/bench_heads.py [--model smollm2-135m]

(Llama / Qwen models: the importance and the timers read ``model.model.layers[i].self_attn``.)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import contextmanager

import torch

from common import median_time, print_table
from pruning_bridge.bridge import HookBridge
from pruning_bridge.heads.removal import head_counts, heads_to_remove, remove_heads
from pruning_bridge.heads.routing import RoutedHeads
from pruning_bridge.models import load_model


def o_proj_norms(model) -> torch.Tensor:
    """``[n_layers, n_heads]``: the Frobenius norm of each head's columns of o_proj."""
    rows = []
    for layer in model.model.layers:
        attn = layer.self_attn
        w = attn.o_proj.weight.detach()
        rows.append(w.view(w.shape[0], -1, attn.head_dim).norm(dim=(0, 2)))
    return torch.stack(rows)


@contextmanager
def heads_zeroed(model, heads_by_layer):
    """The reference: those heads' slices of o_proj's input set to zero."""
    def hook(heads, head_dim):
        def zero(module, args):
            z = args[0].unflatten(-1, (-1, head_dim)).clone()
            z[..., heads, :] = 0
            return (z.flatten(-2), *args[1:])
        return zero

    attns = [layer.self_attn for layer in model.model.layers]
    handles = [attns[i].o_proj.register_forward_pre_hook(hook(heads, attns[i].head_dim))
               for i, heads in heads_by_layer.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_against_zeroed(model, pruned, heads_by_layer, ids: torch.Tensor) -> None:
    """Assert ``pruned`` computes what ``model`` computes with ``heads_by_layer`` zeroed."""
    for dtype, batch, atol in ((torch.float32, ids, 1e-2), (torch.float64, ids[:1, :64], 1e-9)):
        model.to(dtype), pruned.to(dtype)  # float32 -> float64 -> float32 is exact
        with heads_zeroed(model, heads_by_layer):
            reference = model(batch, use_cache=False).logits
        logits = pruned(batch, use_cache=False).logits
        print(f"  {dtype}: max |logits - zeroed reference| = "
              f"{(logits - reference).abs().max().item():.1e}")
        torch.testing.assert_close(logits, reference, atol=atol, rtol=0)
    model.float(), pruned.float()


def attention_time(model, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median over forwards of the wall time spent inside all self-attention modules."""
    clock = {"start": 0.0, "total": 0.0}

    def start(module, args):
        clock["start"] = time.perf_counter()

    def stop(module, args, output):
        clock["total"] += time.perf_counter() - clock["start"]

    attns = [layer.self_attn for layer in model.model.layers]
    handles = [a.register_forward_pre_hook(start) for a in attns]
    handles += [a.register_forward_hook(stop) for a in attns]
    totals = []
    try:
        for _ in range(repeats):
            clock["total"] = 0.0
            model(ids, use_cache=False)
            totals.append(clock["total"])
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(totals)


def routing_overhead(model, tokenizer, ids: torch.Tensor) -> list[tuple[str, float]]:
    """Forward time of the plain model and of routed models (all heads still computed)."""
    bridge = HookBridge(model, tokenizer)
    n_heads = model.config.num_attention_heads
    rows = [("plain model", median_time(lambda: model(ids, use_cache=False), repeats=3))]
    for label, top_k, uniform in (("routed, every head, uniform gates", n_heads - 1, True),
                                  ("routed, ~50% heads active", n_heads // 2 - 1, False)):
        router = RoutedHeads(bridge, n_shared=1, top_k=top_k)
        if uniform:
            for param in router.parameters():
                param.zero_()
        with router.routing(bridge):
            if uniform:
                torch.testing.assert_close(bridge(ids, use_cache=False),
                                           model(ids, use_cache=False).logits,
                                           atol=1e-4, rtol=0)
            rows.append((f"{label} (active {router.active_fraction:.2f})",
                         median_time(lambda: bridge(ids, use_cache=False), repeats=3)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--fraction", type=float, default=0.5)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    cfg = model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    ids = torch.randint(0, cfg.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
    importance = o_proj_norms(model)
    n_q, n_kv = (sum(c) for c in zip(*head_counts(model)))
    full_name = f"full model ({n_q} query / {n_kv} kv heads)"
    forward_rows, attention_rows = [], []
    with torch.no_grad():
        forward_rows.append((full_name, median_time(lambda: model(ids, use_cache=False),
                                                    repeats=3)))
        attention_rows.append((full_name, attention_time(model, ids)))
        for label, kv_groups in (("whole kv groups", groups), ("single heads", None)):
            heads = heads_to_remove(importance, args.fraction, kv_groups=kv_groups)
            pruned = remove_heads(copy.deepcopy(model), heads)
            print(f"{label}:")
            check_against_zeroed(model, pruned, heads, ids)
            q, kv = (sum(c) for c in zip(*head_counts(pruned)))
            name = f"{label} removed ({q} query / {kv} kv heads)"
            forward_rows.append((name, median_time(lambda: pruned(ids, use_cache=False),
                                                   repeats=3)))
            attention_rows.append((name, attention_time(pruned, ids)))
    threads = torch.get_num_threads()
    print_table(f"Forward, batch 4 x 256, {args.model}, {threads} thread(s)", forward_rows,
                full_name)
    print_table(f"Attention modules only (sum over {cfg.num_hidden_layers} layers, target <= "
                f"0.85x)", attention_rows, full_name)
    with torch.no_grad():
        routed_rows = routing_overhead(model, tokenizer, ids)
    print_table(f"Routed (masked) forward vs the plain model, batch 4 x 256, {threads} thread(s)",
                routed_rows, "plain model")


if __name__ == "__main__":
    main()
