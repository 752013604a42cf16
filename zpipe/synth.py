"""Random-weight Llama model dirs with real shapes, for tests and speed work without downloads.

A synth either writes its weights (safetensors, like any model dir) or is *seeded*: the dir
holds the config and tokenizer only, and whoever loads a tensor makes it from the seed and its
name (``tensor``), the same values a written synth holds. A node of a 70B-shaped model then
builds just its own layers, with nothing on disk (``zpipe.models.resolve_model("synth:NAME")``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

from zpipe.models import Progress, is_complete, read_marker, write_marker

__all__ = ["PRESETS", "DTYPES", "synth", "build_tokenizer", "seeded", "tensor", "tensor_shapes",
           "hf_model"]

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
BLOCK = 1 << 22  # elements of a synth tensor made from one seed (``tensor``)
SHARD_BYTES = 2 * 1024**3  # max bytes per safetensors shard (bounds RAM while writing)
DTYPES = ("float32", "bfloat16", "float16")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# LlamaConfig kwargs per preset; rope goes in `rope_parameters` as transformers 5 expects.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_hidden_layers=6, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=512, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
    "llama-3.2-1b": dict(
        num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
        rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "llama-3-8b": dict(
        num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
    "llama-3-70b": dict(
        num_hidden_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
        head_dim=128, intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
}


def build_tokenizer(vocab_size: int, model_max_length: int = 2048) -> Any:
    """Byte-level tokenizer: ids 0-255 are bytes, then BOS/EOS, then ``<t{id}>`` fillers.

    No merges, so any text round-trips; fillers are plain vocab entries so every id decodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    n_fixed = 256 + 2
    if vocab_size < n_fixed:
        raise ValueError(f"vocab_size must be >= {n_fixed}")
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet(),
                                                 key=_byte_of))}
    vocab[BOS], vocab[EOS] = 256, 257
    vocab.update({f"<t{i}>": i for i in range(n_fixed, vocab_size)})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    # Like Llama 3: plain encoding prepends BOS (the chat template adds its own).
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 256)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS,
                                  model_max_length=model_max_length)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _byte_of(ch: str) -> int:
    """Byte value that a ByteLevel alphabet char stands for (GPT-2's bytes_to_unicode)."""
    o = ord(ch)
    if 33 <= o <= 126 or 161 <= o <= 172 or 174 <= o <= 255:
        return o
    # The remaining bytes were mapped, in order, to 256, 257, ...; undo that.
    rest = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
    return rest[o - 256]


def _tensor_plan(c: Any) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes, in file order."""
    h, hd, inter = c.hidden_size, c.head_dim, c.intermediate_size
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    plan: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (c.vocab_size, h))]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        plan += [
            (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]
    plan.append(("model.norm.weight", (h,)))
    if not c.tie_word_embeddings:
        plan.append(("lm_head.weight", (c.vocab_size, h)))
    return plan


def tensor(name: str, shape: tuple[int, ...], dtype: str, seed: int) -> Any:
    """Synth tensor ``name``: norms are ones, the rest N(0, 0.02) seeded by ``seed`` and the
    name alone (so it does not depend on sharding or on who makes it), rounded to ``dtype``.
    Made in blocks of ``BLOCK`` elements, each with its own seed, on every core at once (a
    70B node's 10 layers are 8.6 billion elements)."""
    import math
    from concurrent.futures import ThreadPoolExecutor

    import torch

    tdtype = getattr(torch, dtype)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=tdtype)
    flat = torch.empty(math.prod(shape), dtype=torch.float32)
    blocks = flat.split(BLOCK)

    def fill(i: int) -> None:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}#{i}".encode()))
        blocks[i].normal_(0.0, 0.02, generator=g)  # torch lets the GIL go meanwhile

    if len(blocks) == 1:
        fill(0)
    else:
        with ThreadPoolExecutor(min(len(blocks), os.cpu_count() or 1)) as pool:
            list(pool.map(fill, range(len(blocks))))
    return flat.view(shape).to(tdtype)


def seeded(model_dir: Path) -> dict[str, Any] | None:
    """The recipe (``preset``, ``dtype``, ``seed``) of a seeded synth dir; None for any other."""
    if not is_complete(model_dir):
        return None
    marker = read_marker(model_dir)
    return marker if marker.get("weights") == "seeded" else None


def tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every weight of the Llama model in ``model_dir`` and its shape, from its config."""
    from transformers import AutoConfig

    return dict(_tensor_plan(AutoConfig.from_pretrained(model_dir)))


def hf_model(model_dir: Path, dtype: Any, device: str = "cpu",
             device_map: str | None = None) -> Any:
    """transformers' ``LlamaForCausalLM`` of a synth dir, written or seeded (its tensors made
    here, one at a time, on the CPU and then moved to ``device``), in eval mode.
    ``device_map="auto"``: layers spread over the GPUs, as ``from_pretrained`` does it
    (accelerate's device map and hooks)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    recipe = seeded(model_dir)
    if recipe is None:
        if device_map is not None:
            return LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                    device_map=device_map).eval()
        return LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    placed: dict[str, Any] = {}
    if device_map is not None:
        from accelerate import infer_auto_device_map

        placed = infer_auto_device_map(model, no_split_module_classes=["LlamaDecoderLayer"],
                                       dtype=dtype)

    def device_of(name: str) -> Any:
        if device_map is None:
            return device
        parts = name.split(".")
        for i in range(len(parts), -1, -1):
            where = placed.get(".".join(parts[:i]))
            if where is not None:
                return f"cuda:{where}" if isinstance(where, int) else where
        return "cpu"

    shapes = tensor_shapes(model_dir)
    state = {}
    for name in model.state_dict():
        if name in shapes:
            state[name] = tensor(name, shapes[name], recipe["dtype"], recipe["seed"]).to(
                device=device_of(name), dtype=dtype)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    # buffers made on the meta device (rotary inv_freq) are made again on the real one
    with torch.device(device_of("model.rotary_emb")):
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    if device_map is None:
        return model.to(dtype).eval()
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=placed).eval()


def _write_weights(config: Any, out: Path, dtype: str, seed: int, progress: Progress) -> None:
    """Generate tensors one at a time into shards of <= SHARD_BYTES, so RAM stays bounded."""
    import math

    import torch
    from safetensors.torch import save_file

    tdtype = getattr(torch, dtype)
    esize = torch.empty((), dtype=tdtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in _tensor_plan(config):
        nbytes = math.prod(shape) * esize
        if shards[-1] and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else \
        [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for fname, shard in zip(files, shards, strict=True):
        progress(f"writing {fname} ({len(shard)} tensors)")
        tensors = {}
        for name, shape in shard:
            tensors[name] = t = tensor(name, shape, dtype, seed)
            weight_map[name] = fname
            total += t.numel() * esize
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        (out / fname).chmod(0o644)  # safetensors creates files 0600
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def synth(preset: str, out: Path, dtype: str = "float32", seed: int = 0,
          progress: Progress = print, weights: bool = True) -> Path:
    """Write a random-weight Llama HF dir for ``preset`` to ``out`` (atomically); return it.
    ``weights=False``: a seeded synth, without weight files (see the module docstring).

    Refuses a non-empty ``out`` unless it is an earlier synth of the same preset; an
    identical earlier synth (same dtype, seed and kind) is reused as is.
    """
    kind = "written" if weights else "seeded"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    out = Path(out).expanduser().absolute()
    source = f"synth:{preset}"
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        if any(out.iterdir()):
            prev = read_marker(out) if is_complete(out) else {}
            if prev.get("source") != source:
                raise FileExistsError(f"{out} is not empty and not a synth of preset {preset!r};"
                                      " refusing to overwrite it")
            if prev.get("dtype") == dtype and prev.get("seed") == seed and \
                    prev.get("weights", "written") == kind:
                progress(f"{out} already holds this synth ({preset}, {dtype}, seed {seed})")
                return out
    from transformers import GenerationConfig, LlamaConfig

    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to `out` (same filesystem) so the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the result should be an ordinary dir
        config = LlamaConfig(**PRESETS[preset], bos_token_id=256, eos_token_id=257,
                             dtype=dtype, architectures=["LlamaForCausalLM"])
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=256, eos_token_id=257).save_pretrained(tmp)
        tok = build_tokenizer(config.vocab_size, config.max_position_embeddings)
        assert (tok.bos_token_id, tok.eos_token_id) == (256, 257)
        tok.save_pretrained(tmp)
        if weights:
            _write_weights(config, tmp, dtype, seed, progress)
        write_marker(tmp, out.name, source, preset=preset, dtype=dtype, seed=seed, weights=kind)
        if out.exists() and any(out.iterdir()):
            # Replacing an older synth of this preset: move it aside, swap, then delete.
            old = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)  # replaces an empty dir too
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"wrote {preset} synth to {out}")
    return out
