"""Request bodies of the OpenAI API (the fields inhouse implements) and the OpenAI error shape.

Types are checked strictly (a string where a number belongs is an error, as with OpenAI, not a
silent conversion); unknown fields are accepted and ignored, because SDKs add new ones over time.
Every problem becomes an `ApiError` carrying the HTTP status and the OpenAI error body
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError


class ApiError(Exception):
    """An error answered with the OpenAI error body.

    Args:
        status: HTTP status code.
        message: human-readable; never contains the prompt text or an API key.
        type: OpenAI error type (``invalid_request_error``, ``authentication_error``...).
        param: the offending request field, if any.
        code: a machine-readable code (``model_not_found``, ``context_length_exceeded``...).
        headers: extra response headers (``Retry-After`` for 429).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    """The fields both generation endpoints share (sampling, stopping, streaming)."""

    model: Optional[str] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``. ``messages`` are checked by the chat renderer."""

    messages: list[dict[str, Any]]
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    max_tokens: Optional[int] = None  # None: up to the context (as OpenAI's chat API)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``: a prompt string, token ids, or a list of either."""

    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = 16  # the legacy completions API's default
    logprobs: Optional[int] = None
    echo: bool = False


def parse_body(cls: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; raise `ApiError` (400) naming the first bad field (never its value)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_input=False, include_url=False)[0]
        loc = [str(p) for p in err["loc"]]
        # For unions pydantic reports each branch; keep the field path, drop the branch names.
        param = ".".join(p for p in loc if not any(p.startswith(t) for t in ("str", "list[", "dict[", "int", "float")))
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "this field is required"
        return _raise(param or None, msg)


def _raise(param: Optional[str], msg: str):
    raise ApiError(400, f"{param}: {msg}" if param else msg, param=param)


def _json_type(v: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(v), type(v).__name__)
