"""The OpenAI endpoints: request → prompt ids + `SamplingParams` → `AsyncEngine` → OpenAI JSON / SSE.

JSON and chat formats stay here; the engine sees token ids and plain Python values only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from inhouse.engine.engine import ContextLengthError, EngineError
from inhouse.engine.outputs import CompletionOutput, Logprob, RequestOutput
from inhouse.engine.params import SamplingParams, SamplingParamsError
from inhouse.server.async_engine import AsyncEngine, Delta, EngineFailure, Final, QueueFullError, RequestTimeoutError
from inhouse.server.metrics import ServerMetrics
from inhouse.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_body
from inhouse.tokenizer.system_prompt import ToolSpecError, split_tools

logger = logging.getLogger("inhouse.server")

MAX_TOP_LOGPROBS = 20
# A streamed reply is held back (to be parsed whole) while it may still turn out to be a tool call.
TOOL_CALL_STARTS = ("{", "[", "<function", "<|python_tag|>", "brave_search.", "wolfram_alpha.", "photogen.")


@dataclass
class ServerState:
    """What the handlers share: the model, its engine thread, names, metrics.

    ``names`` are the base model's names; ``adapters`` the LoRA adapter names (a request's
    ``model`` field picks the base model or one adapter).
    """

    llm: Any  # inhouse.LLM
    engine: AsyncEngine
    metrics: ServerMetrics
    names: list[str]
    adapters: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len


# ---------------------------------------------------------------------------------------- helpers
async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        pos = f" (at character {e.pos})" if isinstance(e, json.JSONDecodeError) else ""
        raise ApiError(400, f"the request body is not valid JSON{pos}") from None


def check_model(state: ServerState, model: Optional[str]) -> tuple[str, Optional[str]]:
    """The request's ``model`` -> (name to answer with, LoRA adapter or None for the base model)."""
    if model is None or model == "":
        return state.names[0], None
    if model in state.names:
        return model, None
    if model in state.adapters:
        return model, model
    raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                        f"{', '.join(state.names + state.adapters)}", param="model", code="model_not_found")


def _params(state: ServerState, req: Any, *, max_tokens: Optional[int], logprobs: Optional[int],
            prompt_logprobs: Optional[int] = None, skip_special: bool = True) -> SamplingParams:
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, f"temperature: must be between 0 and 2, got {temperature}", param="temperature")
    kw: dict[str, Any] = dict(
        n=req.n, temperature=temperature, seed=req.seed, stop=req.stop, max_tokens=max_tokens,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, skip_special_tokens=skip_special,
    )
    for name in ("top_p", "top_k", "min_p", "repetition_penalty"):
        v = getattr(req, name)
        if v is not None:
            kw[name] = v
    if isinstance(req.stop, list) and len(req.stop) > 16:
        raise ApiError(400, f"stop: at most 16 stop strings, got {len(req.stop)}", param="stop")
    try:
        return SamplingParams(**kw)
    except SamplingParamsError as e:
        raise ApiError(400, str(e).replace("SamplingParams.", ""), param=e.field) from None


async def _submit(state: ServerState, ids: list[int], params: SamplingParams, rid: str, prompt: Optional[str],
                  prompt_param: str, model: str, adapter: Optional[str]) -> asyncio.Queue:
    try:
        sink = await state.engine.submit(ids, params, request_id=rid, prompt=prompt, adapter=adapter)
    except QueueFullError as e:
        state.metrics.rejected.inc()
        raise ApiError(429, str(e), type="rate_limit_error", code="server_busy",
                       headers={"Retry-After": str(e.retry_after)}) from None
    except ContextLengthError as e:
        param = "max_tokens" if "max_tokens is" in str(e) else prompt_param
        raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
    except EngineError as e:
        raise ApiError(400, str(e), param=prompt_param) from None
    state.metrics.prompt_tokens.inc(len(ids))
    state.metrics.model_requests.inc(1, model)
    return sink


