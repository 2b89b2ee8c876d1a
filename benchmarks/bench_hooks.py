"""Caching activations four ways on SmolLM2-135M: plain HF, HookBridge, nnterp, TransformerLens.

Same weights, same WikiText-2 batch (8 windows of 256 tokens; ``--quick``: 2 x 64), two workloads:

    A  cache ``resid_post`` of every layer;
    B  A plus the attention pattern of one layer (``--pattern-layer``, default 10).

Paths: (1) the plain HF forward with ``output_hidden_states=True`` (for B an eager-attention copy
with ``output_attentions=True``), the baseline; (2) ``HookBridge.run_with_cache``; (3) nnterp's
``StandardizedTransformer`` (``layers_output[i]`` / ``attention_probabilities[i]`` in a trace;
benchmark-only dependency, skipped with a message when it does not import); (4) TransformerLens
``HookedTransformer.run_with_cache`` built by ``lens_safety.hooked.hooked_from_hf``.

Every path is checked against the plain forward: the relative max difference
``max|x - ref| / max|ref|`` over every resid_post (HF's last hidden state is the final-norm'd one,
so the last resid_post is compared after ``model.model.norm``) and over the pattern's causal
(real) positions. Time is the median of ``--repeats`` runs after one warm-up; memory is the peak
process RSS during one extra run minus the RSS just before it (psutil, sampled every ms in a
thread, after ``malloc_trim``), so it counts everything the run allocates: activations, cache,
wrapper overhead. Threads: ``OMP_NUM_THREADS`` if set, else torch's default.

    python benchmarks/bench_hooks.py [--quick] [--batch 8] [--seq 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import psutil
import torch
from common import median_time

from lens_safety.hooked import hooked_from_hf
from pruning_bridge.bridge import HookBridge
from pruning_bridge.evals import load_wikitext2
from pruning_bridge.models import load_model

ROOT = Path(__file__).resolve().parents[1]
PLAIN = "1. plain HF forward"


# --------------------------------------------------------------------------- nnterp on nnsight 0.8
def import_nnterp():
    """``(StandardizedTransformer, RenameConfig)`` or ``(None, reason)``.

    nnterp 1.3.0 targets nnsight 0.5: it imports ``Object`` from
    ``nnsight.intervention.tracing.globals`` (now ``nnsight.tracing.hint``) and reads
    ``LanguageModel._model`` (now ``_module``). Shim both before importing it.
    """
    try:
        from nnsight import LanguageModel
        from nnsight.tracing.hint import Object
        if "nnsight.intervention.tracing.globals" not in sys.modules:
            try:
                import nnsight.intervention.tracing.globals  # noqa: F401  (an nnsight nnterp knows)
            except ImportError:
                pkg = types.ModuleType("nnsight.intervention.tracing")
                mod = types.ModuleType("nnsight.intervention.tracing.globals")
                mod.Object = Object
                pkg.globals = mod
                sys.modules["nnsight.intervention.tracing"] = pkg
                sys.modules["nnsight.intervention.tracing.globals"] = mod
        if not hasattr(LanguageModel, "_model"):
            LanguageModel._model = property(lambda self: self._module)
        from nnterp import StandardizedTransformer
        from nnterp.rename_utils import RenameConfig
    except Exception as exc:  # noqa: BLE001  (ImportError, or a shim that no longer fits)
        return None, f"{type(exc).__name__}: {exc}"
    return StandardizedTransformer, RenameConfig


def llama_attn_probs(attn, return_module_source: bool = False):
    """Where the eager softmax lives in transformers 5's LlamaAttention, in nnsight 0.8's naming.

    nnsight 0.8 also names the ``attention_interface = ...get_interface(...)`` assignment, so the
    call nnterp's default source means (``attention_interface_0``) is ``attention_interface_1``.
    """
    source = attn.source.attention_interface_1.source
    return source if return_module_source else source.nn_functional_dropout_0


# ------------------------------------------------------------------------------------- memory
_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def peak_rss_delta(fn) -> float:
    """Peak RSS (bytes) above the pre-call RSS while ``fn()`` runs, sampled every millisecond."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)
    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = start
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
        peak = max(peak, proc.memory_info().rss)
    finally:
        done.set()
        thread.join()
    del out
    return peak - start


