"""Sweeps on a local Ray instance (2 CPUs): a two-job sweep gives the same tables as the local
executor and writes into the same run store; an unreachable address fails in seconds."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from rloop.errors import ConfigError
from rloop.experiments.executors import RayExecutor, check_ray_address, make_executor
from rloop.experiments.sweeps import ScalingConfig, run_scaling
from tests.test_sweeps import load_local, save_checkpoint, settings

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    monkeypatch.setenv("RLOOP_PROGRESS", "0")


def test_unreachable_address_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach the Ray cluster"):
        check_ray_address("127.0.0.1:1")
    assert time.monotonic() - started < 10
    with pytest.raises(ConfigError, match="bad Ray address"):
        check_ray_address("nonsense")
    with pytest.raises(ConfigError, match="needs --executor ray"):
        make_executor("local", "127.0.0.1:6379")


def test_two_job_sweep_on_local_ray(tmp_path) -> None:
    ray = pytest.importorskip("ray")
    from rloop.runs import list_runs

    dirs = [save_checkpoint(tmp_path / f"m{i}", family=f) for i, f in enumerate(["llama", "gpt2"])]
    config = ScalingConfig(models=[str(d) for d in dirs], settings=settings(tmp_path))
    local = run_scaling(config, out=tmp_path / "local", loader=load_local)

    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})  # fmt: skip
    try:
        executor = RayExecutor(num_gpus=0)
        distributed = run_scaling(config, out=tmp_path / "ray", executor=executor,
                                  loader=load_local)  # fmt: skip
    finally:
        ray.shutdown()
    a = pd.read_csv(local.run_dir / "scaling.csv")
    b = pd.read_csv(distributed.run_dir / "scaling.csv")
    pd.testing.assert_frame_equal(a, b)
    jobs = pd.read_csv(distributed.run_dir / "jobs.csv")
    assert sorted(jobs["status"]) == ["done", "done"]
    # The workers' child runs landed in the driver's run store index.
    index = list_runs(tmp_path / "store")
    children = index[index["path"].str.startswith(str(distributed.run_dir / "jobs"))]
    assert len(children) == 2 and set(children["status"]) == {"complete"}
