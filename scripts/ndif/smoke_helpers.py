"""Plain Python helpers that smoke.py calls *inside* a remote trace.

The module is registered with ``cloudpickle.register_pickle_by_value`` (``nnsight.register``) by
the smoke test, so the function's source travels with the request and is rebuilt on the server:
the server never imports this module.
"""


def token_norms(hidden, scale=2.0):
    """A plain function (no nnsight in it): scaled L2 norm of each position's hidden state."""
    return hidden.norm(dim=-1) * scale
