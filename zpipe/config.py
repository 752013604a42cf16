"""YAML schemas for brokers, nodes and whole local clusters.

A bad file is refused with the file, the key and what was expected, e.g.
``configs/local.yaml: nodes[1].dtype: Input should be 'float32', 'bfloat16' or 'float16'``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

DEFAULT_BROKER = "tcp://127.0.0.1:5555"

_LAYERS = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layers(value: object) -> tuple[int, int]:
    """'A-B' (inclusive, as people write it), 'A' or an int → half-open (A, B+1)."""
    if isinstance(value, bool):
        raise ValueError("layers must look like '0-9' or 3")
    if isinstance(value, int):
        value = str(value)
    m = _LAYERS.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"layers must look like '0-9' (inclusive) or 3, got {value!r}")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) is not None else a
    if b < a:
        raise ValueError(f"layer range {value!r} ends before it starts")
    return a, b + 1


Layers = Annotated[tuple[int, int], BeforeValidator(parse_layers)]
# KV-head groups of a stage split across nodes by heads: 'A-B' inclusive, like layers.
Heads = Annotated[tuple[int, int], BeforeValidator(parse_layers)]


def _check_address(v: str) -> str:
    if not re.match(r"^(tcp://[^:\s]+:\d+|ipc://\S+|inproc://\S+)$", v):
        raise ValueError(f"expected a ZeroMQ address like tcp://127.0.0.1:5555, got {v!r}")
    return v


def _check_device(v: str) -> str:
    if not re.match(r"^(cpu|cuda(:\d+)?)$", v):
        raise ValueError(f"expected 'cpu' or 'cuda:N', got {v!r}")
    return v


Address = Annotated[str, BeforeValidator(_check_address)]
Device = Annotated[str, BeforeValidator(_check_device)]
DType = Literal["float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageSpec(_Strict):
    node: str
    layers: Layers
    heads: Heads | None = None  # a share of a stage split by KV-head groups


Strategy = Literal["uniform", "memory", "compute", "mixed", "custom"]


def _check_stages(stages: list[tuple[str, tuple[int, int], tuple[int, int] | None]]) -> None:
    """Layer ranges contiguous from 0; the members of a stage split by heads in a row, with the
    same layers and KV-head ranges contiguous from 0 (the model's count is checked at
    placement)."""
    expect, heads, prev_layers = 0, None, None
    for name, layers, h in stages:
        if heads is not None and h is not None and h[0] == heads[1] \
                and layers == prev_layers:
            heads = h  # the next member of the split stage before
            continue
        if heads is not None and h is not None and layers == prev_layers:
            raise ValueError(f"node {name!r}: heads must go on from {heads[1]}, got {h[0]}")
        if layers[0] != expect:
            raise ValueError(f"stages must cover layers contiguously from 0; node {name!r} "
                             f"starts at {layers[0]}, expected {expect}")
        if h is not None and h[0] != 0:
            raise ValueError(f"node {name!r}: a split stage's heads start at 0, got {h[0]}")
        expect, heads, prev_layers = layers[1], h, layers


def _removed(data: object, keys: dict[str, str]) -> object:
    """Refuse keys that no longer exist, saying why (before "unknown key" would)."""
    if isinstance(data, dict):
        for key, why in keys.items():
            if key in data:
                raise ValueError(f"'{key}' is no longer a setting: {why}")
    return data


class MixedWeights(_Strict):
    """How the mixed strategy weighs each node's capabilities: its speed and its memory."""

    compute: float = Field(0.6, ge=0)
    memory: float = Field(0.4, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _no_bandwidth(cls, data: object) -> object:
        # Link bandwidth belongs to a pair of nodes, and no node measures or reports one: a
        # weight on it only scaled the other terms down.
        return _removed(data, {"bandwidth": "no node measures link bandwidth; the mixed "
                               "strategy weighs compute and memory only (drop the key)"})


class PlacementConfig(_Strict):
    strategy: Strategy = "uniform"
    # every strategy but custom: node names in pipeline order, or how many nodes to wait for
    # (ordered by name)
    nodes: list[str] | Annotated[int, Field(ge=1)] = 1
    # custom: the stages in pipeline order
    stages: list[StageSpec] = []
    # memory budgeting: the KV cache of this many sessions of this many tokens must fit too
    context_len: int = Field(2048, ge=1)
    sessions: int = Field(8, ge=1)
    weights: MixedWeights = MixedWeights()

    @model_validator(mode="after")
    def _consistent(self) -> PlacementConfig:
        if self.strategy == "custom":
            if not self.stages:
                raise ValueError("strategy 'custom' needs 'stages'")
            names = [s.node for s in self.stages]
            if len(set(names)) != len(names):
                raise ValueError(f"a node may hold one stage only: {names}")
            _check_stages([(s.node, s.layers, s.heads) for s in self.stages])
        if isinstance(self.nodes, list) and len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"duplicate node names in {self.nodes}")
        return self

    def expected_nodes(self) -> int:
        if self.strategy == "custom":
            return len(self.stages)
        return self.nodes if isinstance(self.nodes, int) else len(self.nodes)


