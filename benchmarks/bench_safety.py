"""What the RTP protocol's k-sample generation costs on SmolLM2-135M, edited and not, in one run.

The workload is the protocol's sampling (``lens_safety.evaluation.protocol.continuations``):
RTP toxic prompts (``load_rtp(data, kinds="toxic", limit=--prompts)``), ``k`` samples per
prompt, nucleus ``top_p=0.9``, temperature 1, ``top_k=0``, exactly 20 new tokens
(``min_new_tokens=20``), batches of ``--batch // k`` prompts each repeated ``k`` times,
left-padded, each batch seeded as the
protocol seeds it (``torch.manual_seed(seed * 1_000_003 + index of its first prompt)``). Every
path runs these same batches with these same seeds:

    (a) plain HF ``model.generate`` on the left-padded tokenized batch: the baseline;
    (b) ``HookBridge.generate`` with no hooks;
    (c) the bridge under a hook edit (``with edit.apply(bridge):``): ``clamp`` at one layer
        (``--clamp-layer``, threshold = the median projection onto d of that layer's resid_post
        over the prompts' real tokens) and ``subtract`` (``--alpha``) at a window of layers
        (``--window``, both ends included);
    (d) the weights orthogonalised against d (``Edit(how="orthogonalize")``), generating
        through plain HF ``model.generate`` inside the context (the weight edit itself is timed
        apart, it is paid once per context, not per token);
    (e) TransformerLens (``lens_safety.backend.transformer_lens.hooked_from_hf``: a
        ``HookedTransformer`` on 3.x, a ``TransformerBridge`` on 4.x, which decodes without its
        KV cache) under the same clamp
        edit, one prompt's k samples per batch as the protocol runs it, through the toolkit's
        ``lens_safety.backend.transformer_lens.generate`` (skip with ``--no-lens``).

d is a seeded random unit vector of width ``hidden_size``. Checks: (b) gives the very same token
ids as (a); and the orthogonalised model's greedy continuations of ``--check-prompts`` prompts
equal the bridge's under a ``project`` edit at every residual hook of every layer
(``skip_first=False``), the same edit up to float rounding (otherwise the share of equal tokens
is reported). Time is the median of ``--repeats`` runs after one warm-up run (which is also the
run the checks and the "changed" column read), the repeats taken round-robin over the paths so
that load from elsewhere does not fall on one path's every run; new tokens/s = sequences x 20
/ seconds; ratio = seconds / seconds of (a). Threads: ``OMP_NUM_THREADS`` if set, else torch's
default.

    python benchmarks/bench_safety.py [--quick] [--prompts 16] [--k 8] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from lens_safety.data.rtp import load_rtp
from lens_safety.edits.edit import Edit
from pruning_bridge.bridge import HookBridge
from pruning_bridge.models import load_model

ROOT = Path(__file__).resolve().parents[1]
PLAIN = "(a) plain HF generate"


def left_padded(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``texts``, left-padded (as ``HookBridge.to_tokens``)."""
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return enc["input_ids"], enc["attention_mask"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--prompts", type=int, default=None, help="default 16 (4 with --quick)")
    parser.add_argument("--k", type=int, default=None, help="default 8 (4 with --quick)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per batch")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--clamp-layer", type=int, default=12)
    parser.add_argument("--window", type=int, nargs=2, default=(10, 20), metavar=("FIRST", "LAST"))
    parser.add_argument("--alpha", type=float, default=1.0, help="subtract strength")
    parser.add_argument("--check-prompts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-lens", action="store_true", help="skip (e) TransformerLens")
    parser.add_argument("--quick", action="store_true", help="4 prompts x k=4, 1 repeat")
    args = parser.parse_args()
    n_prompts = args.prompts or (4 if args.quick else 16)
    k = args.k or (4 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 3)
    new_tokens = args.new_tokens
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a library reset it
    warnings.filterwarnings("ignore")

    model, tok = load_model(args.model)
    model.requires_grad_(False)
    model.eval()
    bridge = HookBridge(model, tok)
    n_layers, width = model.config.num_hidden_layers, model.config.hidden_size
    prompts = [r.text for r in load_rtp(args.data, kinds="toxic", limit=n_prompts)]
    if len(prompts) < n_prompts:
        raise SystemExit(f"only {len(prompts)} toxic RTP prompts in {args.data}")

    # The protocol's batches: batch // k prompts, each repeated k times, one seed per batch.
    per_batch = min(max(1, args.batch // k), n_prompts)
    batches = [(args.seed * 1_000_003 + start,
                [p for p in prompts[start:start + per_batch] for _ in range(k)])
               for start in range(0, n_prompts, per_batch)]
    n_sequences = n_prompts * k
    sampling = dict(do_sample=True, top_p=0.9, temperature=1.0, top_k=0,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    g = torch.Generator().manual_seed(args.seed)
    d = torch.randn(width, generator=g)
    d = d / d.norm()

    # Clamp threshold: median projection onto d at the clamp layer over the prompts' real
    # tokens (each row's first token left out, as the edit leaves it alone).
    clamp_layer = args.clamp_layer
    name = f"blocks.{clamp_layer}.hook_resid_post"
    ids, mask = left_padded(tok, prompts)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, [name], attention_mask=mask)
    real = mask.bool() & (mask.cumsum(-1) > 1)
    threshold = float((cache[name].float() @ d)[real].median())
    window = list(range(args.window[0], args.window[1] + 1))
    clamp = Edit.from_direction(d, "clamp", layers=[clamp_layer], threshold=threshold)
    subtract = Edit.from_direction(d, "subtract", layers=window, alpha=args.alpha)

    # Each path returns the new token ids of every sequence, [n_sequences, new_tokens].
    @torch.no_grad()
    def plain():
        out = []
        for seed, batch in batches:
            ids, mask = left_padded(tok, batch)
            torch.manual_seed(seed)
            gen = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_id,
                                 **sampling)
            out.append(gen[:, ids.shape[1]:])
        return torch.cat(out)

    @torch.no_grad()
    def via_bridge():
        out = []
        for seed, batch in batches:
            torch.manual_seed(seed)
            gen = bridge.generate(batch, return_text=False, **sampling)
            out.append(gen[:, gen.shape[1] - new_tokens:])
        return torch.cat(out)

    def under(edit):
        def run():
            with edit.apply(bridge):
                return via_bridge()
        return run

    lens = None
    if not args.no_lens:
        from lens_safety.backend.transformer_lens import generate, hooked_from_hf
        lens = hooked_from_hf(model, tok).requires_grad_(False)

    @torch.no_grad()
    def via_lens():
        out = []
        with clamp.apply(lens):
            for seed, batch in batches:
                for i in range(0, len(batch), k):  # one prompt's k samples per batch
                    ids = torch.tensor([tok(batch[i])["input_ids"]] * k)
                    torch.manual_seed(seed + i // k)
                    gen = generate(lens, ids, new_tokens, do_sample=True, top_p=0.9,
                                   temperature=1.0)
                    out.append(gen[:, ids.shape[1]:])
        return torch.cat(out)

    paths = {PLAIN: plain,
             "(b) HookBridge.generate, no hooks": via_bridge,
             f"(c) bridge + clamp L{clamp_layer}": under(clamp),
             f"(c) bridge + subtract L{window[0]}-{window[-1]}": under(subtract)}
    orth_name = "(d) orthogonalized weights, HF generate"
    paths[orth_name] = plain  # run inside the orthogonalize context below
    if lens is not None:
        paths[f"(e) TransformerLens + clamp L{clamp_layer}"] = via_lens

    orthogonalized = Edit.from_direction(d, "orthogonalize")

    def timed(path: str, run) -> tuple[float, torch.Tensor]:
        """Seconds of one ``run()`` (only the generation: (d) enters orthogonalize outside)."""
        context = orthogonalized.apply(bridge) if path == orth_name else nullcontext()
        with context:
            start = time.perf_counter()
            out = run()
            return time.perf_counter() - start, out

    # One warm-up pass (whose tokens the checks read), then the repeats round-robin over the
    # paths, so that a burst of load from elsewhere does not land on one path's every run.
    print(f"timing {len(paths)} paths x (1 warm-up + {repeats}), {len(batches)} batches each",
          flush=True)
    tokens = {path: timed(path, run)[1] for path, run in paths.items()}
    times: dict[str, list[float]] = {path: [] for path in paths}
    for repeat in range(repeats):
        for path, run in paths.items():
            times[path].append(timed(path, run)[0])
        print(f"  repeat {repeat + 1}: " + ", ".join(f"{path.split()[0]} {t[-1]:.2f} s"
                                                    for path, t in times.items()), flush=True)
    rows = [(path, statistics.median(t)) for path, t in times.items()]

    # ---- checks
    same_ab = torch.equal(tokens[PLAIN], tokens["(b) HookBridge.generate, no hooks"])
    check = prompts[:args.check_prompts]
    project = Edit.from_direction(d, "project", layers=range(n_layers),
                                  where=("hook_resid_pre", "hook_resid_mid", "hook_resid_post"),
                                  skip_first=False)
    greedy = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    with torch.no_grad():
        with project.apply(bridge):
            hooked_greedy = bridge.generate(check, return_text=False, **greedy)
        ids, mask = left_padded(tok, check)
        start = time.perf_counter()
        with orthogonalized.apply(bridge):
            enter = time.perf_counter() - start
            orth_greedy = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_id,
                                         **greedy)
            start = time.perf_counter()
        leave = time.perf_counter() - start
    hooked_new = hooked_greedy[:, ids.shape[1]:]
    orth_new = orth_greedy[:, ids.shape[1]:]
    equal_share = (hooked_new == orth_new).float().mean().item()
    equal_rows = (hooked_new == orth_new).all(1).sum().item()

    # ---- table
    base = rows[0][1]
    print(f"\nRTP k-sample generation: {args.model} fp32 CPU, {n_prompts} toxic prompts x k={k} "
          f"= {n_sequences} sequences x {new_tokens} new tokens, batches of {per_batch * k} "
          f"sequences ({per_batch} prompts x {k}; TransformerLens: 1 prompt x {k}), nucleus "
          f"p=0.9 T=1, {torch.get_num_threads()} threads, median of {repeats} after 1 warm-up")
    print(f"d: random unit vector (seed {args.seed}); clamp threshold {threshold:+.4f} (median "
          f"projection at L{clamp_layer}); subtract alpha {args.alpha:g} at "
          f"L{window[0]}-{window[-1]}")
    print(f"{'path':<44}{'seconds':>9}{'new tok/s':>11}{'ratio':>8}{'changed vs (a)':>16}")
    for path, seconds in rows:
        changed = (tokens[path] != tokens[PLAIN]).any(1).sum().item()
        print(f"{path:<44}{seconds:>9.3f}{n_sequences * new_tokens / seconds:>11.1f}"
              f"{seconds / base:>8.2f}{f'{changed}/{n_sequences}':>16}")
    print(f"\n'changed vs (a)': sequences whose {new_tokens} sampled tokens differ from (a)'s "
          f"(same seeds; TransformerLens samples with its own sampler, so all differ).")
    print(f"orthogonalize: entering the context (weight edit) {enter * 1e3:.1f} ms, leaving "
          f"(restore) {leave * 1e3:.1f} ms, once per context, not in (d)'s time.")
    print(f"check (b) == (a) token ids: {'yes' if same_ab else 'NO'}")
    print(f"check orthogonalized greedy == bridge + project at every resid hook "
          f"({len(check)} prompts x {new_tokens} tokens): "
          + ("yes" if equal_rows == len(check) else
             f"NO, {100 * equal_share:.1f}% of tokens equal, {equal_rows}/{len(check)} "
             f"continuations equal (same edit up to float rounding)"))


if __name__ == "__main__":
    main()
