"""Smoke tests of the benchmarks in ``bench/`` (tiny model, few tokens): structure and sanity, not
speed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import cli as bench_cli
from bench import compare as bench
from bench import report as bench_report
from bench import transport as bench_transport


def test_compare_tiny(tiny_model: Path, tmp_path: Path) -> None:
    cfg = bench.CompareConfig(model=str(tiny_model), dtype="float32", prompt_len=8, new_tokens=4,
                              concurrency=2, stages=[2], threads=1, warmup_tokens=2,
                              log_dir=str(tmp_path / "logs"))
    result = bench.compare(cfg)
    json.dumps(result)  # what --json writes

    assert result["config"]["batch1_runs"] == 3
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    names = [s["name"] for s in result["systems"]]
    assert names == ["transformers", "zpipe 2 stages"]
    base, z = result["systems"]

    for s in (base, z):
        b1 = s["batch1"]
        assert b1["runs"] == 3
        assert len(s["token_ids"]) == 3 and all(len(t) == 4 for t in s["token_ids"])
        assert b1["tokens_per_s"] > 0 and b1["ttft_s"] > 0
        assert b1["per_token"]["count"] > 0
        assert 0 < b1["per_token"]["p50_s"] <= b1["per_token"]["p99_s"]
        c = s["concurrent"]
        assert c["sessions"] == 2 and c["tokens"] == 8 and c["tokens_per_s"] > 0
        assert c["tokens_match"] is True and c["mismatched_sessions"] == []
        assert c["gain_over_batch1"] > 0
        assert all(v and v > 10 * 2**20 for v in s["peak_rss_bytes"].values())
        assert s["cpu"]["batch1"]["foreign_cores"] >= 0 and s["cpu"]["batch1"]["own_cores"] > 0
        assert s["cpu"]["concurrent"]["wall_s"] > 0

    assert base["batch1"]["ttft_1tok_s"] > 0
    assert "left-padded" in base["concurrent"]["how"]
    assert base["batch1"]["ratio_to_transformers"] == pytest.approx(1.0)
    # Greedy zpipe gives transformers' tokens on the same weights.
    assert z["batch1"]["matches_transformers"] is True
    assert z["batch1"]["all_full_length"] is True
    assert math.isfinite(z["batch1"]["ratio_to_transformers"])
    assert math.isfinite(z["concurrent"]["ratio_to_transformers"])
    assert set(z["peak_rss_bytes"]) == {"broker", "node-s0", "node-s1"}
    assert [(p["start"], p["end"]) for p in z["placement"]] == [(0, 3), (3, 6)]
    bd = z["batch1"]["breakdown"]
    assert bd["step_s_p50"] >= bd["compute_s_p50"] > 0

    table = bench_report.format_compare(result)
    assert "transformers" in table and "zpipe 2 stages" in table and "2 sessions" in table

    pytest.importorskip("matplotlib")
    bench_report.plot_compare(result, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_transport_small() -> None:
    cfg = bench_transport.TransportConfig(sizes=[4096, 1 << 20], modes=["zpipe", "zpipe-sync", "raw"],
                                max_iters=20, max_seconds=0.2, warmup=2)
    result = bench_transport.transport(cfg)
    json.dumps(result)
    assert set(result["modes"]) == {"zpipe", "zpipe-sync", "raw"}
    for rows in result["modes"].values():
        assert [r["bytes"] for r in rows] == [2304, 4096, 8192, 4096, 1 << 20]
        assert rows[0]["shape"] == [1, 576] and rows[1]["dtype"] == "bfloat16"
        for r in rows:
            assert 5 <= r["iters"] <= 20
            assert 0 < r["rtt_us_min"] <= r["rtt_us_p50"] <= r["rtt_us_p99"]
            assert r["one_way_us"] == pytest.approx(r["rtt_us_p50"] / 2)
            assert r["gb_per_s"] == pytest.approx(2 * r["bytes"] / r["rtt_us_p50"] / 1e3)
    assert "one-way" in bench_transport.format_transport(result)


def test_cli_parser() -> None:
    parser = bench_cli.build_parser()
    a = parser.parse_args(["compare", "--stages", "1,3", "--concurrency", "4",
                           "--threads", "2", "--json", "x.json"])
    assert (a.stages, a.concurrency, a.threads, a.json) == ([1, 3], 4, 2, "x.json")
    assert a.func is bench_cli._cmd_compare
    a = parser.parse_args(["transport", "--sizes", "4K,16M", "--modes", "raw"])
    assert (a.sizes, a.modes) == ([4096, 16 << 20], ["raw"])
    a = parser.parse_args(["netns", "--rates", "1gbit,20mbit", "--nodes", "3", "--direct"])
    assert (a.rates, a.nodes, a.direct, a.func) == (["1gbit", "20mbit"], 3, True,
                                                    bench_cli._cmd_netns)
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--stages", "0"])
