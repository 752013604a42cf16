"""Running an asyncio program on uvloop where it is available."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:  # uvloop is optional where it does not build
        return asyncio.run(coro)
    return uvloop.run(coro)
