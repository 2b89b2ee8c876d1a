"""Remote faults explain themselves: every failure is one ``RemoteError`` naming the server, the
work and what to do; transient server faults are retried with backoff (counted in
``bridge.traffic``) and a sweep over a remote bridge ends with the rows of a run without faults;
the remote status display is off unless asked for, and the server's warnings about the toolkit's
own traces are dropped. Faults are injected into the simulated server's round trip, or come from
a loopback socket (nothing listening, or one that resets every connection).
"""

import socket
import struct
import threading

import pytest
from nnsight.intervention.backends.remote import RemoteError as NnsightRemoteError
from nnsight.schema.response import ResponseModel, Status

from pruning_bridge.bridge import HookBridge
from pruning_bridge.bridge.remote import (RETRIES_ENV, STATUS_ENV, CountingRemoteBackend,
                                          QuietDisplay, RetryPolicy, SimulatedServer, Traffic)
from pruning_bridge.common.errors import RemoteError, UsageError

# what ndif 0.1.2 answers when the model actor dies mid-request, and when a replica is evicted
ACTOR_FAULT = ("Error submitting request to model deployment. Please try again later. Sorry "
               "for the inconvenience.")
EVICTED = ("Replica was evicted while processing your request. Sorry for the inconvenience. "
           "Please try again later.")


def inject(monkeypatch, faults: dict[int, BaseException]) -> list[int]:
    """Make attempt number N (1-based, retries included) of the simulated server raise
    ``faults[N]`` before it runs; returns the attempt counter."""
    attempts, round_trip = [0], SimulatedServer.round_trip

    def faulty(self, tracer):
        attempts[0] += 1
        if attempts[0] in faults:
            raise faults[attempts[0]]
        return round_trip(self, tracer)

    monkeypatch.setattr(SimulatedServer, "round_trip", faulty)
    return attempts


@pytest.fixture(scope="module")
def sweep(tiny, data_dir):
    """``sweep(bridge, out)``: the layer sweep of tiny-llama without layer 0 / 1, 9 requests."""
    from pruning_bridge.evals import EvalSettings
    from pruning_bridge.pruning.layer_sweep import layer_sweep

    settings = EvalSettings(("mmlu", "perplexity"), data_dir=data_dir, window=64, batch_size=4,
                            limit={"mmlu": 4, "perplexity": 2}, progress=False)

    def run(bridge, out):
        rows = layer_sweep(bridge, None, settings, layers=[0, 1], out=out)
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    return run


@pytest.fixture(scope="module")
def clean(tiny, sweep):
    """The sweep's rows without faults, and the bridge's traffic."""
    model, tok = tiny("tiny-llama")
    bridge = HookBridge.remote(model, tokenizer=tok, simulate=True)
    return sweep(bridge, None), bridge.traffic


def test_a_sweep_survives_transient_faults_with_the_rows_of_a_run_without(tiny, sweep, clean,
                                                                          tmp_path, monkeypatch):
    model, tok = tiny("tiny-llama")
    expected, traffic = clean
    assert (traffic.requests, traffic.retries) == (9, 0)
    # request 2 meets a dying actor; request 4 a reset connection, then an evicted replica
    attempts = inject(monkeypatch, {2: NnsightRemoteError(ACTOR_FAULT),
                                    5: ConnectionResetError(104, "Connection reset by peer"),
                                    6: NnsightRemoteError(EVICTED)})
    faulty = HookBridge.remote(model, tokenizer=tok, simulate=True, retries=2, backoff=0)
    assert sweep(faulty, tmp_path / "faulty.jsonl") == expected
    assert attempts[0] == 12
    assert (faulty.traffic.requests, faulty.traffic.retries) == (9, 3)
    assert [fault[:24] for fault in faulty.traffic.faults] == [
        "Error submitting request", "ConnectionResetError: [E", "Replica was evicted whil"]
    assert "3 retried after a transient fault" in str(faulty.traffic)


def test_a_sweep_stopped_by_a_lasting_fault_resumes_to_the_same_rows(tiny, sweep, clean,
                                                                     tmp_path, monkeypatch):
    model, tok = tiny("tiny-llama")
    expected, _ = clean
    out = tmp_path / "rows.jsonl"
    # request 4 (the first of the model without layer 0) fails twice: one retry is not enough
    inject(monkeypatch, {4: NnsightRemoteError(ACTOR_FAULT), 5: NnsightRemoteError(ACTOR_FAULT)})
    bridge = HookBridge.remote(model, tokenizer=tok, simulate=True, retries=1, backoff=0)
    with pytest.raises(RemoteError) as caught:
        sweep(bridge, out)
    message = str(caught.value)
    assert "<simulated, in this process>" in message and "a trace of" in message
    assert "2 attempt(s) failed with a transient fault" in message
    assert "retry later" in message and "resumes where it stopped" in message
    assert isinstance(caught.value.__cause__, NnsightRemoteError)
    assert (bridge.traffic.requests, bridge.traffic.retries) == (3, 1)
    assert len(out.read_text().splitlines()) == 2  # the unpruned model's rows were saved
    bridge.traffic.reset()
    assert sweep(bridge, out) == expected
    assert bridge.traffic.requests == 6  # only what was missing


