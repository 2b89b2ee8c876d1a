"""lm-evaluation-harness for every model the toolkit produces (``pip install lm-eval``).

    results = evaluate_with_lm_eval(model, tok, ["arc_easy", "hellaswag"], limit=200)
    with edit.apply(bridge):                      # any hooks active on a HookBridge apply
        results = evaluate_with_lm_eval(bridge, tok, "pb_mmlu", metadata={"data_dir": DIR})
    lm_eval.simple_evaluate(model="pruning-bridge",
                            model_args="pretrained=smollm2-135m,skip_layers=3|5", tasks=[...])

``PruningBridgeLM`` (registered in lm-eval as ``pruning-bridge``) runs what
``pruning_bridge.evals`` runs: a Hugging Face causal LM (a dropped-layer, magnitude- or
Wanda-pruned or head-removed model is still one) or a ``HookBridge``, whose active hooks
(skipped layers, routed heads, an activation edit) act on every request. It can also enter a
saved edit and skipped layers itself, so a spec string with lm-eval's ``--model_args`` does the
same. Scoring follows lm-eval's ``HFLM``: a continuation is scored on the tokens that encoding
context + continuation adds to the context's own encoding; rolling log-likelihoods use
``lm_eval.utils.get_rolling_token_windows`` over ``max_length`` (every token predicted once);
generation is greedy unless the task samples, stopped at the task's ``until`` strings. Batches
are left-padded with position ids that count real tokens (``pruning_bridge.common.tokens``), as
in the toolkit's own evaluations, and only the continuation's logits are computed.

The ``pb_mmlu`` / ``pb_gsm8k`` / ``pb_wikitext`` tasks (``lm_eval_tasks/``) read local data and
follow the toolkit's protocols, for cross-checks; see that package.
"""

from __future__ import annotations

import difflib
import logging
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..bridge import HookBridge
from ..common.atomic import write_json_atomic
from ..common.errors import LmEvalMissingError, UsageError
from ..common.tokens import left_pad, model_device, position_ids
from .lm import _accepts, context_length, cut_at_stop
from .lm_eval_tasks import LOCAL_TASKS, TASKS_DIR

INSTALL_HINT = "pip install 'layers-to-latents[lm-eval]' (or: pip install lm-eval)"

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise LmEvalMissingError(f"lm-evaluation-harness is needed here: {INSTALL_HINT}") from error

MODEL_NAME = "pruning-bridge"
DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when a model does not say its context
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- arguments


def parse_layers(layers: str | int | Sequence[int] | None) -> list[int] | None:
    """Skipped layers from Python (a list) or a model_args string (``"3|5"``, ``"3 5"``, ``"3"``;
    lm-eval splits ``--model_args`` at commas, so a comma list cannot be used there)."""
    if layers is None or layers == "":
        return None
    if isinstance(layers, int):
        return [layers]
    if isinstance(layers, str):
        parts = [p for p in layers.replace("|", " ").replace(";", " ").replace(",", " ").split()]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"skip_layers must be layer indices such as '3|5', got "
                             f"{layers!r}.") from None
    return [int(layer) for layer in layers]


def load_edit(edit):
    """A lens_safety ``Edit``: as given (anything with ``.apply(bridge)``), or loaded from the
    folder ``Edit.save`` wrote. (The one place pruning_bridge reaches into lens_safety, lazily:
    a saved edit is lens_safety's format.)"""
    if edit is None or hasattr(edit, "apply"):
        return edit
    folder = Path(edit).expanduser()
    if not folder.is_dir():
        raise UsageError(f"--edit {edit}: not a folder; pass the folder Edit.save wrote "
                         f"(edit.json + edit.safetensors).")
    from lens_safety.edits.edit import Edit

    return Edit.load(folder)


def _batch_size(value) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        raise UsageError("batch_size='auto' is not supported by pruning-bridge; give a number "
                         "(e.g. batch_size=8).")
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"batch_size must be a positive integer, got {value!r}.") from None
    if size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {value!r}.")
    return size


# ---------------------------------------------------------------- the lm-eval model


