"""Sending the bridge's traces to an NDIF server (nnsight remote execution), and counting them.

nnsight ships a trace to NDIF as source code plus the objects it names (pickled; functions by
their source). NDIF's hosted service runs it in a protected environment that lets a trace import
only a few modules: torch, math, numpy, collections and a handful more (``SERVER_MODULES``, from
ndif's ``protected_environment``; the PyPI ``ndif`` 0.1.2 used for a local server checks nothing,
so the client holds every trace to the stricter rule). Nothing of this toolkit is installed on a
server. So everything that runs inside a remote trace, the bridge's own ``traced`` code and every
user hook, must be sent *by value* and use only those modules. ``check_sendable`` proves that
on the client, before any request, and names the function and the module at fault;
``SimulatedServer`` runs a whole trace through the same serialise / restricted-unpickle / execute
round trip without a server (for tests).

``Traffic`` counts what a bridge sends: requests, payload bytes, result bytes and seconds.
"""

from __future__ import annotations

import io
import time
import types
from dataclasses import dataclass, field

import cloudpickle
import torch
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.intervention.serialization import CustomCloudUnpickler, dumps
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend
from nnsight.tracing.tracer import _saves

from ..common.errors import UsageError
from . import adapters, traced

# What NDIF's hosted service lets a trace import (ndif's protected environment: its whitelist, and
# what unpickling needs). A prefix admits its submodules.
SERVER_MODULES = (
    "builtins", "torch", "collections", "time", "numpy", "sympy", "nnterp", "math", "einops",
    "typing", "_operator", "operator", "pandas", "enum", "copyreg", "pickle", "cloudpickle",
    "nnsight.intervention", "nnsight.modeling", "nnsight.schema", "nnsight.tracing",
    "transformers",  # only as the deployed model's own classes (persistent objects)
)
# Modules whose functions run inside the bridge's traces: always sent by value.
IN_TRACE_MODULES = (traced, adapters)


class UnsendableError(UsageError):
    """A function or object that an NDIF server could not run inside a trace."""


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


def _describe(fn) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{name} (from {getattr(fn, '__module__', None) or type(fn).__module__})"


def check_sendable(fn, what: str = "hook") -> None:
    """Raise ``UnsendableError`` unless an NDIF server can run ``fn`` inside a trace."""
    try:
        blob = dumps(fn)
    except Exception as error:  # noqa: BLE001 - any pickling failure is the same answer
        raise UnsendableError(f"The {what} {_describe(fn)} cannot be sent to an NDIF server: "
                              f"it cannot be pickled ({error}).") from error
    try:
        refused = refused_references(blob)
    except Exception as error:  # noqa: BLE001 - e.g. a by-reference function of a local file
        refused = [f"something that cannot be rebuilt there ({error})"]
    if refused:
        raise UnsendableError(
            f"The {what} {_describe(fn)} cannot run on an NDIF server: it uses "
            f"{', '.join(refused[:5])}, and a server lets a trace use only "
            f"{', '.join(m for m in SERVER_MODULES[:10])} (and a few more). Define the function "
            f"in your script or notebook (it is then sent as source), or register its module "
            f"with pruning_bridge.bridge.remote.send_by_value(module), using only those modules "
            f"inside it.")


@dataclass
class Traffic:
    """What a bridge sent to the server and got back."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_returned: int = 0
    seconds: float = 0.0
    log: list[dict] = field(default_factory=list)

    def record(self, sent: int, returned: int, seconds: float) -> None:
        self.requests += 1
        self.bytes_sent += sent
        self.bytes_returned += returned
        self.seconds += seconds
        self.log.append(dict(sent=sent, returned=returned, seconds=seconds))

    def reset(self) -> None:
        self.requests = self.bytes_sent = self.bytes_returned = 0
        self.seconds = 0.0
        self.log.clear()

    def __str__(self) -> str:
        return (f"{self.requests} requests, {self.bytes_sent:,} bytes sent, "
                f"{self.bytes_returned:,} bytes returned, {self.seconds:.2f} s")


def result_bytes(saves: dict) -> int:
    """The size of a result as the server sends it (``torch.save`` of the saved values)."""
    buffer = io.BytesIO()
    torch.save(saves, buffer, pickle_protocol=4)
    return buffer.tell()


class CountingRemoteBackend(RemoteBackend):
    """nnsight's remote backend, recording each request in a ``Traffic``."""

    def __init__(self, traffic: Traffic, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.traffic = traffic
        self._sent = self._returned = 0

    def _serialize(self, tracer) -> bytes:
        blob = super()._serialize(tracer)
        self._sent = len(blob)
        return blob

    def finalize(self, content: bytes):
        self._returned = len(content)
        return super().finalize(content)

    def __call__(self, tracer=None):
        tic = time.perf_counter()
        result = super().__call__(tracer)
        self.traffic.record(self._sent, self._returned, time.perf_counter() - tic)
        return result


class SimulatedServer(Backend):
    """A trace sent through the server's round trip without a server, for tests and dry runs.

    The trace is serialised exactly as for NDIF and unpickled with the server's module whitelist
    (``ServerUnpickler``; a refusal raises ``UnsendableError``) against the model's persistent
    objects; the restored code then runs on the local model, and the saved values are counted
    as the server would send them.
    """

    def __init__(self, lm, traffic: Traffic):
        self.lm, self.traffic = lm, traffic

    def __call__(self, tracer) -> None:
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

__all__ = ["SERVER_MODULES", "CountingRemoteBackend", "ServerUnpickler", "SimulatedServer",
           "Traffic", "UnsendableError", "allowed", "check_sendable", "refused_references",
           "send_by_value"]
