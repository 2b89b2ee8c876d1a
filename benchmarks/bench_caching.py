"""lens_safety caching and editing costs on SmolLM2-135M, as ratios in one run.

(a) ``cache_residuals`` throughput (64 texts, pool="last", every resid_post, batch 8) vs a plain
    HF forward over the very same padded batches; the cached residuals are checked against the
    HF ``hidden_states`` of that forward at the last real token.
(b) Memory of what is *kept*: the pooled cache ``[n_layers, n, d_model]`` vs
    ``bridge.run_with_cache`` of every resid_post ``[n_layers, batch, pos, d_model]`` for the
    same batches. Bytes are computed from the sizes of the kept tensors (numel x element size),
    not from a process-memory probe.
(c) Greedy generation of 20 new tokens for 8 prompts: the unedited model vs an ``Edit``
    projecting at every residual hook of every layer (first token included) vs the same
    direction ``orthogonalize``d into the weights; the two edits must give the same tokens.

    python benchmarks/bench_caching.py [--model smollm2-135m] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
from common import median_time, print_table, sample_texts

from lens_safety.backend import residual_hooks
from lens_safety.edits.edit import Edit
from lens_safety.probing.caching import cache_residuals
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common import left_pad
from pruning_bridge.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-texts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tok = load_model(args.model)
    model.eval()
    bridge = HookBridge(model, tok)
    n_layers = bridge.adapter.n_layers
    post = [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    texts = sample_texts(args.n_texts)

    # the same padded batches cache_residuals builds (sorted by length, left padding)
    rows = tok(texts, truncation=True, max_length=256)["input_ids"]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(range(len(texts)), key=lambda i: len(rows[i]))
    batches = [(order[s:s + args.batch], *left_pad([rows[i] for i in order[s:s + args.batch]],
                                                     pad_id))
               for s in range(0, len(texts), args.batch)]

    # ---- (a) throughput
    def cached():
        return cache_residuals(bridge, tok, texts, pool="last", batch_size=args.batch,
                               progress=False)

    @torch.no_grad()
    def plain():
        return [model(input_ids=ids, attention_mask=mask).logits for _, ids, mask in batches]

    pooled = cached()
    with torch.no_grad():  # reference: HF hidden_states[L + 1] is resid_post L (L < last)
        for index, ids, mask in batches:
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            for layer in range(n_layers - 1):
                torch.testing.assert_close(pooled[layer, index], hs[layer + 1][:, -1].float(),
                                           rtol=1e-4, atol=1e-4)
    t_plain = median_time(plain, repeats=args.repeats)
    t_cache = median_time(cached, repeats=args.repeats)
    print_table(f"(a) {args.n_texts} texts, batch {args.batch}, {n_layers} resid_post pooled "
                f"(last), {torch.get_num_threads()} threads; texts/s: plain "
                f"{args.n_texts / t_plain:.1f}, cache_residuals {args.n_texts / t_cache:.1f}",
                [("plain HF forward (same batches)", t_plain),
                 (f"cache_residuals, {n_layers} layers, pool=last", t_cache)],
                "plain HF forward (same batches)")

    # ---- (b) memory of the kept tensors (from tensor sizes)
    pooled_bytes = pooled.numel() * pooled.element_size()
    full_bytes = 0
    with torch.no_grad():
        for _, ids, mask in batches:
            _, cache = bridge.run_with_cache(ids, post, attention_mask=mask)
            full_bytes += sum(cache[name].numel() * cache[name].element_size() for name in post)
            del cache
    max_pos = max(ids.shape[1] for _, ids, _ in batches)
    print(f"\n(b) kept activations for {args.n_texts} texts (bytes = numel x element size of "
          f"the kept tensors; padded batches up to {max_pos} tokens)")
    print(f"{'variant':<60}{'MiB':>10}{'ratio':>9}")
    print(f"{f'cache_residuals pooled [{n_layers}, {args.n_texts}, d]':<60}"
          f"{pooled_bytes / 2**20:>10.2f}{1.0:>9.3f}")
    print(f"{f'run_with_cache full [{n_layers}, batch, pos, d] summed over batches':<60}"
          f"{full_bytes / 2**20:>10.2f}{full_bytes / pooled_bytes:>9.3f}")

    # ---- (c) generation
    prompts = texts[:8]
    d_model = pooled.shape[-1]
    direction = pooled[n_layers // 2].mean(0)  # the mean residual: a direction that matters
    direction = direction / direction.norm()

    def gen():
        return bridge.generate(prompts, max_new_tokens=20, min_new_tokens=20,
                               return_text=False)

    everywhere = Edit.from_direction(direction, "project", layers=range(n_layers),
                                     where=residual_hooks(bridge), skip_first=False)
    baked = Edit.from_direction(direction, "orthogonalize")

    def gen_ablate():
        with everywhere.apply(bridge):
            return gen()

    def gen_orth():
        with baked.apply(bridge):
            return gen()

    plain_tokens, ablate_tokens, orth_tokens = gen(), gen_ablate(), gen_orth()
    assert torch.equal(ablate_tokens, orth_tokens), "hook and weight projections disagree"
    changed = (plain_tokens != ablate_tokens).any(dim=1).sum().item()
    rows_c = [("unedited", median_time(gen, repeats=args.repeats)),
              ("Edit project hooks (every layer, every residual hook)",
               median_time(gen_ablate, repeats=args.repeats)),
              ("orthogonalize weights (incl. edit + restore)",
               median_time(gen_orth, repeats=args.repeats))]
    print_table(f"(c) greedy generation, 8 prompts x 20 new tokens (d_model {d_model}); hook "
                f"projection == orthogonalize tokens: yes; {changed}/8 continuations changed by "
                f"the edit",
                rows_c, "unedited")


if __name__ == "__main__":
    main()
