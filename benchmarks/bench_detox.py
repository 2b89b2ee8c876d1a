"""What each detox edit costs on SmolLM2-135M: fitting it, and generating under it.

Each peer kind (``lens_safety.edits.peers``: AurA, Mean-AcT, Linear-AcT, ITI-c, CAA) is fitted
with its paper's defaults (hook points, pooling, causal or not; every layer; ITI-c's top 48
heads) on ``--fit`` toxic and ``--fit`` non-toxic RTP training prompts, and timed (fit seconds,
one run). The causal kinds (Mean-/Linear-AcT) are fitted both ways: in one forward pass (all
texts in one batch; what ``fit_peer`` does when they fit in ``batch_size``) and, the naive
baseline, step by step (one pass per hook point, batches of ``--fit``), with the largest
difference between the two states printed. Then the protocol's generation workload: ``--prompts`` RTP toxic prompts, ``--k``
samples each (nucleus 0.9, temperature 1, exactly ``--new-tokens`` new tokens), batches of
``--batch // k`` prompts, each batch seeded as the protocol seeds it
(``lens_safety.evaluation.protocol.continuations``), through the HookBridge unedited and under
each kind at its published default strength (and, with ``--ours DIR``, a saved ``Edit``).
Time is the median of ``--repeats`` runs after one warm-up, round-robin over the variants;
ratio = seconds / seconds unedited. Threads: ``OMP_NUM_THREADS`` if set.

    python benchmarks/bench_detox.py [--quick] [--prompts 8] [--k 4] [--fit 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

from lens_safety.data.rtp import load_rtp, split_rtp
from lens_safety.edits.peers import KINDS, SPECS, PeerEdit, fit_peer
from lens_safety.evaluation.protocol import ProtocolSettings, continuations
from pruning_bridge.bridge import HookBridge
from pruning_bridge.models import load_model

ROOT = Path(__file__).resolve().parents[1]
UNEDITED = "unedited"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--prompts", type=int, default=None, help="default 8 (2 with --quick)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="sequences per batch")
    parser.add_argument("--fit", type=int, default=None,
                        help="training prompts per class to fit on (default 64; 16 --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--ours", default=None, help="a saved Edit folder to time as well")
    parser.add_argument("--quick", action="store_true", help="2 prompts, 16 fit texts, 1 repeat")
    args = parser.parse_args()
    prompts_n = args.prompts or (2 if args.quick else 8)
    fit_n = args.fit or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)

    warnings.filterwarnings("ignore")
    model, tok = load_model(args.model)
    bridge = HookBridge(model, tok)
    split = split_rtp(load_rtp(args.data), seed=0)
    toxic, nontoxic = (split.texts("train", kind, fit_n) for kind in ("toxic", "nontoxic"))
    prompts = split.texts("test", "toxic", prompts_n)
    settings = ProtocolSettings(k=args.k, max_new_tokens=args.new_tokens,
                                batch_size=args.batch)

    edits, fit_seconds, step_by_step = {}, {}, {}
    for kind in args.kinds:
        start = time.perf_counter()
        state = fit_peer(kind, bridge, toxic, nontoxic, batch_size=2 * fit_n, progress=False)
        fit_seconds[kind] = time.perf_counter() - start
        edits[kind] = PeerEdit(kind, state)
        if SPECS[kind].causal:  # the naive baseline: one forward pass per hook point
            start = time.perf_counter()
            slow = fit_peer(kind, bridge, toxic, nontoxic, batch_size=fit_n, progress=False)
            step_by_step[kind] = (time.perf_counter() - start,
                                  max(float((slow[k] - state[k]).abs().max()) for k in state))
    if args.ours:
        from lens_safety.edits.edit import Edit

        edits["ours"] = Edit.load(args.ours)

    variants = {UNEDITED: None, **edits}

    def run(edit) -> None:
        with edit.apply(bridge) if edit is not None else nullcontext():
            continuations(bridge, tok, prompts, args.k, settings, sample=True)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, edit in variants.items():  # warm-up
        run(edit)
    for _ in range(repeats):
        for name, edit in variants.items():
            start = time.perf_counter()
            run(edit)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    sequences = len(prompts) * args.k
    print(f"\n{args.model}: {len(prompts)} prompts x k={args.k}, {args.new_tokens} new tokens, "
          f"batch {args.batch}; fit on {len(toxic)} + {len(nontoxic)} prompts; median of "
          f"{repeats}")
    print(f"{'edit':<28}{'fit s':>8}{'generate s':>12}{'tokens/s':>10}{'ratio':>8}")
    for name, seconds in median.items():
        fit = f"{fit_seconds[name]:.1f}" if name in fit_seconds else "-"
        label = name if name == UNEDITED else str(variants[name])
        print(f"{label:<28}{fit:>8}{seconds:>12.2f}{sequences * args.new_tokens / seconds:>10.1f}"
              f"{seconds / median[UNEDITED]:>8.3f}")
    for kind, (seconds, difference) in step_by_step.items():
        print(f"causal fit of {kind}: step by step {seconds:.1f} s vs one pass "
              f"{fit_seconds[kind]:.1f} s ({seconds / fit_seconds[kind]:.1f}x); largest state "
              f"difference {difference:.2e}")


if __name__ == "__main__":
    main()
