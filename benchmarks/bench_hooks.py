"""HookBridge against plain HF, TransformerLens and nnterp on SmolLM2-135M: time, memory, exactness.

Same weights, same WikiText-2 batch (``--batch`` windows of ``--seq`` tokens), six workloads:

    forward       logits;
    resid_post    logits and a cache of every layer's ``resid_post``;
    ablation      logits with one head's ``attn.hook_z`` zeroed (``--head L.H``, default 10.3);
    pattern       logits, every ``resid_post`` and one layer's attention pattern
                  (``--pattern-layer``, default 10);
    generate      greedy generation of ``--new-tokens`` (20) tokens from the first
                  ``--prompt`` (32) tokens of each window, no hook;
    generate+ablation   the same under the head ablation.

Paths: plain HF with sdpa attention (the model as loaded) and an eager-attention copy (HF gives
attention patterns only in eager); the head ablation there is a plain torch forward pre-hook
zeroing the head's slice of ``o_proj``'s input, and generation is HF's own ``generate`` with that
hook. ``HookBridge`` wraps the sdpa model. ``TransformerBridge`` (TransformerLens 4.x) is booted on
a deep copy of the HF model (booting rewires the model in place and switches it to eager
attention) with ``enable_compatibility_mode(no_processing=True)``, as
``lens_safety.backend.transformer_lens`` does; its generation runs as TransformerLens's
``generate`` does by default (KV cache) and, in a second row, without the KV cache (what
lens_safety uses, since the cached decoding drifts). ``HookedTransformer`` runs when
TransformerLens 3.x is installed (``PYTHONPATH=/tmp/tl39``), nnterp's ``StandardizedTransformer``
when nnterp imports (benchmark-only dependency; the resid_post and pattern workloads); a path that
cannot run says why.

Columns: the median wall time of ``--repeats`` runs after one warm-up, as a ratio to plain HF
(sdpa; for the pattern workload HF eager, the only plain HF that returns a pattern); the peak
process RSS during one more run minus the RSS just before it (psutil, sampled every ms, after gc
and ``malloc_trim``); the relative max difference ``max|x - ref| / max|ref|`` to HF sdpa and to HF
eager over the logits, every cached ``resid_post`` (HF's last hidden state is after the final
norm, so the last ``resid_post`` is compared through ``model.model.norm``) and the pattern's
causal positions (the pattern against HF eager only: sdpa has none); for generation, whether the
generated tokens equal HF's (``yes``, or the first new token that differs).

    OMP_NUM_THREADS=1 python benchmarks/bench_hooks.py [--quick] [--batch 4] [--seq 128]
        [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import importlib.metadata
import json
import os
import sys
import threading
import time
import types
import warnings
from pathlib import Path
from typing import Callable

import psutil
import torch
from common import median_time

from pruning_bridge.bridge import HookBridge
from pruning_bridge.evals import load_wikitext2
from pruning_bridge.models import load_model

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("forward", "resid_post", "ablation", "pattern", "generate", "generate+ablation")
GENERATION = ("generate", "generate+ablation")


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


# --------------------------------------------------------------------------- TransformerLens
def transformer_lens_version() -> str | None:
    try:
        import transformer_lens
    except ImportError:
        return None
    return getattr(transformer_lens, "__version__", None) or \
        importlib.metadata.version("transformer_lens")


def boot_transformer_bridge(model, tokenizer):
    """A compatibility-mode, unprocessed TransformerBridge on a deep copy of ``model`` (as
    ``lens_safety.backend.transformer_lens`` builds it on TransformerLens 4)."""
    from transformer_lens.model_bridge import TransformerBridge

    copied = copy.deepcopy(model)
    bridge = TransformerBridge.boot_transformers(
        copied.config._name_or_path or copied.config.model_type, hf_model=copied,
        tokenizer=tokenizer, device=next(copied.parameters()).device,
        dtype=next(copied.parameters()).dtype)
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    return bridge.eval().requires_grad_(False)


def hooked_transformer(model, tokenizer):
    """TransformerLens 3.x's HookedTransformer on ``model``'s unprocessed weights."""
    from lens_safety.backend.transformer_lens import hooked_from_hf

    return hooked_from_hf(model, tokenizer).requires_grad_(False)


# ------------------------------------------------------------------------------------- memory
_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def peak_rss_delta(fn: Callable[[], object]) -> float:
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
    """``max|x - ref| / max|ref|`` (over ``mask``'s positions of the last two axes, if given)."""
    x, ref = x.detach().float(), ref.detach().float()
    if mask is not None:
        x, ref = x[..., mask], ref[..., mask]
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def compare(out: dict, ref: dict) -> float | None:
    """Largest relative difference over the entries both outputs have (None if none)."""
    diffs = []
    for key in ("logits", "resid"):
        if key in out and key in ref:
            diffs += [rel_diff(x, r) for x, r in zip(out[key], ref[key])] if key == "resid" \
                else [rel_diff(out[key], ref[key])]
    if out.get("pattern") is not None and ref.get("pattern") is not None:
        seq = ref["pattern"].shape[-1]
        diffs.append(rel_diff(out["pattern"], ref["pattern"],
                              torch.ones(seq, seq, dtype=torch.bool).tril()))
    return max(diffs) if diffs else None


def same_tokens(out: torch.Tensor, ref: torch.Tensor, prompt: int) -> str:
    """``"yes"`` when the generated tokens are equal, else where they first differ."""
    new, ref_new = out[:, prompt:], ref[:, prompt:]
    if new.shape == ref_new.shape and torch.equal(new, ref_new):
        return "yes"
    n = min(new.shape[1], ref_new.shape[1])
    differs = (new[:, :n] != ref_new[:, :n]).any(0).nonzero()
    at = differs[0, 0].item() + 1 if len(differs) else n + 1
    return f"no (token {at})"


# ---------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--batch", type=int, default=None, help="default 4 (2 with --quick)")
    parser.add_argument("--seq", type=int, default=None, help="default 128 (64 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (3 with --quick)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens for generation")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--pattern-layer", type=int, default=10)
    parser.add_argument("--head", default="10.3", help="LAYER.HEAD whose hook_z is zeroed")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--quick", action="store_true", help="batch 2 x 64, 3 repeats")
    parser.add_argument("--json", default=None, metavar="OUT", help="also save the rows here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    batch = args.batch or (2 if args.quick else 4)
    seq = args.seq or (64 if args.quick else 128)
    repeats = args.repeats or (3 if args.quick else 5)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a library reset it
    warnings.filterwarnings("ignore")

    model, tok = load_model(args.model)
    model.requires_grad_(False).eval()
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    text = load_wikitext2("test", args.data)[:400_000]
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    if len(ids) < batch * seq:
        raise SystemExit(f"only {len(ids)} tokens of WikiText-2 for {batch} x {seq}")
    ids = ids[: batch * seq].view(batch, seq)
    prompt = ids[:, : min(args.prompt, seq)]
    n = model.config.num_hidden_layers
    P = args.pattern_layer
    L, H = (int(part) for part in args.head.split("."))
    d_head = model.config.hidden_size // model.config.num_attention_heads
    post = [f"blocks.{layer}.hook_resid_post" for layer in range(n)]
    pattern_name, z_name = f"blocks.{P}.attn.hook_pattern", f"blocks.{L}.attn.hook_z"
    norm = model.model.norm
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # ---- the edit, three ways: TransformerLens's hook_z, and a plain torch pre-hook on o_proj
    def zero_head(z, hook):
        z[:, :, H] = 0
        return z

    def zero_head_hf(module, args_):
        args_[0][..., H * d_head:(H + 1) * d_head] = 0

    @contextlib.contextmanager
    def hf_ablation(net, on: bool):
        handle = (net.model.layers[L].self_attn.o_proj.register_forward_pre_hook(zero_head_hf)
                  if on else None)
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def normed_last(resid: list) -> list:
        return resid[:-1] + [norm(resid[-1])]

    # ---- runners: workload -> (fn returning an output dict) per path
    def hf(net, name_: str):
        def forward():
            with torch.no_grad():
                return {"logits": net(input_ids=ids).logits}

        def resid(with_pattern: bool):
            def run():
                with torch.no_grad():
                    out = net(input_ids=ids, output_hidden_states=True,
                              output_attentions=with_pattern)
                return {"logits": out.logits, "resid": list(out.hidden_states[1:]),
                        "pattern": out.attentions[P] if with_pattern else None}
            return run

        def ablation():
            with hf_ablation(net, True), torch.no_grad():
                return {"logits": net(input_ids=ids).logits}

        def generate(ablate: bool):
            def run():
                with hf_ablation(net, ablate), torch.no_grad():
                    return {"tokens": net.generate(
                        input_ids=prompt, attention_mask=torch.ones_like(prompt),
                        max_new_tokens=args.new_tokens, do_sample=False, temperature=None,
                        top_p=None, top_k=None, pad_token_id=pad_id)}
            return run

        runs = {"forward": forward, "resid_post": resid(False), "ablation": ablation,
                "generate": generate(False), "generate+ablation": generate(True)}
        if name_ == "eager":
            runs["pattern"] = resid(True)
        return runs

    def hook_bridge(bridge):
        def forward():
            return {"logits": bridge(ids)}

        def cache(names):
            def run():
                logits, cache_ = bridge.run_with_cache(ids, names=names)
                return {"logits": logits, "resid": normed_last([cache_[p] for p in post]),
                        "pattern": cache_[pattern_name] if pattern_name in names else None}
            return run

        def ablation():
            with bridge.hooks([(z_name, zero_head)]):
                return {"logits": bridge(ids)}

        def generate(ablate: bool):
            def run():
                with bridge.hooks([(z_name, zero_head)] if ablate else []):
                    return {"tokens": bridge.generate(prompt, max_new_tokens=args.new_tokens)}
            return run

        return {"forward": forward, "resid_post": cache(post),
                "ablation": ablation, "pattern": cache(post + [pattern_name]),
                "generate": generate(False), "generate+ablation": generate(True)}

    def lens(hooked, kv_cache: bool = True):
        """TransformerLens's API (HookedTransformer and TransformerBridge alike)."""
        def forward():
            with torch.no_grad():
                return {"logits": hooked(ids, return_type="logits")}

        def cache(names):
            def run():
                with torch.no_grad():
                    logits, cache_ = hooked.run_with_cache(ids, names_filter=names)
                return {"logits": logits, "resid": normed_last([cache_[p] for p in post]),
                        "pattern": cache_[pattern_name] if pattern_name in names else None}
            return run

        def ablation():
            with hooked.hooks(fwd_hooks=[(z_name, zero_head)]), torch.no_grad():
                return {"logits": hooked(ids, return_type="logits")}

        def generate(ablate: bool):
            def run():
                with hooked.hooks(fwd_hooks=[(z_name, zero_head)] if ablate else []), \
                        torch.no_grad():
                    return {"tokens": hooked.generate(
                        prompt, max_new_tokens=args.new_tokens, do_sample=False,
                        stop_at_eos=False, verbose=False, use_past_kv_cache=kv_cache)}
            return run

        if not kv_cache:
            return {"generate": generate(False), "generate+ablation": generate(True)}
        return {"forward": forward, "resid_post": cache(post),
                "ablation": ablation, "pattern": cache(post + [pattern_name]),
                "generate": generate(False), "generate+ablation": generate(True)}

    def nnterp(models):
        def cache(with_pattern: bool):
            st = models["eager" if with_pattern else "sdpa"]

            def run():
                resid, saved = [], []
                with torch.no_grad(), st.trace(ids):
                    for layer in range(n):  # nnsight 0.8 wants accesses in execution order
                        if with_pattern and layer == P:
                            saved.append(st.attention_probabilities[P].save())
                        resid.append(st.layers_output[layer].save())
                    logits = st.logits.save()
                return {"logits": logits, "resid": normed_last(resid),
                        "pattern": saved[0] if with_pattern else None}
            return run
        return {"resid_post": cache(False), "pattern": cache(True)}

    # ---- the paths
    paths: dict[str, dict[str, Callable[[], dict]]] = {
        "HF sdpa": hf(model, "sdpa"), "HF eager": hf(eager, "eager"),
        "HookBridge": hook_bridge(HookBridge(model, tok))}
    notes = []
    version = transformer_lens_version()
    if version is None:
        notes.append("TransformerLens rows skipped: transformer_lens does not import.")
    else:
        if version.startswith("3."):
            try:
                paths[f"HookedTransformer (TL {version})"] = lens(hooked_transformer(model, tok))
            except Exception as exc:  # noqa: BLE001  (report and skip the row)
                notes.append(f"HookedTransformer skipped: {type(exc).__name__}: {exc}")
        else:
            notes.append(f"HookedTransformer skipped: TransformerLens {version} removed it (4.0); "
                         f"run with PYTHONPATH=/tmp/tl39 (TransformerLens 3.9) for that row.")
        try:
            tb = boot_transformer_bridge(model, tok)
            paths[f"TransformerBridge (TL {version})"] = lens(tb)
            paths["TransformerBridge, no KV cache"] = lens(tb, kv_cache=False)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"TransformerBridge skipped: {type(exc).__name__}: {exc}")
    StandardizedTransformer, RenameConfig = import_nnterp()
    if StandardizedTransformer is None:
        notes.append(f"nnterp skipped: it does not import ({RenameConfig}); install it with "
                     f"`.venv/bin/pip install nnterp` (benchmark-only dependency).")
    else:
        try:
            eager_copy = copy.deepcopy(eager)
            paths["nnterp StandardizedTransformer"] = nnterp({
                "sdpa": StandardizedTransformer(copy.deepcopy(model), tokenizer=tok),
                "eager": StandardizedTransformer(
                    eager_copy, tokenizer=tok, enable_attention_probs=True,
                    rename_config=RenameConfig(attn_prob_source=llama_attn_probs))})
        except Exception as exc:  # noqa: BLE001
            notes.append(f"nnterp skipped: StandardizedTransformer failed "
                         f"({type(exc).__name__}: {exc})")

    # ---- measure
    load = os.getloadavg()
    threads = torch.get_num_threads()
    print(f"{args.model} fp32 CPU, WikiText-2 batch {batch} x {seq} (generation: prompt "
          f"{prompt.shape[1]}, {args.new_tokens} new tokens), {threads} threads, median of "
          f"{repeats} after a warm-up; load average before: {load[0]:.1f}")
    for note in notes:
        print(note)
    rows = []
    for workload in workloads:
        base_name = "HF eager" if workload == "pattern" else "HF sdpa"
        # HF sdpa has no pattern: the pattern workload's sdpa reference is its resid_post run
        refs = {name: paths[name]["resid_post" if workload == "pattern" else workload]()
                for name in ("HF sdpa", "HF eager")}
        measured = []
        for name, runs in paths.items():
            if workload not in runs:
                continue
            run = runs[workload]
            try:
                out = run()
                if workload in GENERATION:
                    vs = {ref: same_tokens(out["tokens"], r["tokens"], prompt.shape[1])
                          for ref, r in refs.items()}
                else:
                    vs = {ref: compare(out, r) for ref, r in refs.items()}
                del out
                seconds = median_time(run, repeats=repeats)
                memory = peak_rss_delta(run)
            except Exception as exc:  # noqa: BLE001  (a path that fails: say so, go on)
                print(f"{workload}: {name} failed: {type(exc).__name__}: {exc}")
                continue
            measured.append(dict(workload=workload, path=name, seconds=seconds,
                                 rss_mib=memory / 2**20, vs_sdpa=vs.get("HF sdpa"),
                                 vs_eager=vs.get("HF eager")))
        base = next(r["seconds"] for r in measured if r["path"] == base_name)
        for row in measured:
            row["ratio"] = row["seconds"] / base
        rows += measured
        print_workload(workload, base_name, measured)
    print("\nratio: time / the plain HF row named; peak RSS: psutil RSS sampled every ms during "
          "one run minus the RSS before it; vs HF: relative max difference max|x - HF| / max|HF| "
          "over logits, every resid_post and the pattern's causal positions (generation: equal "
          "generated tokens).")
    if args.json:
        meta = dict(model=args.model, batch=batch, seq=seq, repeats=repeats, threads=threads,
                    prompt=prompt.shape[1], new_tokens=args.new_tokens, head=args.head,
                    pattern_layer=P, load_average=load, transformer_lens=version,
                    torch=torch.__version__, command=" ".join(sys.argv),
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(), notes=notes)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"rows saved to {args.json}")


def _fmt(value) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.1e}"


def print_workload(workload: str, base_name: str, rows: list[dict]) -> None:
    print(f"\n{workload} (ratio to {base_name})")
    print(f"{'path':<34}{'seconds':>9}{'ratio':>7}{'peak RSS':>12}{'vs HF sdpa':>14}"
          f"{'vs HF eager':>14}")
    for r in rows:
        print(f"{r['path']:<34}{r['seconds']:>9.3f}{r['ratio']:>7.2f}{r['rss_mib']:>8.0f} MiB"
              f"{_fmt(r['vs_sdpa']):>14}{_fmt(r['vs_eager']):>14}")


if __name__ == "__main__":
    main()
