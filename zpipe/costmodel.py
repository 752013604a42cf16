"""The planner's inputs: what a node can do and what the model costs, per layer and token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class NodeCapability:
    name: str
    gflops: float  # measured dense matmul throughput at start-up: a prior, until measured
    mem_free_bytes: int  # memory budget for this node's weights + KV
    measured_s_per_layer: float | None = None  # decode compute per layer-equivalent, measured
    # KV bytes per layer held, fixed by the node (a static KV pool: allocated whole whatever the
    # sessions); None: the planner's context_len × sessions budget.
    kv_bytes_per_layer: int | None = None


@dataclass
class ModelCost:
    num_layers: int
    layer_weight_bytes: int
    layer_flops_per_token: float
    kv_bytes_per_token_per_layer: int
    embed_bytes: int  # on stage 0
    head_bytes: int  # final norm + lm_head, on the last stage
    head_flops_per_token: float
    tied: bool = False  # lm_head is the embedding: one copy where one stage is first and last

    @classmethod
    def from_spec(cls, spec: Any, dtype_bytes: int) -> ModelCost:
        """Llama costs from a ``ModelSpec`` (or anything with its fields and ``config``)."""
        h, hd = spec.hidden_size, spec.head_dim
        inter = int(spec.config.intermediate_size)
        q = h * spec.num_heads * hd
        kv = 2 * h * spec.num_kv_heads * hd
        o = spec.num_heads * hd * h
        mlp = 3 * h * inter  # gate, up, down
        params = q + kv + o + mlp + 2 * h  # + input and post-attention RMSNorm
        vocab_h = spec.vocab_size * h
        return cls(
            num_layers=spec.num_layers,
            layer_weight_bytes=params * dtype_bytes,
            layer_flops_per_token=2.0 * params,
            kv_bytes_per_token_per_layer=2 * spec.num_kv_heads * hd * dtype_bytes,
            embed_bytes=vocab_h * dtype_bytes,
            head_bytes=(vocab_h + h) * dtype_bytes,
            head_flops_per_token=2.0 * vocab_h,
            tied=bool(spec.tie_word_embeddings),
        )

    # -- per-stage figures
    def fixed_bytes(self, first: bool, last: bool) -> int:
        """Embedding / head bytes a stage holds besides its layers."""
        b = (self.embed_bytes if first else 0) + (self.head_bytes if last else 0)
        if first and last and self.tied:
            b -= self.embed_bytes  # the one embedding matrix serves both
        return b

    def kv_budget_bytes(self, layers: int, context_len: int, sessions: int,
                        per_layer: int | None = None) -> int:
        """KV bytes of ``layers`` layers: ``per_layer`` each (a node's static pool), else a
        cache of ``context_len × sessions`` tokens each."""
        if per_layer is not None:
            return layers * per_layer
        return layers * context_len * sessions * self.kv_bytes_per_token_per_layer

    def layer_bytes(self, context_len: int, sessions: int, kv_per_layer: int | None = None) -> int:
        """Memory one more layer costs: its weights and its KV budget."""
        return self.layer_weight_bytes + self.kv_budget_bytes(1, context_len, sessions,
                                                              kv_per_layer)

    def stage_flops(self, layers: int, last: bool) -> float:
        return layers * self.layer_flops_per_token + (self.head_flops_per_token if last else 0.0)

    def layer_equivalents(self, layers: int, last: bool) -> float:
        """A stage's work in units of one layer's FLOPs."""
        return self.stage_flops(layers, last) / self.layer_flops_per_token


def measured_s_per_layer(compute_s: float, start: int, end: int, cost: ModelCost) -> float:
    """A measured per-token stage time → seconds per layer-equivalent (head work included)."""
    return compute_s / cost.layer_equivalents(end - start, end == cost.num_layers)


def pool_bytes_per_layer(slots: int, max_len: int, kv_heads: int, head_dim: int,
                         dtype_bytes: int) -> int:
    """A static KV pool's bytes per layer: K and V for ``slots`` + 1 (scratch) slots of
    ``max_len`` tokens (``zpipe.slots.SlotPool``)."""
    return (slots + 1) * max_len * 2 * kv_heads * head_dim * dtype_bytes
