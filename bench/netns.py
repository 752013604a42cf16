"""A zpipe cluster across network namespaces on one machine: real hosts' networking without
the hosts.

The broker and every node run in a network namespace of their own, each joined by a veth pair
to one bridge in the root namespace, with real addresses of a free 10.x.y.0/24 (the bridge
has the last one, so a client in the root namespace reaches the broker as a remote client
would). Each link can be capped with ``tc ... tbf`` (both directions) and cut with ``ip link
set ... down``. The processes are the real ``zpipe broker`` / ``zpipe node`` started with
``ip netns exec``; the broker binds its veth address, the nodes connect to it there, and under
direct routing each node binds its peer socket to its own address, which is what it
registers and what the other nodes connect to.

Needs root and iproute2 (``ip``, ``tc``). Every name is unique to the run, and ``stop`` removes
what ``start`` made by those names (processes by pid), whatever happened in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zpipe.client import Client
from zpipe.config import BrokerConfig, NodeConfig, dump
from zpipe.keys import make_keys

PORT = 5555
COMMAND_S = 10.0  # the most one ip / tc command may take


class NetnsError(RuntimeError):
    pass


def unavailable() -> str | None:
    """Why namespaces cannot be used here (None: they can): root, ``ip`` and ``tc``, and a
    namespace that can really be made."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"iproute2's {' and '.join(missing)} not found"
    probe = f"zpipe-probe-{os.getpid()}-{random.randrange(1 << 16):04x}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          timeout=COMMAND_S)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=COMMAND_S)
    return None


def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=COMMAND_S)
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that no address or route of the root namespace touches."""
    used = []
    for line in (_ip("ip", "-4", "-o", "addr", "show") + _ip("ip", "-4", "route", "show")
                 ).split():
        try:
            used.append(ipaddress.ip_network(line, strict=False))
        except ValueError:
            continue
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{random.randrange(200, 250)}.{random.randrange(256)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise NetnsError("no free 10.x.y.0/24 for the namespaces")


def _burst(rate: str) -> int:
    """tbf's bucket: 10 ms of the rate (at least 16 KB), enough for the kernel's timer."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, mult in units.items():
        if rate.lower().endswith(unit):
            bits = float(rate[:-len(unit)]) * mult
            return max(16_000, int(bits / 8 / 100))
    raise ValueError(f"a rate like 20mbit or 1gbit, got {rate!r}")


