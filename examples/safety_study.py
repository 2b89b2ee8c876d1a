"""The whole safety study: probes per layer, the harmful direction, editing and its trade-off.

    python examples/safety_study.py                              # SmolLM2-135M, offline, HookBridge
    python examples/safety_study.py --model gpt2-large --backend hooked   # the report's setting

Steps: cache residuals of the ToxiGen + CrowS-Pairs prompts, fit layer probes (binary and
three-class), extract the harmful direction at the best layer, plot the held-out projections per
class, then evaluate ``subtract`` over an alpha sweep and ``project`` (toxicity of greedy
continuations of held-out toxic / neutral prompts, WikiText-2 perplexity). Figures go to
``figures/`` (safety_probes, safety_projection_histogram, safety_tradeoff), results to
``results/<model>/safety/`` (resumable: cached activations and the sweep's JSONL are reused).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lens_safety import PromptSet, cache_residuals, run_probe_study
from lens_safety.figures import projection_histogram, tradeoff_figure
from lens_safety.sweep import alpha_sweep
from pruning_bridge.evals.data import load_wikitext2
from pruning_bridge.common import save_figure


def load(model_spec: str, backend: str, dtype, device):
    if backend == "hooked":
        from lens_safety import load_hooked

        hooked = load_hooked(model_spec, dtype=dtype, device=device)
        return hooked, hooked.tokenizer
    from pruning_bridge.bridge import HookBridge
    from pruning_bridge.models import load_model

    model, tokenizer = load_model(model_spec, dtype=dtype, device=device)
    return HookBridge(model, tokenizer), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--backend", choices=["bridge", "hooked"], default="bridge",
                        help="bridge: HookBridge on the HF model; hooked: TransformerLens")
    parser.add_argument("--data-dir", default=None, help="local data (default: the hub)")
    parser.add_argument("--n-per-class", type=int, default=None,
                        help="default: the smallest class (279 neutral prompts)")
    parser.add_argument("--n-prompts", type=int, default=20)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 16.0, 32.0, 64.0, 128.0])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--out", default="results")
    parser.add_argument("--figures", default="figures")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out) / args.model.replace("/", "--") / "safety"
    figures = Path(args.figures)
    model, tok = load(args.model, args.backend, args.dtype, args.device)

    study = run_probe_study(model, tok, model_name=args.model, data_dir=args.data_dir,
                            n_per_class=args.n_per_class, out_dir=out)
    layer = study["best_layer"]
    print(f"\nProbes ({study['n_train']} train / {study['n_test']} held-out prompts)")
    print(f"{'layer':>5} {'cv AUROC':>9} {'held-out acc':>13} {'held-out AUROC':>15} "
          f"{'3-class cv acc':>15}")
    for cv, test, three in zip(study["cv_binary"], study["held_out_binary"],
                               study["cv_three_class"]):
        print(f"{cv['layer']:>5} {cv['auroc']:>9.3f} {test['accuracy']:>13.3f} "
              f"{test['auroc']:>15.3f} {three['accuracy']:>15.3f}")
    print(f"best layer {layer}; direction AUROC on held-out prompts "
          f"{study['held_out_projection_auroc']:.3f}")
    print("wrote", *save_figure(study["probes"].figure(f"{args.model}: probe per layer"),
                                figures / "safety_probes"))

    prompts = PromptSet.load(args.data_dir, n_per_class=args.n_per_class, seed=0)
    _, test = prompts.split(test_size=0.25, seed=0)
    test_acts = cache_residuals(model, tok, test.texts, hook=study["hook"], pool=study["pool"],
                                store=out / f"acts_test_{study['hook']}_{study['pool']}"
                                            f".safetensors")
    print("wrote", *save_figure(projection_histogram(
        test_acts[layer], test.labels, study["direction"],
        title=f"{args.model}: held-out projections on the harmful direction (layer {layer})"),
        figures / "safety_projection_histogram"))

    toxic = [x.text for x in test if x.label == "toxic"][:args.n_prompts]
    neutral = [x.text for x in test if x.label == "neutral"][:args.n_prompts]
    rows = alpha_sweep(model, tok, study["direction"], args.alphas, toxic_prompts=toxic,
                       neutral_prompts=neutral,
                       perplexity_text=load_wikitext2("test", args.data_dir),
                       window=args.window, max_windows=args.max_windows,
                       out=out / "alpha_sweep.jsonl", max_new_tokens=args.max_new_tokens,
                       subtract_layers=[study["best_layer"]])
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
