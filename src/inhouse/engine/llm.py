"""The offline generation API, shaped like vLLM's so a vLLM script runs by changing one import.

    from inhouse import LLM, SamplingParams
    llm = LLM("path/to/model", dtype="bfloat16", max_model_len=4096, seed=0)
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)

LoRA adapters (PEFT directories) run unmerged, several in one batch, as with vLLM:

    from inhouse import LLM, LoRARequest, SamplingParams
    outs = llm.generate(["Hi", "Hi"], params, lora_request=[LoRARequest("support", 1, "adapters/support"), None])
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from inhouse.engine.engine import Engine, EngineError, Request
from inhouse.engine.outputs import RequestOutput
from inhouse.engine.params import SamplingParams
from inhouse.model.transformer import model_dtype
from inhouse.resolve import LoadedModel, open_model
from inhouse.tokenizer.chat import ChatRenderer

logger = logging.getLogger("inhouse.engine")

PromptType = Union[str, dict, list[int]]


@dataclass
class StreamDelta:
    """A piece of a streamed completion: new text (never a split character) and new ids."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    stop_reason: Any = None


class LLM:
    """Load a model once, then generate from prompts or conversations.

    Args:
        model: a model directory (Meta or HF layout), a .gguf file, ``random:PRESET``, or None
            for the embedded SmolLM2-135M-Instruct.
        dtype: "auto", "float32", "bfloat16" or "float16".
        max_model_len: context length to enforce (default: the model's, capped at 8192 to bound
            the KV cache; pass a larger value explicitly for long contexts).
        seed: seeds sampling of requests without their own seed, and random weights.
        max_num_seqs: how many sequences are decoded together.
        chat_format: "auto", "llama3" (native Llama 3.1) or "template" (the model's jinja template).
        chat_template: a jinja chat template to use instead of the model's own.
        tokenizer: a directory with a tokenizer to use instead of the model's own.
        quantize: "auto" (int8 weights for quantized GGUF files), "none" or "int8".
        compile: compile the decode step with torch.compile (slow first start, cached after).
        adapter: a LoRA adapter directory (PEFT format) applied, unmerged, to every request that names
            no other (`lora_request=LoRARequest(name, id, path)` on generate/chat/stream).
        max_loras: LoRA adapters resident at once; requests for others wait for a slot (least
            recently used adapters not in use are evicted).

    Raises:
        ValueError (its subclasses) for a model that cannot be found, read or fit in memory.
    """

    def __init__(self, model: Optional[str] = None, *, dtype: str = "auto", max_model_len: Optional[int] = None,
                 seed: int = 0, max_num_seqs: int = 8, chat_format: str = "auto",
                 chat_template: Optional[str] = None, tokenizer: Optional[str] = None,
                 max_num_batched_tokens: int = 2048, quantize: Optional[str] = "auto", compile: bool = False,
                 adapter: Optional[str] = None, max_loras: int = 8, **ignored: Any):
        for k in ignored:
            logger.info("LLM(%s=...) is a vLLM option inhouse does not use; ignored", k)
        loaded = open_model(model, dtype=dtype, seed=seed, max_model_len=max_model_len, tokenizer=tokenizer,
                            quantize=quantize)
        self._setup(loaded, max_model_len=max_model_len, seed=seed, max_num_seqs=max_num_seqs,
                    chat_format=chat_format, chat_template=chat_template,
                    max_num_batched_tokens=max_num_batched_tokens, compile=compile, max_loras=max_loras)
        if adapter:
            self.default_adapter = self.add_lora(adapter)

    @classmethod
    def from_model(cls, model, tokenizer, *, name: str = "model", max_model_len: Optional[int] = None,
                   seed: int = 0, max_num_seqs: int = 8, chat_format: str = "auto",
                   chat_template: Optional[str] = None, max_num_batched_tokens: int = 2048,
                   compile: bool = False, max_loras: int = 8) -> "LLM":
        """Wrap an already-built `Transformer` and `Tokenizer` (no loading)."""
        self = cls.__new__(cls)
        dtype = model_dtype(model)
        loaded = LoadedModel(name, model, tokenizer, model.args, dtype, "memory", None)
        self._setup(loaded, max_model_len=max_model_len, seed=seed, max_num_seqs=max_num_seqs,
                    chat_format=chat_format, chat_template=chat_template,
                    max_num_batched_tokens=max_num_batched_tokens, compile=compile, max_loras=max_loras)
        return self

    def _setup(self, loaded: LoadedModel, *, max_model_len, seed, max_num_seqs, chat_format, chat_template,
               max_num_batched_tokens, compile: bool = False, max_loras: int = 8) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras={max_loras} must be at least 1")
        self.max_loras = max_loras
        self.default_adapter: Optional[str] = None
        self.loaded = loaded
        args = loaded.args
        if max_model_len is None:
            max_model_len = min(args.max_seq_len, 8192)
        elif max_model_len > args.max_seq_len:
            raise ValueError(f"max_model_len={max_model_len} is more than the model's context of {args.max_seq_len}")
        self.max_model_len = max_model_len
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.chat_renderer = ChatRenderer(self.tokenizer, mode=chat_format, template=chat_template)
        self.engine = Engine(self.model, self.tokenizer, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens, seed=seed, compile=compile)
        # The chat format may end turns with more tokens than the tokenizer's EOS (Llama 3.1: eot + eom).
        self.engine.stop_ids = frozenset(self.engine.stop_ids | self.chat_renderer.stop_ids)

    # ------------------------------------------------------------------ adapters
    def add_lora(self, lora: Any, name: Optional[str] = None) -> str:
        """Register a LoRA adapter (read and checked now, loaded into a slot when a request uses it).

        Args:
            lora: a `LoRARequest`, or a PEFT adapter directory.
            name: the name for a directory (default: the directory's own name).

        Returns:
            The adapter's name (what `adapters` lists and a server request's ``model`` field selects).

        Raises:
            AdapterError (a ValueError): unreadable adapter, one that does not fit the model, or a
                name already given to another directory.
        """
        from inhouse.finetune.adapters import AdapterBank

        if isinstance(lora, (str, os.PathLike)):
            path = os.fspath(lora)
            name = name or os.path.basename(os.path.normpath(path))
        elif hasattr(lora, "lora_path") and hasattr(lora, "lora_name"):
            path, name = lora.lora_path, name or lora.lora_name
        else:
            raise ValueError(f"lora_request: expected a LoRARequest or an adapter directory, got {type(lora).__name__}")
        if self.engine.adapters is None:
            self.engine.adapters = AdapterBank(self.model, max_loras=self.max_loras)
        self.engine.adapters.add(name, path)
        return name

    @property
    def adapters(self) -> list[str]:
        """Names of the registered LoRA adapters."""
        return [] if self.engine.adapters is None else self.engine.adapters.names()

    def _adapter_names(self, lora_request: Any, n: int) -> list[Optional[str]]:
        """The adapter of each of `n` requests: one `LoRARequest` for all, one per prompt, or None (the default)."""
        if isinstance(lora_request, (list, tuple)):
            if len(lora_request) != n:
                raise EngineError(f"got {len(lora_request)} lora_request entries for {n} prompts")
            items = list(lora_request)
        else:
            items = [lora_request] * n
        return [self.default_adapter if r is None else self.add_lora(r) for r in items]

    def get_tokenizer(self):
        """The tokenizer (``encode(text)`` / ``decode(ids)``)."""
        return self.tokenizer

    def _to_ids(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._to_ids(prompt["prompt"])
            raise EngineError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise EngineError(f"unsupported prompt type {type(prompt).__name__}: give a string, token ids or a dict")

    def _params_list(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise EngineError(f"got {len(params)} SamplingParams for {n} prompts")
        return params

    def _run(self, items: list[tuple[Optional[str], list[int]]], params: list[SamplingParams],
             adapters: list[Optional[str]]) -> list[RequestOutput]:
        reqs: list[Request] = []
        try:
            for (text, ids), p, a in zip(items, params, adapters):
                reqs.append(self.engine.add_request(ids, p, prompt=text, adapter=a))
        except Exception:
            for r in reqs:
                self.engine.abort(r.request_id)
            raise
        return self.engine.run_to_completion(reqs)

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = False, lora_request: Any = None) -> list[RequestOutput]:
        """Complete each prompt. Prompts: strings, ``{"prompt_token_ids": [...]}`` dicts, or a list of them.

        `lora_request`: a `LoRARequest` for every prompt, or a list with one (or None) per prompt;
        prompts of different adapters and of the base model run in the same batches.

        Returns one `RequestOutput` per prompt, in order. Raises `ContextLengthError` (a ValueError)
        when a prompt, or prompt + max_tokens, does not fit in max_model_len — before running anything;
        `AdapterError` (a ValueError) for an adapter that cannot be read or does not fit the model.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        items = [self._to_ids(p) for p in prompts]
        adapters = self._adapter_names(lora_request, len(items))
        return self._run(items, self._params_list(sampling_params, len(items)), adapters)

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = False, *, tools: Optional[list[dict]] = None, add_generation_prompt: bool = True,
             chat_template: Optional[str] = None, lora_request: Any = None,
             **template_kwargs: Any) -> list[RequestOutput]:
        """Reply to one conversation (list of message dicts) or several (list of lists).

        Llama 3.x models use the native Llama 3.1 format (with `tools`); other models their
        shipped chat template. Parse tool calls from a reply with `parse_reply`.
        """
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        renderer = self.chat_renderer if chat_template is None else ChatRenderer(self.tokenizer, template=chat_template)
        items = [(None, renderer.encode(c, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs))
                 for c in convs]
        adapters = self._adapter_names(lora_request, len(items))
        return self._run(items, self._params_list(sampling_params, len(items)), adapters)

    def parse_reply(self, text: str, ended_with_eom: bool = False):
        """Split a reply into content and tool calls (`ParsedAssistant`)."""
        return self.chat_renderer.parse(text, ended_with_eom=ended_with_eom)

    def stream(self, prompt: Union[PromptType, list[dict]], sampling_params: Optional[SamplingParams] = None, *,
               tools: Optional[list[dict]] = None, lora_request: Any = None) -> Iterator[StreamDelta]:
        """Generate for one prompt (or one conversation: a list of message dicts), yielding text as it comes.

        The generator can be closed early (e.g. Ctrl-C in the CLI): the request is cancelled and its
        cache rows freed.
        """
        params = sampling_params or SamplingParams()
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            text, ids = None, self.chat_renderer.encode(prompt, tools=tools)
        else:
            text, ids = self._to_ids(prompt)
        adapter = self._adapter_names(lora_request, 1)[0]
        req = self.engine.add_request(ids, params, prompt=text, adapter=adapter)
        try:
            while not req.finished:
                for u in self.engine.step():
                    if u.seq.request is req:
                        yield StreamDelta(u.seq.index, u.new_text, u.new_token_ids,
                                          u.seq.finish_reason if u.finished else None,
                                          u.seq.stop_reason if u.finished else None)
                if not self.engine.has_unfinished():
                    break
        finally:
            if not req.finished:
                self.engine.abort(req.request_id)

    def encode_chat(self, messages: list[dict], tools: Optional[list[dict]] = None) -> list[int]:
        """Prompt ids of a conversation, as `chat` would build them."""
        return self.chat_renderer.encode(messages, tools=tools)

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits (T, V) of a full forward over `token_ids` (no cache)."""
        return self.model(torch.tensor([token_ids]))[0]
