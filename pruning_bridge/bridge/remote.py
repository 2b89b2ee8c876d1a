"""Sending the bridge's traces to an NDIF server (nnsight remote execution), and counting them.

nnsight ships a trace to NDIF as source code plus the objects it names (pickled; functions by
their source). NDIF's hosted service runs it in a protected environment that lets a trace import
only the modules in ``SERVER_MODULES`` (torch, math, numpy, collections and a handful more, from
ndif's ``protected_environment``); the PyPI ``ndif`` 0.1.2 of a self-hosted server checks
nothing, so the client holds every trace to the hosted rule. Nothing of this toolkit is installed
on a server. So everything that runs inside a remote trace, the bridge's own ``traced`` code and
every user hook, must be sent *by value* and use only those modules. ``check_sendable`` proves
that on the client, before any request (the pickled references and every ``import`` in the code
that travels), and names the function and the module at fault; ``SimulatedServer`` runs a whole
trace through the same serialise / restricted-unpickle / execute round trip without a server.

A failed request raises ``RemoteError`` naming the server, the work and what to do; transient
faults (the model actor restarting, a replica evicted, a connection reset) are first retried
with exponential backoff (``RetryPolicy``). ``Traffic`` counts what a bridge sends: requests,
retries, payload bytes, result bytes and seconds. nnsight's status display is off unless asked
for; the server's log lines are printed, except its warnings about the toolkit's own traces.
"""

from __future__ import annotations

import dis
import functools
import io
import os
import re
import socket
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import cloudpickle
import torch
from nnsight.intervention.backends.display import StatusDisplay
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.intervention.backends.remote import RemoteError as NnsightRemoteError
from nnsight.intervention.serialization import CustomCloudUnpickler, dumps
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from nnsight.tracing.backend import Backend
from nnsight.tracing.tracer import _saves

from ..common.errors import RemoteError, UnsendableError, UsageError
from . import adapters, traced

T = TypeVar("T")

# What NDIF's hosted service lets a trace import (ndif's protected environment: its whitelist, and
# what unpickling needs). A prefix admits its submodules. The one list of it in the project.
SERVER_MODULES = (
    "builtins", "torch", "collections", "time", "numpy", "sympy", "nnterp", "math", "einops",
    "typing", "_operator", "operator", "pandas", "enum", "copyreg", "pickle", "cloudpickle",
    "nnsight.intervention", "nnsight.modeling", "nnsight.schema", "nnsight.tracing",
    "transformers",  # only as the deployed model's own classes (persistent objects)
)
# Modules whose functions run inside the bridge's traces: always sent by value.
IN_TRACE_MODULES = (traced, adapters)
# Environment variables for the defaults of HookBridge.remote's retries, backoff and status.
RETRIES_ENV = "LAYERS_TO_LATENTS_NDIF_RETRIES"
BACKOFF_ENV = "LAYERS_TO_LATENTS_NDIF_BACKOFF"
STATUS_ENV = "LAYERS_TO_LATENTS_NDIF_STATUS"
SIMULATED_HOST = "<simulated, in this process>"
START_ADVICE = ("For a local server: `bash scripts/ndif_local.sh start` (it writes .ndif/env; "
                "`source .ndif/env` sets NDIF_HOST)")

def send_by_value(*modules: types.ModuleType) -> None:
    """Send ``modules``' functions to the server as source (they are not installed there)."""
    for module in modules:
        try:
            cloudpickle.register_pickle_by_value(module)
        except ValueError:  # already registered
            pass


send_by_value(*IN_TRACE_MODULES)


def allowed(module: str) -> bool:
    """Whether an NDIF server lets a trace use ``module``."""
    return any(module == ok or module.startswith(ok + ".") for ok in SERVER_MODULES)


def _server_modules_text() -> str:
    return ", ".join(SERVER_MODULES[:10]) + " (and a few more: remote.SERVER_MODULES)"


class _AnyPersistent(dict):
    """Persistent ids (the model's modules) resolve to a placeholder when only checking."""

    def __contains__(self, key) -> bool:
        return True

    def __getitem__(self, key):
        return types.SimpleNamespace(persistent_id=key)


class ServerUnpickler(CustomCloudUnpickler):
    """nnsight's unpickler, refusing (and recording) every module a server would refuse.

    A module reaches the far side in two ways: a class or function by reference (``find_class``)
    and a module object by reference (cloudpickle's ``subimport``); both are checked.
    """

    def __init__(self, file, persistent_objects):
        super().__init__(file, persistent_objects)
        self.refused: list[str] = []

    def _check(self, module: str, what: str) -> None:
        if not allowed(module):
            self.refused.append(what)

    def find_class(self, module: str, name: str):
        self._check(module, f"{module}.{name}")
        found = super().find_class(module, name)
        if found in (cloudpickle.cloudpickle.subimport, cloudpickle.cloudpickle.dynamic_subimport):
            def subimport(name, *args, _found=found):
                self._check(name, f"the module {name}")
                return _found(name, *args)
            return subimport
        return found


