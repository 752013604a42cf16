"""Presenting ``python -m bench compare`` results: the text table and the PNG plot."""

from __future__ import annotations

from pathlib import Path

from bench.common import _f, _mib, _ms


def format_compare(result: dict) -> str:
    cfg = result["config"]
    m = result["machine"]
    lines = [
        f"model {cfg['model']} ({cfg['dtype']}, {cfg['device']}), prompt {cfg['prompt_len']} "
        f"tokens, {cfg['new_tokens']} new tokens, {cfg['threads']} threads per process, "
        f"concurrency {cfg['concurrency']}; OMP_WAIT_POLICY: zpipe processes "
        f"{cfg.get('zpipe_omp_wait_policy')}, transformers "
        f"{next((s['omp_wait_policy'] for s in result['systems'] if s['stages'] == 0), '-')}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB; "
        f"{m['date']}; load average {m['loadavg']} -> {m.get('loadavg_after')}",
        f"code: git {m.get('git_commit', '?')}"
        + (f" with local changes to {', '.join(m['git_modified'])}" if m.get("git_modified")
           else ""),
        "",
        f"{'system':<16} {'mode':<16} {'TTFT ms':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'tok/s':>7} {'x base':>6} {'gain':>5} {'match':>5}",
    ]
    for s in result["systems"]:
        for mode in ("batch1", "concurrent"):
            r = s.get(mode)
            if not r:
                continue
            if mode == "batch1":
                label, ttft = f"batch 1 (x{r['runs']})", r["ttft_s"]
                match = r.get("matches_transformers")
                gain = None
            else:
                label = (f"batch {r['sessions']} padded" if s["stages"] == 0
                         else f"{r['sessions']} sessions")
                ttft, match, gain = r["ttft_s_p50"], r["tokens_match"], r.get("gain_over_batch1")
            pt = r["per_token"]
            lines.append(
                f"{s['name']:<16} {label:<16} {_f(_ms(ttft), '8.1f')} "
                f"{_f(_ms(pt['p50_s']), '7.2f')} {_f(_ms(pt['p99_s']), '7.2f')} "
                f"{r['tokens_per_s']:7.1f} {_f(r.get('ratio_to_transformers'), '6.2f')} "
                f"{_f(gain, '5.2f')} {'-' if match is None else ('yes' if match else 'NO'):>5}")
    lines += ["", "peak memory (VmHWM, MiB):"]
    for s in result["systems"]:
        peaks = ", ".join(f"{k} {_mib(v)}" for k, v in s["peak_rss_bytes"].items())
        lines.append(f"  {s['name']:<16} {peaks}")
    lines += ["", "other processes on the machine while each system ran (cores kept busy by "
                  "processes not ours; steal = hypervisor; own = this benchmark's processes):"]
    for s in result["systems"]:
        c = s.get("cpu") or {}
        b, cc = c.get("batch1") or {}, c.get("concurrent") or {}
        lines.append(
            f"  {s['name']:<16} batch 1: foreign {_f(b.get('foreign_cores'), '.2f')} "
            f"(max {_f(b.get('max_foreign_cores'), '.2f')}), steal "
            f"{_f(b.get('steal_cores'), '.2f')}, own {_f(b.get('own_cores'), '.2f')}"
            + (f"; concurrent: foreign {cc['foreign_cores']:.2f}, own {cc['own_cores']:.2f}"
               if cc else ""))
    whole = m.get("cpu_during_measurement")
    if whole:
        lines.append(f"  whole measurement ({whole['wall_s']:.0f} s): foreign "
                     f"{whole['foreign_cores']:.2f} cores, steal {whole['steal_cores']:.2f}, "
                     f"own {whole['own_cores']:.2f}")
    lines += ["", "zpipe decode breakdown (broker-side medians per token, ms):"]
    for s in result["systems"]:
        if s["stages"] == 0:
            continue
        for mode in ("batch1", "concurrent"):
            b = (s.get(mode) or {}).get("breakdown")
            if b:
                lines.append(
                    f"  {s['name']:<16} {mode:<10} step {_f(_ms(b['step_s_p50']), '.2f')}, "
                    f"compute {_f(_ms(b['compute_s_p50']), '.2f')}, hop overhead "
                    f"{_f(_ms(b['hop_overhead_s_p50']), '.2f')} (per hop "
                    f"{_f(_ms(b['per_hop_overhead_s_p50']), '.3f')})")
    lines += ["", "x base: tokens/s over transformers' in the same mode; gain: concurrent "
                  "tokens/s over batch-1 tokens/s; match: batch 1 = same tokens as transformers, "
                  "concurrent = every session's tokens equal its batch-1 tokens.",
              f"TTFT: {result['method']['ttft']}",
              f"tok/s: {result['method']['tokens_per_s']}"]
    return "\n".join(lines)


def plot_compare(result: dict, path: str | Path) -> None:
    """A PNG: tokens/s per system (batch 1 and concurrent) and per-token latency.

    Raises ImportError if matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = result["systems"]
    names = [s["name"] for s in systems]
    cfg = result["config"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    x = range(len(systems))
    w = 0.38
    b1 = [s["batch1"]["tokens_per_s"] for s in systems]
    cc = [(s.get("concurrent") or {}).get("tokens_per_s", 0) for s in systems]
    ax = axes[0]
    ax.bar([i - w / 2 for i in x], b1, w, label="batch 1")
    if any(cc):
        ax.bar([i + w / 2 for i in x], cc, w, label=f"{cfg['concurrency']} concurrent")
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("tokens/s")
    ax.set_title("throughput")
    ax.legend()
    ax = axes[1]
    p50 = [_ms(s["batch1"]["per_token"]["p50_s"]) or 0 for s in systems]
    p99 = [_ms(s["batch1"]["per_token"]["p99_s"]) or 0 for s in systems]
    ax.bar([i - w / 2 for i in x], p50, w, label="p50")
    ax.bar([i + w / 2 for i in x], p99, w, label="p99")
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("ms")
    ax.set_title("per-token latency, batch 1")
    ax.legend()
    ax = axes[2]
    ax.bar(list(x), [_ms(s["batch1"]["ttft_s"]) or 0 for s in systems], 0.6)
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("ms")
    ax.set_title(f"time to first token ({cfg['prompt_len']}-token prompt)")
    fig.suptitle(f"{Path(cfg['model']).name} {cfg['dtype']} {cfg['device']}, "
                 f"{cfg['new_tokens']} new tokens, {cfg['threads']} threads/process — "
                 f"{result['machine']['cpu']}, {result['machine']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

