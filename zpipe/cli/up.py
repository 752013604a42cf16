"""``zpipe up FILE``: start a cluster file's broker and nodes as child processes.

It waits until every node has loaded its layers, then either answers ``--prompt`` and stops,
or keeps the cluster up until Ctrl-C / SIGTERM, starting again a child that exits (the broker's
recovery takes a restarted node back into service); one that exits more than
``RESTARTS_PER_MINUTE`` times in a minute stops the cluster. Every child is stopped by its pid on
the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from zpipe import aio
from zpipe.client import Client, ZpipeError
from zpipe.config import ClusterConfig, ConfigError, dump, load, local_address
from zpipe.keys import keys_command, make_keys
from zpipe.models import resolve_model

LOCAL = "local"  # the client and admin keys ``up`` makes for this machine
RESTARTS_PER_MINUTE = 5  # a child that exits more often than this is not started again


class Cluster:
    """The child processes of one cluster file, started and stopped together."""

    def __init__(self, cfg: ClusterConfig, log_dir: Path,
                 restarts_per_minute: int = RESTARTS_PER_MINUTE) -> None:
        self.cfg = cfg
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.commands: dict[str, str] = {}  # child -> its zpipe command ("broker", "node")
        self.restarts_per_minute = restarts_per_minute
        self.restarted: dict[str, deque[float]] = {}  # child -> its restarts' monotonic times

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._spawn("broker", "broker", self.cfg.broker_config())
        for node in self.cfg.node_configs():
            self._spawn(f"node-{node.name}", "node", node)

    def _spawn(self, name: str, command: str, cfg: object) -> None:
        dump(cfg, self.log_dir / f"{name}.yaml")
        self.commands[name] = command
        self.procs.append((name, self._launch(name, "wb")))

    def _launch(self, name: str, mode: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", mode)
        # Own session: a Ctrl-C reaches only ``up``, which then stops the children in order.
        proc = subprocess.Popen(
            [sys.executable, "-m", "zpipe.cli.main", self.commands[name], "-c",
             str(self.log_dir / f"{name}.yaml")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return proc

    def serve_http(self, broker: str, bind: str, key: str | None = None) -> None:
        """Start ``zpipe serve`` for this cluster's broker (stopped with the rest); ``key``:
        the admin key ``up`` itself uses under CURVE."""
        log = open(self.log_dir / "serve.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "zpipe.cli.main", "serve", "--broker", broker, "--bind", bind,
             *(["--key", key] if key else [])],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(("serve", proc))

    def dead(self) -> list[str]:
        return [f"{name} (exit {p.returncode})" for name, p in self.procs if p.poll() is not None]

    def restart_exited(self, now: float, killed_only: bool = False) -> tuple[list[str], list[str]]:
        """Start again every child that exited (its log goes on in the same file), unless it
        was restarted ``restarts_per_minute`` times in the minute before ``now`` (monotonic).
        ``killed_only``: only those a signal ended; one that exited on its own is left as it is.
        Returns the children restarted and those left exited, as ``dead`` names them."""
        restarted, left = [], []
        for i, (name, p) in enumerate(self.procs):
            if p.poll() is None or name not in self.commands:
                continue
            what = f"{name} (exit {p.returncode})"
            times = self.restarted.setdefault(name, deque())
            while times and now - times[0] > 60:
                times.popleft()
            if (killed_only and p.returncode >= 0) or len(times) >= self.restarts_per_minute:
                left.append(what)
                continue
            times.append(now)
            self.procs[i] = (name, self._launch(name, "ab"))
            restarted.append(what)
        return restarted, left

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name.split(' ')[0]}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def local_keys(cfg: ClusterConfig) -> str | None:
    """With ``keys`` set: make the key pairs this cluster needs where missing (the broker's,
    each node's, and client and admin ``local``); ``up`` speaks to the broker as admin
    ``local``. Returns that admin's secret key file."""
    if cfg.broker.keys is None:
        return None
    root = Path(cfg.broker.keys)
    made = make_keys(root, [n.name for n in cfg.nodes], [LOCAL], [LOCAL])
    if made:
        print(f"[zpipe up] made {len(made)} CURVE key pairs in {root} (as `"
              f"{keys_command(root, [n.name for n in cfg.nodes], [LOCAL], [LOCAL])}` does)",
              file=sys.stderr)
    return str(root / "admins" / f"{LOCAL}.key_secret")


async def _wait_ready(cluster: Cluster, address: str, timeout: float,
                      key: str | None = None) -> dict:
    async with Client(address, key=key) as client:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            # A child that exits with an error while starting is misconfigured: stop and show
            # why. One a signal killed (the OOM killer, an operator) is started again, as later.
            restarted, dead = cluster.restart_exited(time.monotonic(), killed_only=True)
            for what in restarted:
                print(f"[zpipe up] {what} stopped; started it again", file=sys.stderr)
            if dead:
                details = "\n".join(f"--- {d}:\n{cluster.tail(d)}" for d in dead)
                raise ZpipeError("child_died", f"{', '.join(dead)} stopped early\n{details}")
            try:
                info = await client.info(timeout=1.0)
                if info["ready"]:
                    return info
                status = info["waiting_for"]
            except ZpipeError:
                status = "starting the broker"
            if status != last:
                print(f"[zpipe up] {status}", file=sys.stderr)
                last = status
            if time.monotonic() > deadline:
                raise ZpipeError("timeout", f"not ready after {timeout:.0f} s: {status}")
            await asyncio.sleep(0.25)


async def _answer(address: str, args: argparse.Namespace, key: str | None) -> None:
    from zpipe.cli.generate import latency_report, stream_to_stdout

    async with Client(address, key=key) as client:
        gen = await stream_to_stdout(client, args.prompt, args.chat,
                                     {"max_new_tokens": args.max_new_tokens})
    print(latency_report(gen))


def run_up(args: argparse.Namespace) -> int:
    cfg = load(args.file, ClusterConfig)
    resolve_model(cfg.model)  # fail here, clearly, rather than in every child
    try:
        cfg.pinned_cpus()  # enough CPUs here for pin_cpus
    except ConfigError as e:
        raise ConfigError(f"{args.file}: {e}") from None
    log_dir = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="zpipe-up-"))
    address = local_address(cfg.broker.bind)
    key = local_keys(cfg)
    cluster = Cluster(cfg, log_dir)

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    print(f"[zpipe up] starting a broker and {len(cfg.nodes)} nodes; logs in {log_dir}",
          file=sys.stderr)
    cluster.start()
    try:
        info = aio.run(_wait_ready(cluster, address, args.ready_timeout, key))
        stages = ", ".join(f"{s['node']}[{s['start']}-{s['end'] - 1}]" for s in info["placement"])
        print(f"[zpipe up] ready at {address}: {stages}", file=sys.stderr)
        if args.http:
            cluster.serve_http(address, args.http, key)
            print(f"[zpipe up] OpenAI-compatible API and dashboard on http://{args.http}/",
                  file=sys.stderr)
        if args.prompt:
            aio.run(_answer(address, args, key))
            return 0
        if key is not None:
            print(f"[zpipe up] CURVE on: clients pass a key, e.g. `zpipe generate --key "
                  f"{Path(key).parent.parent / 'clients' / LOCAL}.key_secret --broker "
                  f"{address} 'Hello'`", file=sys.stderr)
        print("[zpipe up] Ctrl-C stops the cluster", file=sys.stderr)
        while True:
            time.sleep(0.5)
            restarted, left = cluster.restart_exited(time.monotonic())
            for what in restarted:
                print(f"[zpipe up] {what} stopped; started it again", file=sys.stderr)
            if left:
                print(f"[zpipe up] {', '.join(left)} stopped more than "
                      f"{cluster.restarts_per_minute} times in a minute; stopping the rest",
                      file=sys.stderr)
                return 1
    except ZpipeError as e:
        print(f"[zpipe up] {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        print("[zpipe up] stopping", file=sys.stderr)
        cluster.stop()
