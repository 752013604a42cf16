"""One pipeline stage of a Llama-family model: a contiguous range of decoder layers.

The math mirrors ``transformers.models.llama.modeling_llama`` with the sdpa attention path
op for op, so that greedy decoding through a chain of stages gives the same tokens as
``LlamaForCausalLM.generate``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from zpipe import synth
from zpipe.kvcache import KVCache
from zpipe.slots import SlotKV

# Attention backends for a GPU stage's eager steps (prefills): all but cuDNN's, which builds a
# plan for every new shape. On an H100 an 8-layer stage's first prefill of a new batch size took
# 70-180 ms (55 ms of it in cuDNN) against 6-20 ms warm; 12-52 ms without cuDNN.
_GPU_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

_LAYER_PARTS = (
    "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class ModelSpec:
    model_dir: Path
    config: object
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: list[int]
    tie_word_embeddings: bool

    @classmethod
    def load(cls, model_dir: Path) -> ModelSpec:
        from transformers import AutoConfig

        model_dir = Path(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        if config.model_type != "llama":
            raise ValueError(f"{model_dir}: model_type {config.model_type!r} is not 'llama'")
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(config, flag, False):
                raise ValueError(f"{model_dir}: {flag}=True is not supported")
        if getattr(config, "pretraining_tp", 1) not in (None, 1):
            raise ValueError(f"{model_dir}: pretraining_tp != 1 is not supported")
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if heads % kv_heads:
            raise ValueError(f"{model_dir}: {heads} heads not divisible by {kv_heads} KV heads")
        eos: list[int] = []
        sources = [config.eos_token_id]
        gen_path = model_dir / "generation_config.json"
        if gen_path.exists():
            sources.append(json.loads(gen_path.read_text()).get("eos_token_id"))
        for src in sources:
            for t in src if isinstance(src, list) else [src]:
                if t is not None and t not in eos:
                    eos.append(int(t))
        return cls(
            model_dir=model_dir, config=config, num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size, num_heads=heads, num_kv_heads=kv_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size, eos_token_ids=eos,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


def head_slices(spec: ModelSpec, heads: tuple[int, int]) -> dict[str, tuple[int, int, int]]:
    """What a node holding KV heads ``[a, b)`` of a layer reads of it: ``part -> (dim, lo, hi)``.

    A KV-head group is one KV head and the query heads that share it, so K/V never split: the
    node takes those heads' rows of q/k/v and the matching columns of ``o_proj``, and the MLP's
    intermediate columns in the same proportion (rows of gate/up, columns of down).
    """
    a, b = heads
    g, hd = spec.num_kv_heads, spec.head_dim
    if not 0 <= a < b <= g:
        raise ValueError(f"bad KV-head range [{a}, {b}) for {g} KV heads")
    rep = spec.num_heads // g
    inter = spec.config.intermediate_size
    mlp = (inter * a // g, inter * b // g)
    q = (a * rep * hd, b * rep * hd)
    kv = (a * hd, b * hd)
    return {"self_attn.q_proj": (0, *q), "self_attn.k_proj": (0, *kv),
            "self_attn.v_proj": (0, *kv), "self_attn.o_proj": (1, *q),
            "mlp.gate_proj": (0, *mlp), "mlp.up_proj": (0, *mlp), "mlp.down_proj": (1, *mlp)}


def sum_partials(parts: list[Tensor]) -> Tensor:
    """The partials of a split stage's members added in member order: every member that adds
    the same partials gets the same bits, so their residual streams stay identical."""
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


def _slice_of(name: str, slices: dict[str, tuple[int, int, int]]) -> tuple[int, int, int] | None:
    """The ``(dim, lo, hi)`` cut of weight ``name`` a stage split by heads holds (None: whole)."""
    if not name.startswith("model.layers."):
        return None
    return slices.get(name.split(".", 3)[-1].removesuffix(".weight"))


def _cut(source: Any, cut: tuple[int, int, int] | None) -> Any:
    """Rows (dim 0) or columns (dim 1) ``[lo, hi)`` of a tensor or a safetensors slice."""
    if cut is None:
        return source
    dim, lo, hi = cut
    return source[lo:hi] if dim == 0 else source[:, lo:hi]


def _weight_files(model_dir: Path) -> dict[str, Path | None]:
    """Tensor name -> safetensors file holding it (None: a seeded synth makes it)."""
    if synth.seeded(model_dir) is not None:
        return dict.fromkeys(synth.tensor_shapes(model_dir))
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / f for name, f in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{model_dir}: no model.safetensors(.index.json)")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # LlamaRMSNorm: float32 statistics, cast back, then weight * x.
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _max_row_norm(w: Tensor, chunk: int = 4096) -> float:
    """max_j ||w_j||_2 in float64 (chunked: no float64 copy of the whole matrix)."""
    return max(float(torch.linalg.vector_norm(w[i:i + chunk].double(), dim=1).max())
               for i in range(0, w.shape[0], chunk))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def padded_rows(n: int) -> int:
    """The rows a GPU batch of ``n`` tokens runs as: a power of two up to 64, then a multiple
    of 64 (at most 134 matmul shapes up to 8,192 tokens, ~3% padding at 1,000)."""
    return 1 << (n - 1).bit_length() if n <= 64 else -(-n // 64) * 64


def padded_counts(max_tokens: int) -> list[int]:
    """Every ``padded_rows`` value of a batch of 1..``max_tokens`` tokens, in order."""
    top = padded_rows(max_tokens)
    return [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= top] + list(range(128, top + 1, 64))


class PrefillRun:
    """Fresh prefills of several sessions attended in one call: their tokens scattered into
    ``[rows, heads, longest, hd]`` (right padding, which causal attention never lets a real
    token see), and their K/V written with one indexed copy when they share a KV pool."""

    def __init__(self, caches: list[KVCache], lens: list[int], device: torch.device) -> None:
        self.caches, self.lens = caches, lens
        self.tokens, self.longest = sum(lens), max(lens)
        row = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        off = torch.cat([torch.arange(n) for n in lens])
        self.row, self.off = row.to(device), off.to(device)
        first = caches[0]
        shared = all(isinstance(c, SlotKV) and c.pool is first.pool for c in caches)
        self.pool = first.pool if shared else None
        if self.pool is not None:
            self.slot = torch.tensor([c.slot for c in caches])[row].to(device)

    def _pad(self, x: Tensor) -> Tensor:
        """``[heads, tokens, hd]`` -> ``[rows, heads, longest, hd]``."""
        out = x.new_zeros(len(self.lens), x.shape[0], self.longest, x.shape[2])
        out[self.row, :, self.off] = x.transpose(0, 1)
        return out

    def attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Write the rows' K/V to their caches (at position 0) and return their attention
        output ``[tokens, heads * hd]``."""
        if self.pool is not None:
            self.pool.k[layer][self.slot, :, self.off] = k.transpose(0, 1)
            self.pool.v[layer][self.slot, :, self.off] = v.transpose(0, 1)
        else:
            start = 0
            for cache, n in zip(self.caches, self.lens, strict=True):
                cache.append(layer, k[:, start:start + n], v[:, start:start + n])
                start += n
        a = F.scaled_dot_product_attention(self._pad(q), self._pad(k), self._pad(v),
                                           scale=scale, is_causal=True, enable_gqa=True)
        return a[self.row, :, self.off].reshape(self.tokens, -1)