def refused_references(blob: bytes, persistent_objects=None) -> list[str]:
    """What in a pickled payload a server would refuse (empty when it would accept it all)."""
    unpickler = ServerUnpickler(io.BytesIO(blob), persistent_objects or _AnyPersistent())
    unpickler.load()
    return list(dict.fromkeys(unpickler.refused))


# ---------------------------------------------------------------- what travels as code
def _by_value(obj) -> bool:
    """Whether cloudpickle sends ``obj`` (a function or class) as code rather than by name."""
    try:
        return not cloudpickle.cloudpickle._should_pickle_by_reference(obj)
    except Exception:  # noqa: BLE001 - not a function or class, or no module to name it by
        return False


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and the code of every function, lambda and class defined inside it."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


@functools.lru_cache(maxsize=4096)
def _imports(code: types.CodeType) -> tuple[str, ...]:
    """The modules ``code`` itself imports (``import x``, ``from x import y``; a relative import
    with its dots; ``__import__(...)`` for a call of it)."""
    found = []
    instructions = list(dis.get_instructions(code))
    for i, instruction in enumerate(instructions):
        if instruction.opname == "IMPORT_NAME":  # after LOAD_CONST level, LOAD_CONST fromlist
            before = instructions[i - 2] if i >= 2 else None
            level = before.argval if before and before.opname == "LOAD_CONST" else 0
            found.append("." * (level if isinstance(level, int) else 0) + instruction.argval)
    if "__import__" in code.co_names:
        found.append("__import__(...)")
    return tuple(found)


def _cell_contents(cell) -> list:
    try:
        return [cell.cell_contents]
    except ValueError:  # an empty cell
        return []


def _travelling_functions(fn) -> Iterator[types.FunctionType]:
    """``fn`` and every function sent with it as code: the by-value functions among its closure
    cells, the globals and defaults it names, and the methods of by-value classes and of their
    instances, recursively (what cloudpickle pickles by value)."""
    stack, seen = [fn], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, types.MethodType):
            stack += [obj.__func__, obj.__self__]
        elif isinstance(obj, functools.partial):
            stack += [obj.func, *obj.args, *obj.keywords.values()]
        elif isinstance(obj, (staticmethod, classmethod)):
            stack.append(obj.__func__)
        elif isinstance(obj, type):
            if _by_value(obj):
                stack.extend(vars(obj).values())
        elif isinstance(obj, types.FunctionType):
            if not _by_value(obj):
                continue
            yield obj
            names = {name for code in _code_objects(obj.__code__) for name in code.co_names}
            stack += [obj.__globals__[name] for name in names if name in obj.__globals__]
            stack += [value for cell in obj.__closure__ or () for value in _cell_contents(cell)]
            stack += [*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()]
        elif type(obj).__module__ != "builtins" and _by_value(type(obj)):
            stack += [type(obj), *getattr(obj, "__dict__", {}).values()]  # an instance of one


def refused_imports(fn) -> list[tuple[str, str]]:
    """``(module, function)`` for each import a server would refuse in the code that travels
    with ``fn`` (its body, nested functions, and the by-value functions it uses)."""
    found = [(module, getattr(code, "co_qualname", code.co_name))
             for function in _travelling_functions(fn)
             for code in _code_objects(function.__code__) for module in _imports(code)
             if not allowed(module)]
    return list(dict.fromkeys(found))


def _describe(fn) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{name} (from {getattr(fn, '__module__', None) or type(fn).__module__})"


def _sent_by_reference(fn) -> bool:
    """Whether ``fn`` itself goes by name to a module the server cannot import."""
    base = fn.__func__ if isinstance(fn, types.MethodType) else getattr(fn, "func", fn)
    if not isinstance(base, (types.FunctionType, types.BuiltinFunctionType, type)):
        base = type(base)
    module = getattr(base, "__module__", None) or ""
    return not _by_value(base) and not allowed(module)


