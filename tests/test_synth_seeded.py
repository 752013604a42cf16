"""Seeded synth models: no weight files, each tensor made from the seed and its name by
whoever loads it, the same values as a written synth; a cluster serves one token-exact."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from conftest import start_cluster

from bench.common import greedy_reference
from zpipe import synth
from zpipe.identity import weights_hash
from zpipe.models import ModelNotFound, resolve_model
from zpipe.shard import Stage


@pytest.fixture(scope="module")
def seeded_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.synth("tiny", tmp_path_factory.mktemp("seeded") / "tiny", seed=1,
                       progress=lambda m: None, weights=False)


def test_a_seeded_synth_holds_no_weights_and_makes_the_written_ones(
        seeded_tiny: Path, tiny_model: Path) -> None:
    assert not list(seeded_tiny.glob("*.safetensors"))
    assert synth.seeded(seeded_tiny)["seed"] == 1 and synth.seeded(tiny_model) is None
    for heads in (None, (1, 2)):  # a share of a stage split by heads is cut the same way
        made = Stage(seeded_tiny, 2, 6, heads=heads)
        read = Stage(tiny_model, 2, 6, heads=heads)
        assert made.weights.keys() == read.weights.keys()
        assert all(torch.equal(made.weights[n], read.weights[n]) for n in read.weights)


def test_a_seeded_synth_has_its_own_identity(seeded_tiny: Path, tmp_path: Path) -> None:
    other = synth.synth("tiny", tmp_path / "t2", seed=2, progress=lambda m: None,
                        weights=False)
    assert weights_hash(seeded_tiny) != weights_hash(other)
    assert weights_hash(seeded_tiny) == weights_hash(seeded_tiny)


def test_synth_names_resolve_to_a_seeded_dir(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZPIPE_HOME", str(tmp_path))
    path = resolve_model("synth:llama-3-70b")
    assert path == resolve_model("synth:llama-3-70b")  # made once
    shapes = synth.tensor_shapes(path)
    assert shapes["model.layers.79.mlp.down_proj.weight"] == (8192, 28672)
    assert sum(1 for p in path.iterdir() if p.stat().st_size > 10 << 20) == 0  # no weights
    with pytest.raises(ModelNotFound, match="no synth preset 'llama-9'"):
        resolve_model("synth:llama-9")


def test_a_cluster_of_a_seeded_model_gives_transformers_tokens(seeded_tiny: Path,
                                                               tmp_path: Path) -> None:
    prompt = [256, 72, 105, 33, 300]
    want = greedy_reference(seeded_tiny, prompt, 12)
    rc = start_cluster(seeded_tiny, tmp_path, [{"name": "a", "threads": 1},
                                                {"name": "b", "threads": 1}])
    try:
        async def run() -> list[int]:
            async with rc.client() as client:
                got = await client.generate(prompt_ids=prompt, max_new_tokens=12,
                                            ignore_eos=True)
            return got.token_ids

        assert asyncio.run(run()) == want
    finally:
        rc.cluster.stop()
