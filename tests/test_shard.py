"""Stage chains must reproduce transformers' greedy generation exactly."""

from __future__ import annotations

import os
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import zpipe.shard as shard
from zpipe.kvcache import KVCache
from zpipe.shard import ModelSpec, Stage

N_NEW = 32
PROMPTS = [[7], [1, 15, 300, 42, 9], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]]
SPLITS = {1: [(0, 6)], 2: [(0, 4), (4, 6)], 3: [(0, 2), (2, 4), (4, 6)]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _make_model(path: Path, seed: int, **extra) -> Path:
    config = LlamaConfig(
        num_hidden_layers=6, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=512, max_position_embeddings=256,
        initializer_range=0.2, **extra)  # larger init: varied greedy output, not one repeated id
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: thread hand-off costs more than it saves, and a busy box makes it far worse."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
    return {
        "plain": _make_model(root / "plain", 0),
        "llama3_tied": _make_model(root / "llama3", 1, rope_parameters=llama3,
                                   tie_word_embeddings=True),
    }


_HF_CACHE: dict = {}


def hf_reference(model_dir: Path, dtype: torch.dtype, prompt: list[int], n_new: int = N_NEW):
    """(generated token ids, per-step float32 logits) from LlamaForCausalLM.generate."""
    key = (str(model_dir), dtype, tuple(prompt), n_new)
    if key not in _HF_CACHE:
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n_new,
                                 output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(prompt):].tolist()
        assert len(tokens) == n_new
        _HF_CACHE[key] = tokens, [lg[0].float() for lg in out.logits]
    return _HF_CACHE[key]


def run_chain(stages: list[Stage], prompt: list[int], n_new: int = N_NEW, chunk: int = 256,
              prefill_split: int | None = None):
    """Greedy decode through chained stages; returns (tokens, per-step logits)."""
    caches = [s.new_cache(chunk=chunk) for s in stages]

    def step(ids: list[int]) -> torch.Tensor:
        x = torch.tensor(ids, dtype=torch.int64)
        pos = caches[0].length
        for stage, cache in zip(stages, caches, strict=True):
            x = stage.forward(cache, x, pos)
        return x

    if prefill_split:
        step(prompt[:prefill_split])
        logits = step(prompt[prefill_split:])
    else:
        logits = step(prompt)
    tokens, all_logits = [], []
    for _ in range(n_new):
        all_logits.append(logits)
        tokens.append(int(torch.argmax(logits)))
        if len(tokens) < n_new:
            logits = step(tokens[-1:])
    return tokens, all_logits


def _stages(model_dir: Path, n: int, dtype=torch.float32) -> list[Stage]:
    return [Stage(model_dir, a, b, dtype=dtype) for a, b in SPLITS[n]]


@pytest.mark.parametrize("model", ["plain", "llama3_tied"])
@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_fp32_matches_hf(models, model, n_stages):
    stages = _stages(models[model], n_stages)
    for prompt in PROMPTS:
        ref_tokens, ref_logits = hf_reference(models[model], torch.float32, prompt)
        tokens, logits = run_chain(stages, prompt)
        assert tokens == ref_tokens, f"prompt {prompt}"
        assert len(set(tokens)) > 8  # a meaningful sequence, not a degenerate repeat
        for i, (ours, ref) in enumerate(zip(logits, ref_logits, strict=True)):
            assert ours.dtype == torch.float32 and ours.shape == (512,)
            assert (ours - ref).abs().max().item() <= 1e-4, f"step {i}"


@pytest.mark.parametrize("model", ["plain", "llama3_tied"])
@pytest.mark.parametrize("n_stages", [1, 3])
def test_bf16_matches_hf(models, model, n_stages):
    stages = _stages(models[model], n_stages, torch.bfloat16)
    for prompt in PROMPTS:
        ref_tokens, _ = hf_reference(models[model], torch.bfloat16, prompt)
        tokens, _ = run_chain(stages, prompt)
        assert tokens == ref_tokens, f"prompt {prompt}"


def test_cache_growth_past_chunk(models):
    stages = _stages(models["plain"], 3)
    prompt = PROMPTS[2]  # 17 tokens + 32 new: crosses several 8-token chunks
    ref_tokens, ref_logits = hf_reference(models["plain"], torch.float32, prompt)
    tokens, logits = run_chain(stages, prompt, chunk=8)
    base_tokens, base_logits = run_chain(stages, prompt, chunk=256)
    assert tokens == ref_tokens == base_tokens
    for ours, base in zip(logits, base_logits, strict=True):
        assert torch.equal(ours, base)


def test_continuation_prefill(models):
    """Multi-token forward at pos > 0 (causal mask aligned to the end) still matches HF."""
    stages = _stages(models["llama3_tied"], 2)
    prompt = PROMPTS[2]
    ref_tokens, ref_logits = hf_reference(models["llama3_tied"], torch.float32, prompt)
    tokens, logits = run_chain(stages, prompt, prefill_split=6)
    assert tokens == ref_tokens
    assert (logits[0] - ref_logits[0]).abs().max().item() <= 1e-4


