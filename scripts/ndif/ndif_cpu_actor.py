"""A CPU model actor for a local NDIF (ndif 0.1.2), selected with NDIF_MODEL_IMPORT_PATH.

The stock ``ndif.services.ray.deployments.modeling.base.ModelActor`` is CUDA-only: it calls
``torch.cuda.set_device`` / ``set_per_process_memory_fraction`` while loading, checks that every
tensor landed on an assigned GPU, and ``torch.cuda.synchronize()`` after every request. This
class keeps everything else of the stock actor (request lifecycle, timeouts, result upload,
Redis responses) and only swaps those steps for CPU ones:

* ``load_from_disk`` loads the checkpoint with nnsight's ``from_model_key`` on ``device="cpu"``
  in the deployment's dtype (deploy float32 so remote results equal local ones bit for bit);
* ``cleanup`` does no CUDA calls;
* ``gpu_mem_bytes_by_id`` is emptied, so the per-request GPU metering is a no-op;
* nnsight's warning that a generation's open loop asked for a step more than the model made
  is filtered (the actor relays stderr to the client as log lines);
* the actor declares itself not cacheable (there is no GPU to park it off): an eviction tears it
  down; ``to_cache`` / ``from_cache`` only flip the flag.

The controller only places models on Ray nodes that advertise a ``GPU`` resource and a
``cuda_memory_bytes`` custom resource; scripts/ndif_local.sh starts the Ray head with both
declared (a budget in bytes, not a real device). Ray ships the actor class to the worker, so
nothing here relies on import-time patching of another process: the CUDA guards are installed
in ``__init__``, in the actor's own process.
"""

from __future__ import annotations

import gc
import logging
import os
import warnings
from typing import Any, Dict, Optional

import ray
import torch

from ndif.services.ray.deployments.modeling.base import BaseModelDeployment

logger = logging.getLogger("ndif.modeling")
OWN_TRACE_NOISE = r".*was never reached: the loop asked for a step"


def _no_cuda_calls() -> None:
    """Make the CUDA entry points the stock code paths touch harmless on a CPU build.

    Belt and braces: the overrides below avoid them already, but code shared with the stock
    actor (metrics, cancel paths) may still reach one; on a CPU torch they raise.
    """
    if torch.cuda.is_available():
        return
    for name in ("synchronize", "empty_cache", "set_device", "reset_peak_memory_stats",
                 "set_per_process_memory_fraction"):
        setattr(torch.cuda, name, lambda *args, **kwargs: None)


class CPUModelDeployment(BaseModelDeployment):
    """``BaseModelDeployment`` that loads and runs the model on CPU."""

    CACHEABLE = False

    def __init__(self, model_key: str, execution_timeout: Optional[float] = None,
                 gpu_mem_bytes_by_id: Optional[Dict[int, int]] = None, dtype: str = "float32",
                 **kwargs: Any) -> None:
        _no_cuda_calls()
        # Ray sets OMP_NUM_THREADS=1 in a worker whose actor asks for one CPU, so torch computes
        # with one thread; a client computes with its default (all cores). The reduction order
        # then differs and results drift by ~1e-5. Use the same thread count as a plain process
        # (scripts/ndif_local.sh exports it) to get results equal to a local run bit for bit.
        threads = os.environ.get("NDIF_CPU_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        # A generation's open ``tracer.all()`` loop (the toolkit's remote generate) ends by asking
        # for one step more than the model made, and nnsight warns about it. The actor relays
        # stderr to the client as log lines: one the user cannot act on, so it is dropped here
        # (and by the toolkit's client, for servers it does not run).
        warnings.filterwarnings("ignore", message=OWN_TRACE_NOISE, category=UserWarning)
        super().__init__(model_key, execution_timeout=execution_timeout,
                         gpu_mem_bytes_by_id={}, dtype=dtype, **kwargs)

    def load_from_disk(self):
        from nnsight.modeling.huggingface import HuggingFaceModel

        self.gpu_mem_bytes_by_id = {}
        model = HuggingFaceModel.from_model_key(
            self.model_key, dispatch=True, dtype=self.dtype_name, device="cpu", **self.kwargs)
        model._module.requires_grad_(False)
        model._module.eval()
        logger.info(f"Loaded {self.model_key} on CPU ({self.dtype_name})")
        return model

    # The weights already live in CPU memory, so parking (HOT -> WARM) and restoring are
    # bookkeeping only (the controller may still ask if it cannot read CACHEABLE off the
    # Ray actor class).
    async def to_cache(self) -> None:
        from ndif.services.ray.deployments.modeling.base import KILL_REASON_PREEMPTED

        await self.cancel(KILL_REASON_PREEMPTED)
        self.cached = True

    def from_cache(self, gpu_mem_bytes_by_id: Dict[int, int]) -> None:
        self.cached = False

    def cleanup(self) -> None:
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


@ray.remote(num_cpus=1, max_restarts=-1)
class CPUModelActor(CPUModelDeployment):
    """The Ray actor class to deploy: ``NDIF_MODEL_IMPORT_PATH=ndif_cpu_actor.CPUModelActor``."""
