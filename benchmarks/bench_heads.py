"""Head removal speed and size: 25 / 50 / 75 % of the heads physically removed vs the full
model, for each selection of ``heads_to_remove``, and the cost of routing heads per token
(masked, through the bridge) vs the plain model.

Heads are ranked by a stand-in importance (the norm of each head's slice of o_proj) and chosen
by each selection: ``balanced`` (the default: the same number of query heads from every kv
group of a layer, so every layer keeps a uniform layout and shrinks), ``uneven`` (the globally
least important single heads; uneven splits replicate kv heads, so a layer can grow: flagged)
and ``groups`` (whole kv groups). Before timing, each pruned model's logits are checked against
the full model with those heads zeroed at o_proj's input: in float32 on the timed batch (atol
1e-2: many layers of rounding in different kernels) and, for models under 300M parameters, in
float64 on a short prompt (atol 1e-9). Reported: parameters, the whole forward, and the
attention modules alone (timed with forward hooks), as ratios to the full model.

    python benchmarks/bench_heads.py                                       # SmolLM2, 9 over 3
    python benchmarks/bench_heads.py --model shape:tinyllama-1.1b --batch 1 --seq 128 --no-routing
    python benchmarks/bench_heads.py --model shape:qwen3-0.6b --batch 1 --seq 128 --no-routing

(``shape:*`` are the report's models at true size with random weights; Llama / Qwen models
only: the importance and the timers read ``model.model.layers[i].self_attn``.)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from contextlib import contextmanager

import torch

from common import median_time, print_table
from pruning_bridge.bridge import HookBridge
from pruning_bridge.heads.removal import (LayerGrowthWarning, head_counts, heads_to_remove,
                                          remove_heads)
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


def check_against_zeroed(model, pruned, heads_by_layer, ids: torch.Tensor,
                         exact: bool = True) -> None:
    """Assert ``pruned`` computes what ``model`` computes with ``heads_by_layer`` zeroed: in
    float32 on the timed batch and, if ``exact``, in float64 on a short prompt."""
    checks = [(torch.float32, ids, 1e-2)]
    if exact:
        checks.append((torch.float64, ids[:1, :64], 1e-9))
    for dtype, batch, atol in checks:
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


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m",
                        help="a load_model spec, e.g. shape:tinyllama-1.1b (true size)")
    parser.add_argument("--fractions", default="0.25,0.5,0.75", help="fractions of heads removed")
    parser.add_argument("--modes", default="balanced,uneven,groups",
                        help="heads_to_remove selections to compare")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--no-routing", action="store_true", help="skip the routed rows")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    importance = o_proj_norms(model)
    n_q, n_kv = (sum(c) for c in zip(*head_counts(model)))
    full_name = f"full model ({n_q} query / {n_kv} kv heads)"
    total = n_params(model)
    exact = total < 3e8  # float64 copies of a model and its pruned copy fit in memory
    forward_rows, attention_rows, sizes = [], [], []
    with torch.no_grad():
        forward_rows.append((full_name, median_time(lambda: model(ids, use_cache=False),
                                                    repeats=3)))
        attention_rows.append((full_name, attention_time(model, ids)))
        for fraction in (float(f) for f in args.fractions.split(",")):
            for mode in args.modes.split(","):
                heads = heads_to_remove(importance, fraction, model, mode=mode)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", LayerGrowthWarning)
                    pruned = remove_heads(copy.deepcopy(model), heads)
                grown = bool(caught)
                q, kv = (sum(c) for c in zip(*head_counts(pruned)))
                label = f"{fraction:.0%} removed, {mode} ({q} query / {kv} kv heads)"
                print(f"{label}:")
                check_against_zeroed(model, pruned, heads, ids, exact)
                sizes.append((label, n_params(pruned) / total,
                              "grew a layer (warned)" if grown else ""))
                forward_rows.append((label, median_time(lambda: pruned(ids, use_cache=False),
                                                        repeats=3)))
                attention_rows.append((label, attention_time(pruned, ids)))
                pruned = None  # free it before the next copy
    threads = torch.get_num_threads()
    print(f"\nParameters relative to the full model ({total:,}), {args.model}")
    for label, ratio, note in sizes:
        print(f"{label:<60}{ratio:>8.3f}  {note}")
    print_table(f"Forward, batch {args.batch} x {args.seq}, {args.model}, {threads} thread(s)",
                forward_rows, full_name)
    print_table(f"Attention modules only (sum over {cfg.num_hidden_layers} layers)",
                attention_rows, full_name)
    if not args.no_routing:
        with torch.no_grad():
            routed_rows = routing_overhead(model, tokenizer, ids)
        print_table(f"Routed (masked) forward vs the plain model, batch {args.batch} x "
                    f"{args.seq}, {threads} thread(s)", routed_rows, "plain model")


if __name__ == "__main__":
    main()
