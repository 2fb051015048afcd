"""Every process of a run talks to the run's own Ray cluster, even with other Ray clusters on the same machine.

Ray's State API (``ray.util.state``) finds its cluster from ``RAY_ADDRESS`` or, without it, by looking for running GCS
processes on the machine, and raises ``ConnectionError: Found multiple active Ray instances`` when it finds two. Ray
Train V2 uses it inside Ray workers (the placement-group cleaner and the state actor check whether a Train controller is
alive), so a second local cluster - another user's run - made a finished fold's placement group outlive it and the next
fold wait for resources without end (Ray 2.60, ``train/v2/_internal/execution/controller/placement_group_cleaner.py``
-> ``dashboard/utils.py::ray_address_to_api_server_url``). A local cluster's address exists only once ``ray.init``
has started it, so it cannot go into the job's ``env_vars``; :func:`pin_address` runs as the job's
``worker_process_setup_hook`` (Ray calls it in every worker process of the job, detached actors included, before any
task or actor runs there) and sets ``RAY_ADDRESS`` to the GCS the worker is connected to. Kept in a module of its own so
that every Ray worker imports nothing heavier than this.
"""

from __future__ import annotations

import os

import ray

SETUP_HOOK = f"{__name__}.pin_address"


def pin_address() -> None:
    """Point this Ray worker's State API (and anything else reading ``RAY_ADDRESS``) at the cluster it belongs to."""
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
