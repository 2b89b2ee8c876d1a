"""The main job: reproduce the report on the embedded SmolLM2-135M, offline.

For now it runs the evaluation baseline (MMLU 0-shot, GSM8K 8-shot, WikiText-2 perplexity) and
prints a table; the layer-removal, weight-pruning, head-routing and safety studies join it as they
land. Results are written to ``results/`` as they finish and reused when rerun, so an
interrupted run resumes where it stopped.

    python examples/reproduce_report.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pruning_bridge.data import load_wikitext2
from pruning_bridge.evals import EvalResult, gsm8k_accuracy, mmlu_accuracy, perplexity
from pruning_bridge.models import load_model

PRESETS = {  # sizes that finish on 2 CPU cores in a few minutes (default) or a few seconds (smoke)
    "default": dict(model="smollm2-135m", mmlu=451, gsm8k=16, gsm8k_tokens=192, windows=8,
                    window=1024),
    "smoke": dict(model="tiny-llama", mmlu=12, gsm8k=2, gsm8k_tokens=8, windows=2, window=128),
    "report": dict(model="Qwen/Qwen3-0.6B", mmlu=451, gsm8k=131, gsm8k_tokens=256, windows=None,
                   window=2048),
}


def cached(path: Path, compute) -> EvalResult:
    """Reuse a finished result from ``path``; otherwise compute it and write it at once."""
    if path.exists():
        return EvalResult.from_json(path)
    result = compute()
    result.to_json(path)
    return result


def baseline(model, tokenizer, p: dict, data_dir, out: Path) -> list[EvalResult]:
    def ppl() -> EvalResult:
        text = load_wikitext2("test", data_dir)
        value = perplexity(model, tokenizer, text, window=p["window"], max_windows=p["windows"])
        return EvalResult("perplexity", "perplexity", value,
                          {"window": p["window"], "windows": p["windows"]})

    return [
        cached(out / "baseline_mmlu.json",
               lambda: mmlu_accuracy(model, tokenizer, limit=p["mmlu"], data_dir=data_dir)),
        cached(out / "baseline_gsm8k.json",
               lambda: gsm8k_accuracy(model, tokenizer, limit=p["gsm8k"], data_dir=data_dir,
                                      max_new_tokens=p["gsm8k_tokens"])),
        cached(out / "baseline_perplexity.json", ppl),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--model", default=None, help="override the preset's model")
    parser.add_argument("--data-dir", default=None, help="local data (default: the hub)")
    parser.add_argument("--out", default="results", help="results folder (resumable)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    p = dict(PRESETS[args.preset])
    if args.model:
        p["model"] = args.model
    out = Path(args.out) / p["model"].replace("/", "--")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = load_model(p["model"], dtype=args.dtype, device=args.device)
    results = baseline(model, tokenizer, p, args.data_dir, out)
    print(f"\nModel: {p['model']}   preset: {args.preset}   results: {out}")
    print(f"{'task':<12}{'metric':<12}{'value':>10}  settings")
    for r in results:
        settings = {k: v for k, v in r.settings.items() if k != "n"}
        print(f"{r.task:<12}{r.metric:<12}{r.value:>10.4f}  {json.dumps(settings)}")
    print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
