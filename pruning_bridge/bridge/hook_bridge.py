"""HookBridge: TransformerLens hook-point names on Hugging Face causal LMs, through nnsight.

    bridge = HookBridge(model, tokenizer)
    logits, cache = bridge.run_with_cache("Hello world", names=["blocks.3.hook_resid_post"])
    with bridge.hooks([("blocks.3.attn.hook_z", zero_head_2)]):
        logits = bridge("Hello world")
        text = bridge.generate("Hello", max_new_tokens=20)

Activations have TransformerLens shapes (``[batch, pos, d_model]``; per head
``[batch, pos, head, d_head]``). A hook ``fn(activation, hook)`` may return a replacement (or
edit in place and return None); ``hook`` is the hook's name, a ``str`` with TransformerLens's
``hook.name``, so ``fn(activation, name)`` hooks work as well. The wrapped model's weights are
never changed. TransformerLens's own verbs (``run_with_hooks``, ``names_filter=``, ``cfg``,
``to_tokens``, the ``ActivationCache`` methods...) are in ``tl_api`` and ``activation_cache``.
"""

from __future__ import annotations

import difflib
import os
import warnings
from contextlib import contextmanager, nullcontext
from copy import deepcopy
from typing import Callable, Iterable, Iterator, Sequence

import torch
from nnsight import LanguageModel
from torch import Tensor

from ..common.errors import UsageError
from ..common.tokens import model_device
from ..common.tokens import position_ids as mask_position_ids
from . import extra_hooks
from .activation_cache import ActivationCache, UnknownHookError
from .adapters import Adapter, adapter_for
from .attention import PATTERN_NAMES, ROTARY_NAMES, exposed
from .remote import (CountingRemoteBackend, RetryPolicy, SimulatedServer, Traffic,
                     check_sendable, send_by_value, status_wanted)
from .tl_api import FwdHooks, TransformerLensAPI
from .traced import InputBox, interleave, layer_of, make_plan, make_visitor

HookFn = Callable[[Tensor, str], Tensor | None]
Names = Iterable[str] | Callable[[str], bool] | None
send_by_value(extra_hooks)  # its point functions run inside traces, as traced's and adapters'


