"""A model's identity (zpipe.identity): the same model gives the same one, another checkpoint or
another shape gives one that differs where it differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from zpipe.identity import differences, model_identity
from zpipe.models import synth
from zpipe.shard import ModelSpec


def _identity(model_dir: Path) -> dict:
    return model_identity(ModelSpec.load(model_dir))


def test_a_copy_is_the_same_model(tiny_model: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model, tmp_path / "copy"))
    ours = _identity(tiny_model)
    assert _identity(copy) == ours and differences(ours, _identity(copy)) == []
    assert ours["num_layers"] == 6 and ours["hidden_size"] == 64
    assert ours["architecture"] == "LlamaForCausalLM" and len(ours["weights"]) == 16
    assert None not in ours.values()


def test_other_weights_or_another_shape_differ(tiny_model: Path, tmp_path: Path) -> None:
    ours = _identity(tiny_model)
    seed2 = _identity(synth("tiny", tmp_path / "seed2", seed=2, progress=lambda m: None))
    assert [d.split()[0] for d in differences(ours, seed2)] == ["weights"]
    wider = Path(shutil.copytree(tiny_model, tmp_path / "wider"))
    config = json.loads((wider / "config.json").read_text())
    config["intermediate_size"] *= 2
    (wider / "config.json").write_text(json.dumps(config))
    (diff,) = differences(ours, _identity(wider))
    assert diff == "intermediate_size 256 (this broker: 128)"


def test_differences_take_any_register_contents(tiny_model: Path) -> None:
    """What a node sends is untrusted: missing keys and odd values are named, cut short."""
    ours = _identity(tiny_model)
    diffs = differences(ours, {**ours, "weights": "x" * 500, "num_heads": None})
    assert diffs[0] == f"num_heads None (this broker: {ours['num_heads']})"
    assert diffs[1].startswith("weights " + "x" * 37 + "... (this broker: ")
    assert len(differences(ours, {})) == len(ours)
