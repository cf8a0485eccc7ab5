"""Where sweep jobs run: one after another in this process (``local``), or as independent
tasks on a Ray cluster (``ray``), each asking for the GPUs it needs.

An executor takes a list of jobs and a picklable function ``run(job) -> result`` and calls
``on_result(job, result)`` in the driver as each job finishes (in completion order), so the
sweep can save every result the moment it exists. A job that raises (or whose Ray worker
dies) is turned into a result by ``on_error(job, exc)``; the other jobs go on.

Ray jobs write into the same run store as the driver: ``RLOOP_RUNS`` is passed to every
worker, and on a multi-node cluster the store must live on a shared file system.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

from rloop.errors import ConfigError
from rloop.runs import runs_root

EXECUTORS = ("local", "ray")
CONNECT_TIMEOUT_SECONDS = 5.0


class Executor(Protocol):
    name: str

    def run(
        self,
        jobs: Sequence,
        run: Callable,
        on_result: Callable,
        on_error: Callable,
    ) -> None: ...


class LocalExecutor:
    """Run jobs sequentially in this process (the default)."""

    name = "local"

    def run(self, jobs: Sequence, run: Callable, on_result: Callable, on_error: Callable) -> None:
        for job in jobs:
            try:
                result = run(job)
            except Exception as err:  # a job must never stop the sweep
                result = on_error(job, err)
            on_result(job, result)


def check_ray_address(address: str | None) -> None:
    """ConfigError in seconds when a host:port address does not accept connections (Ray
    itself waits minutes). ``None``/``local`` start a local instance; ``auto`` is left to Ray."""
    if address in (None, "", "local", "auto"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"bad Ray address {address!r}: write host:port (e.g. 10.0.0.5:6379), "
            "ray://host:10001 or auto"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_SECONDS):
            pass
    except OSError as err:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({err.strerror or err}); start it with "
            "`ray start --head` or pass the address `ray status` prints"
        ) from None


class RayExecutor:
    """Run each job as a Ray task on an existing cluster (``address``) or a local instance.

    num_gpus: GPUs each job asks for (None: 1 when the cluster has GPUs, else 0).
    runtime_env: extra Ray runtime environment (merged; env_vars RLOOP_RUNS and
    RLOOP_PROGRESS=0 are always set so workers write into the driver's run store).
    max_retries: how often Ray re-runs a job whose worker died (job writes are idempotent).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_gpus: float | None = None,
        runtime_env: dict | None = None,
        max_retries: int = 2,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "--executor ray needs Ray: pip install 'rloop[ray]' (or pip install 'ray[default]')"
            ) from None
        self._ray = ray
        self.address = address
        self.num_gpus = num_gpus
        self.runtime_env = dict(runtime_env or {})
        self.max_retries = max_retries

    def _connect(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            return
        check_ray_address(self.address)
        try:
            if self.address in (None, "", "local"):
                ray.init(include_dashboard=False)
            else:
                ray.init(address=self.address)
        except (ConnectionError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"cannot connect to Ray at {self.address or 'a new local instance'} ({first}); "
                "check the address with `ray status`"
            ) from None

    def _gpus(self) -> float:
        if self.num_gpus is not None:
            return float(self.num_gpus)
        return 1.0 if self._ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    def run(self, jobs: Sequence, run: Callable, on_result: Callable, on_error: Callable) -> None:
        if not jobs:
            return
        self._connect()
        ray = self._ray

        env = dict(self.runtime_env.get("env_vars", {}))
        env.setdefault("RLOOP_RUNS", str(runs_root().expanduser().absolute()))
        env.setdefault("RLOOP_PROGRESS", "0")
        if os.environ.get("HF_HUB_OFFLINE"):
            env.setdefault("HF_HUB_OFFLINE", os.environ["HF_HUB_OFFLINE"])
        runtime_env = {**self.runtime_env, "env_vars": env}
        task = ray.remote(_call_job).options(
            num_gpus=self._gpus(), max_retries=self.max_retries, runtime_env=runtime_env
        )
        pending = {task.remote(run, job): job for job in jobs}
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            for ref in finished:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as err:  # worker died or the task raised
                    result = on_error(job, err)
                on_result(job, result)


def _call_job(run: Callable, job: object) -> object:
    """Ray task body: ``run`` may be any picklable callable (a functools.partial too)."""
    return run(job)


def make_executor(
    name: str, ray_address: str | None = None, num_gpus: float | None = None
) -> LocalExecutor | RayExecutor:
    """``local`` or ``ray``; ConfigError for anything else (or a Ray address without ray)."""
    if name == "local":
        if ray_address:
            raise ConfigError("--ray-address needs --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address=ray_address, num_gpus=num_gpus)
    raise ConfigError(f"unknown executor {name!r}: choose one of {', '.join(EXECUTORS)}")