class _Timing:
    """Time to first token and time between tokens of one request, into the histograms."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self.m, self.arrival = metrics, arrival
        self.first: Optional[float] = None
        self.last: dict[int, float] = {}

    def delta(self, d: Delta) -> None:
        now = time.monotonic()
        k = len(d.token_ids)
        if not k:
            return
        self.m.generated_tokens.inc(k)
        if self.first is None:
            self.first = now
            self.m.ttft.observe(now - self.arrival)
        prev = self.last.get(d.index)
        if prev is not None:
            for _ in range(k):
                self.m.tpot.observe((now - prev) / k)
        self.last[d.index] = now

    def final(self, f: Final) -> None:
        self.m.e2e.observe(time.monotonic() - self.arrival)


def _error_from_final(f: Final) -> ApiError:
    if isinstance(f.error, RequestTimeoutError):
        return ApiError(504, str(f.error), type="timeout_error", code="request_timeout")
    if isinstance(f.error, EngineFailure):
        return ApiError(500, str(f.error), type="server_error")
    return ApiError(500, "the request was cancelled", type="server_error")


async def _wait_final(state: ServerState, sink: asyncio.Queue, request: Request, rid: str, timing: _Timing) -> Final:
    """Consume a request's deltas until it ends; abort it if the client goes away meanwhile."""
    while True:
        try:
            item = await asyncio.wait_for(sink.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                state.engine.abort(rid)
                logger.info("client left before %s finished; cancelled", rid)
                raise asyncio.CancelledError()
            continue
        if isinstance(item, Final):
            timing.final(item)
            if item.error is not None:
                raise _error_from_final(item)
            return item
        timing.delta(item)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _top_entries(d: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(((t, lp) for t, lp in d.items() if lp.rank is not None and lp.rank <= k), key=lambda x: x[1].rank)[:k]


def _chosen(d: dict[int, Logprob]) -> tuple[int, Logprob]:
    return next(iter(d.items()))  # the engine puts the sampled token first


def _chat_logprobs(entries: list[dict[int, Logprob]], k: int) -> dict:
    content = []
    for d in entries:
        tok, lp = _chosen(d)
        text = lp.decoded_token or ""
        content.append({
            "token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": t.decoded_token or "", "logprob": t.logprob,
                              "bytes": list((t.decoded_token or "").encode("utf-8"))} for _, t in _top_entries(d, k)],
        })
    return {"content": content}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------------------------------- tools
@dataclass
class ToolSetup:
    tools: Optional[list[dict]]  # what the prompt carries (None: no tool prompt)
    choice: Optional[str]  # None/"auto"/"required"/a function name, for the system prompt
    parse: bool  # parse tool calls out of the reply


def _check_tools(req: ChatCompletionRequest) -> ToolSetup:
    tools, choice = req.tools, req.tool_choice
    if tools is not None and not tools:
        raise ApiError(400, "tools: must be a non-empty list when given", param="tools")
    names: list[str] = []
    if tools:
        try:
            builtin, custom = split_tools(tools)
        except ToolSpecError as e:
            raise ApiError(400, f"tools: {e}", param="tools") from None
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, Mapping) else None
            params = fn.get("parameters") if isinstance(fn, Mapping) else None
            if params is not None:
                if params.get("type", "object") != "object":
                    raise ApiError(400, f"tools[{i}].function.parameters.type: a tool's parameters must be a JSON "
                                        f"schema of type 'object', got {params.get('type')!r}", param="tools")
                if not isinstance(params.get("properties", {}), Mapping):
                    raise ApiError(400, f"tools[{i}].function.parameters.properties: must be an object",
                                   param="tools")
        names = builtin + [c.name for c in custom]
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ApiError(400, f"tool_choice: must be 'none', 'auto', 'required' or "
                                f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}",
                           param="tool_choice")
        if choice != "none" and not tools:
            raise ApiError(400, f"tool_choice: {choice!r} needs tools", param="tool_choice")
        if choice == "none":
            return ToolSetup(None, None, False)
        return ToolSetup(tools, choice, True)
    fn = choice.get("function") if choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str):
        raise ApiError(400, "tool_choice: a named choice is {'type': 'function', 'function': {'name': ...}}",
                       param="tool_choice")
    if name not in names:
        raise ApiError(400, f"tool_choice: the function {name!r} is not among the tools ({', '.join(names) or 'none'})",
                       param="tool_choice")
    return ToolSetup(tools, name, True)