def check_sendable(fn, what: str = "hook") -> None:
    """Raise ``UnsendableError`` unless an NDIF server can run ``fn`` inside a trace: everything
    it is pickled with, and every ``import`` in the code sent with it, must be of
    ``SERVER_MODULES``."""
    try:
        blob = dumps(fn)
    except Exception as error:  # noqa: BLE001 - any pickling failure is the same answer
        raise UnsendableError(f"The {what} {_describe(fn)} cannot be sent to an NDIF server: "
                              f"it cannot be pickled ({error}).") from error
    try:
        refused = refused_references(blob)
    except Exception as error:  # noqa: BLE001 - e.g. a by-reference function of a local file
        refused = [f"something that cannot be rebuilt there ({error})"]
    imports = refused_imports(fn)
    if not refused and not imports:
        return
    uses = [f"uses {', '.join(refused[:5])}"] if refused else []
    uses += [f"imports {module} (in {function})" for module, function in imports[:5]]
    if _sent_by_reference(fn):
        advice = ("It is sent by name, and the server cannot import its module. Define the "
                  "function in your script or notebook (it is then sent as source), or register "
                  "its module with pruning_bridge.bridge.remote.send_by_value(module), using only "
                  "those modules inside it.")
    else:
        modules = ", ".join(dict.fromkeys([m for m, _ in imports] + [
            r.removeprefix("the module ") for r in refused]))
        advice = (f"The function itself travels as source: use only those modules inside it, "
                  f"and do what needs {modules} before or after the call (on the tensors it "
                  f"returns), not inside the function. A helper of yours from an installed "
                  f"package can travel as source too: "
                  f"pruning_bridge.bridge.remote.send_by_value(module).")
    raise UnsendableError(
        f"The {what} {_describe(fn)} cannot run on an NDIF server: it {'; it '.join(uses)}, and "
        f"NDIF's hosted service lets a trace use only {_server_modules_text()}. {advice}")


# ---------------------------------------------------------------- counting, retrying, errors
@dataclass
class Traffic:
    """What a bridge sent to the server and got back: completed requests (``log``: one entry
    each), and transient faults retried (``faults``: one line each)."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_returned: int = 0
    seconds: float = 0.0
    retries: int = 0
    log: list[dict] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    def record(self, sent: int, returned: int, seconds: float) -> None:
        self.requests += 1
        self.bytes_sent += sent
        self.bytes_returned += returned
        self.seconds += seconds
        self.log.append({"sent": sent, "returned": returned, "seconds": seconds})

    def record_retry(self, fault: str) -> None:
        self.retries += 1
        self.faults.append(fault)

    def reset(self) -> None:
        self.requests = self.bytes_sent = self.bytes_returned = self.retries = 0
        self.seconds = 0.0
        self.log.clear()
        self.faults.clear()

    def __str__(self) -> str:
        return (f"{self.requests} requests, {self.bytes_sent:,} bytes sent, "
                f"{self.bytes_returned:,} bytes returned, {self.seconds:.2f} s"
                + (f", {self.retries} retried after a transient fault" if self.retries else ""))


def _env_number(name: str, kind: type, default):
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not a{'n integer' if kind is int else ' number'}."
                         ) from None


@dataclass(frozen=True)
class RetryPolicy:
    """How a transient server fault is retried: up to ``retries`` more attempts, waiting
    ``backoff`` seconds before the first and twice as long before each next one (at most
    ``max_wait``). The defaults outlast a model actor that the server restarts (~10 s)."""

    retries: int = 3
    backoff: float = 2.0
    max_wait: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or self.retries < 0:
            raise UsageError(f"retries must be an integer >= 0, got {self.retries!r}.")
        if not self.backoff >= 0 or not self.max_wait >= 0:
            raise UsageError(f"backoff must be >= 0 seconds, got {self.backoff!r}.")

    @classmethod
    def configured(cls, retries: int | None = None, backoff: float | None = None
                   ) -> RetryPolicy:
        """The values given, else those of ``$LAYERS_TO_LATENTS_NDIF_RETRIES`` and
        ``$LAYERS_TO_LATENTS_NDIF_BACKOFF`` (seconds), else the defaults."""
        return cls(retries if retries is not None else _env_number(RETRIES_ENV, int, cls.retries),
                   backoff if backoff is not None else _env_number(BACKOFF_ENV, float,
                                                                   cls.backoff))

    def wait(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0 = the first)."""
        return min(self.max_wait, self.backoff * 2 ** attempt)


# The server's words for a fault that passes (ndif 0.1.2: "Error submitting request to model
# deployment. Please try again later.", "Replica was evicted while processing your request.",
# "Service temporarily unavailable: compute backend is reconnecting.").
TRANSIENT_MESSAGES = re.compile(r"try again|evicted|actor (died|unavailable)|"
                                r"temporarily unavailable", re.IGNORECASE)