class Stage:
    """Layers [start, end) of the model; first = start == 0, last = end == num_layers."""

    def __init__(self, model_dir: Path, start: int, end: int, *,
                 dtype: torch.dtype = torch.float32, device: str = "cpu",
                 reuse: Stage | None = None, heads: tuple[int, int] | None = None):
        """``reuse``: a stage of the same model whose tensors this one shares where they
        overlap, so a node that gains layers reads only those from disk.

        ``heads``: KV heads ``[a, b)`` of a stage split across nodes by heads (``head_slices``
        says what that holds); None for all of them. A split stage needs ``combine``: a function
        that takes this member's partial output of a layer's attention or MLP ``[T, hidden]``
        and returns the sum of every member's (``sum_partials`` of them all); the residual is
        added to that sum once.
        """
        from transformers.activations import ACT2FN
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.spec = spec = ModelSpec.load(model_dir)
        if not 0 <= start < end <= spec.num_layers:
            raise ValueError(f"bad layer range [{start}, {end}) for {spec.num_layers} layers")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} not supported (float32, bfloat16 or float16)")
        if heads is not None and tuple(heads) == (0, spec.num_kv_heads):
            heads = None  # all of them: a plain stage
        self.heads = tuple(heads) if heads is not None else None
        slices = head_slices(spec, self.heads) if self.heads is not None else {}
        self.combine: Callable[[Tensor], Tensor] | None = None
        self.start, self.end = start, end
        self.first, self.last = start == 0, end == spec.num_layers
        self.dtype, self.device = dtype, torch.device(device)
        cfg = spec.config
        self.eps = cfg.rms_norm_eps
        self.scale = spec.head_dim**-0.5
        self.act = ACT2FN[cfg.hidden_act]
        self.rotary = LlamaRotaryEmbedding(cfg).to(self.device)  # inv_freq stays float32

        files = _weight_files(Path(model_dir))
        names = [f"model.layers.{i}.{p}.weight" for i in range(start, end) for p in _LAYER_PARTS]
        if self.first:
            names.append("model.embed_tokens.weight")
        if self.last:
            names.append("model.norm.weight")
            tied = spec.tie_word_embeddings or "lm_head.weight" not in files
            head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
            names.append(head_name)
        have = reuse.weights if reuse is not None and reuse.dtype == dtype \
            and reuse.heads == self.heads else {}
        w = {n: have[n] for n in names if n in have}
        w.update(self._read(files, [n for n in names if n not in w], slices))
        self.weights = w
        self.embed = w["model.embed_tokens.weight"] if self.first else None
        self.norm = w["model.norm.weight"] if self.last else None
        self.lm_head = w[head_name] if self.last else None
        self.layers = [tuple(w[f"model.layers.{i}.{p}.weight"] for p in _LAYER_PARTS)
                       for i in range(start, end)]
        # Fast greedy lm_head (see _greedy_lm_head): the largest row norm of the head, and how
        # many greedy rows it checked / had to recompute exactly.
        self.lm_head_max_norm = (_max_row_norm(self.lm_head) if self.last
                                 and dtype == torch.float32 and self.device.type == "cpu"
                                 else None)
        self.lm_head_checked = 0
        self.lm_head_rechecks = 0
        # Fresh prefills of a batch share attention calls (``_prefill_runs``). Not on the CPU,
        # where every float32 row must stay bit-identical to running alone.
        self.group_prefills = self.device.type != "cpu"
        # GPU batches run as ``padded_rows(tokens)`` rows (zeros beyond the real ones, which
        # never reach a real row's attention): cuBLAS chooses a kernel the first time it meets
        # a matmul shape, 14 ms of a stage's first prefill of a new token count on an H100
        # (8 layers; the warm step takes 8-17 ms); padded, a few shapes serve every batch.
        self.pad_rows = self.device.type != "cpu"

    def _read(self, files: dict[str, Path], names: list[str],
              slices: dict[str, tuple[int, int, int]]) -> dict[str, Tensor]:
        """The tensors ``names``; a layer part in ``slices`` only its slice (read as such)."""
        if not names:
            return {}
        missing = [n for n in names if n not in files]
        if missing:
            raise KeyError(f"{self.spec.model_dir}: missing tensors {missing[:5]}")
        by_file: dict[Path, list[str]] = {}
        for n in dict.fromkeys(names):
            by_file.setdefault(files[n], []).append(n)
        load_dev = str(self.device) if self.device.type != "cpu" else "cpu"
        out = {}
        made = by_file.pop(None, [])
        if made:  # a seeded synth: each tensor from its seed, cut like a read
            recipe = synth.seeded(self.spec.model_dir)
            shapes = synth.tensor_shapes(self.spec.model_dir)
            for n in made:
                t = synth.tensor(n, shapes[n], recipe["dtype"], recipe["seed"])
                t = _cut(t, _slice_of(n, slices))
                out[n] = t.to(device=self.device, dtype=self.dtype).contiguous()
        for path, group in by_file.items():
            with safe_open(path, framework="pt", device=load_dev) as f:
                for n in group:
                    cut = _slice_of(n, slices)
                    t = f.get_tensor(n) if cut is None else _cut(f.get_slice(n), cut)
                    out[n] = t.to(self.dtype).contiguous()
        return out

    @property
    def kv_heads(self) -> int:
        """The KV heads this stage holds (its caches' heads)."""
        return self.spec.num_kv_heads if self.heads is None else self.heads[1] - self.heads[0]

    def new_cache(self, chunk: int = 256) -> KVCache:
        return KVCache(range(self.start, self.end), self.kv_heads, self.spec.head_dim,
                       self.dtype, self.device, chunk=chunk)

    @torch.inference_mode()
    def warm_matmuls(self, max_tokens: int, max_rows: int) -> float:
        """Run once every matmul shape a padded batch of up to ``max_tokens`` tokens meets, and
        ``lm_head`` for 1..``max_rows`` rows; returns the seconds taken. For GPUs: cuBLAS
        chooses a kernel the first time it meets a shape (~14 ms for an 8-layer stage's shapes
        of one batch size on an H100), which would otherwise land on live prefills."""
        t0 = time.perf_counter()
        weights = {tuple(w.shape): w for layer in self.layers for w in layer if w.dim() == 2}
        for m in padded_counts(max_tokens):
            for w in weights.values():
                F.linear(w.new_zeros(m, w.shape[1]), w)
        if self.last:
            for m in range(1, max_rows + 1):
                F.linear(self.lm_head.new_zeros(m, self.lm_head.shape[1]), self.lm_head)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def weight_bytes(self) -> int:
        tensors = {id(t): t for layer in self.layers for t in layer}
        for t in (self.embed, self.norm, self.lm_head):
            if t is not None:
                tensors[id(t)] = t
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def _tick(self, profile: dict, name: str, t0: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        profile[name] = profile.get(name, 0.0) + (t - t0)
        return t

    def forward(self, cache: KVCache, x: Tensor, pos: int, profile: dict | None = None) -> Tensor:
        """Run this stage's layers on ``n`` new tokens at positions ``[pos, pos + n)``.

        ``x``: int64 token ids ``[n]`` on the first stage, else hidden ``[n, hidden]``. Returns
        hidden ``[n, hidden]`` in ``self.dtype``, or on the last stage float32 logits ``[vocab]``
        of the last position. Advances ``cache`` by ``n``.
        """
        return self.forward_batch([(cache, x, pos)], profile)[0]

    @torch.inference_mode()
    def forward_batch(self, items: list[tuple[KVCache, Tensor, int]],
                      profile: dict | None = None,
                      greedy: list[bool] | None = None) -> list[Tensor]:
        """``forward`` for several sessions at once: one (cache, x, pos) per session.

        The sessions' tokens are concatenated so every weight matrix is read once per batch;
        attention runs per session against its own cache. Returns one output per item.

        ``greedy`` (one flag per item, default all False) marks sessions that only take the
        argmax of the logits. On a float32 CPU last stage their logits may come from one fast
        gemm: not bit-identical to running alone, but with the same argmax (proved per row,
        else recomputed exactly). Other rows' logits are as running alone: bit-identical in
        float32 on the CPU, within a few roundings in bfloat16 (oneDNN's bf16 kernels round a
        row differently alone and in a batch).
        """
        if greedy is not None and len(greedy) != len(items):
            raise ValueError(f"{len(greedy)} greedy flags for {len(items)} items")
        if self.heads is not None and self.combine is None:
            raise ValueError("a stage split by heads needs its group's combine")
        for cache, x, pos in items:
            if pos != cache.length:
                raise ValueError(f"pos {pos} != cache length {cache.length}")
            if x.shape[0] == 0:
                raise ValueError("no tokens")
        t0 = time.perf_counter() if profile is not None else 0.0
        xs = [x for _, x, _ in items]
        if self.first:
            if any(x.dim() != 1 or x.is_floating_point() for x in xs):
                raise ValueError("first stage expects int64 token ids [n]")
            ids = xs[0] if len(xs) == 1 else torch.cat(xs)
            h = F.embedding(ids.to(self.device, torch.int64), self.embed)
            if profile is not None:
                t0 = self._tick(profile, "embed", t0)
        else:
            if any(x.dim() != 2 or x.shape[1] != self.spec.hidden_size for x in xs):
                raise ValueError(f"expected hidden [n, {self.spec.hidden_size}]")
            h = (xs[0] if len(xs) == 1 else torch.cat([x.to(self.dtype) for x in xs]))
            h = h.to(device=self.device, dtype=self.dtype)
        lens = [x.shape[0] for x in xs]
        tokens = sum(lens)
        pad = padded_rows(tokens) - tokens if self.pad_rows else 0
        if pad:
            h = F.pad(h, (0, 0, 0, pad))
        pos_ids = torch.cat([torch.arange(p, p + n) for (_, _, p), n in zip(items, lens,
                                                                             strict=True)]
                            + ([torch.zeros(pad, dtype=torch.int64)] if pad else []))
        cos, sin = self.rotary(h, pos_ids.to(self.device)[None])  # [1, T, head_dim]
        masks = [self._mask(p, n) for (_, _, p), n in zip(items, lens, strict=True)]
        caches = [c for c, _, _ in items]
        lin = self._linear_for(lens + [pad] if pad else lens)
        runs = self._prefill_runs(items, lens)
        with sdpa_kernel(_GPU_SDPA) if self.device.type == "cuda" else nullcontext():
            for i, w in enumerate(self.layers, self.start):
                h = self._layer(i, w, h, caches, lens, cos, sin, masks, lin, runs)
                if profile is not None:
                    t0 = self._tick(profile, f"layer.{i}", t0)
        for c, n in zip(caches, lens, strict=True):
            c.advance(n)
        if pad:
            h = h[:tokens]
        if not self.last:
            return list(h.split(lens)) if len(items) > 1 else [h]
        ends = torch.tensor(lens).cumsum(0) - 1
        h = _rms_norm(h[ends.to(self.device)], self.norm, self.eps)
        if profile is not None:
            t0 = self._tick(profile, "norm", t0)
        if self.lm_head_max_norm is not None and greedy is not None and sum(greedy) > 1:
            logits = self._greedy_lm_head(h, greedy)
        else:
            logits = self._linear_for([1] * len(lens))(h, self.lm_head).float()
        if profile is not None:
            self._tick(profile, "lm_head", t0)
        return list(logits)

    def _linear_for(self, lens: list[int]):
        """The matmul for a batch whose sessions bring ``lens`` tokens each.

        Batching must not change a session's numbers: on the CPU a one-row matmul (gemv) and
        the same row inside a bigger gemm round differently, which can flip a greedy token. So
        single-token rows of a CPU batch go through ``bmm`` (one gemv-shaped product per row,
        bit-identical to running alone in float32, while the weights stay hot in cache; bf16
        rows stay within a few roundings), and each prefill
        gets its own matmul exactly as alone. GPUs take the plain batched matmul.
        """
        if len(lens) == 1 or self.device.type != "cpu":
            return F.linear
        bounds, start = [], 0
        for n in lens:  # runs of single-token rows, and each prefill on its own
            if n == 1 and bounds and bounds[-1][2]:
                bounds[-1][1] += 1
            else:
                bounds.append([start, start + n, n == 1])
            start += n

        def linear(x: Tensor, w: Tensor) -> Tensor:
            parts = []
            for a, b, single in bounds:
                if single and b - a > 1:
                    rows = x[a:b, None, :]
                    parts.append(torch.bmm(rows, w.t().expand(b - a, -1, -1))[:, 0])
                else:
                    parts.append(F.linear(x[a:b], w))
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        return linear

    def _greedy_lm_head(self, h: Tensor, greedy: list[bool]) -> Tensor:
        """Logits ``[rows, vocab]`` for a float32 CPU batch: greedy rows from one gemm, whose
        argmax is proved equal to the exact (alone, gemv) argmax or else recomputed exactly;
        other rows exact, as in ``forward_batch`` without ``greedy``.

        Why: the per-row exact head (bmm) costs ~3x a plain gemm of the same rows. Any float32
        dot product of length K is within gamma_K * sum_k |x_k||w_jk| of the true value
        (gamma_K = K u / (1 - K u), u = 2^-24, whatever the summation order), so gemm and gemv
        differ per logit by at most 2 gamma_K sum_k |x_k||w_jk| <= 2 gamma_K ||x|| max_j ||w_j||
        (Cauchy-Schwarz) = B. If the gemm's top1 - top2 > 2 B, the exact top1 is the same index
        and strictly above every other logit (so no tie either).
        """
        rows = torch.tensor(greedy)
        fast_idx = rows.nonzero()[:, 0]
        x = h[fast_idx]
        fast = F.linear(x, self.lm_head)
        k = x.shape[1]
        u = 2.0**-24
        gamma = k * u / (1 - k * u)
        # Norms and margins in float64, so their own rounding is far below the 1% slack; the
        # absolute term covers underflow (subnormal products). NaN or infinite logits (overflow:
        # the bound means nothing there) fail the test and take the exact path.
        norms = torch.linalg.vector_norm(x.double(), dim=1)
        bound = 2 * gamma * norms * self.lm_head_max_norm * 1.01 + 1e-30
        top2 = fast.topk(2, dim=1).values.double()
        ok = ((top2[:, 0] - top2[:, 1]) > 2 * bound) & top2.isfinite().all(1)
        self.lm_head_checked += len(fast_idx)
        self.lm_head_rechecks += int((~ok).sum())
        if len(fast_idx) == len(greedy) and bool(ok.all()):
            return fast  # the common case: all rows greedy, all proved
        out = torch.empty(h.shape[0], self.lm_head.shape[0], dtype=torch.float32)
        out[fast_idx] = fast
        exact_rows = (~rows).clone()
        exact_rows[fast_idx[~ok]] = True
        exact_idx = exact_rows.nonzero()[:, 0]
        if len(exact_idx):
            out[exact_idx] = self._linear_for([1] * len(exact_idx))(h[exact_idx], self.lm_head)
        return out

    def _mask(self, pos: int, n: int) -> Tensor | None:
        """None for a plain prefill (causal) or one token; an aligned causal mask otherwise."""
        if pos > 0 and n > 1:
            k_pos = torch.arange(pos + n, device=self.device)
            q_pos = torch.arange(pos, pos + n, device=self.device)
            return k_pos[None, :] <= q_pos[:, None]
        return None

    def _prefill_runs(self, items: list, lens: list[int]) -> dict[int, PrefillRun]:
        """Runs of consecutive fresh prefills (position 0) that share one attention call, by
        their first item. Each row alone costs an SDPA call and two K/V copies per layer,
        ~30 us of launches on a GPU: 32 prompts of 32 tokens took 79 ms of an H100 node's
        compute that way, 21 ms in one run."""
        runs: dict[int, PrefillRun] = {}
        if not self.group_prefills:
            return runs
        i = 0
        while i < len(items):
            j, longest, total = i, 0, 0
            # Extend while padding to the longest prompt at most doubles the tokens.
            while (j < len(items) and items[j][2] == 0 and lens[j] > 1
                   and (j - i + 1) * max(longest, lens[j]) <= 2 * (total + lens[j])):
                longest, total = max(longest, lens[j]), total + lens[j]
                j += 1
            if j - i > 1:
                runs[i] = PrefillRun([c for c, _, _ in items[i:j]], lens[i:j], self.device)
            i = max(j, i + 1)
        return runs

    def _layer(self, i: int, w: tuple[Tensor, ...], h: Tensor, caches: list[KVCache],
               lens: list[int], cos: Tensor, sin: Tensor, masks: list[Tensor | None],
               linear=F.linear, runs: dict[int, PrefillRun] | None = None) -> Tensor:
        ln1, wq, wk, wv, wo, ln2, wg, wu, wd = w
        t, hd = h.shape[0], self.spec.head_dim
        x = _rms_norm(h, ln1, self.eps)
        q = linear(x, wq).view(t, -1, hd).transpose(0, 1)  # [heads, T, hd]
        k = linear(x, wk).view(t, -1, hd).transpose(0, 1)
        v = linear(x, wv).view(t, -1, hd).transpose(0, 1)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        outs = []
        start = item = 0
        while item < len(caches):
            run = runs.get(item) if runs else None
            if run is not None:
                sl = slice(start, start + run.tokens)
                outs.append(run.attention(i, q[:, sl], k[:, sl], v[:, sl], self.scale))
                start, item = start + run.tokens, item + len(run.caches)
                continue
            n, mask = lens[item], masks[item]
            sl = slice(start, start + n)
            kc, vc = caches[item].append(i, k[:, sl], v[:, sl])
            a = F.scaled_dot_product_attention(
                q[None, :, sl], kc[None], vc[None], attn_mask=mask, scale=self.scale,
                is_causal=mask is None and n > 1, enable_gqa=True)
            outs.append(a[0].transpose(0, 1).reshape(n, -1))
            start, item = start + n, item + 1
        if start < t:  # padding rows (``pad_rows``): attend to nothing, stay zero
            outs.append(outs[0].new_zeros(t - start, outs[0].shape[1]))
        a = outs[0] if len(outs) == 1 else torch.cat(outs)
        o = linear(a, wo)
        h = h + (o if self.heads is None else self.combine(o))
        x = _rms_norm(h, ln2, self.eps)
        m = linear(self.act(linear(x, wg)) * linear(x, wu), wd)
        return h + (m if self.heads is None else self.combine(m))
