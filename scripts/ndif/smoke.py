"""Smoke test of the local NDIF: remote traces against the server equal local ones exactly.

    scripts/ndif_local.sh start && .venv/bin/python scripts/ndif/smoke.py && scripts/ndif_local.sh stop

Reads NDIF_HOST and NDIF_LOCAL_MODEL_PATH from the environment, else from .ndif/env. The remote
model is a meta model (no weights here); the comparison model loads the same checkpoint in fp32.
Checks (each must pass, exit status 1 otherwise):
  (a) trace saving model.model.layers[3].output           remote == local (max |diff| 0.0)
  (b) in-trace edit: layer 5's MLP output set to zero       remote logits == local logits
  (c) generate, max_new_tokens=5, greedy                    same token ids
  (d) a trace calling a plain function from a module registered by value: runs on the server;
      a function from a module the server cannot import (pickled by reference): the error text
  (e) a large result (every layer's output, > the inline limit): goes through the object store
Prints warm remote vs local timings and the bytes of each response.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import nnsight  # noqa: E402
import torch  # noqa: E402

from ndif_client import configure, local_model, remote_model  # noqa: E402


def load_env() -> None:
    env_file = HERE.parents[1] / ".ndif" / "env"
    if env_file.exists():
        for line in env_file.read_text().splitlines():
            if line.startswith("export "):
                key, _, value = line[len("export "):].partition("=")
                os.environ.setdefault(key, shlex.split(value)[0] if value else "")


class MeteredBackend:
    """Factory for nnsight's RemoteBackend that records the size and route of each response.

    RemoteBackend.download_result gets either the result bytes themselves (sent inline on the
    websocket's COMPLETED frame) or a presigned object-store URL it downloads; both end in
    ``finalize(content)`` with the compressed bytes, so overriding those two methods measures
    every response.
    """

    def __init__(self):
        from nnsight.intervention.backends.remote import RemoteBackend

        log = self.log = []

        class Backend(RemoteBackend):
            def download_result(self, url):
                log.append({"route": "inline (websocket)" if isinstance(url, (bytes, bytearray))
                            else "object store (presigned URL)"})
                return super().download_result(url)

            def finalize(self, content):
                log[-1]["bytes"] = len(content)
                return super().finalize(content)

        self.cls = Backend

    def __call__(self, model):
        return self.cls(model.to_model_key(), env=model._remoteable_get_env())

    def last(self):
        return self.log[-1] if self.log else {}


def first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def max_diff(a, b) -> float:
    a, b = first(a), first(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def main() -> int:
    load_env()
    host = configure()
    path = os.environ.get("NDIF_LOCAL_MODEL_PATH") or str(HERE.parents[1] / ".ndif" / "smollm2-135m")
    print(f"host {host}\nmodel {path}")
    t = time.perf_counter()
    remote = remote_model(path)
    print(f"remote (meta) model built in {time.perf_counter() - t:.1f} s; key {remote.to_model_key()}")
    assert next(remote._module.parameters()).device.type == "meta", "remote model holds weights"
    t = time.perf_counter()
    local = local_model(path, tokenizer=remote.tokenizer)
    print(f"local fp32 model loaded in {time.perf_counter() - t:.1f} s")
    meter = MeteredBackend()
    prompt = "The Eiffel Tower is in the city of"

    # (a) a saved activation
    def layer3(model, backend=None, remote_=False):
        with model.trace(prompt, remote=remote_, backend=backend):
            h = model.model.layers[3].output.save()
        return h

    remote_times, local_times = [], []
    for i in range(4):  # the first remote call is the warm-up
        t = time.perf_counter()
        h_remote = layer3(remote, meter(remote))
        remote_times.append(time.perf_counter() - t)
    for i in range(4):
        t = time.perf_counter()
        h_local = layer3(local)
        local_times.append(time.perf_counter() - t)
    d = max_diff(h_remote, h_local)
    check("(a) layers[3].output remote == local", d == 0.0,
          f"max |diff| {d}, shape {tuple(first(h_remote).shape)}, response {meter.last()}")
    warm_remote = statistics.median(remote_times[1:])
    warm_local = statistics.median(local_times[1:])
    print(f"    timings: remote first {remote_times[0]:.3f} s, warm median {warm_remote:.3f} s "
          f"(all {[round(x, 3) for x in remote_times]}); local warm median {warm_local:.3f} s "
          f"(all {[round(x, 3) for x in local_times]})")

    # (b) an in-trace edit
    def edited(model, backend=None, remote_=False):
        with model.trace(prompt, remote=remote_, backend=backend):
            model.model.layers[5].mlp.output = torch.zeros_like(model.model.layers[5].mlp.output)
            logits = model.lm_head.output.save()
        return logits

    e_remote, e_local = edited(remote, meter(remote)), edited(local)
    with local.trace(prompt):
        clean = local.lm_head.output.save()
    d = max_diff(e_remote, e_local)
    changed = max_diff(e_local, clean)
    check("(b) zeroed layers[5].mlp output: logits remote == local", d == 0.0 and changed > 0,
          f"max |diff| {d} (edit moved the logits by {changed:.3f}), response {meter.last()}")

    # (c) generate
    def gen(model, backend=None, remote_=False):
        with model.generate(prompt, max_new_tokens=5, do_sample=False, remote=remote_,
                            backend=backend) as tracer:
            ids = tracer.result.save()
        return ids

    t = time.perf_counter()
    g_remote = gen(remote, meter(remote))
    t_remote = time.perf_counter() - t
    t = time.perf_counter()
    g_local = gen(local)
    t_local = time.perf_counter() - t
    same = torch.equal(g_remote, g_local)
    check("(c) generate max_new_tokens=5 remote == local", same,
          f"{remote.tokenizer.decode(g_remote[0])!r} (remote {t_remote:.2f} s, local "
          f"{t_local:.2f} s), response {meter.last()}")

    # (d) user code inside the trace
    import cloudpickle
    import smoke_helpers

    cloudpickle.register_pickle_by_value(smoke_helpers)  # == nnsight.register(smoke_helpers)

    def norms(model, backend=None, remote_=False):
        with model.trace(prompt, remote=remote_, backend=backend):
            n = smoke_helpers.token_norms(model.model.layers[3].output).save()
            pid = nnsight.save(os.getpid())
        return n, pid

    (n_remote, pid_remote), (n_local, _) = norms(remote, meter(remote)), norms(local)
    d = max_diff(n_remote, n_local)
    check("(d1) by-value registered module function runs remotely", d == 0.0,
          f"max |diff| {d}; os.getpid() inside the block ran on the server: pid {pid_remote} "
          f"(client {os.getpid()}), response {meter.last()}")

    # A module the server cannot import: loaded here from a temporary file, not on sys.path and
    # not registered, so cloudpickle pickles its function by reference (module + name).
    tmp = Path(tempfile.mkdtemp(prefix="ndif-smoke-"))
    (tmp / "client_only_helpers.py").write_text(textwrap.dedent('''
        def token_norms(hidden):
            return hidden.norm(dim=-1)
    '''))
    spec = importlib.util.spec_from_file_location("client_only_helpers",
                                                  tmp / "client_only_helpers.py")
    client_only = importlib.util.module_from_spec(spec)
    sys.modules["client_only_helpers"] = client_only
    spec.loader.exec_module(client_only)
    error = None
    try:
        with remote.trace(prompt, remote=True):
            bad = client_only.token_norms(remote.model.layers[3].output).save()  # noqa: F841
    except Exception as exception:  # the server's error, re-raised on the client
        error = f"{type(exception).__name__}: {str(exception).strip().splitlines()[-1]}"
    check("(d2) by-reference function from a module the server lacks is refused",
          error is not None and "client_only_helpers" in error, f"error: {error}")

    # (e) a large result: every layer's output for a longer prompt
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 25)

    def all_layers(model, backend=None, remote_=False):
        with model.trace(long_prompt, remote=remote_, backend=backend):
            # only names bound to a saved value come back: save the list itself
            hs = nnsight.save([first(layer.output) for layer in model.model.layers])
        return hs

    t = time.perf_counter()
    big_remote = all_layers(remote, meter(remote))
    t_big = time.perf_counter() - t
    big_local = all_layers(local)
    d = max(max_diff(a, b) for a, b in zip(big_remote, big_local))
    raw = sum(x.numel() * x.element_size() for x in big_remote)
    check("(e) every layer's output (large result) remote == local", d == 0.0,
          f"max |diff| {d}; {len(big_remote)} tensors, {raw / 1e6:.1f} MB raw, "
          f"{t_big:.2f} s, response {meter.last()}")

    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
