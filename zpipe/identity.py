"""A model's identity: what a node and the broker compare, so that no node serves another model.

``model_identity`` is a flat dict of the config fields that shape the computation (the
architecture and every dimension) plus ``weights``, a short hash of the safetensors files:
each file's name, its header (tensor names, dtypes, shapes, offsets) and a sample of its data,
``SAMPLES`` chunks of ``CHUNK`` bytes spread evenly over it (all of it when smaller). The
config fields catch another architecture or size; the hash catches another checkpoint of the
same architecture (a fine-tune, another seed), which changes every weight matrix. It reads at
most ~256 KiB per file and needs no torch. The same checkpoint stored in another dtype hashes
differently: the broker refuses it, the safe side, as its numerics differ too.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from zpipe import synth
from zpipe.shard import ModelSpec

SAMPLES = 64
CHUNK = 4096
# (identity key, config attribute); the config's values are ints, floats or strings.
CONFIG_FIELDS = (
    ("model_type", "model_type"), ("num_layers", "num_hidden_layers"),
    ("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
    ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
    ("head_dim", "head_dim"), ("vocab_size", "vocab_size"), ("rms_norm_eps", "rms_norm_eps"),
    ("tie_word_embeddings", "tie_word_embeddings"),
)


def model_identity(spec: ModelSpec) -> dict[str, Any]:
    """The identity of the model ``spec`` was loaded from (see the module docstring)."""
    c = spec.config
    out: dict[str, Any] = {key: getattr(c, attr, None) for key, attr in CONFIG_FIELDS}
    out["architecture"] = (getattr(c, "architectures", None) or [""])[0]
    out["head_dim"] = spec.head_dim  # derived when the config leaves it out
    # newer transformers keep it in ``rope_parameters``, older ones as ``rope_theta``
    out["rope_theta"] = (getattr(c, "rope_parameters", None) or {}).get(
        "rope_theta", getattr(c, "rope_theta", None))
    out["weights"] = weights_hash(spec.model_dir)
    return out


def weights_hash(model_dir: Path) -> str:
    """16 hex digits over each safetensors file's name, header and a sample of its data (of a
    seeded synth: over its recipe, which makes every tensor)."""
    h = hashlib.sha256()
    recipe = synth.seeded(Path(model_dir))
    if recipe is not None:
        h.update(json.dumps({k: recipe[k] for k in ("preset", "dtype", "seed")}).encode())
        return h.hexdigest()[:16]
    for path in _weight_files(Path(model_dir)):
        size = path.stat().st_size
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = f.read(n)
            data = size - 8 - n
            h.update(path.name.encode() + b"\0" + header)
            if data <= SAMPLES * CHUNK:
                h.update(f.read())
                continue
            stride = (data - CHUNK) // (SAMPLES - 1)
            for i in range(SAMPLES):
                f.seek(8 + n + i * stride)
                h.update(f.read(CHUNK))
    return h.hexdigest()[:16]


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = set(json.loads(index.read_text())["weight_map"].values())
        return [model_dir / name for name in sorted(names)]
    return [model_dir / "model.safetensors"]


def differences(ours: dict[str, Any], theirs: dict) -> list[str]:
    """What differs, as ``"key value (this broker: value)"``, for every key of ``ours``;
    ``theirs`` is untrusted (a node's register), so its values are shown cut short."""
    return [f"{key} {_short(theirs.get(key, '(none)'))} (this broker: {_short(value)})"
            for key, value in ours.items() if theirs.get(key) != value]


def _short(v: object) -> str:
    text = v if isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
