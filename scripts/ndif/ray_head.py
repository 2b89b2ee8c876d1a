"""`ray start` for a slow or busy machine: the Ray CLI with longer startup waits, lighter start.

Run as ``python scripts/ndif/ray_head.py start --head ...`` (the same arguments as ``ray start``).
Under ``nice -n 19`` on a 2-core machine whose cores are kept busy by other work, every Python
process Ray starts gets a few percent of a core, and ``ray start`` (Ray 2.60) gives up:

* the raylet waits a fixed ~20 s for the dashboard agent to write its listen port to a file, then
  aborts ("Timed out waiting for file .../dashboard_agent_listen_port_..."). It skips that wait
  when it is told the port, which ``ray start --dashboard-agent-listen-port`` hands only to the
  agent: this passes it to the raylet too;
* ``ray start`` then gives the node a hard-coded 30 s to register with the GCS ("The current node
  timed out during startup"): this makes the poll it calls (``services.get_node``) keep polling
  for up to ``$NDIF_LOCAL_RAY_NODE_WAIT_S`` seconds (default 300);
* the dashboard starts nine module processes; NDIF's controller only uses Ray's state API
  (``StateHead``, served over the dashboard's HTTP port), so only the modules in
  ``$NDIF_LOCAL_RAY_DASHBOARD_MODULES`` (default ``StateHead``) are loaded. Set it to ``all`` for
  the full dashboard. (``--disable-frontend`` would turn the HTTP server off, state API included.)

The dashboard's own startup timeout is an environment variable (``RAY_DASHBOARD_STARTUP_TIMEOUT_S``,
set by scripts/ndif_local.sh). Everything else is ``ray start``.
"""

import os
import sys
import time

import ray._private.ray_constants as ray_constants
import ray._private.services as services

_get_node = services.get_node
_ray_start_ray_process = services.start_ray_process
_start_raylet = services.start_raylet
_agent_listen_port = None


def _patient_get_node(*args, **kwargs):
    deadline = time.monotonic() + float(os.environ.get("NDIF_LOCAL_RAY_NODE_WAIT_S", "300"))
    while True:
        try:
            return _get_node(*args, **kwargs)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _start_raylet_with_agent_port(*args, **kwargs):
    global _agent_listen_port
    _agent_listen_port = kwargs.get("dashboard_agent_listen_port")
    return _start_raylet(*args, **kwargs)


def _start_ray_process(command, process_type, *args, **kwargs):
    command = list(command)
    if process_type == ray_constants.PROCESS_TYPE_RAYLET and _agent_listen_port:
        command.append(f"--dashboard_agent_listen_port={_agent_listen_port}")
    modules = os.environ.get("NDIF_LOCAL_RAY_DASHBOARD_MODULES", "StateHead")
    if (process_type == ray_constants.PROCESS_TYPE_DASHBOARD and modules != "all"
            and not any(arg.startswith("--modules-to-load") for arg in command)):
        command.append(f"--modules-to-load={modules}")
    return _ray_start_ray_process(command, process_type, *args, **kwargs)


services.get_node = _patient_get_node
services.start_raylet = _start_raylet_with_agent_port
services.start_ray_process = _start_ray_process

if __name__ == "__main__":
    from ray.scripts.scripts import main

    sys.argv[0] = "ray"
    sys.exit(main())
