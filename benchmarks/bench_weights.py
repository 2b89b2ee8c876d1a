"""Magnitude pruning vs torch.nn.utils.prune on SmolLM2-135M: wall time and peak extra memory.

All variants prune the same matrices (the Linear layers of the decoder blocks) at 50 % and leave
plain pruned weights (torch's re-parametrisation is removed with ``prune.remove``):

- global: ``prune_permanently(model, magnitude_masks(model, 0.5, scope="global"))`` and the
  reversible ``magnitude_prune(..., scope="global")`` (enter + exit, so it also restores) vs
  ``prune.global_unstructured(..., pruning_method=prune.L1Unstructured, amount=0.5)``;
- per matrix: ``magnitude_masks(scope="per_matrix")`` + ``prune_permanently`` vs
  ``prune.l1_unstructured`` on each matrix.

Correctness, checked first in this process: each pair zeroes the same number of weights, and the
same weights except where ``|w|`` equals the threshold (the embedded SmolLM2 is dequantised from
a 4-bit GGUF, so many weights share a value and the tie-break decides; torch's ``topk`` breaks ties
in no documented order).

Memory is the peak resident set size (RSS) above the RSS just before the call, sampled every
millisecond by a background thread with psutil (tracemalloc does not see torch's allocator), in a
fresh process per variant whose weights were all read once before (they may be lazily mapped from
the checkpoint file, and a first touch would count as extra memory). That process runs with
``MALLOC_MMAP_THRESHOLD_=65536``, so glibc gives every freed block of 64 KiB or more back to the
OS at once and RSS follows the live tensors instead of the allocator's retained free space (with
the default allocator our numbers roughly double or triple from that slack). A sampled peak can
miss a spike shorter than a millisecond: it is a measurement, not a bound. Time is the median of
``--repeats`` calls in another fresh process with the default allocator (the weights are reset
between calls, outside the timing).

    python benchmarks/bench_weights.py [--model smollm2-135m] [--sparsity 0.5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.nn.utils import prune

from common import print_table
from pruning_bridge.common.memory import PeakMemory
from pruning_bridge.models import load_model
from pruning_bridge.pruning.weights import (magnitude_masks, magnitude_prune, prunable_linears,
                                    prune_permanently)


def zeros_in(linears) -> int:
    return sum(int((m.weight == 0).sum()) for m in linears.values())


# Each variant prunes the model in place and returns the number of zeros while pruned.
def torch_global(model, sparsity):
    linears = prunable_linears(model)
    prune.global_unstructured([(m, "weight") for m in linears.values()],
                              pruning_method=prune.L1Unstructured, amount=sparsity)
    for m in linears.values():
        prune.remove(m, "weight")
    return zeros_in(linears)


def ours_global(model, sparsity):
    return prune_permanently(model, magnitude_masks(model, sparsity, scope="global")).zeros


def ours_global_context(model, sparsity):
    with magnitude_prune(model, sparsity, scope="global") as report:
        return report.zeros


def torch_per_matrix(model, sparsity):
    linears = prunable_linears(model)
    for m in linears.values():
        prune.l1_unstructured(m, "weight", amount=sparsity)
        prune.remove(m, "weight")
    return zeros_in(linears)


def ours_per_matrix(model, sparsity):
    return prune_permanently(model, magnitude_masks(model, sparsity)).zeros


VARIANTS = {
    "torch global_unstructured + remove": torch_global,
    "ours global: masks + prune_permanently": ours_global,
    "ours global: magnitude_prune enter + exit": ours_global_context,
    "torch l1_unstructured per matrix + remove": torch_per_matrix,
    "ours per_matrix: masks + prune_permanently": ours_per_matrix,
}


def measure(variant: str, args) -> dict:
    """Run one variant ``args.repeats`` times in this (fresh) process."""
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    # this copy also reads every weight once, so lazily mapped pages are resident before timing
    originals = {name: m.weight.detach().clone() for name, m in prunable_linears(model).items()}
    times, peaks, zeros = [], [], []
    for _ in range(args.repeats):
        with torch.no_grad(), PeakMemory(interval=0.001) as memory:
            start = time.perf_counter()
            zeros.append(VARIANTS[variant](model, args.sparsity))
            times.append(time.perf_counter() - start)
        peaks.append(memory.extra)
        with torch.no_grad():
            for name, m in prunable_linears(model).items():
                m.weight.copy_(originals[name])
    return {"seconds": statistics.median(times), "peak_bytes": peaks[0], "zeros": zeros}


def in_fresh_process(variant: str, args, repeats: int, env: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--model", args.model,
               "--sparsity", str(args.sparsity), "--repeats", str(repeats),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_same_masks(args) -> None:
    """Both sides zero the same count, and the same weights except ties at the threshold."""
    model, _ = load_model(args.model)
    for scope in ("global", "per_matrix"):
        ours = magnitude_masks(model, args.sparsity, scope=scope)
        other = copy.deepcopy(model)
        theirs = prunable_linears(other)
        if scope == "global":
            prune.global_unstructured([(m, "weight") for m in theirs.values()],
                                      pruning_method=prune.L1Unstructured, amount=args.sparsity)
        else:
            for m in theirs.values():
                prune.l1_unstructured(m, "weight", amount=args.sparsity)
        linears = prunable_linears(model)
        # the threshold: the largest pruned |w| (per matrix, or over all matrices)
        cuts = {name: m.weight.detach().abs()[ours[name]].max() for name, m in linears.items()}
        if scope == "global":
            cuts = dict.fromkeys(cuts, max(cuts.values()))
        differ = ties = 0
        for name, m in linears.items():
            mask, their_mask, cut = ours[name], theirs[name].weight_mask == 0, cuts[name]
            if scope == "per_matrix":
                assert int(mask.sum()) == int(their_mask.sum()), name
            score = m.weight.detach().abs()
            off = mask != their_mask
            assert (score[off] == cut).all(), f"{scope} {name}: masks differ off the threshold"
            differ += int(off.sum())
            ties += int((score == cut).sum())
        total = sum(int(mask.sum()) for mask in ours.values())
        assert total == sum(int((m.weight_mask == 0).sum()) for m in theirs.values()), scope
        print(f"{scope}: same {total:,} pruned weights in both; {differ:,} positions differ, "
              f"all tied at the threshold ({ties:,} weights there)")
        del other, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    torch.set_num_threads(args.threads)
    check_same_masks(args)
    results = {}
    for variant in VARIANTS:
        results[variant] = in_fresh_process(variant, args, args.repeats)
        results[variant]["peak_bytes"] = in_fresh_process(
            variant, args, 1, {"MALLOC_MMAP_THRESHOLD_": "65536"})["peak_bytes"]
    counts = {variant: r["zeros"][0] for variant, r in results.items()}
    assert len(set(counts.values())) <= 2, counts  # global and per-matrix counts
    assert counts["ours global: masks + prune_permanently"] == counts[
        "torch global_unstructured + remove"] == counts["ours global: magnitude_prune enter + exit"]
    assert counts["ours per_matrix: masks + prune_permanently"] == counts[
        "torch l1_unstructured per matrix + remove"]

    model, _ = load_model(args.model)
    n_weights = sum(m.weight.numel() for m in prunable_linears(model).values())
    weight_mib = sum(m.weight.nbytes for m in prunable_linears(model).values()) / 2**20
    setting = (f"{args.model}, {n_weights:,} weights in {len(prunable_linears(model))} matrices "
               f"({weight_mib:.0f} MiB), sparsity {args.sparsity}, {args.threads} threads")
    for group, baseline in (("global", "torch global_unstructured + remove"),
                            ("per matrix", "torch l1_unstructured per matrix + remove")):
        names = [v for v in VARIANTS if ("global" in v) == (group == "global")]
        print_table(f"Magnitude pruning, {group}: wall time (median of {args.repeats}); {setting}",
                    [(v, results[v]["seconds"]) for v in names], baseline)
        base = results[baseline]["peak_bytes"]
        print(f"\nMagnitude pruning, {group}: peak extra RSS (fresh process, see the docstring)")
        print(f"{'variant':<48}{'MiB':>10}{'ratio':>9}")
        for v in names:
            peak = results[v]["peak_bytes"]
            print(f"{v:<48}{peak / 2**20:>10.1f}{peak / base:>9.3f}")
    print(f"\nFor scale: the weights take {weight_mib:.0f} MiB, bool masks {n_weights / 2**20:.0f} "
          f"MiB, the zeroed values {args.sparsity * weight_mib:.0f} MiB. Zeros while pruned: "
          f"{counts}")


if __name__ == "__main__":
    main()