def test_a_server_error_is_not_retried_and_says_what_failed(tiny, monkeypatch):
    model, tok = tiny("tiny-llama")
    inject(monkeypatch, {1: NnsightRemoteError("RuntimeError: The size of tensor a (7) must "
                                               "match the size of tensor b (3)")})
    bridge = HookBridge.remote(model, tokenizer=tok, simulate=True, backoff=0)

    def halve(x, name):
        return x * 0.5

    with bridge.hooks([("blocks.1.hook_resid_post", halve)]), \
            pytest.raises(RemoteError) as caught:
        bridge.run_with_cache("Hello", names=["blocks.0.hook_resid_post"])
    message = str(caught.value)
    assert ("a trace of" in message and "caching blocks.0.hook_resid_post" in message
            and "hook halve on blocks.1.hook_resid_post" in message)
    assert "must match the size" in message and "fix the hook" in message
    assert bridge.traffic.retries == 0


@pytest.fixture
def checkpoint(tiny, tmp_path):
    model, tok = tiny("tiny-gpt2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path, tok


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_server_at_the_host_says_where_and_how_to_start_one(checkpoint):
    path, tok = checkpoint
    host = f"http://127.0.0.1:{_closed_port()}"
    bridge = HookBridge.remote(path, host=host, tokenizer=tok, backoff=0)
    for call in (lambda: bridge("Hello"), lambda: bridge.generate("Hello", max_new_tokens=2)):
        with pytest.raises(RemoteError) as caught:
            call()
        message = str(caught.value)
        assert f"Cannot reach an NDIF server at {host}" in message
        assert "Connection refused" in message and "bash scripts/ndif_local.sh start" in message
        assert isinstance(caught.value.__cause__, ConnectionRefusedError)
    assert "a generation of 2 tokens" in message
    assert bridge.traffic.retries == 0  # nothing there: not retried
    with pytest.raises(UsageError, match="not a URL"):
        HookBridge.remote(path, host="127.0.0.1:8011", tokenizer=tok)


@pytest.fixture
def resetting_host():
    """A loopback server that resets every connection it accepts."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed
                return
            conn.recv(1024)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_a_reset_connection_is_retried_then_reported(checkpoint, resetting_host):
    path, tok = checkpoint
    bridge = HookBridge.remote(path, host=resetting_host, tokenizer=tok, retries=2, backoff=0)
    with pytest.raises(RemoteError, match=r"3 attempt\(s\) failed with a transient fault "
                                          r"\(last: ConnectionResetError"):
        bridge("Hello")
    assert (bridge.traffic.requests, bridge.traffic.retries) == (0, 2)


def test_retries_and_status_are_configurable(tiny, monkeypatch):
    model, tok = tiny("tiny-llama")
    assert RetryPolicy() == RetryPolicy(retries=3, backoff=2.0)
    assert [RetryPolicy(backoff=2).wait(n) for n in range(4)] == [2, 4, 8, 16]
    assert RetryPolicy(backoff=10, max_wait=30).wait(5) == 30
    monkeypatch.setenv(RETRIES_ENV, "5")
    monkeypatch.setenv(STATUS_ENV, "1")
    bridge = HookBridge.remote(model, tokenizer=tok, simulate=True)
    assert bridge.retry.retries == 5 and bridge.show_status
    bridge = HookBridge.remote(model, tokenizer=tok, simulate=True, retries=0, status=False)
    assert bridge.retry.retries == 0 and not bridge.show_status
    monkeypatch.setenv(RETRIES_ENV, "many")
    with pytest.raises(UsageError, match=f"{RETRIES_ENV}='many' is not an integer"):
        HookBridge.remote(model, tokenizer=tok, simulate=True)
    with pytest.raises(UsageError, match="retries must be an integer >= 0"):
        HookBridge.remote(model, tokenizer=tok, simulate=True, retries=-1)


def test_quiet_by_default_and_the_toolkits_own_warnings_dropped(capsys):
    backend = CountingRemoteBackend(Traffic(), "key", host="http://127.0.0.1:9")
    assert not backend.display.enabled  # no spinner line every 0.1 s
    assert CountingRemoteBackend(Traffic(), "key", host="http://127.0.0.1:9",
                                 status=True).display.enabled
    display = QuietDisplay()
    for line in ["/x/nnsight/intervention/interleaver.py:881: UserWarning: "
                 "'model.model.layers.8.output.i10' was never reached: the loop asked for a "
                 "step the run did not make", "  warnings.warn(expected)",
                 "a hook printed this"]:
        display.update(ResponseModel(id="job1", status=Status.LOG, description=line))
    display.update(ResponseModel(id="job1", status=Status.RUNNING))
    out, err = capsys.readouterr()
    assert out == "" and err == "[NDIF job1] a hook printed this\n"
