"""The dashboard's data: the broker's admin status, cut down to what the page draws."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ms(stats: dict | None, key: str) -> float | None:
    v = None if not stats else stats.get(key)
    return None if v is None else round(v * 1000, 3)


def _layers(stages: list[dict]) -> str:
    return " | ".join(f"{s['node']} {s['start']}-{s['end'] - 1}" for s in stages) or "-"


def dashboard_state(status: dict) -> dict:
    """Stages in pipeline order (node, layers, heads, device, state, heartbeat age, per-token
    compute and hop p50/p99 in ms), the other nodes, throughput, running sessions and the
    reallocation/failover history, newest first."""
    by_name = {n["name"]: n for n in status.get("nodes", [])}
    placement = status.get("placement") or {}
    stages = []
    for i, st in enumerate(placement.get("stages", [])):
        n = by_name.get(st["node"], {})
        stages.append({
            "index": i, "node": st["node"], "layers": [st["start"], st["end"] - 1],
            "heads": n.get("heads"), "num_heads": n.get("num_heads"),
            "device": n.get("device"), "dtype": n.get("dtype"), "state": n.get("state"),
            "host": n.get("host"), "heartbeat_age_s": n.get("heartbeat_age_s"),
            "tokens": n.get("tokens"),
            "compute_p50_ms": _ms(n.get("compute"), "p50"),
            "compute_p99_ms": _ms(n.get("compute"), "p99"),
            "hop_p50_ms": _ms(n.get("hop"), "p50"), "hop_p99_ms": _ms(n.get("hop"), "p99"),
            "mem_used": n.get("mem_used"), "kv_bytes": n.get("kv_bytes"),
        })
    in_pipeline = {s["node"] for s in stages}
    spare = [{"node": n["name"], "device": n.get("device"), "state": n.get("state"),
              "heartbeat_age_s": n.get("heartbeat_age_s")}
             for n in status.get("nodes", []) if n["name"] not in in_pipeline]
    overall = status.get("overall") or {}
    history = []
    for r in reversed(status.get("reallocations") or []):
        history.append({"time": r.get("time"), "reason": r.get("reason"), "ok": r.get("ok"),
                        "error": r.get("error"), "pause_s": r.get("pause_s"),
                        "before": _layers(r.get("before") or []),
                        "after": _layers(r.get("after") or [])})
    return {
        "ready": status.get("ready"), "waiting_for": status.get("waiting_for"),
        "model": Path(status.get("model") or "-").name, "num_layers": status.get("num_layers"),
        "epoch": placement.get("epoch"), "stages": stages, "spare": spare,
        "tokens_per_s": overall.get("tokens_per_s"), "tokens_total": overall.get("tokens_total"),
        "step_p50_ms": _ms(overall.get("step"), "p50"),
        "step_p99_ms": _ms(overall.get("step"), "p99"),
        "ttft_p50_ms": _ms(overall.get("ttft"), "p50"),
        "sessions": [_session(s) for s in status.get("sessions") or []],
        "history": history,
    }


def _session(s: dict) -> dict[str, Any]:
    return {"sid": s["sid"][:8], "prompt_tokens": s.get("prompt_tokens"),
            "tokens": s.get("tokens"), "tokens_per_s": s.get("tokens_per_s"),
            "step_p50_ms": None if s.get("step_p50_s") is None else round(
                s["step_p50_s"] * 1000, 3),
            "age_s": s.get("age_s")}
