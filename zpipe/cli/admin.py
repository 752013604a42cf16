"""``zpipe admin ...``: ask a running broker for its status, nodes, sessions, metrics, profile.

    zpipe admin status [--json]      nodes, placement, sessions, latency figures
    zpipe admin nodes | sessions     one table each
    zpipe admin metrics [--json]     Prometheus text (or the figures as JSON)
    zpipe admin profile [--tokens N] time per part of the whole model, per node
    zpipe admin watch [--interval S] [--count N]   a live status table
    zpipe admin plan [--strategy S] [--json]       the placement a strategy would choose now,
                                                    with predicted ms/token; nothing applied
    zpipe admin move --layers A-B --to NODE        move layers A..B (inclusive) to NODE
    zpipe admin move --layers A-B --heads G1-G2 --to NODE
                                                   move KV heads G1..G2 of stage A..B to NODE
    zpipe admin rebalance [--strategy S]           re-plan and move layers accordingly
    zpipe admin drain NODE                         move every layer off NODE (so it can leave)
    zpipe admin slow NODE --factor F               slow NODE's compute down F times (tests, demos)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import uuid
from typing import Any

DEFAULT_BROKER = "tcp://127.0.0.1:5555"
CLEAR = "\x1b[H\x1b[2J"


class AdminError(RuntimeError):
    pass


class AdminClient:
    """A DEALER socket that sends ``admin`` requests and waits for their replies."""

    def __init__(self, address: str | None = None, timeout: float = 5.0,
                 key: str | None = None, broker_key: str | None = None) -> None:
        import zmq

        from zpipe import bounds, keys

        self.address = address or os.environ.get("ZPIPE_BROKER") or DEFAULT_BROKER
        self.timeout = timeout
        pair = keys.client_keys(key, broker_key)  # an admin key, for operations that change
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        bounds.limit(self.sock, bounds.client_frame())
        if pair is not None:
            keys.connect_as(self.sock, *pair)
        self.keyed = pair is not None
        self.monitor = self.sock.get_monitor_socket(keys.HANDSHAKE_FAILED)  # a refused key
        self.sock.connect(self.address)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)

    def _no_answer(self, timeout: float) -> AdminError:
        """No answer: the broker refused the handshake (said so), or it is not answering."""
        if self.monitor.poll(0):
            what = "this key" if self.keyed else "a connection without a key (give --key FILE)"
            return AdminError(f"auth_refused: the broker at {self.address} refused {what}")
        return AdminError(f"no answer from broker at {self.address} in {timeout:g} s")

    def request(self, op: str, args: dict | None = None, timeout: float | None = None) -> dict:
        import zmq

        from zpipe import protocol

        timeout = self.timeout if timeout is None else timeout
        rid = uuid.uuid4().hex
        fields: dict[str, Any] = {"rid": rid, "op": op}
        if args:
            fields["args"] = args
        try:
            self.sock.send_multipart(protocol.encode("admin", **fields), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise self._no_answer(timeout) from None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            try:
                msg = protocol.decode(self.sock.recv_multipart())
            except protocol.ProtocolError:
                continue
            if msg.get("rid") != rid:
                continue  # a late answer to an earlier request
            if msg.kind == "error":
                raise AdminError(f"{msg['code']}: {msg['message']}")
            if msg.kind == "admin_reply":
                return msg["data"]
        raise self._no_answer(timeout)


# ---------------------------------------------------------------- formatting
def table(headers: list[str], rows: list[list]) -> str:
    """Aligned columns: text left, numbers right."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    right = [all(_NUMERIC.match(r[i]) for r in cells if r[i] != "-") and any(
        r[i] != "-" for r in cells) for i in range(len(headers))]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if rt else v.ljust(w)
                         for v, w, rt in zip(vals, widths, right, strict=True)).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in cells])


_NUMERIC = re.compile(r"^-?[0-9][0-9.,]*%?$")


def _cell(v: Any) -> str:
    return "-" if v is None else str(v)


