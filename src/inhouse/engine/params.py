"""Per-request sampling parameters, compatible with vLLM's ``SamplingParams``.

Field names, defaults and meanings follow vLLM (which follows the OpenAI completions API), so code
written against ``vllm.SamplingParams`` runs unchanged for the fields listed here. Validation happens
once, in ``__post_init__``; every error is a :class:`SamplingParamsError` (a ``ValueError``) whose
message names the field and the offending value.

Differences from vLLM, on purpose:
- ``temperature`` has no upper bound here (the OpenAI-compatible server may impose ``[0, 2]``), and very
  small positive temperatures are not clamped to 0.01: sampling runs in float32, where ``logits / 1e-4``
  neither overflows nor makes ``softmax`` produce NaN.
- ``logprobs`` / ``prompt_logprobs`` accept ``None`` or a count ``>= 0`` (vLLM also accepts ``-1`` for the
  whole vocabulary). ``True`` means 1, as in vLLM; ``False`` means ``None`` (no logprobs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Union

# Temperatures below this are greedy decoding (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; the message names the field and its value."""

    def __init__(self, field: str, value: Any, problem: str):
        self.field = field
        self.value = value
        super().__init__(f"SamplingParams.{field} {problem}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """Sampling parameters for one generation request (vLLM-compatible subset).

    Attributes:
        n: number of completions to return for the prompt (>= 1; must be 1 when greedy).
        temperature: softmax temperature, >= 0; values below 1e-5 mean greedy decoding (argmax).
        top_p: nucleus sampling: keep the smallest set of most probable tokens whose mass is >= top_p;
            in (0, 1], 1 disables.
        top_k: keep the top_k most probable tokens; 0 or -1 disables (vLLM uses 0 now, -1 before).
        min_p: drop tokens whose probability is below ``min_p * p(most probable token)``; in [0, 1],
            0 disables.
        repetition_penalty: > 0; for every token present in the prompt or the output so far, a positive
            logit is divided by it and a negative logit multiplied by it (1 disables).
        presence_penalty: in [-2, 2]; subtracted once from the logit of every token already generated.
        frequency_penalty: in [-2, 2]; subtracted from a token's logit once per time it was generated.
        seed: seed of this request's own random generator (reproducible whatever else is in the batch);
            None (or -1, as in vLLM) uses the engine's generator.
        max_tokens: maximum number of generated tokens (>= 1), or None for "up to the context length".
        min_tokens: EOS and ``stop_token_ids`` are banned until this many tokens were generated.
        stop: string(s) that end generation; normalised to a list (empty strings are rejected).
        stop_token_ids: token ids that end generation; normalised to a duplicate-free list.
        ignore_eos: keep generating after the model's end-of-sequence token.
        logprobs: number of top log-probabilities to return per generated token (the sampled token's is
            always returned as well), or None.
        prompt_logprobs: number of top log-probabilities to return per prompt token, or None.
        include_stop_str_in_output: keep the matched stop string at the end of the output text.
        skip_special_tokens: leave special tokens out of the detokenized text.

    Raises:
        SamplingParamsError: (a ``ValueError``) on any invalid field, naming the field and the value.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Normalisations first (as vLLM): they decide what the checks below see.
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise SamplingParamsError("stop", self.stop, "must be a string, a list of strings or None")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        else:
            raise SamplingParamsError("stop_token_ids", self.stop_token_ids, "must be a list of token ids or None")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is True:
                setattr(self, name, 1)
            elif value is False:
                setattr(self, name, None)

        self._verify()

        if self.is_greedy:
            # Greedy decoding ignores the truncation knobs; reset them so that batching code can tell
            # from the tensors alone which rows need filtering (vLLM does the same).
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            if self.n > 1:
                raise SamplingParamsError("n", self.n, "must be 1 when using greedy sampling (temperature=0)")

    def _verify(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise SamplingParamsError("n", self.n, "must be an integer >= 1")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature):
            raise SamplingParamsError("temperature", self.temperature, "must be a finite number")
        if self.temperature < 0.0:
            raise SamplingParamsError("temperature", self.temperature, "must be non-negative")
        # `not (a < x <= b)` is also true for NaN, so NaN is rejected by the range checks.
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError("top_p", self.top_p, "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise SamplingParamsError("top_k", self.top_k, "must be an integer: 0 or -1 (disabled), or >= 1")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError("min_p", self.min_p, "must be in [0, 1]")
        if (
            not _is_number(self.repetition_penalty)
            or not math.isfinite(self.repetition_penalty)
            or self.repetition_penalty <= 0.0
        ):
            raise SamplingParamsError("repetition_penalty", self.repetition_penalty, "must be a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise SamplingParamsError(name, value, "must be in [-2, 2]")
        if self.seed is not None and not _is_int(self.seed):
            raise SamplingParamsError("seed", self.seed, "must be an integer or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise SamplingParamsError("max_tokens", self.max_tokens, "must be an integer >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise SamplingParamsError("min_tokens", self.min_tokens, "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens", self.min_tokens, f"must be <= max_tokens (max_tokens={self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise SamplingParamsError(name, value, "must be an integer >= 0 or None")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError("stop", self.stop, "must contain only non-empty strings")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise SamplingParamsError("stop_token_ids", self.stop_token_ids, "must contain only integers >= 0")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise SamplingParamsError(name, value, "must be a bool")

    @property
    def is_greedy(self) -> bool:
        """True when decoding is greedy (temperature below 1e-5, as vLLM)."""
        return self.temperature < SAMPLING_EPS