def test_kvcache_unit():
    cache = KVCache(range(2, 4), n_kv_heads=2, head_dim=3, dtype=torch.float32, device="cpu",
                    chunk=4)
    assert cache.layers == range(2, 4) and cache.length == 0
    assert cache.nbytes() == 2 * 2 * (2 * 4 * 3) * 4
    data = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    for a, b in [(0, 3), (3, 4), (4, 10)]:  # grows 4 -> 12 at the last step
        for layer in (2, 3):
            k, v = cache.append(layer, data[:, a:b] + layer, -data[:, a:b])
            assert k.shape == (2, b, 3)
            assert torch.equal(k, data[:, :b] + layer) and torch.equal(v, -data[:, :b])
        cache.advance(b - a)
    assert cache.length == 10 and cache.capacity == 12
    with pytest.raises(KeyError):
        cache.append(5, data[:, :1], data[:, :1])

    full = cache.export(range(2, 4))
    assert set(full) == {"k.2", "v.2", "k.3", "v.3"}
    assert full["k.3"].is_contiguous() and torch.equal(full["k.3"], data + 3)
    part = cache.export(range(3, 4), heads=range(1, 2), tokens=range(2, 7))
    assert torch.equal(part["k.3"], data[1:2, 2:7] + 3) and part["k.3"].is_contiguous()
    part["k.3"].zero_()  # exports are copies
    assert torch.equal(cache.export(range(3, 4))["k.3"], data + 3)
    with pytest.raises(ValueError):
        cache.export(range(2, 3), tokens=range(0, 11))

    other = KVCache(range(0, 0), 2, 3, torch.float32, "cpu", chunk=4)
    other.import_(full, 10)  # adds layers
    assert other.layers == range(2, 4) and other.length == 10
    assert torch.equal(other.export(range(2, 4))["v.2"], -data)
    # heads imported separately into a fresh cache
    heads = KVCache(range(0, 0), 2, 3, torch.float32, "cpu")
    for h in (range(0, 1), range(1, 2)):
        heads.import_(cache.export(range(2, 4), heads=h), 10, heads=h)
    assert all(torch.equal(heads.export(range(2, 4))[n], full[n]) for n in full)
    # single-head cache receiving one head
    one = KVCache(range(0, 0), 1, 3, torch.float32, "cpu")
    one.import_(cache.export(range(2, 3), heads=range(1, 2)), 10)
    assert torch.equal(one.export(range(2, 3))["k.2"], data[1:2] + 2)
    # suffix import extends existing layers
    grow = KVCache(range(0, 0), 2, 3, torch.float32, "cpu", chunk=4)
    grow.import_(cache.export(range(2, 4), tokens=range(0, 5)), 5)
    grow.import_(cache.export(range(2, 4), tokens=range(5, 10)), 10)
    assert all(torch.equal(grow.export(range(2, 4))[n], full[n]) for n in full)
    with pytest.raises(ValueError, match="gap"):
        grow.import_(cache.export(range(2, 4), tokens=range(8, 10)), 14)
    with pytest.raises(ValueError):
        one.import_(full, 10)  # 2 heads into a 1-head cache

    cache.drop_layers(range(2, 3))
    assert cache.layers == range(3, 4)
    assert cache.nbytes() == 2 * (2 * 12 * 3) * 4


def test_export_import_continues_decoding(models):
    """Move one stage's cache to a fresh cache (whole and per-head) mid-session."""
    stages = _stages(models["plain"], 3)
    prompt = PROMPTS[1]
    ref_tokens, _ = hf_reference(models["plain"], torch.float32, prompt)
    caches = [s.new_cache(chunk=8) for s in stages]

    def step(ids):
        x, pos = torch.tensor(ids), caches[0].length
        for stage, cache in zip(stages, caches, strict=True):
            x = stage.forward(cache, x, pos)
        return int(torch.argmax(x))

    tokens = [step(prompt)]
    for i in range(N_NEW - 1):
        if i == 5:  # whole-cache move of the middle stage
            moved = stages[1].new_cache()
            moved.drop_layers(moved.layers)
            moved.import_(caches[1].export(caches[1].layers), caches[1].length)
            caches[1] = moved
        if i == 11:  # per-head move of the last stage
            moved = stages[2].new_cache()
            for h in (range(0, 1), range(1, 2)):
                moved.import_(caches[2].export(range(4, 6), heads=h), caches[2].length, heads=h)
            caches[2] = moved
        tokens.append(step(tokens[-1:]))
    assert tokens == ref_tokens


def test_pos_mismatch_and_bad_input(models):
    stage = Stage(models["plain"], 0, 2)
    cache = stage.new_cache()
    with pytest.raises(ValueError, match="pos"):
        stage.forward(cache, torch.tensor([1, 2]), 1)
    h = stage.forward(cache, torch.tensor([1, 2]), 0)
    assert h.shape == (2, 64) and h.dtype == torch.float32 and cache.length == 2
    with pytest.raises(ValueError, match="pos"):
        stage.forward(cache, torch.tensor([3]), 0)
    with pytest.raises(ValueError):
        stage.forward(cache, torch.zeros(1, 64), 2)  # first stage wants ids
    mid = Stage(models["plain"], 2, 4)
    with pytest.raises(ValueError):
        mid.forward(mid.new_cache(), torch.zeros(1, 32), 0)
    with pytest.raises(ValueError):
        Stage(models["plain"], 4, 7)