def _could_be_tool_call(text: str) -> bool:
    s = text.lstrip()
    return not s or any(s.startswith(p) or p.startswith(s) for p in TOOL_CALL_STARTS)


# ---------------------------------------------------------------------------------------- chat
async def chat_completions(state: ServerState, request: Request) -> Response:
    """``POST /v1/chat/completions``."""
    arrival = time.monotonic()
    req = parse_body(ChatCompletionRequest, await read_json(request))
    model, adapter = check_model(state, req.model)
    if not req.messages:
        raise ApiError(400, "messages: must be a non-empty list", param="messages")
    setup = _check_tools(req)
    messages = [dict(m, role="system") if m.get("role") == "developer" else m for m in req.messages]
    renderer = state.llm.chat_renderer
    native = renderer.mode == "llama3"
    kwargs = {"tool_choice": setup.choice} if (native and setup.tools) else {}
    try:
        ids = renderer.encode(messages, tools=setup.tools, **kwargs)
    except ToolSpecError as e:
        raise ApiError(400, f"tools: {e}", param="tools") from None
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs: must be between 0 and {MAX_TOP_LOGPROBS}, got {req.top_logprobs}",
                       param="top_logprobs")
    k = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    parse_tools = setup.parse and native
    params = _params(state, req, max_tokens=max_tokens, logprobs=k, skip_special=not parse_tools)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    sink = await _submit(state, ids, params, rid, None, "messages", model, adapter)
    timing = _Timing(state.metrics, arrival)
    eom = state.llm.tokenizer.special_tokens.get("<|eom_id|>")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        gen = _stream_chat(state, sink, rid, model, len(ids), params.n, k, parse_tools, eom, include_usage, timing)
        return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    final = await _wait_final(state, sink, request, rid, timing)
    out: RequestOutput = final.output
    choices = []
    for o in out.outputs:
        message, finish = _chat_message(state, o, parse_tools, eom)
        choices.append({"index": o.index, "message": message,
                        "logprobs": _chat_logprobs(o.logprobs, k) if k is not None else None,
                        "finish_reason": finish})
    n_out = sum(len(o.token_ids) for o in out.outputs)
    return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                         "choices": choices, "usage": _usage(len(ids), n_out)})


def _finish_reason(reason: Optional[str]) -> str:
    return "length" if reason == "length" else "stop"


def _chat_message(state: ServerState, o: CompletionOutput, parse_tools: bool, eom: Optional[int]) -> tuple[dict, str]:
    if not parse_tools:
        return {"role": "assistant", "content": o.text}, _finish_reason(o.finish_reason)
    ended_eom = bool(o.token_ids) and o.token_ids[-1] == eom
    parsed = state.llm.chat_renderer.parse(o.text, ended_with_eom=ended_eom)
    if not parsed.tool_calls:
        return {"role": "assistant", "content": parsed.content}, _finish_reason(o.finish_reason)
    return ({"role": "assistant", "content": parsed.content.strip() or None,
             "tool_calls": [c.to_openai() for c in parsed.tool_calls]}, "tool_calls")


