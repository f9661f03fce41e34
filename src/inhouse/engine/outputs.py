"""Request outputs shaped like vLLM's, so scripts written for vLLM read them unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Logprob:
    """Log-probability of one token, its rank among the vocabulary (1 = most likely) and its text."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# Per position: token id -> Logprob (the chosen token plus the top-k alternatives).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    Attributes:
        index: which of the request's `n` samples this is.
        text: generated text (stop string excluded unless asked for).
        token_ids: generated ids, including the stop token that ended generation.
        cumulative_logprob: sum of the chosen tokens' logprobs (None unless logprobs were asked for).
        logprobs: per generated token, the chosen and top-k logprobs (None unless asked for).
        finish_reason: "stop" (end token or stop string), "length" (max_tokens or context), or None while running.
        stop_reason: the stop string or stop token id that ended it; None for the model's EOS or for "length".
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[SampleLogprobs]
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result of one prompt: the prompt as seen by the model and its `n` completions."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[PromptLogprobs]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: dict = field(default_factory=dict)