@register_model(MODEL_NAME)
class PruningBridgeLM(TemplateLM):
    """An lm-eval model over an HF causal LM or a ``HookBridge`` (see the module doc).

    ``model``: the model or bridge, or a ``load_model`` spec (``smollm2-135m``, a checkpoint
    folder, a hub id); lm-eval's ``pretrained=`` is the same argument. ``tokenizer``: needed
    with a model object unless the bridge has one. ``edit``: a lens_safety ``Edit`` (or the
    folder of a saved one) and ``skip_layers``: layers to skip; both are entered around every
    request through the bridge, and leave the model unchanged. ``max_length``: the context
    for truncation and rolling windows (default: the model's, as lm-eval's HFLM). Objects run
    on their own device; ``device`` and ``dtype`` apply to a spec.
    """

    def __init__(self, model=None, tokenizer: PreTrainedTokenizerBase | None = None, *,
                 pretrained=None, dtype: str | None = None, device: str | None = None,
                 batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, edit=None, skip_layers=None,
                 add_bos_token: bool | None = None, max_batch_size=None, **unused):
        super().__init__()
        if unused:
            log.warning("pruning-bridge ignores model arguments %s", sorted(unused))
        if model is not None and pretrained is not None:
            raise UsageError("Pass the model once: model=... or pretrained=..., not both.")
        model = pretrained if model is None else model
        if model is None:
            raise UsageError("No model: pass a model or HookBridge, or pretrained=SPEC "
                             "(e.g. pretrained=smollm2-135m).")
        if isinstance(model, (str, Path)):
            from ..models import load_model

            model, loaded_tokenizer = load_model(model, dtype=dtype, device=device)
            tokenizer = tokenizer or loaded_tokenizer
        elif device is not None and torch.device(device) != model_device(model):
            raise UsageError(f"The model is on {model_device(model)}, not {device}: move it "
                             f"before wrapping it (a model object is never moved).")
        if isinstance(model, HookBridge):
            tokenizer = tokenizer or model.tokenizer
        if tokenizer is None:
            raise UsageError("Pass the tokenizer: PruningBridgeLM(model, tokenizer).")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise UsageError("The tokenizer has neither a pad nor an end-of-text token.")
        self.tokenizer = tokenizer
        self.model = model
        self.edit = load_edit(edit)
        self.skip_layers = parse_layers(skip_layers)
        self.bridge = model if isinstance(model, HookBridge) else None
        if self.bridge is None and (self.edit is not None or self.skip_layers):
            self.bridge = HookBridge(model, tokenizer)
        self._batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self._device = model_device(model)

    # ---------------------------------------------------------------- what lm-eval asks
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context or a rolling window starts from: BOS, else EOS (HFLM)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        hf = self.model.model if isinstance(self.model, HookBridge) else self.model
        return context_length(hf) or DEFAULT_MAX_LENGTH

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    @property
    def runner(self):
        """What the requests run: the bridge when hooks are involved, else the model itself."""
        return self.bridge if self.bridge is not None else self.model

    @contextmanager
    def running(self) -> Iterator[Any]:
        """The runner with this LM's skipped layers and edit entered (nothing else changes)."""
        with ExitStack() as stack:
            if self.skip_layers:
                from ..pruning.layers import skip_layers

                stack.enter_context(skip_layers(self.bridge, self.skip_layers))
            if self.edit is not None:
                stack.enter_context(self.edit.apply(self.bridge))
            yield self.runner

    def get_model_info(self) -> dict:
        """Recorded in lm-eval's results ``config``."""
        hf = self.model.model if isinstance(self.model, HookBridge) else self.model
        return {"model_num_parameters": sum(p.numel() for p in hf.parameters()),
                "model_dtype": str(next(hf.parameters()).dtype),
                "under_hooks": self.bridge is not None,
                "edit": str(self.edit) if self.edit is not None else None,
                "skip_layers": self.skip_layers, "max_length": self.max_length}

    # ---------------------------------------------------------------- tokens
    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """Token ids as HFLM encodes them (no second BOS when the text starts with one)."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **options)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @torch.no_grad()
    def continuation_logits(self, rows: Sequence[Sequence[int]], keep: int) -> torch.Tensor:
        """Logits ``[batch, keep, vocab]`` at the last ``keep`` positions of the token rows
        (left-padded; a model that can skips the LM head elsewhere)."""
        ids, mask = left_pad(rows, self._pad_id())
        runner = self.runner
        device = model_device(runner)
        ids, mask = ids.to(device), mask.to(device)
        kwargs = {"logits_to_keep": keep} if _accepts(runner, "logits_to_keep") else {}
        out = runner(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                     **kwargs)
        logits = out.logits if hasattr(out, "logits") else out
        return logits[:, -keep:]

    # ---------------------------------------------------------------- log-likelihoods
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """``(sum of continuation log-probs, whether greedy decoding gives the continuation)``
        per ``((context, continuation), context_ids, continuation_ids)``; requests that share
        context + continuation[:-1] (multiple choice) share one forward, as in HFLM."""
        results = []
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                         group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        with self.running():
            for chunk in order.get_batched(n=override_bs or self.batch_size):
                rows, lengths = [], []
                for _, context, continuation in chunk:
                    if not context or not continuation:
                        raise UsageError("Empty context or continuation tokens in a request.")
                    # the last max_length tokens of context + continuation, minus the last one
                    rows.append((context + continuation)[-(self.max_length + 1):][:-1])
                    lengths.append(min(len(continuation), self.max_length))
                logits = self.continuation_logits(rows, max(lengths))
                for (request, context, continuation), row, length in zip(chunk, logits, lengths):
                    logprobs = F.log_softmax(row[-length:].float(), dim=-1)[None]
                    greedy = logprobs.argmax(-1)
                    for key, cont, lp in order.get_cache(req_str=request, cxt_toks=context,
                                                         cont_toks=continuation, logits=logprobs):
                        target = torch.tensor(cont[-length:], device=lp.device)[None]
                        is_greedy = bool((greedy[:, -target.shape[1]:] == target).all())
                        score = float(lp[:, -target.shape[1]:].gather(
                            2, target[..., None]).sum())
                        results.append((score, is_greedy))
                        if key is not None:  # None: a rolling window (cached per text)
                            self.cache_hook.add_partial("loglikelihood", key, (score, is_greedy))
                        bar.update(1)
        bar.close()
        return order.get_original(results)

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """lm-eval's disjoint rolling windows ``(context, predicted)`` over ``text``'s tokens."""
        return list(map(make_disjoint_window, get_rolling_token_windows(
            token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length, context_len=1)))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text over rolling windows of ``max_length`` tokens (every
        token predicted once; windows run ``max(1, batch_size // 4)`` at a time: they are long)."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for window in self.rolling_windows(text):
                windows.append((None, *window))
                owners.append(i)
        totals = [0.0] * len(requests)
        step = max(1, self.batch_size // 4)
        for start in tqdm(range(0, len(windows), step), disable=disable_tqdm,
                          desc="loglikelihood_rolling"):
            scores = self._loglikelihood_tokens(windows[start:start + step], disable_tqdm=True,
                                                override_bs=step)
            for owner, (score, _) in zip(owners[start:start + step], scores):
                totals[owner] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, rows: Sequence[Sequence[int]], max_new_tokens: int,
                 stop: Sequence[str] = (), **sampling) -> list[list[int]]:
        """New token ids per prompt (left-padded batch), greedy unless ``do_sample``."""
        ids, mask = left_pad(rows, self._pad_id())
        sampling = dict(sampling)
        if not sampling.get("do_sample"):
            sampling.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        runner = self.runner
        device = model_device(runner)
        if getattr(runner, "remote", None) is not None:
            stop = ()  # a server has no tokenizer to stop with: cut at the stop string here
        out = runner.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                              max_new_tokens=max_new_tokens, pad_token_id=self._pad_id(),
                              stop_strings=list(stop) or None,
                              tokenizer=self.tokenizer if stop else None, **sampling)
        return out[:, ids.shape[1]:].tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of ``(context, gen_kwargs)`` requests, cut at the first stop string
        (the task's ``until`` plus the end-of-text token), batched by equal ``gen_kwargs``."""
        results = []
        order = Collator([req.args for req in requests], group_by="gen_kwargs",
                         sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_fn=lambda r: r[1])
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        with self.running():
            for chunk in order.get_batched(n=self.batch_size):
                contexts, all_kwargs = zip(*chunk)
                kwargs = dict(normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks))
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_new = kwargs.pop("max_gen_toks")
                kwargs.pop("max_length", None)
                if not kwargs.get("do_sample"):
                    kwargs.pop("temperature", None)
                room = self.max_length - max_new
                if room <= 0:
                    raise UsageError(f"max_gen_toks={max_new} leaves no room for a prompt in "
                                     f"max_length={self.max_length}.")
                rows = [self.tok_encode(c, left_truncate_len=room) for c in contexts]
                for context, kw, new in zip(contexts, all_kwargs,
                                            self.generate(rows, max_new, until, **kwargs)):
                    text = cut_at_stop(self.tok_decode(new), until)
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", (context, kw), text)
                    bar.update(1)
        bar.close()
        return order.get_original(results)