# -------------------------------------------------------------------------------------- checks
def rel_diff(x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    x, ref = x.detach().float(), ref.detach().float()
    if mask is not None:
        x, ref = x[..., mask], ref[..., mask]
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def max_rel_diff(out, ref, norm, pattern_layer: int | None, plain: bool = False) -> float:
    """``out``/``ref``: (list of resid_post, pattern or None); ``ref`` is the plain forward's,
    whose last entry is HF's last hidden state (after the final norm): ``out``'s last resid_post
    goes through ``norm`` first unless ``out`` is a plain forward's too."""
    resid, pattern = out
    ref_resid, ref_pattern = ref
    diffs = [rel_diff(r, q) for r, q in zip(resid[:-1], ref_resid[:-1])]
    with torch.no_grad():
        diffs.append(rel_diff(resid[-1] if plain else norm(resid[-1]), ref_resid[-1]))
    if pattern_layer is not None:
        seq = ref_pattern.shape[-1]
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        diffs.append(rel_diff(pattern, ref_pattern, causal))
    return max(diffs)


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--batch", type=int, default=None, help="default 8 (2 with --quick)")
    parser.add_argument("--seq", type=int, default=None, help="default 256 (64 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (2 with --quick)")
    parser.add_argument("--pattern-layer", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="batch 2 x 64, 2 repeats")
    args = parser.parse_args()
    batch = args.batch or (2 if args.quick else 8)
    seq = args.seq or (64 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 5)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a library reset it
    warnings.filterwarnings("ignore")

    model, tok = load_model(args.model)
    model.requires_grad_(False)  # every path runs without autograd (nnsight may trace off-thread)
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    text = load_wikitext2("test", args.data)[:400_000]
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    if len(ids) < batch * seq:
        raise SystemExit(f"only {len(ids)} tokens of WikiText-2 for {batch} x {seq}")
    ids = ids[: batch * seq].view(batch, seq)
    n = model.config.num_hidden_layers
    P = args.pattern_layer
    post = [f"blocks.{layer}.hook_resid_post" for layer in range(n)]
    pattern_name = f"blocks.{P}.attn.hook_pattern"
    norm = model.model.norm

    bridge = HookBridge(model, tok)
    hooked = hooked_from_hf(model, tok).requires_grad_(False)
    StandardizedTransformer, RenameConfig = import_nnterp()
    nnterp_models = {}
    if StandardizedTransformer is None:
        print(f"nnterp skipped: it does not import ({RenameConfig}). "
              f"Install it with `.venv/bin/pip install nnterp` (benchmark-only dependency).")
    else:
        try:
            # Wrap the already-loaded modules (no hub access): a copy in the model's own attention
            # implementation for A, the eager copy (needed for attention probabilities) for B.
            nnterp_models["A"] = StandardizedTransformer(copy.deepcopy(model), tokenizer=tok)
            nnterp_models["B"] = StandardizedTransformer(
                eager, tokenizer=tok, enable_attention_probs=True,
                rename_config=RenameConfig(attn_prob_source=llama_attn_probs))
        except Exception as exc:  # noqa: BLE001  (report and skip the row)
            print(f"nnterp skipped: StandardizedTransformer failed ({type(exc).__name__}: {exc})")
            nnterp_models = {}

    # Each runner returns ([resid_post per layer], pattern or None).
    def plain(with_pattern: bool):
        net = eager if with_pattern else model

        @torch.no_grad()
        def run():
            out = net(input_ids=ids, output_hidden_states=True, output_attentions=with_pattern)
            return list(out.hidden_states[1:]), (out.attentions[P] if with_pattern else None)
        return run

    def via_bridge(with_pattern: bool):
        names = post + [pattern_name] if with_pattern else post

        @torch.no_grad()
        def run():
            _, cache = bridge.run_with_cache(ids, names=names)
            return [cache[name] for name in post], (cache[pattern_name] if with_pattern else None)
        return run

    def via_nnterp(with_pattern: bool):
        st = nnterp_models["B" if with_pattern else "A"]

        @torch.no_grad()
        def run():
            resid, saved = [], []
            with st.trace(ids):
                for layer in range(n):  # nnsight 0.8 wants accesses in execution order
                    if with_pattern and layer == P:
                        saved.append(st.attention_probabilities[P].save())
                    resid.append(st.layers_output[layer].save())
            return resid, (saved[0] if with_pattern else None)
        return run

    def via_lens(with_pattern: bool):
        names = post + [pattern_name] if with_pattern else post

        @torch.no_grad()
        def run():
            _, cache = hooked.run_with_cache(ids, names_filter=names)
            return [cache[name] for name in post], (cache[pattern_name] if with_pattern else None)
        return run

    paths = {PLAIN: plain, "2. HookBridge.run_with_cache": via_bridge}
    if nnterp_models:
        paths["3. nnterp StandardizedTransformer"] = via_nnterp
    paths["4. TransformerLens run_with_cache"] = via_lens

    for workload, with_pattern in (("A", False), ("B", True)):
        what = f"{n} resid_post" + (f" + layer-{P} attention pattern" if with_pattern else "")
        reference = plain(with_pattern)()
        rows = []
        for name, make in paths.items():
            run = make(with_pattern)
            diff = max_rel_diff(run(), reference, norm, P if with_pattern else None,
                                plain=name == PLAIN)
            seconds = median_time(run, repeats=repeats)
            memory = peak_rss_delta(run)
            rows.append((name, seconds, memory, diff))
        base = rows[0][1]
        print(f"\nWorkload {workload}: cache {what}; {args.model} fp32 CPU, WikiText-2 batch "
              f"{batch} x {seq}, {torch.get_num_threads()} threads, median of {repeats}")
        print(f"{'path':<38}{'seconds':>9}{'ratio':>8}{'peak RSS delta':>16}{'max rel diff':>14}")
        for name, seconds, memory, diff in rows:
            print(f"{name:<38}{seconds:>9.3f}{seconds / base:>8.2f}"
                  f"{memory / 2**20:>12.0f} MiB{diff:>14.1e}")
    print("\npeak RSS delta: psutil RSS sampled every ms during one run, minus RSS before it "
          "(after gc + malloc_trim). max rel diff: max|x - plain| / max|plain| over every "
          "resid_post (the last one after the final norm, as HF reports it) and the pattern's "
          "causal positions.")


if __name__ == "__main__":
    main()
