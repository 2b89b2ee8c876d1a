"""Figure 1 of the report: remove each layer in turn, evaluate MMLU / GSM8K / perplexity.

Also ranks the layers by ShortGPT's Block Influence (no evaluation needed) and reports how well
that ranking predicts the measured damage (Spearman correlation).

    python examples/figure1_layer_removal.py --data-dir ../shared/data            # SmolLM2, CPU
    python examples/figure1_layer_removal.py --model Qwen/Qwen3-0.6B \\
        --tasks mmlu,gsm8k,perplexity --limit 451 --device cuda                     # the report

Results go to results/<model>/layer_sweep.jsonl (rerun to resume), the figure to
figures/figure1_layer_removal.{html,png}.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import eval_settings, figure_parser, results_dir

from pruning_bridge.cli_options import load_model_from_args
from pruning_bridge.evals.data import load_wikitext2
from pruning_bridge.figures import layer_removal_figure, save_figure
from pruning_bridge.pruning.layer_sweep import layer_sweep, rank_correlation
from pruning_bridge.pruning.layers import block_influence


def main() -> None:
    args = figure_parser(__doc__).parse_args()
    out_dir = results_dir(args)
    settings = eval_settings(args)
    model, tok = load_model_from_args(args)
    rows = layer_sweep(model, tok, settings, out=out_dir / "layer_sweep.jsonl")
    text = load_wikitext2("test", args.data_dir)
    paragraphs = [p for p in text.split("\n\n") if len(p) > 200][:32]
    influence = block_influence(model, tok, paragraphs, max_length=256)
    summary = {"block_influence": influence,
               "spearman_vs_damage": {t: rank_correlation(influence, rows, t)
                                      for t in {r["task"] for r in rows}}}
    (out_dir / "block_influence.json").write_text(json.dumps(summary, indent=2))
    baseline = {r["task"]: r["value"] for r in rows if not r["config"]["removed"]}
    print(f"\n{'layer':>5}  {'BI':>7}  " + "  ".join(f"{t:>11}" for t in baseline))
    print(f"{'none':>5}  {'':>7}  " + "  ".join(f"{v:>11.4f}" for v in baseline.values()))
    for i, bi in enumerate(influence):
        values = {r["task"]: r["value"] for r in rows if r["config"]["removed"] == [i]}
        print(f"{i:>5}  {bi:>7.4f}  " + "  ".join(f"{values.get(t, float('nan')):>11.4f}"
                                                  for t in baseline))
    print("Spearman(Block Influence, damage):", summary["spearman_vs_damage"])
    fig = layer_removal_figure(rows, f"{args.model}: removing one layer")
    print("wrote", *save_figure(fig, Path(args.figures) / "figure1_layer_removal"))


if __name__ == "__main__":
    main()
