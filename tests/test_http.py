"""``zpipe serve`` against a real cluster, through the ``openai`` package, raw HTTP and SSE."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import RunningCluster, free_port

from bench.serving import start_server

KEY = "test-key"
PROMPT = "The history of the printing press begins"
NEW = 12


class Server:
    def __init__(self, rc: RunningCluster, url: str) -> None:
        self.rc = rc
        self.url = url
        self.headers = {"Authorization": f"Bearer {KEY}"}

    def post(self, path: str, body: object, **kw: object) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=120, **kw)



@pytest.fixture(scope="module")
def server(tiny_model: Path, clusters, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    rc = clusters.get(tiny_model, 3)
    proc, url = start_server(rc.address, tmp_path_factory.mktemp("serve") / "serve.log",
                             "--api-key", KEY)
    yield Server(rc, url)
    proc.terminate()
    proc.wait(10)


async def _client_text(rc: RunningCluster, prompt: str, chat: bool) -> tuple:
    """What the Python client gets: (whole text, streamed text, prompt tokens, tokens)."""
    async with rc.client() as client:
        gen = await client.generate(prompt, chat=chat, max_new_tokens=NEW)
        streamed = "".join([c.text async for c in client.stream(prompt, chat=chat,
                                                                max_new_tokens=NEW)])
    return gen.text, streamed, len(gen.prompt_token_ids), len(gen.token_ids)


def test_openai_package_gets_the_python_clients_greedy_text(server: Server) -> None:
    text, streamed, n_prompt, n_tokens = asyncio.run(_client_text(server.rc, PROMPT, False))
    chat_text, chat_streamed, chat_prompt, chat_tokens = asyncio.run(
        _client_text(server.rc, PROMPT, True))
    sync = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    model = sync.models.list().data[0].id
    assert model == "tiny"

    out = sync.completions.create(model=model, prompt=PROMPT, max_tokens=NEW, temperature=0)
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (n_prompt, n_tokens)
    assert out.usage.total_tokens == n_prompt + n_tokens
    parts = sync.completions.create(model=model, prompt=PROMPT, max_tokens=NEW, temperature=0,
                                    stream=True)
    assert "".join(c.choices[0].text for c in parts) == streamed

    chat = sync.chat.completions.create(model=model, max_tokens=NEW, temperature=0,
                                        messages=[{"role": "user", "content": PROMPT}])
    assert chat.choices[0].message.content == chat_text
    assert chat.choices[0].message.role == "assistant"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (chat_prompt, chat_tokens)

    async def run_async() -> tuple[str, str, object]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY)
        whole = await aclient.chat.completions.create(
            model=model, max_tokens=NEW, temperature=0,
            messages=[{"role": "user", "content": PROMPT}])
        chunks = [c async for c in await aclient.chat.completions.create(
            model=model, max_tokens=NEW, temperature=0, stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": PROMPT}])]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        await aclient.close()
        return whole.choices[0].message.content, text, chunks[-1].usage

    whole, streamed_chat, usage = asyncio.run(run_async())
    assert whole == chat_text
    assert streamed_chat == chat_streamed
    assert (usage.prompt_tokens, usage.completion_tokens) == (chat_prompt, chat_tokens)


def test_sse_chunks(server: Server) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": NEW, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers=server.headers, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) >= 3  # role, some text, the end


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_curl_gets_sse_chunks(server: Server) -> None:
    """What the docs show: curl -N streams the completion as server-sent events."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": NEW, "temperature": 0,
            "stream": True}
    out = subprocess.run(
        ["curl", "-sS", "-N", "--max-time", "120", server.url + "/v1/completions",
         "-H", "Content-Type: application/json",
         "-H", f"Authorization: {server.headers['Authorization']}", "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=150, check=True).stdout
    lines = [line for line in out.splitlines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_sequences_cut_the_text(server: Server) -> None:
    text, *_ = asyncio.run(_client_text(server.rc, PROMPT, False))
    stop = text[len(text) // 2:len(text) // 2 + 3]
    want = text[:text.find(stop)]
    body = {"prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "stop": [stop, "never!"]}
    out = server.post("/v1/completions", body).json()
    assert out["choices"][0]["text"] == want
    assert out["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                      headers=server.headers, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


BAD = [
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 2.5},
     "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": "1"},
     "presence_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0},
     "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": -1}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ({}, "messages"),
]


@pytest.mark.parametrize("body, param", BAD)
def test_bad_chat_requests_are_400s_naming_the_field(server: Server, body: dict,
                                                     param: str) -> None:
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_other_errors_have_openais_shape(server: Server) -> None:
    r = server.post("/v1/completions", {"prompt": [10**9, 1], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json",
                   headers=server.headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/v1/chat/completions", headers=headers,
                       json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()
    with pytest.raises(openai.BadRequestError) as e:
        openai.OpenAI(base_url=server.url + "/v1", api_key=KEY).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert e.value.body["param"] == "temperature"
    r = httpx.get(server.url + "/v1/nothing", headers=server.headers)
    assert r.status_code == 404 and "error" in r.json()


def test_health_metrics_models(server: Server) -> None:
    r = httpx.get(server.url + "/health")  # open: no key needed
    assert r.status_code == 200 and r.json()["ready"] is True
    assert httpx.get(server.url + "/metrics").status_code == 401
    r = httpx.get(server.url + "/metrics", headers=server.headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "\nzpipe_tokens_total " in r.text and "zpipe_ready 1" in r.text
    r = httpx.get(server.url + "/v1/models", headers=server.headers)
    assert [m["id"] for m in r.json()["data"]] == ["tiny"]


def _sessions(server: Server) -> tuple[list, dict]:
    async def ask() -> tuple[list, dict]:
        async with server.rc.client() as client:
            status = await client.admin("status")
        return status["sessions"], status["overall"]["sessions_finished"]
    return asyncio.run(ask())


def test_a_client_that_disconnects_mid_stream_leaves_no_session(server: Server) -> None:
    running, finished = _sessions(server)
    before = {s["sid"] for s in running}
    cancelled = finished.get("cancelled", 0)
    body = {"prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers=server.headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        for _ in range(6):  # a few chunks: the session runs at every node
            next(lines)
        running, _ = _sessions(server)
        mine = [s for s in running if s["sid"] not in before]
        assert len(mine) == 1 and mine[0]["tokens"] < 2000
    # the connection is closed: the server cancels the session at the broker
    deadline = time.monotonic() + 30
    while True:
        running, finished = _sessions(server)
        if mine[0]["sid"] not in {s["sid"] for s in running}:
            break
        assert time.monotonic() < deadline, f"session still running: {running}"
        time.sleep(0.1)
    assert finished.get("cancelled", 0) == cancelled + 1


def test_a_cluster_without_placement_answers_503(tiny_model: Path, tmp_path: Path) -> None:
    """A broker whose node has not joined: the app (in process, through ASGI) answers 503 in
    OpenAI's shape, and /health says what the broker waits for."""
    from zpipe.cli.up import Cluster
    from zpipe.config import ClusterConfig, validate
    from zpipe.serve.app import Server as App

    address = f"tcp://127.0.0.1:{free_port()}"
    cfg = validate({"model": str(tiny_model), "broker": {"bind": address},
                    "nodes": [{"name": "x"}]}, ClusterConfig)
    cluster = Cluster(cfg, tmp_path)
    cluster._spawn("broker", "broker", cfg.broker_config())  # the broker only, no node

    async def run() -> tuple[httpx.Response, httpx.Response]:
        app = App(address)
        async with app.client, httpx.AsyncClient(transport=httpx.ASGITransport(app=app.app()),
                                                 base_url="http://zpipe") as http:
            for _ in range(200):  # until the broker answers at all
                health = await http.get("/health")
                if health.json()["status"] != "broker_unreachable":
                    break
            chat = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            return health, chat

    try:
        health, chat = asyncio.run(run())
    finally:
        cluster.stop()
    assert health.status_code == 503 and "x" in health.json()["waiting_for"]
    assert chat.status_code == 503
    err = chat.json()["error"]
    assert err["code"] == "no_placement" and err["type"] == "service_unavailable"
    assert "x" in err["message"]
