"""The dashboard in a real headless Chromium, while a generation runs.

Needs the ``playwright`` package and a Chromium: Debian's (``apt-get install chromium``) or
Playwright's own; skipped otherwise. ``ZPIPE_DASHBOARD_SCREENSHOT=docs/images/dashboard.png``
also keeps the screenshot there (the README's)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest
from test_http import PROMPT

from bench.serving import start_server

playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not "
                                 "installed (pip install playwright)")


def _browser(p):  # noqa: ANN001, ANN202 - Playwright's own types
    exe = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                               "google-chrome"))), None)
    try:
        return p.chromium.launch(executable_path=exe, headless=True,
                                 args=["--no-sandbox", "--disable-gpu"])
    except Exception as e:  # noqa: BLE001 - no browser build: nothing to test with
        pytest.skip(f"no Chromium to run (apt-get install chromium): {str(e)[:200]}")


def test_dashboard_draws_the_pipeline_and_latency_live(tiny_model: Path, clusters,
                                                      tmp_path: Path) -> None:
    rc = clusters.get(tiny_model, 3)
    proc, url = start_server(rc.address, tmp_path / "serve.log")
    stop = threading.Event()

    def generate() -> None:
        body = {"prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return  # closing the stream cancels the session

    gen = threading.Thread(target=generate, daemon=True)
    try:
        gen.start()
        with playwright.sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/")
            page.wait_for_selector(".stage[data-stage='2']", timeout=60_000)
            # every stage's p50 latency and the throughput filled in, a session running
            page.wait_for_function("""() => {
                const cells = [...document.querySelectorAll('.stage .compute')];
                return cells.length === 3 && cells.every(c => /^[0-9.]+ \\//.test(c.textContent))
                    && /^[0-9.]+$/.test(document.getElementById('tps').textContent)
                    && Number(document.getElementById('tps').textContent) > 0
                    && Number(document.getElementById('nsessions').textContent) >= 1;
            }""", timeout=60_000)
            nodes = page.locator(".stage h3").all_text_contents()
            assert nodes == [f"stage {i}: n{i}" for i in range(3)]
            assert page.locator("#state").text_content() == "serving"
            layers = page.locator(".stage .layers").all_text_contents()
            assert layers[0].startswith("0–") and layers[-1].endswith("–5")
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        keep = os.environ.get("ZPIPE_DASHBOARD_SCREENSHOT")
        if keep:
            Path(keep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, keep)
    finally:
        stop.set()
        gen.join(60)
        proc.terminate()
        proc.wait(10)