def ms(s: float | None, digits: int = 2) -> str | None:
    return None if s is None else f"{s * 1000:.{digits}f}"


def mb(b: int | None) -> str | None:
    return None if b is None else f"{b / 1e6:.1f}"


def _q(stats: dict | None, key: str) -> float | None:
    return None if not stats else stats.get(key)


def format_nodes(nodes: list[dict]) -> str:
    rows = []
    for n in nodes:
        layers = f"{n['layers'][0]}-{n['layers'][1] - 1}" if n.get("layers") else None
        heads = f"{n['heads']} ({n['kv_heads']} kv)" if n.get("heads") else None
        rows.append([n["name"], n["host"], n["pid"], n["state"], f"{n['heartbeat_age_s']:.1f}",
                     n["device"], mb(n["mem_used"]), mb(n["mem_free"]), mb(n["kv_bytes"]),
                     mb(n.get("shadow_bytes")), mb(n.get("output_log_bytes")), layers, heads, n["tokens"], ms(_q(n["compute"], "p50")),
                     ms(_q(n["compute"], "p99")), ms(_q(n["hop"], "p50"))])
    return table(["NODE", "HOST", "PID", "STATE", "HB AGE s", "DEVICE", "USED MB", "FREE MB",
                  "KV MB", "SHADOW MB", "LOG MB", "LAYERS", "HEADS", "TOKENS", "COMPUTE p50 ms", "p99 ms",
                  "HOP p50 ms"], rows)


def format_sessions(sessions: list[dict]) -> str:
    if not sessions:
        return "no sessions running"
    rows = [[s["sid"][:12], s["rid"][:12], s["prompt_tokens"], s["tokens"],
             None if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f}",
             ms(s["ttft_s"], 1), ms(s["step_p50_s"]), f"{s['age_s']:.1f}"] for s in sessions]
    return table(["SESSION", "REQUEST", "PROMPT", "TOKENS", "TOK/S", "TTFT ms", "STEP p50 ms",
                  "AGE s"], rows)


def format_status(d: dict) -> str:
    o = d["overall"]
    p = d["placement"]
    state = "ready" if d["ready"] else f"not ready: {d['waiting_for']}"
    lines = [f"model {d['model']} ({d['num_layers']} layers), {state}"]
    if p:
        lines.append(f"placement epoch {p['epoch']}: " + _stages_text(p["stages"]))
    else:
        lines.append("no placement")
    fin = ", ".join(f"{k} {v}" for k, v in sorted(o["sessions_finished"].items())) or "none"
    lines.append(
        f"tokens {o['tokens_total']}, {o['tokens_per_s']:.1f} tok/s (last 10 s); step p50 "
        f"{_fmt_ms(_q(o['step'], 'p50'))}, p99 {_fmt_ms(_q(o['step'], 'p99'))}; ttft p50 "
        f"{_fmt_ms(_q(o['ttft'], 'p50'))}; sessions running {o['sessions_running']}, "
        f"finished: {fin}")
    lines += ["", format_nodes(d["nodes"]), "", format_sessions(d["sessions"])]
    if "reallocations" in d:
        lines += ["", format_reallocations(d["reallocations"])]
    return "\n".join(lines)


def _layers(start: int, end: int) -> str:
    return f"{start}-{end - 1}"


def _stage_text(s: dict) -> str:
    """``a[0-9]``, or for a stage split by heads ``b[10-29 h0-1]+c[10-29 h2]``."""
    layers = _layers(s["start"], s["end"])
    heads = s.get("heads")
    if not isinstance(heads, list) or not heads:
        return f"{s['node']}[{layers}]"
    return "+".join(f"{m[0]}[{layers} h{m[1]}" + (f"-{m[2] - 1}]" if m[2] - m[1] > 1 else "]")
                    for m in heads)