# ---------------------------------------------------------------- one call


def task_manager(tasks: Sequence[str], metadata: dict | None = None):
    """An lm-eval ``TaskManager`` that also knows the ``pb_*`` tasks (and only them when no
    other task is asked for: indexing lm-eval's thousands of YAML files takes seconds)."""
    from lm_eval.tasks import TaskManager

    only_local = all(task in LOCAL_TASKS for task in tasks)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=not only_local,
                       metadata=metadata)


def _check_local_names(tasks: Sequence[str]) -> None:
    """``pb_*`` is the toolkit's prefix: an unknown ``pb_`` name is a typo of one of ours."""
    wrong = [t for t in tasks if t.startswith("pb_") and t not in LOCAL_TASKS]
    if wrong:
        hints = {t: difflib.get_close_matches(t, LOCAL_TASKS, n=1) for t in wrong}
        said = "; ".join(f"{t!r}" + (f" (did you mean {h[0]!r}?)" if h else "")
                         for t, h in hints.items())
        raise UsageError(f"Unknown lm-eval task {said}; the toolkit's own tasks are "
                         f"{', '.join(LOCAL_TASKS)}.")


def evaluate_with_lm_eval(model, tokenizer: PreTrainedTokenizerBase | None = None,
                          tasks: str | Sequence[str] = ("pb_mmlu",), *,
                          limit: int | float | None = None, num_fewshot: int | None = None,
                          edit=None, skip_layers=None, batch_size: int = 8,
                          max_length: int | None = None, data_dir: str | Path | None = None,
                          metadata: dict | None = None, log_samples: bool = False,
                          **simple_evaluate_kwargs) -> dict:
    """lm-eval's ``simple_evaluate`` on ``model`` (an HF model, a HookBridge with its hooks,
    a ``PruningBridgeLM`` or a ``load_model`` spec); returns lm-eval's results dict.

    ``tasks``: lm-eval task names (a comma string or a list), the ``pb_*`` tasks included;
    ``limit``: lm-eval's (items per task, or a fraction); ``edit`` / ``skip_layers`` as in
    ``PruningBridgeLM``; ``data_dir`` and ``metadata`` configure the ``pb_*`` tasks (e.g.
    ``{"mmlu_limit": 57}``).
    """
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    if not tasks:
        raise UsageError("No lm-eval tasks given (e.g. tasks=['pb_mmlu', 'arc_easy']).")
    if isinstance(model, PruningBridgeLM):
        if edit is not None or skip_layers is not None or tokenizer is not None:
            raise UsageError("Give edit / skip_layers / tokenizer to the PruningBridgeLM, not "
                             "again here.")
        lm = model
    else:
        lm = PruningBridgeLM(model, tokenizer, edit=edit, skip_layers=skip_layers,
                             batch_size=batch_size, max_length=max_length)
    metadata = dict(metadata or {})
    if data_dir is not None:
        metadata["data_dir"] = str(Path(data_dir).expanduser().resolve())
    _check_local_names(tasks)  # a typo in pb_* fails at once, without indexing lm-eval's tasks
    manager = task_manager(tasks, metadata)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"Unknown lm-eval task(s) {unknown}; the toolkit's own are "
                         f"{', '.join(LOCAL_TASKS)} (see `lm_eval ls tasks` for the rest).")
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                   task_manager=manager, log_samples=log_samples,
                                   **simple_evaluate_kwargs)


def write_results(results: dict, path: str | Path) -> Path:
    """lm-eval's results as JSON (what cannot be serialised becomes text, as lm-eval does),
    written atomically."""
    from lm_eval.utils import handle_non_serializable

    return write_json_atomic(path, results, indent=1, default=handle_non_serializable,
                             ensure_ascii=False)


def results_table(results: dict) -> str:
    """lm-eval's summary table of ``results`` (and of its groups, as ``lm_eval`` prints)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
