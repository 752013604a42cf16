"""Shared fixtures: a tiny random model, the real default model, and real local clusters.

Clusters are real processes (a broker and stage nodes) on 127.0.0.1 with free ports, started
through the same code as ``zpipe up`` and stopped by pid when the test is done.
"""

from __future__ import annotations

import os

# As in zpipe's CLI: idle OpenMP threads of this process (transformers references) must sleep,
# not spin, while the cluster's processes compute on the same two cores. Before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import asyncio  # noqa: E402
import socket
import time
from pathlib import Path

import pytest

from zpipe.cli.up import Cluster
from zpipe.client import Client, ZpipeError
from zpipe.config import ClusterConfig, validate
from zpipe.models import ModelNotFound, resolve_model, synth

# The client's errors for a broker that is not (yet) answering; any other is an answer.
NOT_UP = ("timeout", "broker_gone")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=1, progress=lambda m: None)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    try:
        return resolve_model("smollm2")
    except ModelNotFound:
        pytest.skip("SmolLM2 is not cached: run `zpipe model fetch smollm2` (make test does)")


async def generating(client: Client, tokens: int = 1, timeout: float = 120.0,
                     **kwargs: object) -> asyncio.Task:
    """Start ``client.generate(**kwargs)`` as a task and return it once its first ``tokens``
    tokens arrived: the session is running at every node."""
    arrived = asyncio.Event()
    task = asyncio.create_task(client.generate(
        on_token=lambda chunk: chunk.index + 1 >= tokens and arrived.set(), **kwargs))
    waiter = asyncio.create_task(arrived.wait())
    await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if not arrived.is_set():
        waiter.cancel()
        if task.done():
            task.result()  # its error
            raise AssertionError(f"the generation ended before {tokens} tokens")
        task.cancel()
        raise AssertionError(f"no {tokens} tokens in {timeout} s")
    return task


class RunningCluster:
    def __init__(self, cluster: Cluster, address: str, info: dict, key: str | None = None
                 ) -> None:
        self.cluster = cluster
        self.address = address
        self.info = info
        self.key = key

    def client(self, timeout: float = 120.0, key: str | None = None) -> Client:
        return Client(self.address, timeout=timeout, key=key or self.key)


def start_cluster(model: Path, log_dir: Path, nodes: list[dict], timeout: float = 180.0,
                  pin_cpus: bool = False, key: str | None = None,
                  **broker: object) -> RunningCluster:
    """Start a broker and ``nodes`` (ClusterNode dicts) and wait until they are ready
    (asking with the CURVE secret key file ``key``, if the broker has ``keys``)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    cfg = validate({"model": str(model), "broker": {"bind": address, **broker}, "nodes": nodes,
                    "pin_cpus": pin_cpus}, ClusterConfig)
    cluster = Cluster(cfg, log_dir)
    cluster.start()

    async def wait() -> dict:
        async with Client(address, key=key) as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                dead = cluster.dead()
                if dead:
                    raise RuntimeError(f"{dead} died:\n" + "\n".join(cluster.tail(d) for d in dead))
                try:
                    info = await client.info(timeout=1.0)
                except ZpipeError as e:
                    if e.code not in NOT_UP:
                        raise  # the broker answered, with an error: not worth 180 s of polls
                else:
                    if info["ready"]:
                        return info
                await asyncio.sleep(0.2)
            raise TimeoutError(f"cluster not ready in {timeout} s")

    try:
        info = asyncio.run(wait())
    except BaseException:
        cluster.stop()
        raise
    return RunningCluster(cluster, address, info, key)


class Clusters:
    """Clusters shared across tests, one per (model, stages, dtype), stopped at session end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.running: dict[tuple, RunningCluster] = {}

    def get(self, model: Path, stages: int, dtype: str = "float32",
            direct: bool = False) -> RunningCluster:
        key = (str(model), stages, dtype, direct)
        if key not in self.running:
            nodes = [{"name": f"n{i}", "dtype": dtype} for i in range(stages)]
            self.running[key] = start_cluster(
                model, self.base / f"{model.name}-{stages}-{dtype}{'-direct' * direct}", nodes,
                direct=direct)
        return self.running[key]

    def stop_all(self) -> None:
        for rc in self.running.values():
            rc.cluster.stop()
        self.running.clear()


@pytest.fixture(scope="session")
def clusters(tmp_path_factory: pytest.TempPathFactory):
    c = Clusters(tmp_path_factory.mktemp("clusters"))
    yield c
    c.stop_all()
