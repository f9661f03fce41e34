"""The HTTP application: routes, API-key check, error bodies, request log, the chat page.

    app = create_app(LLM(), api_keys=ApiKeys.from_file("keys.txt"))
    serve(app, host="127.0.0.1", port=8000)

Every error is an OpenAI error body with the right status; the log line for a request names
the route, status, duration and key owner, never the key or the prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from importlib import resources
from typing import Optional

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.staticfiles import StaticFiles

from inhouse.server.async_engine import AsyncEngine
from inhouse.server.auth import ApiKeys
from inhouse.server.handlers import ServerState, chat_completions, completions
from inhouse.server.metrics import ServerMetrics
from inhouse.server.protocol import ApiError

logger = logging.getLogger("inhouse.server")

PROTECTED_PREFIXES = ("/v1/", "/metrics")
KNOWN_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


def static_dir() -> str:
    """Folder of the chat page's files (installed with the package)."""
    return str(resources.files("inhouse.server") / "static")


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(llm, *, api_keys: Optional[ApiKeys] = None, served_model_names: Optional[list[str]] = None,
               max_queue: int = 64, request_timeout: Optional[float] = 600.0) -> FastAPI:
    """Build the FastAPI app around a loaded `LLM` (its engine is taken over by a worker thread).

    Args:
        llm: an `inhouse.LLM`; nothing else may use its engine while the app runs.
        api_keys: accepted keys; None leaves the API open (a warning is logged at start).
        served_model_names: names clients use for the model (default: the model's own name).
            The LoRA adapters registered on `llm` (`LLM.add_lora`) are served too, each under its
            own name: a request's ``model`` picks the base model or one adapter, and requests for
            different ones share batches.
        max_queue: sequences allowed to wait beyond ``max_num_seqs``; past that requests get 429.
        request_timeout: seconds a request may take in all; None: no limit.
    """
    names = list(served_model_names or [llm.loaded.name])
    adapters = list(getattr(llm, "adapters", []))  # LoRA adapters registered on the LLM (`LLM.add_lora`)
    clash = sorted(set(names) & set(adapters))
    if clash:
        raise ValueError(f"adapter name {clash[0]!r} is also a name of the base model; give the adapter another name")
    metrics = ServerMetrics(max_num_seqs=llm.engine.max_num_seqs, queue_limit=max_queue)

    def on_finish(rid: str, output, error) -> None:  # every end, including aborts by vanished clients
        if error is not None:
            reason = {"RequestTimeoutError": "timeout"}.get(type(error).__name__, "error")
            metrics.finished.inc(1, reason)
        elif output is not None:
            for o in output.outputs:
                metrics.finished.inc(1, o.finish_reason or "abort")

    engine = AsyncEngine(llm.engine, max_queue=max_queue, request_timeout=request_timeout, on_finish=on_finish)
    metrics._stats = lambda: engine.stats
    state = ServerState(llm, engine, metrics, names, adapters)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        if api_keys is None:
            logger.warning("!" * 78)
            logger.warning("!! NO API KEY FILE: this server is OPEN. Anyone who can reach it can use the model.")
            logger.warning("!! Give --api-key-file FILE (one key per line) before exposing it beyond localhost.")
            logger.warning("!" * 78)
        logger.info("serving %s (context %d tokens, %d sequences at once, queue %d)", ", ".join(names),
                    llm.max_model_len, llm.engine.max_num_seqs, max_queue)
        if adapters:
            logger.info("LoRA adapters: %s (at most %d resident at once)", ", ".join(adapters), llm.max_loras)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="inhouse", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.inhouse = state

    def _log(client: str, method: str, path: str, status: int, t0: float, owner: Optional[str],
             note: Optional[str]) -> None:
        endpoint = path if path in KNOWN_ENDPOINTS else ("/static" if path.startswith("/static/") else "other")
        metrics.requests.inc(1, endpoint, str(status))
        level = logging.INFO if status < 400 else logging.WARNING
        logger.log(level, "%s %s %s %d %.3fs%s%s", client, method, endpoint, status, time.monotonic() - t0,
                   f" key={owner}" if owner else "", f" ({note})" if note else "")

    class AuthAndLog:
        """Pure ASGI middleware (streams pass through untouched; disconnects reach the handlers)."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            t0 = time.monotonic()
            path, method = scope["path"], scope["method"]
            client = scope["client"][0] if scope.get("client") else "-"
            owner = None
            if api_keys is not None and path.startswith(PROTECTED_PREFIXES):
                header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                owner = api_keys.check(header)
                if owner is None:
                    why = "missing" if not header else "wrong"
                    err = ApiError(401, f"{why} API key: send 'Authorization: Bearer KEY' with a key from the "
                                        "server's key file", type="authentication_error", code="invalid_api_key")
                    _log(client, method, path, 401, t0, None, f"{why} API key")
                    return await _error_response(err)(scope, receive, send)
            status = [500]

            async def send_wrapper(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, send_wrapper)
            finally:
                _log(client, method, path, status[0], t0, owner, None)

    app.add_middleware(AuthAndLog)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        logger.warning("error %d %s param=%s code=%s: %s", exc.status, exc.type, exc.param, exc.code, exc.message)
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        err = ApiError(exc.status_code, str(exc.detail), type="invalid_request_error",
                       code="not_found" if exc.status_code == 404 else None)
        return _error_response(err)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.error("internal error on %s: %s", request.url.path, type(exc).__name__, exc_info=exc)
        return _error_response(ApiError(500, f"internal server error ({type(exc).__name__})", type="server_error"))

    @app.get("/health")
    async def health():
        s = engine.stats
        if not s.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok", "running": s.running_seqs, "waiting": s.waiting}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": n, "object": "model", "created": state.created, "owned_by": "inhouse",
                 "max_model_len": llm.max_model_len, "parent": None} for n in names]
        data += [{"id": a, "object": "model", "created": state.created, "owned_by": "inhouse",
                  "max_model_len": llm.max_model_len, "parent": names[0]} for a in adapters]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await chat_completions(state, request)

    @app.post("/v1/completions")
    async def complete(request: Request):
        return await completions(state, request)

    @app.get("/")
    async def index():
        return FileResponse(f"{static_dir()}/index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=static_dir()), name="static")
    return app


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted (blocks)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: reachable from other machines", host)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            server_header=False, log_config=None)
    uvicorn.Server(config).run()
