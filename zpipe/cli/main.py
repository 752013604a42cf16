"""The ``zpipe`` command line: broker, node, up, generate, chat, serve, model, admin, keys."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

# Idle OpenMP threads must sleep, not spin: a broker and several nodes share the same cores,
# and spinning threads of an idle stage steal the CPU from the stage that is computing.
# (Set before anything imports torch.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from zpipe.cli.admin import add_key_args  # noqa: E402
from zpipe.config import BrokerConfig, ConfigError, NodeConfig, load  # noqa: E402


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def _cmd_broker(args: argparse.Namespace) -> int:
    from brokers.broker import run_broker

    cfg = load(args.config, BrokerConfig) if args.config else BrokerConfig()
    if args.bind:
        cfg.bind = args.bind
    run_broker(cfg)
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    from nodes.node import run_node

    cfg = load(args.config, NodeConfig)
    if args.broker:
        cfg.broker = args.broker
    run_node(cfg)
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from zpipe.cli.up import run_up

    return run_up(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from zpipe.cli.generate import run_generate

    return run_generate(args)


def _cmd_chat(args: argparse.Namespace) -> int:
    from zpipe.cli.generate import run_chat

    return run_chat(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from zpipe.serve.app import run_serve

    return run_serve(args.broker or os.environ.get("ZPIPE_BROKER"), args.bind,
                     args.api_key or os.environ.get("ZPIPE_API_KEY"), args.key, args.broker_key)


def _nonneg_float(s: str) -> float:
    v = float(s)
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _top_p(s: str) -> float:
    v = float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def _penalty(lo: float, hi: float, open_lo: bool = False) -> Callable[[str], float]:
    def parse(s: str) -> float:
        v = float(s)
        if not ((lo < v) if open_lo else (lo <= v)) or not v <= hi:
            raise argparse.ArgumentTypeError(f"must be in {'(' if open_lo else '['}{lo}, {hi}], "
                                             f"got {s}")
        return v
    return parse


def add_sampling_args(p: argparse.ArgumentParser, chat: bool = False) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=_nonneg_float, default=None,
                   help="0 = greedy; default: the model's generation_config, else temperature "
                        "0.7, top-p 0.9, repetition penalty 1.1" if chat else
                        "0 = greedy (default)")
    p.add_argument("--top-k", type=_nonneg_int, default=None, help="0 = off")
    p.add_argument("--top-p", type=_top_p, default=None)
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--frequency-penalty", type=_penalty(-2, 2), default=None,
                   help="OpenAI's, in [-2, 2]")
    p.add_argument("--presence-penalty", type=_penalty(-2, 2), default=None,
                   help="OpenAI's, in [-2, 2]")
    p.add_argument("--repetition-penalty", type=_penalty(0, 10, open_lo=True), default=None,
                   help="transformers', in (0, 10]; 1 = off")
    p.add_argument("--broker", default=None,
                   help="broker address (default $ZPIPE_BROKER or tcp://127.0.0.1:5555)")
    add_key_args(p)


def _cmd_keys(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zpipe.keys import make_keys

    def names(s: str | None) -> list[str]:
        return [n for n in (s or "").split(",") if n]

    made = make_keys(Path(args.dir), names(args.nodes), names(args.clients), names(args.admins))
    for path in made:
        print(f"made {path}")
    print(f"{len(made)} new key pairs in {args.dir} (existing ones kept)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from zpipe.cli import admin as admin_cli
    from zpipe.cli import model as model_cli

    parser = argparse.ArgumentParser(prog="zpipe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run a broker")
    p.add_argument("-c", "--config", help="broker YAML (default: built-in defaults)")
    p.add_argument("--bind", help="override the bind address")
    p.set_defaults(func=_cmd_broker)

    p = sub.add_parser("node", help="run a stage node")
    p.add_argument("-c", "--config", required=True, help="node YAML")
    p.add_argument("--broker", help="override the broker address")
    p.set_defaults(func=_cmd_node)

    p = sub.add_parser("keys", help="make CURVE key pairs: the broker's and the named ones")
    p.add_argument("dir", help="key directory (YAML: keys: DIR)")
    p.add_argument("--nodes", help="node names, comma-separated (a node's key is its name's)")
    p.add_argument("--clients", help="client names, comma-separated")
    p.add_argument("--admins", help="admin names, comma-separated")
    p.set_defaults(func=_cmd_keys)

    p = sub.add_parser("up", help="start a whole local cluster from a cluster YAML")
    p.add_argument("file", help="cluster YAML, e.g. configs/local.yaml")
    p.add_argument("--prompt", help="answer this prompt, print a latency summary, then stop")
    p.add_argument("--chat", action="store_true", help="send --prompt through the chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--logs", help="directory for the children's logs (default: a temp dir)")
    p.add_argument("--ready-timeout", type=_nonneg_float, default=600.0)
    p.add_argument("--http", metavar="HOST:PORT",
                   help="also serve the OpenAI-compatible HTTP API and dashboard there")
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    add_sampling_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, streamed")
    p.add_argument("--system", help="a system message")
    add_sampling_args(p, chat=True)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP API and dashboard for a broker")
    p.add_argument("--broker", default=None,
                   help="broker address (default $ZPIPE_BROKER or tcp://127.0.0.1:5555)")
    p.add_argument("--bind", default="127.0.0.1:8000", help="HOST:PORT (default %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require this bearer token (default $ZPIPE_API_KEY; none: open)")
    add_key_args(p)  # a CURVE cluster: an admin key also serves the dashboard and /metrics
    p.set_defaults(func=_cmd_serve)

    model_cli.add_parser(sub)
    admin_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if getattr(args, "broker", None) is None and args.command in ("generate", "chat"):
        args.broker = os.environ.get("ZPIPE_BROKER")
    try:
        code = args.func(args)
    except ConfigError as e:
        print(f"zpipe: bad config:\n{e}", file=sys.stderr)
        code = 2
    except LookupError as e:  # a model that is not there, with what to do about it
        print(f"zpipe: {e.args[0] if e.args else e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
