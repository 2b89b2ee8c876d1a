"""Layer removal speed: the prefix-reusing sweep vs the naive loop, and dropped-layer forwards.

1. One-layer-removed sweep over every layer (MMLU subset + perplexity windows) with prefix reuse
   vs evaluating each pruned model from scratch (target <= 0.6x); both must give the same rows.
2. Forward time of the model with k of N layers physically dropped vs the full model, against
   the ideal (N - k) / N.

    python benchmarks/bench_layers.py [--model smollm2-135m] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import median_time, print_table

from pruning_bridge.evals import EvalSettings
from pruning_bridge.models import load_model
from pruning_bridge.pruning.layer_sweep import layer_sweep
from pruning_bridge.pruning.layers import drop_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--limit", type=int, default=16, help="MMLU questions")
    parser.add_argument("--windows", type=int, default=2, help="perplexity windows of 256")
    args = parser.parse_args()
    model, tok = load_model(args.model)
    settings = EvalSettings(["mmlu", "perplexity"], window=256, data_dir=args.data_dir,
                            limit={"mmlu": args.limit, "perplexity": args.windows},
                            progress=False)

    timings, results = [], {}
    for name, reuse in (("naive loop (each pruned model from scratch)", False),
                        ("prefix-reusing sweep", True)):
        start = time.perf_counter()
        rows = layer_sweep(model, tok, settings, reuse_prefix=reuse)  # in memory: computed
        timings.append((name, time.perf_counter() - start))
        results[reuse] = {(r["task"], tuple(r["config"]["removed"])): r["value"] for r in rows}
    for key, value in results[True].items():  # the same numbers both ways
        assert abs(value - results[False][key]) <= 1e-6 * max(1.0, abs(value)), key
    n = model.config.num_hidden_layers
    print_table(f"Layer sweep over {n} layers of {args.model}: MMLU x{args.limit} + "
                f"perplexity {args.windows} x 256 tokens (identical rows)", timings,
                "naive loop (each pruned model from scratch)")

    ids = torch.randint(0, model.config.vocab_size, (4, 256),
                        generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.no_grad():
        full = median_time(lambda: model(ids, use_cache=False), repeats=3)
        rows.append((f"full model ({n} layers)", full))
        for k in (n // 4, n // 2):
            dropped = drop_layers(copy.deepcopy(model), list(range(n - k, n)))
            t = median_time(lambda: dropped(ids, use_cache=False), repeats=3)
            rows.append((f"{k} layers dropped (ideal {(n - k) / n:.3f})", t))
    print_table(f"Forward, batch 4 x 256, {args.model}", rows, f"full model ({n} layers)")


if __name__ == "__main__":
    main()