@functools.cache
def _fault_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(unreachable, transient, any remote fault) exception types; imported late, like nnsight."""
    import httpx
    import websocket

    unreachable = (ConnectionRefusedError, socket.gaierror, httpx.ConnectError,
                   httpx.ConnectTimeout, websocket.WebSocketBadStatusException,
                   websocket.WebSocketAddressException)
    transient = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
                 websocket.WebSocketConnectionClosedException, httpx.RemoteProtocolError,
                 httpx.ReadError, httpx.WriteError)
    remote = (NnsightRemoteError, OSError, httpx.HTTPError, websocket.WebSocketException)
    return unreachable, transient, remote


def _chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def fault_kind(error: BaseException) -> str | None:
    """How a request failed: ``"unreachable"`` (nothing answers as NDIF there: connection
    refused, unknown host, another kind of server), ``"transient"`` (worth retrying: the model
    actor restarting, a replica evicted, a connection reset), ``"server"`` (the server refused or
    failed the work), or None (no fault of the request: a bug here, or a hook's own exception
    in a simulated run)."""
    unreachable, transient, remote = _fault_types()
    chain = _chain(error)
    if any(isinstance(e, unreachable) for e in chain):
        return "unreachable"
    if any(isinstance(e, transient) or (isinstance(e, NnsightRemoteError)
                                        and TRANSIENT_MESSAGES.search(str(e))) for e in chain):
        return "transient"
    return "server" if any(isinstance(e, remote) for e in chain) else None


def _said(error: BaseException, limit: int = 2000) -> str:
    """The error in one short piece: the server's words, or the exception's type and text."""
    text = str(error) if isinstance(error, NnsightRemoteError) else \
        f"{type(error).__name__}: {error}"
    text = text.strip().rstrip(".")
    return text if len(text) <= limit else text[:limit] + " ..."


def remote_error(kind: str, error: BaseException, host: str, what: str, attempts: int
                 ) -> RemoteError:
    """The ``RemoteError`` for a fault of ``kind`` (see ``fault_kind``): where, what, what to do."""
    said = _said(error)
    if kind == "unreachable":
        return RemoteError(
            f"Cannot reach an NDIF server at {host} to run {what} ({said}). Is the server "
            f"running, and is the URL right? {START_ADVICE}; otherwise check the host "
            f"(HookBridge.remote(host=...), --ndif-host, NDIF_HOST).")
    if kind == "transient":
        return RemoteError(
            f"The NDIF server at {host} could not run {what}: {attempts} attempt(s) failed with "
            f"a transient fault (last: {said}). The server may be restarting the model or be "
            f"busy: retry later, or allow more retries (HookBridge.remote(retries=...), "
            f"{RETRIES_ENV}); a sweep that writes to out= resumes where it stopped.")
    return RemoteError(
        f"The NDIF server at {host} could not run {what}: {said}. If this names your hook, fix "
        f"the hook (it ran on the server); if the model is not deployed there, check its name "
        f"against the server's models (nnsight.ndif.status()).")


def call_with_retries(attempt: Callable[[], T], *, host: str, what: str, traffic: Traffic,
                      policy: RetryPolicy) -> T:
    """``attempt()``, retried after a transient fault as ``policy`` says (each retry counted in
    ``traffic``); a remote fault that stays raises ``RemoteError`` with the original as cause.
    Any other exception (ours, or a bug) propagates unchanged."""
    attempts = 0
    while True:
        attempts += 1
        try:
            return attempt()
        except UsageError:
            raise
        except Exception as error:
            kind = fault_kind(error)
            if kind is None:
                raise
            if kind == "transient" and attempts <= policy.retries:
                traffic.record_retry(_said(error, limit=300))
                time.sleep(policy.wait(attempts - 1))
                continue
            raise remote_error(kind, error, host, what, attempts) from error


# ---------------------------------------------------------------- the backends
# Server log lines about the toolkit's own traces, which a user cannot act on: nnsight's warning
# that a generation's open ``tracer.all()`` loop asked for one step more than the model made (by
# design: HookBridge._generate_remote), and the source line Python prints under a warning.
OWN_TRACE_NOISE = re.compile(r"was never reached|^\s*warnings\.warn\(")


def status_wanted(status: bool | None = None) -> bool:
    """``status``, else whether ``$LAYERS_TO_LATENTS_NDIF_STATUS`` is 1 / true / yes."""
    if status is not None:
        return status
    return os.environ.get(STATUS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class QuietDisplay(StatusDisplay):
    """nnsight's status line (a spinner redrawn every 0.1 s) only when ``show``; the server's log
    lines (what a hook prints or warns there) always, on stderr, except ``OWN_TRACE_NOISE``."""

    def __init__(self, show: bool = False, verbose: bool = False):
        super().__init__(enabled=show or verbose, verbose=verbose)

    def update(self, response: ResponseModel) -> None:
        if response.status is Status.LOG:
            if OWN_TRACE_NOISE.search(response.description or ""):
                return
            if not self.enabled:
                print(f"[NDIF {response.id}] {response.description}", file=sys.stderr)
                return
        super().update(response)


def result_bytes(saves: dict) -> int:
    """The size of a result as the server sends it (``torch.save`` of the saved values)."""
    buffer = io.BytesIO()
    torch.save(saves, buffer, pickle_protocol=4)
    return buffer.tell()


class CountingRemoteBackend(RemoteBackend):
    """nnsight's remote backend: quiet unless ``status``, transient faults retried as ``retry``
    says, every other fault a ``RemoteError`` naming ``what``, each request recorded in
    ``traffic``."""

    def __init__(self, traffic: Traffic, model_key: str, host: str | None = None,
                 api_key: str | None = None, *, what: str = "a trace",
                 retry: RetryPolicy = RetryPolicy(), status: bool = False):
        super().__init__(model_key, host=host, api_key=api_key)
        self.traffic, self.what, self.retry = traffic, what, retry
        self.display = QuietDisplay(status, self.verbose)
        self._sent = self._returned = 0

    def _serialize(self, tracer) -> bytes:
        blob = super()._serialize(tracer)
        self._sent = len(blob)
        return blob

    def finalize(self, content: bytes):
        self._returned = len(content)
        return super().finalize(content)

    def _attempt(self, tracer):
        tic = time.perf_counter()
        result = super().__call__(tracer)
        self.traffic.record(self._sent, self._returned, time.perf_counter() - tic)
        return result

    def __call__(self, tracer=None):
        return call_with_retries(lambda: self._attempt(tracer), host=self.host, what=self.what,
                                 traffic=self.traffic, policy=self.retry)


class SimulatedServer(Backend):
    """A trace sent through the server's round trip without a server, for tests and dry runs.

    The trace is serialised exactly as for NDIF and unpickled with the server's module whitelist
    (``ServerUnpickler``; a refusal raises ``UnsendableError``) against the model's persistent
    objects; the restored code then runs on the local model, and the saved values are counted
    as the server would send them. Faults of ``round_trip`` are retried and reported as for a
    real server.
    """

    def __init__(self, lm, traffic: Traffic, *, what: str = "a trace",
                 retry: RetryPolicy = RetryPolicy()):
        self.lm, self.traffic, self.what, self.retry = lm, traffic, what, retry

    def __call__(self, tracer) -> None:
        call_with_retries(lambda: self.round_trip(tracer), host=SIMULATED_HOST, what=self.what,
                          traffic=self.traffic, policy=self.retry)

    def round_trip(self, tracer) -> None:
        """One request: serialise, unpickle as the server would, run here, count."""
        import linecache

        tic = time.perf_counter()
        blob = RequestModel.serialize(tracer, compress=False)
        filename = tracer.info.frame.f_code.co_filename
        kept = linecache.cache.get(filename)
        refused: list[str] = []

        def unpickler(file, persistent_objects):
            restricted = ServerUnpickler(file, persistent_objects)
            restricted.refused = refused
            return restricted

        try:
            restored = RequestModel.deserialize(blob, self.lm._remoteable_persistent_objects(),
                                                unpickler=unpickler)
        finally:  # deserialising registers the block's source under the caller's file name
            if kept is not None:
                linecache.cache[filename] = kept
            else:
                linecache.cache.pop(filename, None)
        if refused:
            raise UnsendableError(f"An NDIF server would refuse this trace: it uses "
                                  f"{', '.join(dict.fromkeys(refused))}.")
        # run the restored code in this process (as nnsight's own local simulation does)
        tracer.info.code = restored.info.code
        tracer.execute(tracer.info.code)
        saved = _saves()
        saves = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saved}
        self.traffic.record(len(blob), result_bytes(saves), time.perf_counter() - tic)


__all__ = ["OWN_TRACE_NOISE", "SERVER_MODULES", "CountingRemoteBackend", "QuietDisplay",
           "RemoteError", "RetryPolicy", "ServerUnpickler", "SimulatedServer", "Traffic",
           "UnsendableError", "allowed", "call_with_retries", "check_sendable", "fault_kind",
           "refused_imports", "refused_references", "send_by_value", "status_wanted"]
