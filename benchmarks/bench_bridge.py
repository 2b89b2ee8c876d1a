"""HookBridge overhead: bridged forward vs the plain HF forward, on SmolLM2-135M (batch 8 x 256).

Variants (one run, same inputs, same numbers checked): the plain model; the bridge with no hook
(it calls the model directly); an nnsight trace that touches nothing; one no-op hook on every
layer's resid_post (read only, and read + write back); caching every resid_post.

    python benchmarks/bench_bridge.py [--model smollm2-135m] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse

import torch

from common import median_time, print_table
from pruning_bridge.bridge import HookBridge
from pruning_bridge.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, tok = load_model(args.model)
    bridge = HookBridge(model, tok)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    n = bridge.adapter.n_layers
    post = [f"blocks.{layer}.hook_resid_post" for layer in range(n)]

    @torch.no_grad()
    def plain():
        return model(input_ids=ids, attention_mask=mask).logits

    def empty_trace():
        with torch.no_grad(), bridge.lm.trace(ids, attention_mask=mask):
            logits = bridge.lm.output.logits.save()
        return logits

    def hooked(fn):
        def run():
            with bridge.hooks([(name, fn) for name in post]):
                return bridge(ids, attention_mask=mask)
        return run

    reference = plain()
    variants = {
        "plain HF forward": plain,
        "bridge, no hook": lambda: bridge(ids, attention_mask=mask),
        "nnsight trace, nothing touched": empty_trace,
        f"bridge, {n} no-op read hooks (return None)": hooked(lambda x, name: None),
        f"bridge, {n} no-op write hooks (return x)": hooked(lambda x, name: x),
        f"bridge, run_with_cache of {n} resid_post": lambda: bridge.run_with_cache(ids, post)[0],
    }
    rows = []
    for name, fn in variants.items():
        torch.testing.assert_close(fn(), reference)  # every variant computes the same logits
        rows.append((name, median_time(fn, repeats=args.repeats)))
    print_table(f"HookBridge overhead on {args.model}, batch {args.batch} x {args.seq} tokens, "
                f"{torch.get_num_threads()} threads", rows, "plain HF forward")


if __name__ == "__main__":
    main()