def _stages_text(stages: Any) -> str:
    """``a[0-9] b[10-29]`` from a list of stage dicts; anything else as it is."""
    if isinstance(stages, dict) and "stages" in stages:
        stages = stages["stages"]
    if isinstance(stages, list) and all(
            isinstance(s, dict) and {"node", "start", "end"} <= set(s) for s in stages):
        return " ".join(_stage_text(s) for s in stages) or "-"
    return "-" if stages is None else str(stages)


def format_reallocations(records: list[dict]) -> str:
    if not records:
        return "no reallocations"
    rows = []
    for r in records:
        t = r.get("time")
        when = time.strftime("%H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else t
        ok = r.get("ok")
        result = "ok" if ok else f"failed: {r.get('error') or '?'}" if ok is not None else None
        rows.append([when, r.get("reason"), _recovery_text(r), _stages_text(r.get("before")),
                     _stages_text(r.get("after")), mb(r.get("kv_bytes")),
                     ms(r.get("pause_s")), result])
    return table(["TIME", "REASON", "SEEN / RESTORED", "BEFORE", "AFTER", "KV MB", "PAUSE ms",
                  "RESULT"], rows)


def _recovery_text(r: dict) -> str:
    """How a recovery saw the loss (after how long a silence) and how it restored the KV."""
    if not r.get("seen_by"):
        return "-"
    silent = r.get("silent_s")
    after = f" after {ms(silent, 0)} ms" if isinstance(silent, (int, float)) else ""
    return f"{r['seen_by']}{after}; {r.get('restored') or '-'}"


def _plan_table(p: dict) -> str:
    rows = [[s["node"] if not s.get("heads") else "+".join(m[0] for m in s["heads"]),
             _layers(s["start"], s["end"]), s["layers"], ms(s["predicted_s"], 3),
             ms(s.get("measured_s"), 3), mb(s["weight_bytes"]), mb(s["kv_bytes"]),
             mb(s["memory_bytes"]), mb(s["budget_bytes"])] for s in p["stages"]]
    return table(["NODE", "LAYERS", "N", "PRED ms/tok", "MEASURED ms", "WEIGHTS MB", "KV MB",
                  "NEEDED MB", "BUDGET MB"], rows)


def format_plan(d: dict) -> str:
    cur, new = d["current"], d["proposed"]
    out = [f"plan: strategy {d['strategy']}, perf weight {d['perf_weight']:g}, KV budget "
           f"{d['context_len']} tokens × {d['sessions']} sessions (nothing applied)", ""]
    if cur is not None:
        out += [f"current (epoch {d['epoch']}): step {_fmt_ms(cur['step_s'])}, bottleneck "
                f"{_fmt_ms(cur['bottleneck_s'])}", _plan_table(cur), ""]
    else:
        out += ["current: no placement", ""]
    out += [f"proposed ({new['strategy']}): step {_fmt_ms(new['step_s'])}, bottleneck "
            f"{_fmt_ms(new['bottleneck_s'])}", _plan_table(new)]
    out += [f"note: {n}" for n in new.get("notes", [])]
    if not d["changed"]:
        out.append("the proposed placement is the current one")
    elif d["gain"] is not None:
        verdict = ("worth a move" if d["worth_it"] else
                   f"not worth a move (< {d['min_gain'] * 100:g}% gain)")
        out.append(f"predicted bottleneck {d['gain'] * 100:+.1f}% faster: {verdict}")
    return "\n".join(out)


def _fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.2f} ms"


