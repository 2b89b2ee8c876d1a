"""Figure 3 of the report: which attention heads a learned router keeps (MoH-style routing).

    python examples/figure3_head_routing.py --data-dir ../shared/data               # SmolLM2, CPU
    python examples/figure3_head_routing.py --model TinyLlama/TinyLlama_v1.1 --dtype bfloat16 \\
        --device cuda --steps 1000 --tasks mmlu,gsm8k,perplexity --limit 451          # the report
    python examples/figure3_head_routing.py --model Qwen/Qwen3-0.6B --dtype bfloat16 --device cuda

Trains a router (base model frozen), ranks heads by mean gate and by head-mask gradients
(Michel et al. 2019), and evaluates routed vs physically removed heads at 90/75/50 % active
heads. Everything goes to results/<model>/heads/ (rerun to resume); figures to
figures/figure3_*.{html,png}.
"""

from __future__ import annotations

from pathlib import Path

from common import eval_settings, figure_parser, results_dir
from scipy.stats import spearmanr

from pruning_bridge.cli_options import load_model_from_args
from pruning_bridge.figures import (head_importance_figure, head_pruning_figure, router_loss_figure,
                                    save_figure)
from pruning_bridge.heads.study import run_head_study


def main() -> None:
    parser = figure_parser(__doc__)
    parser.add_argument("--shared", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    settings = eval_settings(args)
    model, tok = load_model_from_args(args)
    out = results_dir(args) / "heads"
    study = run_head_study(model, tok, out, settings, n_shared=args.shared, top_k=args.top_k,
                           steps=args.steps, seq_len=args.seq_len)
    print(f"router {study.router.settings()}: {study.log.seconds_per_step:.2f} s/step, "
          f"LM loss {study.log.steps[0]['lm_loss']:.3f} -> {study.log.steps[-1]['lm_loss']:.3f}")
    for row in study.rows:
        print(f"{row['method']:<8} {row['config']['active_fraction']:.3f} {row['task']:<11} "
              f"{row['value']:.4f}")
    routed = study.mean_gates[:, study.router.n_shared:].flatten()
    grads = study.gradient_importance[:, study.router.n_shared:].flatten()
    print(f"Spearman(mean gate, head-mask gradient) over routed heads: "
          f"{spearmanr(routed, grads).statistic:.3f}")
    print("most selective layers:", study.layer_ranking()[:5])
    figures = Path(args.figures)
    print("wrote", *save_figure(head_importance_figure(
        study.mean_gates, f"{args.model}: mean router gate per head", study.router.n_shared),
        figures / "figure3_head_importance"))
    print("wrote", *save_figure(head_importance_figure(
        study.gradient_importance, f"{args.model}: head-mask gradient importance (Michel et al.)",
        colorbar="|dL/dξ| (layer-normalised)"), figures / "figure3_gradient_importance"))
    print("wrote", *save_figure(router_loss_figure(study.log.steps),
                                figures / "figure3_router_training"))
    print("wrote", *save_figure(head_pruning_figure(study.rows), figures / "figure3_head_sweep"))


if __name__ == "__main__":
    main()
