"""The remote bridge (NDIF) vs the local one, on the same weights: requests, bytes, wall time.

(a) The probe study's caching: ``cache_residuals`` of every ``hook_resid_post``, pooled at the
    last token, for ``--n-texts`` texts in batches of ``--batch``. The goal: one request per
    batch, and bytes returned within 1.1x of the pooled residuals asked for (they are pooled on
    the server).
(b) The layer sweep: perplexity on ``--windows`` WikiText-2 windows for the unpruned model and
    each of ``--layers`` removed (the remote sweep is the plain loop; locally also the prefix-
    reusing pass). Per-window NLLs are computed on the server, so bytes returned are those.

Both must give the same numbers remotely and locally (checked). Against a real server::

    bash scripts/ndif_local.sh start && source .ndif/env
    .venv/bin/python benchmarks/bench_remote.py --host "$NDIF_HOST" \
        --checkpoint "$NDIF_LOCAL_MODEL_PATH"

Without ``--host`` the server's round trip is simulated in this process (``simulate=True``:
serialisation, the server's unpickling whitelist, execution), which measures the client's side.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import sample_texts
from lens_safety.probing.caching import cache_residuals
from pruning_bridge.bridge import HookBridge
from pruning_bridge.evals import EvalSettings
from pruning_bridge.models import load_model
from pruning_bridge.pruning.layer_sweep import layer_sweep

def timed(fn):
    tic = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - tic


def row(name: str, local_s: float, remote: HookBridge, remote_s: float, asked: int,
        batches: int) -> None:
    t = remote.traffic
    print(f"{name:<34}{local_s:>9.2f}{remote_s:>9.2f}{remote_s / local_s:>8.2f}x"
          f"{t.requests:>6} /{batches:<4}{t.bytes_sent:>13,}{t.bytes_returned:>14,}"
          f"{asked:>14,}{t.bytes_returned / asked:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=None, help="NDIF server (default: simulate)")
    parser.add_argument("--checkpoint", default=None,
                        help="the checkpoint the server deployed (with --host)")
    parser.add_argument("--model", default="smollm2-135m", help="without --host")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--n-texts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--layers", default="0,10,20")
    args = parser.parse_args()

    if args.host:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.checkpoint)
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint,
                                                     torch_dtype=torch.float32).eval()
        from nnsight import CONFIG

        CONFIG.APP.REMOTE_LOGGING = False  # no live status line per request
        remote = HookBridge.remote(args.checkpoint, host=args.host, tokenizer=tok)
        where = f"NDIF server at {args.host}"
    else:
        model, tok = load_model(args.model)
        remote = HookBridge.remote(model, tokenizer=tok, simulate=True)
        where = "simulated server round trip (this process)"
    local = HookBridge(model, tok)
    n_layers = local.adapter.n_layers
    print(f"{where}; {n_layers} layers, d_model {local.config.hidden_size}")
    print(f"\n{'':<34}{'local s':>9}{'remote s':>9}{'ratio':>9}{'requests':>11}"
          f"{'bytes sent':>13}{'returned':>14}{'asked':>14}{'ret/ask':>8}")

    # (a) caching for the probe study
    corpus = sample_texts(args.n_texts)
    kwargs = dict(hook="resid_post", pool="last", batch_size=args.batch, progress=False)
    cache_residuals(remote, None, corpus[:args.batch], **kwargs)  # warm up both
    cache_residuals(local, None, corpus[:args.batch], **kwargs)
    remote.traffic.reset()
    expected, local_s = timed(lambda: cache_residuals(local, None, corpus, **kwargs))
    got, remote_s = timed(lambda: cache_residuals(remote, None, corpus, **kwargs))
    assert torch.equal(got, expected), "remote caching differs from local"
    batches = -(-args.n_texts // args.batch)
    row(f"cache_residuals {args.n_texts} texts", local_s, remote, remote_s, expected.nbytes,
        batches)

    # (b) the layer sweep on perplexity
    layers = [int(x) for x in args.layers.split(",")]
    settings = EvalSettings(("perplexity",), data_dir=args.data_dir, window=args.window,
                            limit=args.windows, batch_size=4 * args.batch, progress=False)
    (reused, reused_s) = timed(lambda: layer_sweep(local, tok, settings, layers=layers))
    (naive, local_s) = timed(lambda: layer_sweep(local, tok, settings, layers=layers,
                                                 reuse_prefix=False))
    remote.traffic.reset()
    rows, remote_s = timed(lambda: layer_sweep(remote, None, settings, layers=layers))
    values = lambda rs: {tuple(r["config"]["removed"]): r["value"] for r in rs}  # noqa: E731
    assert values(rows) == values(naive), "remote sweep differs from local"
    models = len(layers) + 1
    per_model = -(-args.windows // max(1, settings.batch_size // 4))
    asked = models * args.windows * 8  # one float64 NLL per window
    row(f"layer sweep, {models} models x {args.windows} win", local_s, remote, remote_s, asked,
        models * per_model)
    vocab = local.config.vocab_size
    print(f"(the sweep's result is one NLL per window plus the result's fixed overhead; full "
          f"logits would be {models * args.windows * args.window * vocab * 4:,} bytes)")
    gap = max(abs(values(reused)[k] - v) for k, v in values(naive).items())
    print(f"(local prefix-reusing sweep: {reused_s:.2f} s, {reused_s / local_s:.2f}x the plain "
          f"loop; same values: {gap:.1e})")


if __name__ == "__main__":
    main()
