"""Cross-check the toolkit's harness against lm-evaluation-harness on the real SmolLM2-135M.

The same model object runs both, on the same local data:

- **MMLU**, 0-shot, the same seeded 451 questions: ``mmlu_accuracy`` (argmax of the four
  answer-letter logits) vs lm-eval's ``pb_mmlu`` (multiple choice: the letter " A".." D" with the
  highest log-likelihood). Same prompt, word for word; the count of agreeing predictions, both
  accuracies, and how far apart the two scores are (a log-likelihood difference between two
  letters equals the logit difference when both come from the same forward).
- **GSM8K**, 8-shot, greedy, a few problems: ``gsm8k_accuracy`` vs ``pb_gsm8k``: the same
  completions and extracted answers.
- **WikiText-2** perplexity: the protocols differ. The toolkit cuts the text into
  non-overlapping windows of ``--window`` tokens and does not score each window's first token;
  lm-eval's ``loglikelihood_rolling`` (``pb_wikitext``, ``max_length = --window``) scores every
  token, the first from the end-of-text token, each window after the first seeing one token of
  the previous window, and reports word and byte perplexity. Both are reported, with lm-eval's
  token perplexity recomputed from its total log-likelihood, and the protocols are then made to
  coincide: the adapter scores the toolkit's own windows (first token as context), which must
  give the toolkit's number.

    python benchmarks/lm_eval_crosscheck.py [--data-dir ../shared/data] [--mmlu 451] \\
        [--gsm8k 4] [--wikitext-chars 50000] [--batch-size 8] [--out lm_eval_crosscheck.txt]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pruning_bridge.evals import (gsm8k_accuracy, load_wikitext2, mmlu_accuracy,  # noqa: E402
                                  perplexity)
from pruning_bridge.evals.gsm8k import extract_answer  # noqa: E402
from pruning_bridge.evals.lm_eval_adapter import (PruningBridgeLM,  # noqa: E402
                                                  evaluate_with_lm_eval)
from pruning_bridge.evals.mmlu import mmlu_prompts  # noqa: E402
from pruning_bridge.evals.perplexity import token_windows  # noqa: E402
from pruning_bridge.models import load_model  # noqa: E402

LETTERS = "ABCD"


class Report:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def check_mmlu(model, tok, args, say) -> int:
    say(f"## MMLU, 0-shot, {args.mmlu} questions (seed 0), batch size {args.batch_size}")
    ours, t_ours = timed(mmlu_accuracy, model, tok, limit=args.mmlu, data_dir=args.data_dir,
                         batch_size=args.batch_size, progress=False)
    theirs, t_theirs = timed(evaluate_with_lm_eval, model, tok, "pb_mmlu",
                             data_dir=args.data_dir, log_samples=True,
                             batch_size=args.batch_size, metadata={"mmlu_limit": args.mmlu})
    samples = theirs["samples"]["pb_mmlu"]
    _, prompts = mmlu_prompts(tok, limit=args.mmlu, data_dir=args.data_dir)
    same_prompts = sum(s["arguments"][0][0] == p for s, p in zip(samples, prompts))
    by_id = {r["id"]: r for r in ours.records}
    agree, worst, margin, disagreements = 0, 0.0, math.inf, []
    for sample in samples:
        record = by_id[sample["doc"]["id"]]
        lls = [float(resp[0]) for resp in sample["filtered_resps"]]
        logits = record["letter_logits"]
        picked = LETTERS[max(range(4), key=lls.__getitem__)]
        agree += picked == record["prediction"]
        if picked != record["prediction"]:
            disagreements.append((record["id"], record["prediction"], picked, logits, lls))
        # differences between letters: log-likelihoods vs logits (same forward: equal)
        worst = max(worst, max(abs((lls[i] - lls[0]) - (logits[i] - logits[0]))
                               for i in range(1, 4)))
        top = sorted(logits, reverse=True)
        margin = min(margin, top[0] - top[1])
    acc_theirs = theirs["results"]["pb_mmlu"]["acc,none"]
    say(f"same prompt, word for word: {same_prompts} / {len(samples)}")
    say(f"same predicted letter: {agree} / {len(samples)}")
    say(f"accuracy: mmlu_accuracy {ours.value:.4f} ({sum(r['correct'] for r in ours.records)} "
        f"correct), lm-eval pb_mmlu {acc_theirs:.4f}")
    say(f"largest |(ll_i - ll_A) - (logit_i - logit_A)| over questions and letters: "
        f"{worst:.2e}; smallest gap between the two best letters' logits: {margin:.2e}")
    for qid, want, got, logits, lls in disagreements:
        say(f"  DISAGREE {qid}: mmlu_accuracy {want} (logits {logits}), lm-eval {got} "
            f"(log-likelihoods {lls})")
    say(f"seconds: mmlu_accuracy {t_ours:.0f}, lm-eval {t_theirs:.0f}")
    say()
    return agree


def check_gsm8k(model, tok, args, say) -> None:
    say(f"## GSM8K, 8-shot, greedy, 256 new tokens, {args.gsm8k} problems (seed 0)")
    ours, t_ours = timed(gsm8k_accuracy, model, tok, limit=args.gsm8k, shots=8,
                         data_dir=args.data_dir, batch_size=args.batch_size, progress=False)
    theirs, t_theirs = timed(evaluate_with_lm_eval, model, tok, "pb_gsm8k",
                             data_dir=args.data_dir, log_samples=True,
                             batch_size=args.batch_size,
                             metadata={"gsm8k_limit": args.gsm8k, "gsm8k_shots": 8})
    samples = theirs["samples"]["pb_gsm8k"]
    same_text = same_answer = 0
    for sample, record in zip(samples, ours.records):
        assert sample["doc"]["id"] == record["id"]
        completion = sample["filtered_resps"][0]
        answer = extract_answer(completion)
        same_text += completion == record["completion"]
        same_answer += answer == record["prediction"]
        say(f"  problem {record['id']}: gold {record['gold']:g}; gsm8k_accuracy "
            f"{record['prediction']}, lm-eval {answer}")
    say(f"same completion: {same_text} / {len(samples)}; same extracted answer: "
        f"{same_answer} / {len(samples)}")
    say(f"accuracy: gsm8k_accuracy {ours.value:.4f}, lm-eval pb_gsm8k "
        f"{theirs['results']['pb_gsm8k']['exact_match,none']:.4f}")
    say(f"seconds: gsm8k_accuracy {t_ours:.0f}, lm-eval {t_theirs:.0f}")
    say()


def check_wikitext(model, tok, args, say) -> None:
    text = load_wikitext2("test", args.data_dir)
    chars = args.wikitext_chars
    if chars:
        text = text[:chars]
    n_tokens = len(tok(text)["input_ids"])
    words = len(text.split())
    say(f"## WikiText-2 test, {'first ' + str(chars) + ' characters' if chars else 'all'}: "
        f"{len(text):,} characters, {n_tokens:,} tokens, {words:,} words; window "
        f"{args.window}")
    ours, t_ours = timed(perplexity, model, tok, text, window=args.window,
                         batch_size=1, progress=False)
    lm = PruningBridgeLM(model, tok, batch_size=4, max_length=args.window)
    theirs, t_theirs = timed(evaluate_with_lm_eval, lm, tasks="pb_wikitext",
                             data_dir=args.data_dir, log_samples=True,
                             metadata={"wikitext_chars": chars or None})
    [sample] = theirs["samples"]["pb_wikitext"]
    total = float(sample["resps"][0][0]) if isinstance(sample["resps"][0], (list, tuple)) \
        else float(sample["resps"][0])
    result = theirs["results"]["pb_wikitext"]
    say(f"toolkit perplexity (non-overlapping windows, first token of each unscored): "
        f"{ours.value:.4f} over {ours.settings['n']} windows = "
        f"{ours.settings['n'] * (args.window - 1):,} predicted tokens (the last "
        f"{n_tokens - ours.settings['n'] * args.window} tokens, a partial window, dropped)")
    say(f"lm-eval pb_wikitext (rolling windows, every token): token perplexity "
        f"{math.exp(-total / n_tokens):.4f} (from its log-likelihood {total:.2f} over "
        f"{n_tokens:,} tokens), word_perplexity {result['word_perplexity,none']:.4f}, "
        f"byte_perplexity {result['byte_perplexity,none']:.4f}, bits_per_byte "
        f"{result['bits_per_byte,none']:.4f}")
    # the toolkit's windows scored through the adapter: the protocols now coincide
    windows = token_windows(tok, text, args.window).tolist()
    scores = lm._loglikelihood_tokens([(None, w[:1], w[1:]) for w in windows],
                                      disable_tqdm=True)
    nll = -sum(score for score, _ in scores)
    same = math.exp(nll / (len(windows) * (args.window - 1)))
    say(f"the toolkit's windows through the adapter: perplexity {same:.4f} (toolkit "
        f"{ours.value:.4f}; relative difference {abs(same - ours.value) / ours.value:.1e})")
    say(f"seconds: perplexity {t_ours:.0f}, lm-eval {t_theirs:.0f}")
    say()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--mmlu", type=int, default=451, help="MMLU questions (0: skip)")
    parser.add_argument("--gsm8k", type=int, default=4, help="GSM8K problems (0: skip)")
    parser.add_argument("--wikitext-chars", type=int, default=50_000,
                        help="first characters of WikiText-2 test (0: all; -1: skip)")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    import lm_eval

    say = Report()
    model, tok = load_model(args.model)
    say(f"# lm-evaluation-harness {lm_eval.__version__} vs pruning_bridge.evals on "
        f"{args.model}")
    say(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.processor() or platform.machine()}; float32, CPU; data {args.data_dir}")
    say()
    start = time.perf_counter()
    if args.mmlu:
        check_mmlu(model, tok, args, say)
    if args.gsm8k:
        check_gsm8k(model, tok, args, say)
    if args.wikitext_chars >= 0:
        check_wikitext(model, tok, args, say)
    say(f"total {time.perf_counter() - start:.0f} s")
    if args.out:
        Path(args.out).write_text("\n".join(say.lines) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
