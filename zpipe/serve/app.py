"""``zpipe serve``: an OpenAI-compatible HTTP API and a live dashboard in front of a broker.

It talks to the broker only through the async Python client (``zpipe.client.Client``), one
client for every request. Endpoints: ``POST /v1/chat/completions`` and ``/v1/completions``
(server-sent events with ``"stream": true``), ``GET /v1/models``, ``/health``, ``/metrics``
(the broker's Prometheus text), and the dashboard: ``/`` and its data, ``/dashboard.json``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from zpipe.client import Client, TokenChunk, ZpipeError
from zpipe.serve import api
from zpipe.serve.dashboard import dashboard_state

log = logging.getLogger("zpipe.serve")
DASHBOARD_HTML = Path(__file__).with_name("dashboard.html")


class _Stream(StreamingResponse):
    """Server-sent events whose source is closed however the response ends: a client that
    goes away mid-stream cancels its session at the broker there and then."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Server:
    """The app's state: the broker client, the optional API key, the model's name and chat
    defaults (asked of the broker once)."""

    def __init__(self, broker: str | None, api_key: str | None = None, key: str | None = None,
                 broker_key: str | None = None) -> None:
        # CURVE: a client key serves the API; the dashboard and /metrics need an admin key
        self.client = Client(broker, key=key, broker_key=broker_key)
        self.api_key = api_key
        self.model: str | None = None
        self.generation: dict | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with self.client:
            yield

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/", self.dashboard, methods=["GET"]),
            Route("/dashboard.json", self.dashboard_json, methods=["GET"]),
        ]
        app = Starlette(routes=routes, lifespan=self.lifespan,
                        exception_handlers={api.APIError: _error, 404: _not_found,
                                            405: _not_allowed})
        return app

    # ------------------------------------------------------------ helpers
    def _auth(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise api.APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                               code="invalid_api_key")

    async def _info(self) -> dict:
        try:
            return await self.client.info()
        except ZpipeError as e:
            raise api.from_broker(e.code, e.message) from None

    async def _model(self) -> tuple[str, dict | None]:
        """The model's name and chat sampling defaults, as the broker says (asked once)."""
        if self.model is None:
            info = await self._info()
            self.model = Path(info["model"]).name
            self.generation = info.get("generation") or None
        return self.model, self.generation

    # ------------------------------------------------------------ generation
    async def chat(self, request: HTTPRequest) -> Any:
        return await self._generate(request, chat=True)

    async def completions(self, request: HTTPRequest) -> Any:
        return await self._generate(request, chat=False)

    async def _generate(self, request: HTTPRequest, chat: bool) -> Any:
        self._auth(request)
        try:
            body = await request.json()
        except ValueError:
            raise api.APIError(400, "the body is not valid JSON", code="invalid_json") from None
        model, generation = await self._model()
        req = api.parse(body, chat, model, generation)
        events = self.client.events(req.prompt, chat=False, **req.options)
        try:
            accepted = await anext(events)  # the broker's answer: accepted, or an error
        except ZpipeError as e:
            raise api.from_broker(e.code, e.message) from None
        prompt_tokens = len(accepted["prompt_ids"])
        rid = api.new_id(chat)
        if req.stream:
            return _Stream(self._stream(req, rid, events, prompt_tokens),
                           media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        stop = api.StopMatcher(req.stop)
        n, text, reason = 0, "", "stop"
        async with contextlib.aclosing(events):
            try:
                async for ev in events:
                    if isinstance(ev, TokenChunk):
                        n += 1
                        stop.feed(ev.text)
                        if stop.stopped:  # leaving the loop cancels the session
                            break
                    else:
                        text, reason = ev["text"], api.finish_reason(ev["finish_reason"])
            except ZpipeError as e:
                raise api.from_broker(e.code, e.message) from None
        if stop.stopped:
            text, reason = stop.text, "stop"
        return JSONResponse(api.response(req, rid, text, reason, prompt_tokens, n))

    async def _stream(self, req: api.Request, rid: str, events: AsyncIterator[Any],
                      prompt_tokens: int) -> AsyncIterator[str]:
        created = int(time.time())
        stop = api.StopMatcher(req.stop)
        n, reason = 0, "stop"
        async with contextlib.aclosing(events):
            if req.chat:
                yield _sse(api.chunk(req, rid, created, "", role=True))
            try:
                async for ev in events:
                    if isinstance(ev, TokenChunk):
                        n += 1
                        out = stop.feed(ev.text)
                        if out:
                            yield _sse(api.chunk(req, rid, created, out))
                        if stop.stopped:
                            break
                    else:
                        reason = api.finish_reason(ev["finish_reason"])
                        out = stop.flush()
                        if out:
                            yield _sse(api.chunk(req, rid, created, out))
            except ZpipeError as e:  # after the 200: the error goes in the stream
                yield _sse(api.from_broker(e.code, e.message).body())
                yield "data: [DONE]\n\n"
                return
        yield _sse(api.chunk(req, rid, created, None, reason))
        if req.include_usage:
            yield _sse(api.usage_chunk(req, rid, created, prompt_tokens, n))
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------ the rest
    async def models(self, request: HTTPRequest) -> JSONResponse:
        self._auth(request)
        model, _ = await self._model()
        return JSONResponse({"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "zpipe"}]})

    async def health(self, request: HTTPRequest) -> JSONResponse:
        try:
            info = await self.client.info(timeout=2.0)
        except ZpipeError as e:
            return JSONResponse({"status": "broker_unreachable", "message": e.message}, 503)
        ok = bool(info["ready"])
        return JSONResponse({"status": "ok" if ok else "not_ready", "ready": ok,
                             "waiting_for": info["waiting_for"], "sessions": info["sessions"]},
                            200 if ok else 503)

    async def _admin(self, request: HTTPRequest, op: str) -> dict:
        """The broker's answer to admin op ``op``, for an authorised request."""
        self._auth(request)
        try:
            return await self.client.admin(op)
        except ZpipeError as e:
            raise api.from_broker(e.code, e.message) from None

    async def metrics(self, request: HTTPRequest) -> PlainTextResponse:
        data = await self._admin(request, "metrics")
        return PlainTextResponse(data["text"], media_type="text/plain; version=0.0.4")

    async def dashboard(self, request: HTTPRequest) -> HTMLResponse:
        return HTMLResponse(DASHBOARD_HTML.read_text())

    async def dashboard_json(self, request: HTTPRequest) -> JSONResponse:
        return JSONResponse(dashboard_state(await self._admin(request, "status")))


async def _error(request: HTTPRequest, exc: Exception) -> JSONResponse:
    assert isinstance(exc, api.APIError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), exc.status, headers=headers)


async def _not_found(request: HTTPRequest, exc: Exception) -> JSONResponse:
    return JSONResponse(api.APIError(404, f"no such endpoint: {request.url.path}",
                                     code="not_found").body(), 404)


async def _not_allowed(request: HTTPRequest, exc: Exception) -> JSONResponse:
    return JSONResponse(api.APIError(405, f"{request.method} is not allowed on "
                                          f"{request.url.path}", code="method_not_allowed",
                                     type_="invalid_request_error").body(), 405)


def create_app(broker: str | None, api_key: str | None = None, key: str | None = None,
               broker_key: str | None = None) -> Starlette:
    return Server(broker, api_key, key, broker_key).app()


def split_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--bind: expected HOST:PORT, got {bind!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def run_serve(broker: str | None, bind: str, api_key: str | None = None,
              key: str | None = None, broker_key: str | None = None) -> int:
    import uvicorn

    from zpipe.config import ConfigError

    try:
        host, port = split_bind(bind)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    log.info("serving the OpenAI-compatible API and dashboard on http://%s:%d for %s",
             host, port, broker or "the default broker")
    uvicorn.run(create_app(broker, api_key, key, broker_key), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0