def format_profile(d: dict) -> str:
    errors = any(r.get("error") for r in d["parts"])
    rows = []
    for r in d["parts"]:
        share = r.get("decode_share")
        rows.append([r["part"], r["node"], ms(r["prefill_s"], 3), ms(r["decode_s"], 3),
                     None if share is None else f"{share * 100:.1f}%"]
                    + ([r.get("error", "")] if errors else []))
    t = d["total"]
    rows.append(["total", "", ms(t["prefill_s"], 3), ms(t["decode_s"], 3), "100.0%"]
                + ([""] if errors else []))
    headers = ["PART", "NODE", "PREFILL ms", "DECODE ms", "SHARE"] + (["ERROR"] if errors else [])
    out = [f"profile: prefill of {d['tokens']} tokens (PREFILL: all of them), decode of one "
           "token (DECODE: mean per step)", "", table(headers, rows), ""]
    nrows = [[n["node"], f"{n['start']}-{n['end'] - 1}", mb(n.get("weight_bytes")),
              mb(n.get("kv_bytes")), mb(n.get("rss")), mb(n.get("device_mem")),
              "ok" if n["ok"] else n.get("error")] for n in d["nodes"]]
    out.append(table(["NODE", "LAYERS", "WEIGHTS MB", "KV MB", "RSS MB", "DEVICE MB", "STATUS"],
                     nrows))
    return "\n".join(out)


# ---------------------------------------------------------------- commands
def _client(args: argparse.Namespace, default_timeout: float = 5.0) -> AdminClient:
    t = args.timeout if args.timeout is not None else default_timeout
    return AdminClient(args.broker, t, args.key, args.broker_key)


def _print(args: argparse.Namespace, data: dict, fmt: Any) -> None:
    print(json.dumps(data, indent=2) if args.json else fmt(data))


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(args, c.request("status"), format_status)
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    with _client(args) as c:
        data = c.request("nodes")
    _print(args, data, lambda d: format_nodes(d["nodes"]))
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    with _client(args) as c:
        data = c.request("sessions")
    _print(args, data, lambda d: format_sessions(d["sessions"]))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    with _client(args) as c:
        data = c.request("metrics")
    if args.json:
        print(json.dumps({k: v for k, v in data.items() if k != "text"}, indent=2))
    else:
        sys.stdout.write(data["text"])
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    with _client(args, default_timeout=args.node_timeout + 5) as c:
        data = c.request("profile", {"tokens": args.tokens, "timeout": args.node_timeout})
    _print(args, data, format_profile)
    return 0 if data["complete"] else 1


def cmd_watch(args: argparse.Namespace) -> int:
    n = 0
    with _client(args) as c:
        try:
            while args.count is None or n < args.count:
                if n:
                    time.sleep(args.interval)
                try:
                    body = format_status(c.request("status"))
                except AdminError as e:
                    body = f"zpipe admin: {e}"
                sys.stdout.write(f"{CLEAR}{time.strftime('%H:%M:%S')}  {c.address}\n\n{body}\n")
                sys.stdout.flush()
                n += 1
        except KeyboardInterrupt:
            print()
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    with _client(args) as c:
        data = c.request("plan", {"strategy": args.strategy} if args.strategy else None)
    _print(args, data, format_plan)
    return 0


def format_record(d: dict) -> str:
    if "before" not in d and "after" not in d:
        return json.dumps(d)
    lines = [f"{d.get('reason', '')}: " + ("ok" if d.get("ok", True) else
                                           f"failed: {d.get('error')}"),
             f"  before: {_stages_text(d.get('before'))}",
             f"  after:  {_stages_text(d.get('after'))}"]
    if d.get("kv_bytes") is not None or d.get("pause_s") is not None:
        lines.append(f"  KV moved {mb(d.get('kv_bytes')) or '-'} MB, pause "
                     f"{ms(d.get('pause_s')) or '-'} ms")
    return "\n".join(lines)


def _act(op: str, payload: dict) -> Any:
    def run(args: argparse.Namespace) -> int:
        with _client(args, default_timeout=ACT_TIMEOUT_S) as c:
            data = c.request(op, payload(args))
        _print(args, data, format_record)
        return 0 if data.get("ok", True) else 1

    return run


ACT_TIMEOUT_S = 150.0  # longer than the broker's default move_timeout_s (60 s) and a rollback