async def _stream_chat(state: ServerState, sink: asyncio.Queue, rid: str, model: str, n_prompt: int, n: int,
                       k: Optional[int], parse_tools: bool, eom: Optional[int], include_usage: bool,
                       timing: _Timing) -> AsyncIterator[str]:
    created = int(time.time())
    ended = False

    def chunk(index: int, delta: dict, finish: Optional[str] = None, logprobs: Optional[dict] = None) -> str:
        c: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": finish}]}
        if include_usage:
            c["usage"] = None
        return _sse(c)

    text = {i: "" for i in range(n)}
    sent = {i: 0 for i in range(n)}  # characters of text already streamed
    buffering = {i: parse_tools for i in range(n)}
    pending_lp: dict[int, list] = {i: [] for i in range(n)}
    ids_out: dict[int, list[int]] = {i: [] for i in range(n)}
    try:
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        while True:
            item = await sink.get()
            if isinstance(item, Final):
                ended = True
                timing.final(item)
                if item.error is not None:
                    yield _sse(_error_from_final(item).body())
                    return
                break
            timing.delta(item)
            i = item.index
            text[i] += item.text
            ids_out[i] += item.token_ids
            if item.logprobs:
                pending_lp[i] += item.logprobs
            if buffering[i] and not _could_be_tool_call(text[i]):
                buffering[i] = False  # plain prose: stream it (tool calls are parsed only from replies that start as one)
            if not buffering[i] and (sent[i] < len(text[i]) or pending_lp[i]):
                lp = _chat_logprobs(pending_lp[i], k) if k is not None else None
                yield chunk(i, {"content": text[i][sent[i]:]}, logprobs=lp)
                sent[i], pending_lp[i] = len(text[i]), []
            if item.finish_reason is not None:
                finish = _finish_reason(item.finish_reason)
                if buffering[i]:
                    o = CompletionOutput(i, text[i], ids_out[i], None, None, item.finish_reason)
                    message, finish = _chat_message(state, o, True, eom)
                    delta: dict[str, Any] = {}
                    if message.get("content"):
                        delta["content"] = message["content"]
                    if message.get("tool_calls"):
                        delta["tool_calls"] = [dict(c, index=j) for j, c in enumerate(message["tool_calls"])]
                    lp = _chat_logprobs(pending_lp[i], k) if k is not None else None
                    if delta or lp:
                        yield chunk(i, delta, logprobs=lp)
                yield chunk(i, {}, finish)
        if include_usage:
            n_out = sum(len(v) for v in ids_out.values())
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": _usage(n_prompt, n_out)})
        yield "data: [DONE]\n\n"
    finally:
        if not ended:  # the client went away (or the server is stopping): free the cache rows now
            state.engine.abort(rid)
            logger.info("stream %s closed before the end; cancelled", rid)


