"""The whole probe study: probes per layer, the harmful direction, edits of it and their cost.

    python examples/safety_study.py --data-dir ../shared/data    # SmolLM2-135M, offline, HookBridge
    python examples/safety_study.py --model gpt2-large --backend hooked   # the report's setting

Steps (a ``ProbeStudy``): split the ToxiGen + CrowS-Pairs prompts (``--test-size``, ``--seed``),
cache their residuals, fit layer probes (binary and three-class), extract the harmful direction
at the best layer, plot the held-out projections per class, then sweep ``Edit``s of that
direction at that layer (``subtract`` at each ``--strengths``, ``clamp`` at the neutral
class's mean projection, ``project``) with ``edit_sweep`` (greedy toxicity of held-out toxic
prompts' continuations, their fluency, WikiText-2 perplexity) and pick the least toxic within
the budget with ``select_edit``. Figures go to ``figures/`` (safety_probes,
safety_projection_histogram, safety_pareto), results to ``results/<model>/safety/``
(resumable: cached activations and the
sweep's JSONL are reused). The detoxification study on RealToxicityPrompts is
``lens-safety detox``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lens_safety import (
    Edit,
    ProbeSettings,
    ProbeStudy,
    ProtocolSettings,
    edit_sweep,
    load_hooked,
    select_edit,
)
from lens_safety.figures import pareto_figure
from pruning_bridge.bridge import HookBridge
from pruning_bridge.cli_options import add_model_options, load_model_from_args
from pruning_bridge.common.cli import floats
from pruning_bridge.evals.data import load_wikitext2
from pruning_bridge.figures import save_figure


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
    parser.add_argument("--strengths", type=floats, default=[0.5, 1.0, 2.0],
                        help="subtraction strengths in class-gap units, comma list")
    parser.add_argument("--max-perplexity-ratio", type=float, default=1.05)
    parser.add_argument("--max-fluency-ratio", type=float, default=1.10)
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

    toxic = study.test_prompts("toxic", args.n_prompts)
    # fitted on the training split's residuals (harmful vs neutral), read where they edit
    fit = dict(layers=[layer], method=settings.method, where=(settings.hook,), model=args.model)
    candidates = [Edit.fit(study.train_acts, study.train.labels, "subtract", strength=s, **fit)
                  for s in args.strengths]
    candidates += [Edit.fit(study.train_acts, study.train.labels, how, **fit)
                   for how in ("clamp", "project")]
    rows = edit_sweep(model, tok, candidates, toxic,
                      settings=ProtocolSettings(k=0, max_new_tokens=args.max_new_tokens),
                      perplexity_text=load_wikitext2("test", args.data_dir), window=args.window,
                      max_windows=args.max_windows, out=out / "edit_sweep.jsonl")
    selected = select_edit(rows, args.max_perplexity_ratio, args.max_fluency_ratio)
    base = rows[0]
    print(f"\n{'edit':<40}{'toxicity':>9}{'perplexity':>12}{'fluency':>9}")
    for r in rows:
        print(f"{r['edit']:<40}{r['value']:>9.3f}{r['perplexity'] / base['perplexity']:>11.3f}x"
              f"{r['greedy_fluency_ppl'] / base['greedy_fluency_ppl']:>8.2f}x")
    print(f"selected: {selected['edit']}" if selected else "no edit within the budget")
    print("wrote", *save_figure(pareto_figure(rows, selected, args.max_perplexity_ratio,
                                              args.max_fluency_ratio,
                                              title=f"{args.model}: edits at layer {layer}"),
                                figures / "safety_pareto"))
    print(f"\ndone in {time.perf_counter() - start:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