def _layer_range(s: str) -> str:
    from zpipe.config import parse_layers

    try:
        parse_layers(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s.strip()


def _factor(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
    if not (v > 0 and v <= 1000):
        raise argparse.ArgumentTypeError(f"must be > 0 and ≤ 1000, got {s}")
    return v


def _node_name(s: str) -> str:
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", s):
        raise argparse.ArgumentTypeError(f"not a node name: {s!r}")
    return s


STRATEGIES = ("uniform", "memory", "compute", "mixed", "custom")


def _guarded(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except AdminError as e:
            print(f"zpipe admin: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130

    return run


def _positive(kind: type) -> Any:
    def parse(s: str) -> Any:
        v = kind(s)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v

    return parse


def add_key_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--key", default=None,
                   help="CURVE secret key file (default $ZPIPE_KEY; see zpipe keys)")
    q.add_argument("--broker-key", default=None, help="the broker's public key file (default "
                   "$ZPIPE_BROKER_KEY, or broker.key beside --key or one folder up)")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("admin", help="inspect a running cluster",
                              description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="admin_command", required=True)

    def cmd(name: str, fn: Any, help_: str, json_flag: bool = True) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help_)
        q.add_argument("--broker", default=None,
                       help="broker address (default $ZPIPE_BROKER or tcp://127.0.0.1:5555)")
        q.add_argument("--timeout", type=_positive(float), default=None,
                       help="seconds to wait for the broker (default 5)")
        add_key_args(q)
        if json_flag:
            q.add_argument("--json", action="store_true", help="print JSON")
        q.set_defaults(func=_guarded(fn))
        return q

    cmd("status", cmd_status, "nodes, placement, sessions and latency figures")
    cmd("nodes", cmd_nodes, "the stage nodes")
    cmd("sessions", cmd_sessions, "the running sessions")
    cmd("metrics", cmd_metrics, "Prometheus text (--json: the figures as JSON)")
    q = cmd("profile", cmd_profile, "time per part (embed, each layer, norm, lm_head) per node")
    q.add_argument("--tokens", type=_positive(int), default=16, help="prefill length (16)")
    q.add_argument("--node-timeout", type=_positive(float), default=10.0,
                   help="seconds the broker waits for the nodes (10)")
    q = cmd("watch", cmd_watch, "a live status table until Ctrl-C", json_flag=False)
    q.add_argument("--interval", type=_positive(float), default=1.0, help="seconds (1)")
    q.add_argument("--count", type=_positive(int), default=None, help="stop after N redraws")
    q = cmd("plan", cmd_plan, "the placement a strategy would choose now (nothing applied)")
    q.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="default: the broker's placement strategy")
    q = cmd("move", _act("move", lambda a: {"layers": a.layers, "to": a.to,
                                            **({"heads": a.heads} if a.heads else {})}),
            "move a layer range (inclusive), or KV heads of a stage, to a node")
    q.add_argument("--layers", required=True, type=_layer_range, metavar="A-B",
                   help="layers A to B inclusive, e.g. 10-14")
    q.add_argument("--heads", type=_layer_range, metavar="G1-G2", default=None,
                   help="KV heads G1 to G2 inclusive of the stage of exactly those layers, "
                        "moved with their KV (to a member they adjoin, or a node holding "
                        "nothing)")
    q.add_argument("--to", required=True, type=_node_name, metavar="NODE", help="target node")
    q = cmd("rebalance", _act("rebalance", lambda a: {"strategy": a.strategy} if a.strategy
                              else {}), "re-plan with a strategy and move layers")
    q.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="default: the broker's placement strategy")
    q = cmd("drain", _act("drain", lambda a: {"node": a.node}),
            "move every layer off a node so it can leave")
    q.add_argument("node", type=_node_name, metavar="NODE")
    q = cmd("slow", _act("slow", lambda a: {"node": a.node, "factor": a.factor}),
            "slow a node's compute down by a factor (1: normal speed)")
    q.add_argument("node", type=_node_name, metavar="NODE")
    q.add_argument("--factor", required=True, type=_factor, metavar="F",
                   help="compute takes F times as long (0 < F ≤ 1000)")
