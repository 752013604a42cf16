"""zpipe: one Llama-family model served across several processes or machines.

The public names are importable from here (``from zpipe import Client``); they load on first
use, so the broker and node processes do not import the client and vice versa.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("zpipe")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    "Client": "zpipe.client",
    "Generation": "zpipe.client",
    "TokenChunk": "zpipe.client",
    "ZpipeError": "zpipe.client",
    "BrokerConfig": "zpipe.config",
    "NodeConfig": "zpipe.config",
    "ClusterConfig": "zpipe.config",
    "ConfigError": "zpipe.config",
    "load_config": "zpipe.config",
}

__all__ = ["BrokerConfig", "Client", "ClusterConfig", "ConfigError", "Generation", "NodeConfig",
           "TokenChunk", "ZpipeError", "__version__", "load_config"]

if TYPE_CHECKING:
    from zpipe.client import Client, Generation, TokenChunk, ZpipeError
    from zpipe.config import BrokerConfig, ClusterConfig, ConfigError, NodeConfig
    from zpipe.config import load as load_config


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zpipe' has no attribute {name!r}")
    return getattr(import_module(module), "load" if name == "load_config" else name)


def __dir__() -> list[str]:
    return sorted(__all__)
