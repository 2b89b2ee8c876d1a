"""The whole safety study: probes per layer, the harmful direction, editing and its trade-off.

    python examples/safety_study.py --data-dir ../shared/data    # SmolLM2-135M, offline, HookBridge
    python examples/safety_study.py --model gpt2-large --backend hooked   # the report's setting

Steps (a ``ProbeStudy``): split the ToxiGen + CrowS-Pairs prompts (``--test-size``, ``--seed``),
cache their residuals, fit layer probes (binary and three-class), extract the harmful direction
at the best layer, plot the held-out projections per class, then evaluate ``subtract`` over an
alpha sweep and ``project`` (toxicity of greedy continuations of held-out toxic / neutral
prompts, WikiText-2 perplexity). Figures go to
``figures/`` (safety_probes, safety_projection_histogram, safety_tradeoff), results to
``results/<model>/safety/`` (resumable: cached activations and the sweep's JSONL are reused).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lens_safety import ProbeSettings, ProbeStudy, alpha_sweep, load_hooked
from lens_safety.figures import tradeoff_figure
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common.cli import add_model_options, floats, load_model_from_args
from pruning_bridge.common.figures import save_figure
from pruning_bridge.evals.data import load_wikitext2


def load(args: argparse.Namespace):
    """The model on the chosen backend, and its tokenizer."""
    if args.backend == "hooked":
        hooked = load_hooked(args.model, dtype=args.dtype, device=args.device)
        return hooked, hooked.tokenizer
    model, tokenizer = load_model_from_args(args)  # --remote: already a (remote) bridge
    bridge = model if isinstance(model, HookBridge) else HookBridge(model, tokenizer)
    return bridge, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, default="smollm2-135m")
    parser.add_argument("--backend", choices=["bridge", "hooked"], default="bridge",
                        help="bridge: HookBridge on the HF model; hooked: TransformerLens")
    parser.add_argument("--data-dir", default=None, help="local data (default: the hub)")
    parser.add_argument("--n-per-class", type=int, default=None,
                        help="default: the smallest class (279 neutral prompts)")
    parser.add_argument("--test-size", type=float, default=ProbeSettings.test_size)
    parser.add_argument("--seed", type=int, default=ProbeSettings.seed)
    parser.add_argument("--n-prompts", type=int, default=20)
    parser.add_argument("--alphas", type=floats, default=[0.0, 16.0, 32.0, 64.0, 128.0],
                        help="subtraction strengths, comma list")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--out", default="results")
    parser.add_argument("--figures", default="figures")
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out) / args.model.replace("/", "--") / "safety"
    figures = Path(args.figures)
    model, tok = load(args)

    settings = ProbeSettings(n_per_class=args.n_per_class, test_size=args.test_size,
                             seed=args.seed)
    study = ProbeStudy.build(model, tok, settings, data_dir=args.data_dir,
                             model_name=args.model, folder=out)
    summary, layer = study.summary(), study.best_layer
    print(f"\nProbes ({summary['n_train']} train / {summary['n_test']} held-out prompts)")
    print(f"{'layer':>5} {'cv AUROC':>9} {'held-out acc':>13} {'held-out AUROC':>15} "
          f"{'3-class cv acc':>15}")
    for cv, test, three in zip(summary["cv_binary"], summary["held_out_binary"],
                               summary["cv_three_class"]):
        print(f"{cv['layer']:>5} {cv['auroc']:>9.3f} {test['accuracy']:>13.3f} "
              f"{test['auroc']:>15.3f} {three['accuracy']:>15.3f}")
    print(f"best layer {layer}; direction AUROC on held-out prompts "
          f"{summary['held_out_projection_auroc']:.3f}")
    print("wrote", *save_figure(study.figure(f"{args.model}: probe per layer"),
                                figures / "safety_probes"))
    print("wrote", *save_figure(study.projection_figure(
        f"{args.model}: held-out projections on the harmful direction (layer {layer})"),
        figures / "safety_projection_histogram"))

    rows = alpha_sweep(model, tok, study.direction, args.alphas,
                       toxic_prompts=study.test_prompts("toxic", args.n_prompts),
                       neutral_prompts=study.test_prompts("neutral", args.n_prompts),
                       perplexity_text=load_wikitext2("test", args.data_dir),
                       window=args.window, max_windows=args.max_windows,
                       out=out / "alpha_sweep.jsonl", max_new_tokens=args.max_new_tokens,
                       subtract_layers=[layer])
    print(f"\n{'edit':<10}{'alpha':>7}{'tox(toxic)':>12}{'tox(neutral)':>14}{'perplexity':>12}")
    base = rows[0]
    print(f"{'unedited':<10}{'':>7}{base['before_toxicity_toxic']:>12.4f}"
          f"{base['before_toxicity_neutral']:>14.4f}{base['before_perplexity']:>12.3f}")
    for r in rows:
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        print(f"{r['edit']:<10}{alpha:>7}{r['toxicity_toxic']:>12.4f}"
              f"{r['toxicity_neutral']:>14.4f}{r['perplexity']:>12.3f}")
    print("wrote", *save_figure(tradeoff_figure(rows, f"{args.model}: toxicity vs perplexity"),
                                figures / "safety_tradeoff"))
    print(f"\ndone in {time.perf_counter() - start:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