class HookBridge(TransformerLensAPI):
    """TransformerLens hook names, caching and hooks on an HF model (Llama, Qwen2, Qwen3, GPT-2)."""

    def __init__(self, model, tokenizer=None, *, lm: LanguageModel | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.adapter: Adapter = adapter_for(model)
        self.config = model.config
        # nnsight sets the tokenizer's pad token and padding side: give it a copy.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.lm = lm or LanguageModel(model, tokenizer=deepcopy(tokenizer) if tokenizer
                                          else None)
        # where traces run: None here, "simulate" (the server's round trip, in this process),
        # or an NDIF host (True: nnsight's configured one); see HookBridge.remote
        self.remote: str | bool | None = None
        self.api_key: str | None = None
        self.traffic = Traffic()  # requests, retries and bytes sent to a server
        self.retry = RetryPolicy()  # how transient server faults are retried
        self.show_status = False  # nnsight's remote status line
        self._hooks: list[tuple[str, HookFn]] = []
        # the attention mask of the running call's input (1 = real token), for hooks that need
        # positions, e.g. to leave the first real token of each row alone; None between calls
        self.input_box = InputBox()
        n = self.adapter.n_layers
        per_layer = [name for point in self.adapter.layer_points for name in point.names]
        rotary = () if self.adapter.arch.pos_embed else ROTARY_NAMES  # (TransformerLens's order)
        per_layer[per_layer.index("attn.hook_z"):0] = [*rotary, *PATTERN_NAMES]
        self._attention_names = set(rotary) | set(PATTERN_NAMES)
        every = (["hook_embed"] + (["hook_pos_embed"] if self.adapter.arch.pos_embed else [])
                 + [f"blocks.{layer}.{name}" for layer in range(n) for name in per_layer]
                 + ["ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in",
                    "unembed.hook_out"])
        self._order = {name: i for i, name in enumerate(every)}  # every name, in run order
        # what a full cache holds: all but the names TransformerLens computes only behind a
        # flag (cfg.use_attn_result...); named explicitly, those are computed too
        self.hook_names: list[str] = self._default_names()
        self._plan = make_plan(self.adapter, model)  # the hook points as plain data (traced.py)

    @classmethod
    def remote(cls, model: str | os.PathLike | torch.nn.Module, host: str | None = None,
               api_key: str | None = None, tokenizer=None, simulate: bool = False, *,
               retries: int | None = None, backoff: float | None = None,
               status: bool | None = None) -> "HookBridge":
        """A bridge whose every trace runs on an NDIF server, next to the model's weights.

        ``model`` is a hub id or checkpoint folder that the server has deployed; only its
        config is read here (the weights stay on the server, the local model is on the meta
        device). ``host`` defaults to nnsight's configured one (the public NDIF service);
        ``api_key`` to nnsight's configured key. ``simulate=True`` with a loaded model runs the
        server's round trip in this process instead (serialise, unpickle with the server's
        whitelist, run): a dry run that proves every trace and hook can be sent.
        Caching, hooks, ``__call__`` and ``generate`` work as locally and return only the
        requested values; ``bridge.traffic`` counts requests, retries and bytes.

        A transient server fault (the model actor restarting, a replica evicted, a connection
        reset) is retried up to ``retries`` times, waiting ``backoff`` seconds and doubling
        (defaults: ``$LAYERS_TO_LATENTS_NDIF_RETRIES`` / ``_BACKOFF``, else 3 and 2 s); what
        still fails raises ``RemoteError`` naming the server, the work and what to do.
        nnsight's status line is shown only with ``status=True`` (or
        ``$LAYERS_TO_LATENTS_NDIF_STATUS=1``).
        """
        retry, show_status = RetryPolicy.configured(retries, backoff), status_wanted(status)
        if host is not None and not str(host).startswith(("http://", "https://")):
            raise UsageError(f"The NDIF host {host!r} is not a URL: give it as http://HOST:PORT "
                             f"or https://HOST.")
        if simulate:
            if not isinstance(model, torch.nn.Module):
                raise UsageError("HookBridge.remote(..., simulate=True) runs the model here: "
                                 "pass the loaded model, not a name.")
            bridge = cls(model, tokenizer)
            bridge.remote, bridge.retry, bridge.show_status = "simulate", retry, show_status
            return bridge
        if isinstance(model, torch.nn.Module):
            raise UsageError("HookBridge.remote takes the model's hub id or the checkpoint path "
                             "the server deployed, not a loaded model (use simulate=True to "
                             "dry-run a loaded one).")
        name = str(model)
        if os.path.isdir(name):  # a local checkpoint: its key is its absolute path (no hub)
            from nnsight.modeling.huggingface import _ID_CACHE
            name = os.path.realpath(name)
            _ID_CACHE.setdefault(name, name)
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = LanguageModel(name, tokenizer=deepcopy(tokenizer), dispatch=False)
        bridge = cls(lm._module, tokenizer, lm=lm)
        bridge.remote, bridge.api_key = host or True, api_key
        bridge.retry, bridge.show_status = retry, show_status
        return bridge

    @property
    def input_mask(self) -> Tensor | None:
        """The running call's attention mask (1 = real token); None between calls."""
        return self.input_box.mask

    def _run_options(self, verb: str, hooks: dict[str, list[HookFn]],
                     cached: Iterable[str] = ()) -> dict:
        """The nnsight backend of the next trace: here, the simulated server or NDIF (the
        arguments describe the request for its error messages: ``_remote_work``)."""
        if self.remote is None:
            return {}
        what = self._remote_work(verb, hooks, cached)
        if self.remote == "simulate":
            return {"backend": SimulatedServer(self.lm, self.traffic, what=what,
                                               retry=self.retry)}
        return {"backend": CountingRemoteBackend(
            self.traffic, self.lm.to_model_key(),
            host=self.remote if isinstance(self.remote, str) else None, api_key=self.api_key,
            what=what, retry=self.retry, status=self.show_status)}

    def _remote_work(self, verb: str, hooks: dict[str, list[HookFn]],
                     cached: Iterable[str] = ()) -> str:
        """``"a trace of MODEL (caching ...; hooks ...)"``: what a request does, for its errors."""
        def listed(items: list[str]) -> str:
            return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")

        cached = list(cached)
        hooked = [f"{getattr(fn, '__qualname__', type(fn).__qualname__).split('>.')[-1]} on "
                  f"{name}" for name, fns in hooks.items() for fn in fns]
        parts = ([f"caching {listed(cached)}"] if cached else []) + \
            ([f"hook{'s' * (len(hooked) > 1)} {listed(hooked)}"] if hooked else [])
        name = getattr(self.config, "_name_or_path", "") or self.adapter.arch.family
        return f"{verb} of {name}" + (f" ({'; '.join(parts)})" if parts else "")

    # ---------------------------------------------------------------- the model-like surface
    def parameters(self):
        return self.model.parameters()

    @property
    def device(self) -> torch.device:
        return model_device(self.model)  # a remote bridge's (meta) model: inputs made here

    def __repr__(self) -> str:
        return (f"HookBridge({self.adapter.arch.family}, {self.adapter.n_layers} layers, "
                f"{len(self._hooks)} active hooks)")

    # ---------------------------------------------------------------- names
    def resolve(self, names: Names) -> list[str]:
        """Hook names checked and in execution order: a list, a predicate, or None for all of
        ``hook_names`` (as everywhere in the bridge; an empty list selects none). Names that
        TransformerLens gates behind a flag are accepted when named, whatever the flags."""
        if names is None:
            return list(self.hook_names)
        if callable(names):
            return [n for n in self.hook_names if names(n)]
        if isinstance(names, str):
            names = [names]
        names = list(dict.fromkeys(names))
        for name in names:
            if name not in self._order:
                close = difflib.get_close_matches(name, list(self._order), n=5, cutoff=0.6)
                why = (" Its attention and MLP both read hook_resid_pre (parallel residual), "
                       "so there is no hook_resid_mid, as in TransformerLens."
                       if name.endswith("hook_resid_mid") and self.adapter.parallel else "")
                raise UnknownHookError(
                    f"Unknown hook name {name!r} for this {self.adapter.arch.family} model with "
                    f"{self.adapter.n_layers} layers." + why
                    + (f" Closest valid names: {', '.join(close)}." if close else "")
                    + " See bridge.hook_names for all of them.")
        return sorted(names, key=self._order.__getitem__)

    # ---------------------------------------------------------------- inputs
    def tokenize(self, inputs, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask for a string, list of strings (left-padded) or tensor,
        as every bridge call runs them (TransformerLens's ``to_tokens`` gives the ids only)."""
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str):
            if self.tokenizer is None:
                raise UsageError("Pass a tokenizer to HookBridge to run on text.")
            side = self.tokenizer.padding_side
            self.tokenizer.padding_side = "left"
            try:
                enc = self.tokenizer(list(inputs), return_tensors="pt", padding=True)
            finally:
                self.tokenizer.padding_side = side
            ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        else:
            ids = torch.as_tensor(inputs)
            if ids.ndim == 1:
                ids = ids[None]
            if attention_mask is None:
                attention_mask = torch.ones_like(ids)
        device = self.device
        if self.remote is not None:  # a slice of a long text is a view: send only the slice
            return ids.to(device).clone(), attention_mask.to(device).clone()
        return ids.to(device), attention_mask.to(device)

    # ---------------------------------------------------------------- the interleaved work
    def _needs_attention(self, wanted: set[str]) -> bool:
        """Whether a trace touches scores, patterns or rotated q/k (then hooked_attention runs)."""
        return any(name.split(".", 2)[-1] in self._attention_names for name in wanted)

    def _group(self, hooks: Sequence[tuple[str, HookFn]]) -> dict[str, list[HookFn]]:
        grouped: dict[str, list[HookFn]] = {}
        for name, fn in hooks:
            grouped.setdefault(name, []).append(fn)
        return grouped

    # ---------------------------------------------------------------- TransformerLens verbs
    def forward(self, input_ids=None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, names: Names = (),
                logits_to_keep: int = 0, grad: bool = False,
                reduce: Callable[[Tensor], Tensor] | None = None,
                logits: bool | Callable[[Tensor], Tensor] = True,
                **kwargs) -> tuple[Tensor | None, ActivationCache]:
        """Logits (with the active hooks applied) and a cache of ``names``.

        ``names`` selects what to cache as everywhere in the bridge (None: every hook point);
        the default, an empty tuple, caches nothing. Runs without autograd unless ``grad=True``
        (then gradients flow to anything the hooks use, e.g. a trained router, and to the
        model's parameters that require them). ``reduce(activation)`` is cached instead of the
        activation (e.g. pooled over positions; on a server only that comes back).
        ``logits=False``: no logits (None), and the model stops after the last cached point;
        ``logits=fn``: ``fn(logits)`` instead, computed in the trace (e.g. per-window NLLs: on a
        server only those come back).
        """
        if self.remote is not None:
            for fn, what in ((reduce, "reduce function"), (logits, "logits function")):
                if callable(fn):
                    check_sendable(fn, what)
        with torch.set_grad_enabled(grad):
            return self._forward(input_ids, attention_mask, position_ids, names, logits_to_keep,
                                 reduce, logits, **kwargs)

    @contextmanager
    def _input(self, attention_mask: Tensor) -> Iterator[None]:
        """``self.input_mask`` is ``attention_mask`` inside the block (calls may nest)."""
        previous, self.input_box.mask = self.input_box.mask, attention_mask
        try:
            yield
        finally:
            self.input_box.mask = previous

    def _forward(self, input_ids, attention_mask, position_ids, names, logits_to_keep, reduce,
                 want_logits, **kwargs):
        ids, attention_mask = self.tokenize(input_ids, attention_mask)
        if position_ids is None:
            position_ids = mask_position_ids(attention_mask)
        cached = set(self.resolve(names))
        hooks = self._group(self._hooks)
        model_kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        if logits_to_keep:
            model_kwargs["logits_to_keep"] = logits_to_keep
        if not hooks and not cached and self.remote is None:  # the plain model, no overhead
            out = self.model(input_ids=ids, **model_kwargs).logits
            return (want_logits(out) if callable(want_logits) else out), \
                ActivationCache({}, attention_mask, self)
        cache: dict[str, Tensor] = {}
        visit, wanted = make_visitor(hooks, cached, cache, reduce), set(hooks) | cached
        lm, plan, logits = self.lm, self._plan, None
        options = self._run_options("a trace", hooks, sorted(cached, key=self._order.get))
        with self._input(attention_mask), self._attention(wanted, visit), \
                lm.trace(ids, **options, **model_kwargs) as tracer:
            interleave(lm, plan, wanted, visit)
            cache = cache.save()  # remote: the server's copy comes back
            if callable(want_logits):
                logits = want_logits(lm.output.logits).save()
            elif want_logits:
                logits = lm.output.logits.save()
            else:
                tracer.stop()  # nothing after the last cached point is needed
        return logits, ActivationCache(cache, attention_mask, self)

    def _attention(self, wanted: set[str], visit):
        """``hooked_attention`` for this trace if it touches scores / patterns / rotated q,k."""
        if not self._needs_attention(wanted):
            return nullcontext()
        if self.remote is not None:
            raise UsageError(
                "Attention scores, patterns and rotated q/k come from an attention function the "
                "bridge installs in the local model; a remote bridge cannot install it on the "
                "server. Cache attn.hook_q and attn.hook_k instead and compute the pattern here.")
        return exposed(self.model, visit, {layer_of(name) for name in wanted
                                           if name.split(".", 2)[-1] in self._attention_names})

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, *,
                 return_type: str | None = "logits", loss_per_token: bool = False, **kwargs):
        """Logits ``[batch, pos, vocab]``, with the active hooks (an HF-like call for evals);
        ``return_type`` ``"loss"``, ``"both"`` or None as TransformerLens's."""
        if return_type == "logits":
            return self.forward(input_ids, attention_mask, position_ids, **kwargs)[0]
        ids, attention_mask = self.tokenize(input_ids, attention_mask)
        logits, _ = self.forward(ids, attention_mask, position_ids,
                                 logits=return_type is not None, **kwargs)
        return self._output(logits, ids, attention_mask, return_type, loss_per_token)

    def run_with_cache(self, inputs, names: Names = None, attention_mask: Tensor | None = None,
                       *, names_filter: Names = None, return_type: str | None = "logits",
                       remove_batch_dim: bool = False, **kwargs
                       ) -> tuple[Tensor | None, ActivationCache]:
        """``(logits, cache)`` with ``cache[name]`` for each requested name (default: all of
        ``hook_names``). ``names_filter`` (TransformerLens's name for ``names``: a name, a list
        or a predicate), ``return_type`` and ``remove_batch_dim`` as TransformerLens's."""
        if names_filter is not None:
            if names is not None:
                raise UsageError("Give the names to cache as names or names_filter, not both.")
            names = names_filter
        names = self.resolve(names)
        if not names:
            raise UsageError("No hook names selected to cache.")
        if return_type == "logits":
            logits, cache = self.forward(inputs, attention_mask, names=names, **kwargs)
            output = logits
        else:
            ids, attention_mask = self.tokenize(inputs, attention_mask)
            logits, cache = self.forward(ids, attention_mask, names=names,
                                         logits=return_type is not None, **kwargs)
            output = self._output(logits, ids, attention_mask, return_type)
        return output, cache.remove_batch_dim() if remove_batch_dim else cache

    @contextmanager
    def hooks(self, hooks: Sequence[tuple[str, HookFn]] = (), *, fwd_hooks: FwdHooks = (),
              bwd_hooks: FwdHooks = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False) -> Iterator["HookBridge"]:
        """Apply ``[(name, fn), ...]`` to every forward and generation inside the block.

        ``fwd_hooks`` as TransformerLens's (a name may be a filter ``fn(name) -> bool``).
        Backward hooks are not supported: run with ``grad=True`` and use autograd.
        """
        if bwd_hooks:
            raise UsageError("HookBridge has no backward hooks: call forward(..., grad=True) and "
                             "use torch autograd (tensor.register_hook) in a forward hook.")
        if not reset_hooks_end:
            raise UsageError("HookBridge hooks last as long as the `with` block; "
                             "reset_hooks_end=False is not supported.")
        hooks = list(hooks) + self.expand_hooks(fwd_hooks)
        self.resolve([name for name, _ in hooks])
        if self.remote is not None:  # fail here, before any request, naming the function
            for name, fn in hooks:
                check_sendable(fn, f"hook on {name}")
        start = len(self._hooks)
        self._hooks.extend(hooks)
        try:
            yield self
        finally:
            del self._hooks[start:]

    @torch.no_grad()
    def generate(self, inputs=None, max_new_tokens: int = 20, attention_mask: Tensor | None = None,
                 *, input_ids=None, return_text: bool | None = None, **kwargs):
        """Greedy by default; the active hooks act at every decoding step (KV cache on).

        Returns token ids ``[batch, prompt + new]`` (HF ``generate``'s format), or the new text
        per prompt when ``inputs`` is text (or ``return_text=True``).
        """
        inputs = input_ids if inputs is None else inputs
        text_in = isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs
                                              and isinstance(inputs[0], str))
        ids, attention_mask = self.tokenize(inputs, attention_mask)
        kwargs.setdefault("do_sample", False)
        if not kwargs["do_sample"]:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.tokenizer is not None:
            kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        hooks = self._group(self._hooks)
        if self.remote is not None:
            out = self._generate_remote(ids, attention_mask, max_new_tokens, hooks, kwargs)
        elif not hooks:
            out = self.model.generate(input_ids=ids, attention_mask=attention_mask,
                                      max_new_tokens=max_new_tokens, **kwargs)
        else:
            with self._input(attention_mask):
                out = self._generate_hooked(ids, attention_mask, max_new_tokens, hooks, kwargs)
        if return_text or (return_text is None and text_in):
            return self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        return out

    def _generate_remote(self, ids, attention_mask, max_new_tokens, hooks, kwargs) -> Tensor:
        """One request: the whole generation runs on the server, hooks at every step."""
        visit, wanted = make_visitor(hooks, set(), {}), set(hooks)
        lm, plan = self.lm, self._plan
        options = self._run_options(f"a generation of {max_new_tokens} tokens", hooks)
        # nnsight warns that the open tracer.all() loop asked for a step more than the model
        # made (by design). Here (simulated) that is a warning; a server relays it as a log
        # line, which remote.QuietDisplay drops. (Outside the traced block: it is sent as source.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with self._input(attention_mask), self._attention(wanted, visit), \
                    lm.generate(max_new_tokens=max_new_tokens, **options, **kwargs) as tracer:
                with tracer.invoke(ids, attention_mask=attention_mask):
                    if wanted:
                        for _ in tracer.all():
                            interleave(lm, plan, wanted, visit)
                with tracer.invoke():
                    result = tracer.result.save()
        return result

    def _generate_hooked(self, ids, attention_mask, max_new_tokens, hooks, kwargs) -> Tensor:
        visit, wanted = make_visitor(hooks, set(), {}), set(hooks)
        lm, plan = self.lm, self._plan
        if all(name.split(".", 2)[-1] in self._attention_names for name in wanted):
            # only attention internals: hooked_attention does everything (an nnsight
            # generation whose steps touch no module would never advance)
            with self._attention(wanted, visit):
                return self.model.generate(input_ids=ids, attention_mask=attention_mask,
                                           max_new_tokens=max_new_tokens, **kwargs)
        with warnings.catch_warnings(), self._attention(wanted, visit):
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with lm.generate(max_new_tokens=max_new_tokens, **kwargs) as tracer:
                with tracer.invoke(ids, attention_mask=attention_mask):
                    for _ in tracer.all():
                        interleave(lm, plan, wanted, visit)
                with tracer.invoke():
                    result = tracer.result.save()
        return result