def test_reads_only_own_tensors(models, monkeypatch):
    seen: list[str] = []
    real = shard.safe_open

    class Recording:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            seen.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(shard, "safe_open", Recording)
    mid = Stage(models["plain"], 2, 4)
    assert seen and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in seen)
    assert len(seen) == 18
    seen.clear()
    first = Stage(models["plain"], 0, 2)
    assert "model.embed_tokens.weight" in seen and "lm_head.weight" not in seen
    assert "model.norm.weight" not in seen
    seen.clear()
    last = Stage(models["llama3_tied"], 4, 6)
    assert "model.embed_tokens.weight" in seen and "model.norm.weight" in seen
    assert not any(n.startswith("model.layers.3.") for n in seen)
    seen.clear()
    whole_tied = Stage(models["llama3_tied"], 0, 6)
    assert seen.count("model.embed_tokens.weight") == 1

    hf = LlamaForCausalLM.from_pretrained(models["plain"])
    total = sum(p.numel() * 4 for p in hf.parameters())
    last_plain = Stage(models["plain"], 4, 6)
    assert first.weight_bytes() + mid.weight_bytes() + last_plain.weight_bytes() == total
    tied_total = sum(p.numel() * 4 for p in
                     LlamaForCausalLM.from_pretrained(models["llama3_tied"]).parameters())
    assert whole_tied.weight_bytes() == tied_total  # shared tensor counted once
    assert last.weight_bytes() > mid.weight_bytes()


def test_sharded_checkpoint(models, tmp_path):
    hf = LlamaForCausalLM.from_pretrained(models["plain"])
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ref_tokens, _ = hf_reference(models["plain"], torch.float32, PROMPTS[1])
    tokens, _ = run_chain(_stages(tmp_path, 3), PROMPTS[1])
    assert tokens == ref_tokens


def test_model_spec(models, tmp_path):
    spec = ModelSpec.load(models["llama3_tied"])
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == (6, 64, 4, 2)
    assert spec.head_dim == 16 and spec.vocab_size == 512 and spec.tie_word_embeddings
    assert spec.eos_token_ids == [2]
    config = LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, vocab_size=32,
                         attention_bias=True)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attention_bias"):
        ModelSpec.load(tmp_path)


def test_profile(models):
    stage = Stage(models["plain"], 0, 6)
    prof: dict = {}
    logits = stage.forward(stage.new_cache(), torch.tensor([1, 2, 3]), 0, profile=prof)
    assert logits.shape == (512,)
    assert set(prof) == {"embed", "norm", "lm_head", *(f"layer.{i}" for i in range(6))}
    assert all(v >= 0 for v in prof.values())


def _real_model_dir() -> Path | None:
    home = os.environ.get("ZPIPE_HOME") or Path.home() / ".cache" / "zpipe"  # zpipe's default
    candidates = [Path("/tmp/smol-test"), Path(home) / "models" / "smollm2"]
    for c in candidates:
        if (c / "config.json").exists():
            return c
    return None


@pytest.mark.skipif(_real_model_dir() is None, reason="no real model at /tmp/smol-test or "
                    "$ZPIPE_HOME/models/smollm2")
def test_real_model_three_stages():
    model_dir = _real_model_dir()
    spec = ModelSpec.load(model_dir)
    n = spec.num_layers
    cuts = [0, n // 3, 2 * n // 3, n]
    stages = [Stage(model_dir, a, b) for a, b in pairwise(cuts)]
    for prompt in ([1, 2, 3, 4, 5], [42, 17, 99, 1000, 7, 256, 3]):
        prompt = [t % spec.vocab_size for t in prompt]
        ref_tokens, _ = hf_reference(model_dir, torch.float32, prompt, 16)
        tokens, _ = run_chain(stages, prompt, 16)
        assert tokens == ref_tokens


def test_fp16_runs(models):
    """float16 uses the bf16 code path; only checked to run and give finite logits."""
    stages = _stages(models["plain"], 2, torch.float16)
    tokens, logits = run_chain(stages, PROMPTS[1], n_new=4)
    assert all(torch.isfinite(lg).all() for lg in logits)


def test_a_cache_counts_the_bytes_of_its_rows_apart_from_its_capacity() -> None:
    cache = KVCache(range(2, 4), 3, 8, torch.float32, "cpu", chunk=16)
    for layer in (2, 3):
        cache.append(layer, torch.zeros(3, 5, 8), torch.zeros(3, 5, 8))
    cache.advance(5)
    assert cache.used_bytes() == 2 * 2 * 3 * 5 * 8 * 4  # K and V, 2 layers, 5 rows
    assert cache.nbytes() == 2 * 2 * 3 * 16 * 8 * 4  # a chunk of 16 rows allocated
