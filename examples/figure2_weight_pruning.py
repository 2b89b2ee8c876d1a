"""Figure 2 of the report: magnitude vs Wanda weight pruning at 5-50 % sparsity.

    python examples/figure2_weight_pruning.py --data-dir ../shared/data              # SmolLM2, CPU
    python examples/figure2_weight_pruning.py --model Qwen/Qwen3-0.6B \\
        --tasks mmlu,gsm8k,perplexity --limit 451 --device cuda                       # the report

Results go to results/<model>/weight_sweep.jsonl (rerun to resume), the figure to
figures/figure2_weight_pruning.{html,png}. Also prints the sparsity at which perplexity doubles.
"""

from __future__ import annotations

from pathlib import Path

from common import eval_settings, figure_parser, results_dir

from pruning_bridge.cli_options import load_model_from_args
from pruning_bridge.common.cli import floats, names
from pruning_bridge.figures import save_figure, weight_pruning_figure
from pruning_bridge.pruning.weight_sweep import REPORT_SPARSITIES, SCOPES, weight_sweep


def doubling_sparsity(rows: list[dict], method: str) -> float | None:
    """The first swept sparsity at which ``method`` at least doubles the dense perplexity."""
    dense = [r["value"] for r in rows if r["method"] == "dense" and r["task"] == "perplexity"]
    points = sorted((r["config"]["sparsity"], r["value"]) for r in rows
                    if r["method"] == method and r["task"] == "perplexity")
    return next((s for s, v in points if dense and v >= 2 * dense[0]), None)


def main() -> None:
    parser = figure_parser(__doc__)
    parser.add_argument("--sparsities", type=floats, default=list(REPORT_SPARSITIES))
    parser.add_argument("--methods", type=names, default=["magnitude", "wanda"])
    parser.add_argument("--scope", default="per_matrix", choices=SCOPES)
    args = parser.parse_args()
    settings = eval_settings(args)
    model, tok = load_model_from_args(args)
    methods = args.methods
    rows = weight_sweep(model, tok, settings, args.sparsities, methods,
                        out=results_dir(args) / "weight_sweep.jsonl", scope=args.scope)
    for row in rows:
        print(f"{row['method']:<10} {row['config']['sparsity']:>5.2f} {row['task']:<11} "
              f"{row['value']:.4f}")
    for method in methods:
        print(f"{method}: perplexity doubles at sparsity {doubling_sparsity(rows, method)}")
    fig = weight_pruning_figure(rows, f"{args.model}: weight pruning")
    print("wrote", *save_figure(fig, Path(args.figures) / "figure2_weight_pruning"))


if __name__ == "__main__":
    main()
