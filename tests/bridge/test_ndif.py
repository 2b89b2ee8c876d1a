"""The remote bridge against a real NDIF server: every study's check of ``test_remote.py``, with
the server in place of the simulated round trip, remote vs local on the same weights.

Runs when ``NDIF_HOST`` is set (skipped otherwise)::

    bash scripts/ndif_local.sh start        # NDIF on 127.0.0.1, SmolLM2-135M deployed (fp32)
    source .ndif/env                        # NDIF_HOST and NDIF_LOCAL_MODEL_PATH
    bash scripts/test.sh -m ndif tests/bridge/test_ndif.py -s
    bash scripts/ndif_local.sh stop
"""

import os
from pathlib import Path

import pytest
import torch

from pruning_bridge.bridge import HookBridge

# the checks themselves (pytest collects them here too, with this module's `pair`)
from test_remote import (  # noqa: F401
    test_a_hook_the_server_cannot_run_is_refused_before_any_request,
    test_cache_hooks_and_generate_equal_the_local_bridge,
    test_routed_heads_and_cached_residuals_equal_the_local_bridge,
    test_safety_edits_equal_the_local_bridge, test_skipped_layers_equal_the_local_bridge,
    test_weight_edits_on_a_remote_bridge_say_they_need_local_weights)

pytestmark = [pytest.mark.ndif, pytest.mark.skipif(
    not os.environ.get("NDIF_HOST"), reason="no NDIF server: scripts/ndif_local.sh start")]
CHECKPOINT = Path(os.environ.get("NDIF_LOCAL_MODEL_PATH",
                             Path(__file__).parents[2] / ".ndif/smollm2-135m")).resolve()


@pytest.fixture(scope="module")
def served():
    """The deployed checkpoint, loaded here in float32 (the weights the server runs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT, torch_dtype=torch.float32).eval()
    return model, tok


@pytest.fixture
def pair(served):
    from nnsight import CONFIG

    CONFIG.APP.REMOTE_LOGGING = False
    model, tok = served
    return HookBridge(model, tok), HookBridge.remote(CHECKPOINT, host=os.environ["NDIF_HOST"],
                                                     tokenizer=tok)
