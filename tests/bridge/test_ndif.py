"""The remote bridge against a real NDIF server: every study's check of ``test_remote.py``, with
the server in place of the simulated round trip, remote vs local on the same weights; and the
faults: a model actor killed mid-sweep, a server that is not there.

Deselected by default (marker ``ndif``); selected, they need a server and fail without one::

    bash scripts/ndif_local.sh start        # NDIF on 127.0.0.1, SmolLM2-135M deployed (fp32)
    bash scripts/test.sh -m ndif tests/bridge/test_ndif.py
    bash scripts/ndif_local.sh stop

The server is found through ``NDIF_HOST`` / ``NDIF_LOCAL_MODEL_PATH``, else through
``.ndif/env``, which ``start`` writes (so sourcing it is not needed).
"""

import os
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from pruning_bridge.bridge import HookBridge
from pruning_bridge.common.errors import RemoteError

# the checks themselves (pytest collects them here too, with this module's `pair`)
from test_remote import (  # noqa: F401
    PROMPTS, test_a_hook_the_server_cannot_run_is_refused_before_any_request,
    test_cache_hooks_and_generate_equal_the_local_bridge,
    test_routed_heads_and_cached_residuals_equal_the_local_bridge,
    test_safety_edits_equal_the_local_bridge, test_skipped_layers_equal_the_local_bridge,
    test_weight_edits_on_a_remote_bridge_say_they_need_local_weights)

pytestmark = pytest.mark.ndif
ROOT = Path(__file__).resolve().parents[2]
ENV_FILE = ROOT / ".ndif/env"
START = "bash scripts/ndif_local.sh start"


def server_settings() -> dict[str, str]:
    """``NDIF_HOST`` and ``NDIF_LOCAL_MODEL_PATH`` from the environment, else from .ndif/env."""
    found = {}
    if ENV_FILE.is_file():
        for line in ENV_FILE.read_text().splitlines():
            match = re.fullmatch(r"export (\w+)=(.*)", line.strip())
            if match:
                found[match[1]] = match[2].strip("'\"")
    found.update({key: os.environ[key] for key in ("NDIF_HOST", "NDIF_LOCAL_MODEL_PATH")
                  if os.environ.get(key)})
    found.setdefault("NDIF_LOCAL_MODEL_PATH", str(ROOT / ".ndif/smollm2-135m"))
    return found


@pytest.fixture(scope="module")
def server() -> dict[str, str]:
    """The server's settings; fails (does not skip) when no server answers."""
    settings = server_settings()
    host = settings.get("NDIF_HOST")
    if not host:
        pytest.fail(f"No NDIF server to test against: NDIF_HOST is unset and {ENV_FILE} does "
                    f"not exist. Start one with `{START}` (these tests then read .ndif/env), or "
                    f"set NDIF_HOST.", pytrace=False)
    try:
        urllib.request.urlopen(f"{host}/ping", timeout=10).close()
        return settings
    except OSError as error:
        problem = error
    pytest.fail(f"The NDIF server at {host} does not answer ({problem}). Start it with "
                f"`{START}` (`bash scripts/ndif_local.sh status` shows what runs), or fix "
                f"NDIF_HOST.", pytrace=False)


@pytest.fixture(scope="module")
def served(server):
    """The deployed checkpoint, loaded here in float32 (the weights the server runs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(server["NDIF_LOCAL_MODEL_PATH"]).resolve()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    return model, tok, path


def remote_bridge(server, served, **options) -> HookBridge:
    _, tok, path = served
    return HookBridge.remote(path, host=server["NDIF_HOST"], tokenizer=tok, **options)


@pytest.fixture
def pair(server, served):
    model, tok, _ = served
    return HookBridge(model, tok), remote_bridge(server, served)


def test_a_generation_relays_no_warning_about_the_toolkits_own_loop(pair, capfd):
    local, remote = pair

    def halve(x, name):
        return x * 0.5

    with local.hooks([("blocks.8.hook_resid_post", halve)]), \
            remote.hooks([("blocks.8.hook_resid_post", halve)]):
        assert remote.generate(PROMPTS, max_new_tokens=3) == local.generate(PROMPTS,
                                                                            max_new_tokens=3)
    out, err = capfd.readouterr()
    assert "never reached" not in out + err
    assert "RUNNING" not in out + err  # no status line unless asked for


def _actor_pids() -> list[int]:
    """The local server's model actors (Ray names their processes after the actor class)."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("CPUModelActor" in part for part in p.info["cmdline"] or ())]


def test_a_sweep_survives_a_killed_model_actor(server, served, data_dir, tmp_path):
    """The model actor is killed during a request of a sweep; the request is retried once the
    server has brought the actor back, and the rows equal those of a run without the fault."""
    import signal

    from pruning_bridge.evals import EvalSettings
    from pruning_bridge.pruning.layer_sweep import layer_sweep

    settings = EvalSettings(("perplexity",), data_dir=data_dir, window=32, batch_size=4,
                            limit={"perplexity": 3}, progress=False)

    def slow(x, name):  # each request lasts a second on the server: the kill lands inside one
        time.sleep(1.0)

    def sweep(bridge, out):
        with bridge.hooks([("blocks.0.hook_resid_pre", slow)]):
            rows = layer_sweep(bridge, None, settings, layers=[3], out=out)
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    expected = sweep(remote_bridge(server, served), tmp_path / "clean.jsonl")
    assert _actor_pids(), "no model actor process found to kill (is the server local?)"
    bridge = remote_bridge(server, served, retries=4, backoff=2.0)
    killed: list[int] = []

    def kill_during_the_second_request():
        while bridge.traffic.requests < 1:
            time.sleep(0.05)
        time.sleep(0.5)
        for pid in _actor_pids():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_during_the_second_request, daemon=True)
    killer.start()
    tic = time.perf_counter()
    rows = sweep(bridge, tmp_path / "faulty.jsonl")
    killer.join(timeout=5)
    print(f"killed actor {killed}; {bridge.traffic}; faults {bridge.traffic.faults}; "
          f"{time.perf_counter() - tic:.1f} s")
    assert killed and rows == expected
    assert bridge.traffic.requests == 6 and bridge.traffic.retries >= 1


def test_a_server_that_is_not_there_says_so(server, served):
    host = re.sub(r":\d+$", ":9", server["NDIF_HOST"])  # a port where nothing listens
    _, tok, path = served
    bridge = HookBridge.remote(path, host=host, tokenizer=tok)
    with pytest.raises(RemoteError, match=f"Cannot reach an NDIF server at {re.escape(host)}.*"
                                          f"Connection refused.*{re.escape(START)}"):
        bridge(PROMPTS)
    assert bridge.traffic.retries == 0
