"""Joining a multi-process (multi-host) run: the same code path on a TPU pod and on localhost.

On TPU pods (and SLURM / GKE with the usual variables) `jax.distributed.initialize()` finds its
peers by itself. Elsewhere give the coordinator explicitly, by argument or environment:

    JAXFT_COORDINATOR=10.0.0.1:1234 JAXFT_NUM_PROCESSES=2 JAXFT_PROCESS_ID=0 jaxft train ...

Must run before anything touches a jax device.
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None) -> bool:
    """Initializes jax.distributed when a multi-process run is configured; returns whether it did."""
    coordinator_address = coordinator_address or os.environ.get("JAXFT_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _env_int("JAXFT_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAXFT_PROCESS_ID")
    on_tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    if coordinator_address is None and not on_tpu_pod:
        return False  # a single-process run
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ValueError("a coordinator address needs num_processes and process_id too "
                         "(or JAXFT_NUM_PROCESSES and JAXFT_PROCESS_ID)")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        # CPU processes need a collectives backend to talk to each other; gloo ships with jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