class Limits(_Strict):
    max_sessions: int = Field(256, ge=1)
    max_prompt_tokens: int = Field(8192, ge=1)
    max_new_tokens: int = Field(4096, ge=1)
    default_max_new_tokens: int = Field(128, ge=1)
    # Sessions in one step message at most (cohorts are also capped by the nodes' max_batch);
    # with the two above it bounds the largest message the broker takes (zpipe/bounds.py).
    max_batch: int = Field(64, ge=1, le=4096)
    # One client connection's sessions at most, and of those, waiting for their first token.
    max_client_sessions: int = Field(64, ge=1)
    max_client_queued: int = Field(16, ge=1)


class Rebalance(_Strict):
    """Performance-driven reallocation (``brokers/rebalance.py``): re-plan from measured
    per-layer times; move when the plan is predicted ``min_gain`` faster; check each move's
    prediction and undo one that made things slower."""

    enabled: bool = False
    strategy: Strategy = "compute"
    # a move must be predicted at least this much faster per token than the placement serving
    min_gain: float = Field(0.15, gt=0, lt=1)
    min_tokens: int = Field(64, ge=1)  # tokens measured on a placement before judging it
    # measured seconds per layer vs the start-up matmul prior, for nodes with a measurement
    perf_weight: float = Field(1.0, ge=0, le=1)
    cooldown_s: float = Field(30.0, ge=0)  # hysteresis: no new move this soon after one
    check_interval_s: float = Field(2.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _no_threshold(cls, data: object) -> object:
        return _removed(data, {"threshold": "a re-plan is judged by its predicted gain "
                               "(min_gain), not by how far one stage's share drifted"})


class Heartbeat(_Strict):
    """Paranoid Pirate liveness: a peer silent for interval_s × liveness is dead."""

    interval_s: float = Field(1.0, gt=0, le=60)
    liveness: int = Field(3, ge=1, le=100)


class Recovery(_Strict):
    """What happens to running sessions when a node of the placement dies or restarts."""

    # On: they wait at their last token, the broker places the model again (over the nodes
    # still alive if the configured placement cannot be met) and they replay their tokens to
    # rebuild the lost KV, then go on. Off: they end with node_dead / node_lost.
    enabled: bool = True
    # How long the configured placement may take to be met again (a node that restarts or
    # was declared dead on a hiccup registers again) before the nodes alive take it all.
    wait_s: float = Field(2.0, ge=0, le=3600)
    # Sessions that find no new placement within this long end after all.
    timeout_s: float = Field(60.0, gt=0, le=86400)
    # KV shadows (brokers/shadows.py): every this many new rows of a session, a node's K/V
    # rows go to the node of the next stage (the last stage's: the one before), which takes
    # its layers if it dies and goes on from the shadow; survivors keep their KV and sessions
    # replay only the rows after the shadow's last. 0: off (a death replays every session
    # from its prompt).
    shadow_every: int = Field(8, ge=0, le=1 << 20)


# CurveZMQ (zpipe/keys.py): a key directory made by ``zpipe keys DIR``. ``curve`` unset: on
# when ``keys`` is given or a bind is not loopback (which then needs ``keys``); false: open.
KeyDir = Annotated[str, Field(min_length=1, max_length=4096)]


def _need_keys(cfg: BaseModel) -> BaseModel:
    if cfg.curve and cfg.keys is None:
        raise ValueError("curve: true needs 'keys: DIR', a key directory made by "
                         "`zpipe keys DIR --nodes NAME,... --clients NAME --admins NAME`")
    return cfg


# Pin the process's event loop and ZeroMQ's I/O thread to this CPU (``zpipe.aio.pin``): a
# message then crosses no CPUs on its way in or out (a loopback round trip on a GPU host: 95 ->
# 62 µs). For hosts with cores to spare: give each process its own. Unset: no pinning.
CPU = Annotated[int, Field(ge=0, le=4095)]


class _BrokerKnobs(_Strict):
    """What a broker YAML and a cluster file's ``broker:`` section share."""

    bind: Address = DEFAULT_BROKER
    limits: Limits = Limits()
    heartbeat: Heartbeat = Heartbeat()
    rebalance: Rebalance = Rebalance()
    recovery: Recovery = Recovery()
    # A step that gets no answer in this long fails its session instead of hanging it.
    step_timeout_s: float = Field(120.0, gt=0)
    # A reallocation (load + KV transfer) that takes longer is rolled back.
    move_timeout_s: float = Field(60.0, gt=0)
    # > 0: after each message, poll the socket this long before sleeping (zpipe.aio.Socket):
    # lower latency per hop for a CPU core; for hosts with cores to spare (GPU nodes).
    busy_poll_ms: float = Field(0.0, ge=0, le=1000)
    # Activations go straight from stage to stage (each node's peer_bind socket) instead of
    # through the broker: one transfer and one broker pass fewer per stage boundary. Needs
    # every node of the placement to have a peer_bind; steps fall back to the star if not.
    direct: bool = False
    cpu: CPU | None = None
    keys: KeyDir | None = None
    curve: bool | None = None

    @model_validator(mode="after")
    def _keys_for_curve(self) -> _BrokerKnobs:
        return _need_keys(self)


class BrokerConfig(_BrokerKnobs):
    model: str = "smollm2"
    placement: PlacementConfig = PlacementConfig()


class StaticKV(_Strict):
    """The static KV pool and batched decode (``zpipe/slots.py``, ``zpipe/decode.py``)."""

    # None: on for CUDA devices, off for the CPU (whose per-row float32 batching is bit-exact).
    enabled: bool | None = None
    slots: int = Field(64, ge=1, le=4096)  # sessions with a slot; more fall back to eager
    max_len: int = Field(2048, ge=16, le=1 << 20)  # tokens per slot; longer sessions spill
    cuda_graphs: bool = True
    compile: bool = True  # torch.compile the elementwise parts (CUDA only)
    triton_attention: bool = True  # attention read in place from the pool (CUDA only)

    def on(self, device: str) -> bool:
        return self.enabled if self.enabled is not None else device.startswith("cuda")


class NodeConfig(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    broker: Address = DEFAULT_BROKER
    model: str = "smollm2"
    device: Device = "cpu"
    dtype: DType = "float32"
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    # Steps of different sessions waiting at this node run as one batch of up to this many.
    max_batch: int = Field(64, ge=1, le=4096)
    max_batch_tokens: int = Field(8192, ge=1)
    static_kv: StaticKV = StaticKV()
    busy_poll_ms: float = Field(0.0, ge=0, le=1000)  # as the broker's
    # Host memory for the hidden states this node sent on (nodes/outlog.py): if the next
    # stage's node dies without a KV shadow, this node rebuilds its layers' KV from them.
    output_log_mb: float = Field(512.0, ge=0)
    # Where other nodes send this node activations when the broker runs ``direct`` (port 0:
    # any free port). Unset: activations come through the broker only.
    peer_bind: Address | None = None
    # Where the other members of a stage split by heads send this node their partial outputs
    # (port 0: any free port); told to the broker when the node registers.
    group_bind: Address = "tcp://127.0.0.1:0"
    cpu: CPU | None = None  # as the broker's
    keys: KeyDir | None = None  # as the broker's: it uses broker.key, nodes/NAME.key_secret
    curve: bool | None = None  # and nodes/*.key (the other nodes' peer sockets)

    @model_validator(mode="after")
    def _keys_for_curve(self) -> NodeConfig:
        return _need_keys(self)


class ClusterNode(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    device: Device = "cpu"
    dtype: DType = "float32"
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    layers: Layers | None = None
    heads: Heads | None = None  # with layers: this node's KV-head groups of a split stage
    max_batch: int = Field(64, ge=1, le=4096)
    static_kv: StaticKV = StaticKV()
    busy_poll_ms: float = Field(0.0, ge=0, le=1000)
    output_log_mb: float = Field(512.0, ge=0)
    cpu: CPU | None = None


class ClusterPlacement(_Strict):
    """A cluster's placement: the nodes list gives the order (and ``layers``, if set, custom)."""

    strategy: Literal["uniform", "memory", "compute", "mixed"] = "uniform"
    context_len: int = Field(2048, ge=1)
    sessions: int = Field(8, ge=1)
    weights: MixedWeights = MixedWeights()


class ClusterBroker(_BrokerKnobs):
    placement: ClusterPlacement = ClusterPlacement()


class ClusterConfig(_Strict):
    """A whole local cluster: one broker and its nodes, started together by ``zpipe up``."""

    model: str = "smollm2"
    broker: ClusterBroker = ClusterBroker()
    nodes: Annotated[list[ClusterNode], Field(min_length=1)]
    # Give the broker and every node a CPU of its own (``pinned_cpus``); a process's own
    # ``cpu`` key wins. With busy polling on a GPU host: 2 nodes on 2 GPUs answered 22% more
    # tokens/s at batch 1 (docs/benchmarks.md).
    pin_cpus: bool = False

    @model_validator(mode="after")
    def _layers_all_or_none(self) -> ClusterConfig:
        given = [n.layers is not None for n in self.nodes]
        if any(given) and not all(given):
            raise ValueError("give 'layers' for every node or for none (uniform split)")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate node names: {names}")
        if any(n.heads is not None and n.layers is None for n in self.nodes):
            raise ValueError("'heads' needs 'layers'")
        if all(given):
            _check_stages([(n.name, n.layers, n.heads) for n in self.nodes])
        return self

    def pinned_cpus(self) -> tuple[int | None, list[int | None]]:
        """The CPUs of the broker and of each node: its ``cpu`` key, or with ``pin_cpus`` the
        allowed CPUs 2, 4, 6, ... in that order (the first two left to the OS and the client,
        every other one in case neighbours are one core's two threads). Checked when the
        cluster starts, on the machine it runs on: a file read elsewhere may name more."""
        broker, nodes = self.broker.cpu, [n.cpu for n in self.nodes]
        if not self.pin_cpus:
            return broker, nodes
        taken = {c for c in (broker, *nodes) if c is not None}
        free = [c for c in sorted(os.sched_getaffinity(0))[2::2] if c not in taken]
        want = (broker is None) + sum(c is None for c in nodes)
        if len(free) < want:
            raise ConfigError(f"pin_cpus: {want} processes need a CPU of their own, but this "
                              f"machine has {len(free)} to give (CPUs 2, 4, 6, ... of "
                              f"{sorted(os.sched_getaffinity(0))}, less those given by 'cpu')")
        free.reverse()
        return (broker if broker is not None else free.pop(),
                [c if c is not None else free.pop() for c in nodes])

    def broker_config(self) -> BrokerConfig:
        cp = self.broker.placement
        common = {"context_len": cp.context_len, "sessions": cp.sessions, "weights": cp.weights}
        if self.nodes[0].layers is not None:
            placement = PlacementConfig(strategy="custom", stages=[
                StageSpec(node=n.name, layers=f"{n.layers[0]}-{n.layers[1] - 1}",
                          heads=None if n.heads is None else f"{n.heads[0]}-{n.heads[1] - 1}")
                for n in self.nodes], **common)
        else:
            placement = PlacementConfig(strategy=cp.strategy, nodes=[n.name for n in self.nodes],
                                        **common)
        knobs = {k: getattr(self.broker, k) for k in _BrokerKnobs.model_fields}
        knobs["cpu"] = self.pinned_cpus()[0]
        return BrokerConfig(model=self.model, placement=placement, **knobs)

    def node_configs(self) -> list[NodeConfig]:
        """Every node on this machine; CPU nodes without ``threads`` share the cores evenly
        (several nodes each taking every core would fight over them)."""
        cpu_nodes = sum(n.device == "cpu" for n in self.nodes)
        share = max(1, (os.cpu_count() or 1) // max(1, cpu_nodes))
        cpus = self.pinned_cpus()[1]
        return [NodeConfig(name=n.name, broker=local_address(self.broker.bind),
                           model=self.model, device=n.device, dtype=n.dtype,
                           threads=n.threads or (share if n.device == "cpu" else None),
                           max_batch=n.max_batch, static_kv=n.static_kv,
                           busy_poll_ms=n.busy_poll_ms, output_log_mb=n.output_log_mb,
                           cpu=cpu,
                           peer_bind="tcp://127.0.0.1:0" if self.broker.direct else None,
                           keys=self.broker.keys, curve=self.broker.curve)
                for n, cpu in zip(self.nodes, cpus, strict=True)]


def local_address(bind: str) -> str:
    """Where a process on this machine reaches a broker bound to ``bind`` (``*``/0.0.0.0)."""
    return bind.replace("*", "127.0.0.1").replace("0.0.0.0", "127.0.0.1")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


M = TypeVar("M", bound=BaseModel)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "tagged-union")) and part not in (
                "list[str]", "int", "constrained-int", "tuple[int, int]"):
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def load(path: str | Path, model: type[M]) -> M:
    """Read a YAML file into ``model`` or raise ConfigError naming the file and the bad key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return validate(data if data is not None else {}, model, str(path))


def validate(data: object, model: type[M], source: str = "<config>") -> M:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            lines.append(f"{source}: {_loc(err['loc'])}: {msg}")
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None


def dump(cfg: BaseModel, path: Path) -> None:
    """Write a config back as YAML (used by ``zpipe up`` to hand each child its own file)."""
    data = cfg.model_dump(mode="json")
    _layers_to_text(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _layers_to_text(obj: object) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("layers", "heads") and isinstance(v, list) and len(v) == 2:
                obj[k] = f"{v[0]}-{v[1] - 1}"
            else:
                _layers_to_text(v)
    elif isinstance(obj, list):
        for v in obj:
            _layers_to_text(v)