class DelayProxy:
    """A TCP forwarder that holds every chunk ``delay_s`` in each direction: a link's latency
    where ``tc netem`` is not available. Runs its own event loop in a thread; ``listen`` and
    ``target`` are (host, port)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> None:
        self.listen, self.target, self.delay_s = listen, target, delay_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="zpipe-delay-proxy")
        self.server: asyncio.AbstractServer | None = None

    def start(self) -> int:
        """Listen (port 0: any free one); returns the port."""
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connection, *self.listen), self.loop).result(COMMAND_S)
        return self.server.sockets[0].getsockname()[1]

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Chunks go out ``delay_s`` after they came in, in order, at the rate they came."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(due - loop.time())
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(1 << 16):
                queue.put_nowait((loop.time() + self.delay_s, data))
        except OSError:
            pass
        finally:
            queue.put_nowait((0.0, b""))
            with contextlib.suppress(OSError):
                await sender
            writer.close()

    def stop(self) -> None:
        """Close the listener and every connection, then end the thread."""
        async def close() -> None:
            if self.server is not None:
                self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), self.loop).result(COMMAND_S)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(COMMAND_S)


@dataclass
class Host:
    """One namespace: its name, the veth end in the root namespace (on the bridge) and the end
    inside, and its address."""

    ns: str
    outside: str
    inside: str
    addr: str


class NetnsCluster:
    """A broker and ``nodes`` nodes (named n0, n1, ...), each in a namespace of its own. The
    broker binds a veth address, not loopback, so the cluster runs CurveZMQ: its keys are made
    in ``log_dir/keys`` (the broker's, each node's, client and admin ``local``), as on real
    hosts; ``client`` and ``admin`` connect with them."""

    def __init__(self, model: str | Path, nodes: int, log_dir: Path, rate: str | None = None,
                 direct: bool = False, threads: int = 1, broker: dict | None = None,
                 delay_s: float = 0.0) -> None:
        self.model, self.log_dir, self.rate = str(model), log_dir, rate
        # > 0: the nodes reach the broker through a DelayProxy in the root namespace, which
        # holds every chunk this long each way (the clients reach it directly)
        self.delay_s = delay_s
        self.proxy: DelayProxy | None = None
        self.direct, self.threads, self.knobs = direct, threads, broker or {}
        tag = f"{os.getpid() % 1000:03d}{random.randrange(1000):03d}"  # interface names <= 15
        self.tag = tag
        self.bridge = f"zpb{tag}"
        self.net = _free_subnet()
        addrs = [str(a) for a in self.net.hosts()]
        self.gateway = addrs[-1]  # the bridge's: the root namespace's way in
        self.roles = ["broker", *[f"n{i}" for i in range(nodes)]]
        self.hosts = {role: Host(f"zpipe-{tag}-{role}", f"zph{tag}{i}", f"zpn{tag}{i}", addrs[i])
                      for i, role in enumerate(self.roles)}
        self.procs: dict[str, subprocess.Popen] = {}
        self._namespaces: list[str] = []  # what was made, to remove exactly that
        self._links: list[str] = []
        self.keys = log_dir / "keys"

    def client(self, **kw: object) -> Client:
        """A client of this cluster, with the admin key (it may also generate)."""
        return Client(self.address, key=str(self.keys / "admins" / "local.key_secret"), **kw)

    def admin(self, timeout: float = 30.0):
        from zpipe.cli.admin import AdminClient

        return AdminClient(self.address, timeout=timeout,
                           key=str(self.keys / "admins" / "local.key_secret"))

    @property
    def address(self) -> str:
        """The broker's address, as nodes and clients reach it."""
        return f"tcp://{self.hosts['broker'].addr}:{PORT}"

    def start(self) -> None:
        """Make the network and start the broker and the nodes (not waiting for them)."""
        try:
            self._network()
            self.log_dir.mkdir(parents=True, exist_ok=True)
            make_keys(self.keys, self.roles[1:], ["local"], ["local"])
            nodes_broker = self.address
            if self.delay_s > 0:
                self.proxy = DelayProxy((self.gateway, 0), (self.hosts["broker"].addr, PORT),
                                        self.delay_s)
                nodes_broker = f"tcp://{self.gateway}:{self.proxy.start()}"
            self._spawn("broker", "broker", BrokerConfig(
                model=self.model, bind=self.address, direct=self.direct, keys=str(self.keys),
                placement={"strategy": "uniform", "nodes": len(self.roles) - 1}, **self.knobs))
            for role in self.roles[1:]:
                host = self.hosts[role]
                self._spawn(role, "node", NodeConfig(
                    name=role, broker=nodes_broker, model=self.model, threads=self.threads,
                    keys=str(self.keys),
                    peer_bind=f"tcp://{host.addr}:0" if self.direct else None))
        except BaseException:
            self.stop()
            raise

    def _network(self) -> None:
        prefix = self.net.prefixlen
        _ip("ip", "link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        _ip("ip", "addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        _ip("ip", "link", "set", self.bridge, "up")
        for host in self.hosts.values():
            _ip("ip", "netns", "add", host.ns)
            self._namespaces.append(host.ns)
            _ip("ip", "link", "add", host.outside, "type", "veth", "peer", "name", host.inside)
            self._links.append(host.outside)
            _ip("ip", "link", "set", host.inside, "netns", host.ns)
            _ip("ip", "link", "set", host.outside, "master", self.bridge)
            _ip("ip", "link", "set", host.outside, "up")
            _ip("ip", "-n", host.ns, "addr", "add", f"{host.addr}/{prefix}", "dev", host.inside)
            _ip("ip", "-n", host.ns, "link", "set", host.inside, "up")
            _ip("ip", "-n", host.ns, "link", "set", "lo", "up")
        self.cap(self.rate)

    def cap(self, rate: str | None) -> None:
        """Cap every link at ``rate`` (e.g. "20mbit") in both directions; None: no cap."""
        self.rate = rate
        for host in self.hosts.values():
            for where, dev in (((), host.outside), (("-n", host.ns), host.inside)):
                if rate is None:
                    _ip("tc", *where, "qdisc", "del", "dev", dev, "root", check=False)
                else:
                    _ip("tc", *where, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                        rate, "burst", str(_burst(rate)), "latency", "100ms")

    def cut(self, role: str) -> None:
        """Cut ``role``'s link to the bridge (its end in the root namespace goes down)."""
        _ip("ip", "link", "set", self.hosts[role].outside, "down")

    def restore(self, role: str) -> None:
        _ip("ip", "link", "set", self.hosts[role].outside, "up")

    def _spawn(self, role: str, command: str, cfg: object) -> None:
        path = self.log_dir / f"{role}.yaml"
        dump(cfg, path)
        with open(self.log_dir / f"{role}.log", "wb") as log:
            self.procs[role] = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[role].ns, sys.executable, "-m",
                 "zpipe.cli.main", command, "-c", str(path)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def dead(self) -> list[str]:
        return [f"{role} (exit {p.returncode})" for role, p in self.procs.items()
                if p.poll() is not None]

    def tail(self, role: str, lines: int = 20) -> str:
        try:
            text = (self.log_dir / f"{role}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the processes (by pid: SIGTERM, then SIGKILL) and remove the namespaces and
        links this cluster made. Safe to call twice, and after a partial start."""
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self.proxy is not None:
            self.proxy.stop()
        for ns in self._namespaces:
            # Whatever still runs inside (started by these processes): by pid, then the name.
            for pid in _ip("ip", "netns", "pids", ns, check=False).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("ip", "netns", "del", ns, check=False)
        for link in self._links:  # a veth goes with its namespace; the bridge stays otherwise
            if _ip("ip", "link", "show", link, check=False):
                _ip("ip", "link", "del", link, check=False)
        self._namespaces.clear()
        self._links.clear()


# ----------------------------------------------------------------- python -m bench netns

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes "
          "Gutenberg combined movable metal type, oil-based ink and a wooden screw press.")


@dataclass
class NetnsBenchConfig:
    model: str = "smollm2"
    nodes: int = 2
    rates: tuple[str, ...] = ("1gbit", "20mbit")
    new_tokens: int = 64
    runs: int = 3
    threads: int = 1
    direct: bool = False
    delay_ms: float = 0.0  # each way between the nodes and the broker (DelayProxy)
    reference: bool = True  # transformers' greedy tokens in this process, to compare with
    log_dir: Path | None = None



def _p50(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def _rate_figures(rate: str, gens: list) -> dict:
    """The generations made under ``rate``: the client's figures and the per-node compute and
    hop times the broker measured for each token (``Generation.timings``)."""
    from zpipe.metrics import breakdown

    per_node: dict[str, dict[str, list[float]]] = {}
    for g in gens:
        figures = breakdown(g.timings)
        for name, figs in figures["nodes"].items():
            node = per_node.setdefault(name, {"compute": [], "hop": [], "prefill_hop": []})
            node["compute"].append(figs["compute"]["p50"])
            node["hop"].append(figs["hop"]["p50"])
        for name, _, hop in figures["prefill"]["stages"]:  # the prompt's activations: big
            per_node[name]["prefill_hop"].append(hop)
    return {
        "rate": rate,
        "tokens_per_s": [round(g.tokens_per_s, 3) for g in gens],
        "ttft_s": [round(g.ttft_s, 4) for g in gens],
        "new_tokens": [len(g.token_ids) for g in gens],
        "token_ids": [g.token_ids for g in gens],
        "nodes": {name: {k: _p50(v) for k, v in figs.items()}
                  for name, figs in sorted(per_node.items())},
    }


def bench(cfg: NetnsBenchConfig, progress: Callable[[str], None] = lambda m: None) -> dict:
    """``python -m bench netns``: one cluster; after a warm-up, ``runs`` rounds that each cap
    the links at every rate in turn and generate once (interleaved, so that the load of a
    shared machine falls on every rate alike); then whether every generation gave the same
    tokens, and transformers' too."""
    import asyncio
    import tempfile

    from bench.common import greedy_reference, machine_info
    from zpipe.models import resolve_model

    reason = unavailable()
    if reason:
        raise NetnsError(f"cannot run: {reason}")
    model_dir = resolve_model(cfg.model)
    cfg.model = str(model_dir)
    base = cfg.log_dir or Path(tempfile.mkdtemp(prefix="zpipe-netns-"))
    machine = machine_info()
    cluster = NetnsCluster(cfg.model, cfg.nodes, base, rate=cfg.rates[0], direct=cfg.direct,
                           threads=cfg.threads, delay_s=cfg.delay_ms / 1000)
    progress(f"namespaces {cluster.tag}: broker at {cluster.address}, nodes at "
             + ", ".join(cluster.hosts[r].addr for r in cluster.roles[1:]))
    cluster.start()
    try:
        async def run() -> tuple[list, dict]:
            async with cluster.client(timeout=600) as client:
                await client.wait_ready(timeout=600)
                warm = await client.generate(PROMPT, max_new_tokens=cfg.new_tokens)
                progress("warm-up done")
                by_rate: dict[str, list] = {r: [] for r in cfg.rates}
                for i in range(cfg.runs):
                    for rate in cfg.rates:
                        cluster.cap(rate)
                        g = await client.generate(PROMPT, max_new_tokens=cfg.new_tokens)
                        by_rate[rate].append(g)
                        progress(f"round {i + 1}/{cfg.runs}, {rate}: {g.tokens_per_s:.1f} tok/s")
                return [warm], by_rate

        warm, by_rate = asyncio.run(asyncio.wait_for(run(), 3600))
        with cluster.admin() as admin:
            metrics = admin.request("metrics")
    finally:
        cluster.stop()
    rates = [_rate_figures(rate, gens) for rate, gens in by_rate.items()]
    ids = [warm[0].token_ids, *(t for r in rates for t in r["token_ids"])]
    out = {"config": {**cfg.__dict__, "log_dir": str(base)}, "machine": machine,
           "prompt_ids": warm[0].prompt_token_ids, "rates": rates,
           "broker_metrics": {"overall": metrics["overall"], "nodes": metrics["nodes"]},
           "same_tokens_everywhere": all(t == ids[0] for t in ids)}
    if cfg.reference:
        progress("transformers' greedy tokens for the same prompt")
        want = greedy_reference(model_dir, warm[0].prompt_token_ids, cfg.new_tokens)
        out["matches_transformers"] = all(t == want for t in ids)
    machine["loadavg_after"] = machine_info()["loadavg"]
    return out


def format_bench(result: dict) -> str:
    cfg, m = result["config"], result["machine"]
    lines = [
        f"model {Path(cfg['model']).name}, {cfg['nodes']} nodes + broker, each in its own "
        f"network namespace; {'direct routing' if cfg['direct'] else 'via the broker'}; "
        f"{cfg['delay_ms']:g} ms added each way between nodes and broker; "
        f"prompt {len(result['prompt_ids'])} tokens, {cfg['new_tokens']} new tokens; "
        f"{cfg['runs']} rounds over the caps; {cfg['threads']} thread(s) per node",
        f"machine: {m['cpu']}, {m['cores']} cores; {m['date']}; load average {m['loadavg']} -> "
        f"{m.get('loadavg_after')}; git {m.get('git_commit', '?')}",
        "",
        f"{'cap':<8} {'tok/s p50':>9} {'TTFT ms':>8}  per node, p50 ms: decode compute / "
        "decode hop / prefill hop (hop: transfers and queues, as the broker measures)",
    ]
    for r in result["rates"]:
        nodes = "  ".join(f"{name} {f['compute'] * 1e3:.1f} / {f['hop'] * 1e3:.1f} / "
                          f"{f['prefill_hop'] * 1e3:.1f}" for name, f in r["nodes"].items())
        lines.append(f"{r['rate']:<8} {_p50(r['tokens_per_s']):>9.1f} "
                     f"{_p50(r['ttft_s']) * 1e3:>8.1f}  {nodes}")
    lines.append("")
    lines.append(f"same token ids in every generation: {result['same_tokens_everywhere']}"
                 + (f"; equal to transformers' greedy: {result['matches_transformers']}"
                    if "matches_transformers" in result else ""))
    return "\n".join(lines)