# ---------------------------------------------------------------------------------------- completions
def _completion_logprobs(tokens: list[tuple[str, Optional[float], Optional[dict]]], offset0: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pos = offset0
    for text, lp, top in tokens:
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(top)
        out["text_offset"].append(pos)
        pos += len(text)
    return out


def _lp_items(entries: list[Optional[dict[int, Logprob]]], ids: list[int], k: int, tokenizer) -> list:
    items = []
    for tok, d in zip(ids, entries):
        if d is None:
            items.append((tokenizer.decode([tok]), None, None))
            continue
        lp = d.get(tok) or _chosen(d)[1]
        top = {(t.decoded_token or ""): t.logprob for _, t in _top_entries(d, k)}
        items.append((lp.decoded_token or tokenizer.decode([tok]), lp.logprob, top))
    return items


async def completions(state: ServerState, request: Request) -> Response:
    """``POST /v1/completions``."""
    arrival = time.monotonic()
    req = parse_body(CompletionRequest, await read_json(request))
    model, adapter = check_model(state, req.model)
    p = req.prompt
    if isinstance(p, str):
        prompts: list = [p]
    elif p and isinstance(p[0], int):
        prompts = [p]
    else:
        prompts = list(p)
    if not prompts:
        raise ApiError(400, "prompt: must not be empty", param="prompt")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"logprobs: must be between 0 and {MAX_TOP_LOGPROBS}, got {req.logprobs}", param="logprobs")
    k = req.logprobs
    params = _params(state, req, max_tokens=req.max_tokens, logprobs=k,
                     prompt_logprobs=k if (req.echo and k is not None) else None)
    tok = state.llm.tokenizer
    items = []
    for pr in prompts:
        if isinstance(pr, str):
            items.append((pr, tok.encode(pr, bos=tok.add_bos)))
        else:
            items.append((None, [int(t) for t in pr]))
    base = f"cmpl-{uuid.uuid4().hex}"
    sinks: list[tuple[str, asyncio.Queue]] = []
    try:
        for j, (text, ids) in enumerate(items):
            rid = f"{base}-{j}"
            sinks.append((rid, await _submit(state, ids, params, rid, text, "prompt", model, adapter)))
    except BaseException:
        for rid, _ in sinks:
            state.engine.abort(rid)
        raise
    timing = [_Timing(state.metrics, arrival) for _ in items]
    n_prompt = sum(len(ids) for _, ids in items)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        gen = _stream_completions(state, sinks, items, base, model, params.n, k, req.echo, include_usage, timing,
                                  n_prompt)
        return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        finals = await asyncio.gather(*[_wait_final(state, s, request, rid, t) for (rid, s), t in zip(sinks, timing)])
    except BaseException:
        for rid, _ in sinks:
            state.engine.abort(rid)
        raise
    choices = []
    n_out = 0
    for j, (f, (text, ids)) in enumerate(zip(finals, items)):
        out: RequestOutput = f.output
        prompt_text = text if text is not None else tok.decode(ids)
        for o in out.outputs:
            n_out += len(o.token_ids)
            lp = None
            if k is not None:
                lp_items = []
                if req.echo:
                    lp_items += _lp_items(out.prompt_logprobs or [None] * len(ids), ids, k, tok)
                lp_items += _lp_items(o.logprobs or [], o.token_ids, k, tok)
                lp = _completion_logprobs(lp_items, 0)
            choices.append({"index": j * params.n + o.index, "text": (prompt_text if req.echo else "") + o.text,
                            "logprobs": lp, "finish_reason": _finish_reason(o.finish_reason)})
    return JSONResponse({"id": base, "object": "text_completion", "created": int(time.time()), "model": model,
                         "choices": choices, "usage": _usage(n_prompt, n_out)})


async def _stream_completions(state, sinks, items, base, model, n, k, echo, include_usage, timing,
                              n_prompt) -> AsyncIterator[str]:
    created = int(time.time())
    merged: asyncio.Queue = asyncio.Queue()
    tok = state.llm.tokenizer

    async def pump(j: int, q: asyncio.Queue) -> None:
        while True:
            item = await q.get()
            await merged.put((j, item))
            if isinstance(item, Final):
                return

    tasks = [asyncio.create_task(pump(j, q)) for j, (_, q) in enumerate(sinks)]
    open_reqs = len(sinks)
    n_out = 0

    def chunk(index: int, text: str, finish: Optional[str] = None, logprobs: Optional[dict] = None) -> str:
        c = {"id": base, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            c["usage"] = None
        return _sse(c)

    try:
        if echo:
            for j, (text, ids) in enumerate(items):
                for i in range(n):
                    yield chunk(j * n + i, text if text is not None else tok.decode(ids))
        while open_reqs:
            j, item = await merged.get()
            if isinstance(item, Final):
                open_reqs -= 1
                timing[j].final(item)
                if item.error is not None:
                    yield _sse(_error_from_final(item).body())
                    return
                continue
            timing[j].delta(item)
            n_out += len(item.token_ids)
            lp = None
            if k is not None and item.logprobs:
                lp = _completion_logprobs(_lp_items(item.logprobs, item.token_ids, k, tok), 0)
            if item.text or lp or item.finish_reason:
                yield chunk(j * n + item.index, item.text,
                            _finish_reason(item.finish_reason) if item.finish_reason else None, lp)
        if include_usage:
            yield _sse({"id": base, "object": "text_completion", "created": created, "model": model, "choices": [],
                        "usage": _usage(n_prompt, n_out)})
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        if open_reqs:
            for rid, _ in sinks:
                state.engine.abort(rid)
