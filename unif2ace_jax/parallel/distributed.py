"""Multi-host start-up: `jax.distributed.initialize()` when the job spans several processes.

Three ways a run becomes multi-process (`launch_kind` decides, from flags and the environment):

* ``explicit`` — ``--coordinator=HOST:PORT --num_processes=N --process_id=I`` given on the
  command line (any platform; on CPU, collectives go through gloo, so several processes on one
  machine can train together: the localhost test does this).
* ``tpu`` — a multi-host TPU slice (Cloud TPU VM: ``TPU_WORKER_HOSTNAMES`` lists several
  workers, or a multislice job sets ``MEGASCALE_COORDINATOR_ADDRESS``); JAX reads the rest from
  the TPU metadata.
* ``slurm`` — a SLURM step with more than one task (``SLURM_JOB_ID`` and ``SLURM_NTASKS`` /
  ``SLURM_STEP_NUM_TASKS`` > 1); JAX takes the coordinator (first node), process count and id
  from the SLURM variables.

Otherwise (one host) nothing is initialised. Must run before anything touches a JAX backend.

GPU processes under SLURM: JAX gives each process the one GPU numbered by its ``SLURM_LOCALID``
(so every task must see all GPUs of its node). A process that should drive several GPUs (one
process per node) sets ``UNIF2ACE_LOCAL_DEVICE_IDS=0,1,...`` (launch/gpu_slurm.sbatch does).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax

from unif2ace_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Launch:
    kind: str  # "explicit" | "tpu" | "slurm"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def launch_kind(env: Mapping[str, str], *, coordinator: str | None = None,
                num_processes: int | None = None, process_id: int | None = None
                ) -> Launch | None:
    """How this process joins a multi-process job, or None for a single-process run.

    A pure function of the flags and the environment dict `env`.
    """
    explicit = [coordinator, num_processes, process_id]
    if any(v not in (None, "") for v in explicit):
        if coordinator in (None, "") or num_processes is None or process_id is None:
            raise UserError("--coordinator, --num_processes and --process_id go together "
                            "(give all three, or none)")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"--process_id must be in [0, --num_processes={num_processes}), "
                            f"got {process_id}")
        return Launch("explicit", coordinator, num_processes, process_id)
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return Launch("tpu")
    workers = [w for w in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if w.strip()]
    if len(workers) > 1:
        return Launch("tpu")
    if env.get("SLURM_JOB_ID"):
        tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        try:
            many = int(tasks) > 1
        except ValueError:
            many = False
        if many:
            return Launch("slurm")
    return None


def local_device_ids(env: Mapping[str, str]) -> list[int] | None:
    """``UNIF2ACE_LOCAL_DEVICE_IDS`` ("0,1,2,3") as a list; None when unset."""
    text = env.get("UNIF2ACE_LOCAL_DEVICE_IDS", "").strip()
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"UNIF2ACE_LOCAL_DEVICE_IDS must be comma-separated integers, "
                        f"got {text!r}") from None


def uses_cpu(env: Mapping[str, str]) -> bool:
    """Whether JAX will run on the CPU backend (JAX_PLATFORMS names cpu first)."""
    platforms = env.get("JAX_PLATFORMS", "") or env.get("JAX_PLATFORM_NAME", "")
    return platforms.split(",")[0].strip().lower() == "cpu"


def maybe_initialize(*, coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None,
                     env: Mapping[str, str] | None = None) -> Launch | None:
    """Calls `jax.distributed.initialize` when `launch_kind` says the job is multi-process.

    Returns the `Launch` (None: single process, nothing done).
    """
    env = os.environ if env is None else env
    launch = launch_kind(env, coordinator=coordinator, num_processes=num_processes,
                         process_id=process_id)
    if launch is None:
        return None
    if uses_cpu(env):
        # Cross-process collectives on the CPU backend (off by default).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    devices = local_device_ids(env)
    if launch.kind == "explicit":
        jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                                   local_device_ids=devices)
    else:
        jax.distributed.initialize(local_device_ids=devices)
    return launch
