"""Sampling as pure functions of logits.

Every function takes a batch of logits ``(B, V)`` (B rows = requests, V = vocabulary size) plus per-row
parameter tensors of shape ``(B,)``, and returns new tensors: inputs are never modified and no engine
state is kept here. Work is done in float32 whatever the model's dtype.

The order of operations is vLLM's (v1 sampler), and :func:`sample_tokens` composes them:

1. :func:`apply_min_tokens` and :func:`apply_penalties` (repetition, then frequency, then presence);
2. greedy rows take the argmax of those logits;
3. other rows: :func:`apply_temperature`, then :func:`apply_top_k_top_p_min_p` (min_p, top_k, top_p),
   then :func:`sample` draws from ``softmax``.

Log-probabilities (:func:`compute_logprobs`) are taken from the *raw* model logits, before penalties
and temperature: vLLM's default (``logprobs_mode="raw_logprobs"``), which is also what the OpenAI API
reports. Call it on the logits you passed in; since nothing here mutates them they are still raw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from inhouse.engine.params import SAMPLING_EPS, SamplingParams

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters of a batch, packed into tensors.

    Build it with :meth:`from_params`; the boolean flags let the engine skip work that no row needs
    (they are computed on the host, so checking them costs no device synchronisation).

    Attributes:
        temperature: (B,) float32; values < 1e-5 mark greedy rows.
        top_k: (B,) int64; <= 0 disables (both vLLM spellings, 0 and -1, arrive here as given).
        top_p: (B,) float32; 1.0 disables.
        min_p: (B,) float32; 0.0 disables.
        repetition_penalty, presence_penalty, frequency_penalty: (B,) float32.
        all_greedy: every row is greedy.
        no_top_k, no_top_p, no_min_p, no_penalties: no row uses that feature.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    all_greedy: bool
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool
    no_penalties: bool

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], device: torch.device | str = "cpu") -> "SamplingTensors":
        """Pack the parameters of B requests (one row each) into tensors on ``device``.

        Args:
            params: one :class:`SamplingParams` per batch row (a request with ``n > 1`` appears once per
                completion being generated).
            device: where the tensors live (the logits' device).

        Returns:
            The packed :class:`SamplingTensors`.

        Raises:
            ValueError: if ``params`` is empty.
        """
        if len(params) == 0:
            raise ValueError("SamplingTensors.from_params: got an empty list of SamplingParams (need one per row)")

        def floats(name: str) -> torch.Tensor:
            return torch.tensor([float(getattr(p, name)) for p in params], dtype=torch.float32, device=device)

        return cls(
            temperature=floats("temperature"),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=floats("top_p"),
            min_p=floats("min_p"),
            repetition_penalty=floats("repetition_penalty"),
            presence_penalty=floats("presence_penalty"),
            frequency_penalty=floats("frequency_penalty"),
            all_greedy=all(p.is_greedy for p in params),
            no_top_k=all(p.top_k <= 0 for p in params),
            no_top_p=all(p.top_p >= 1.0 for p in params),
            no_min_p=all(p.min_p <= 0.0 for p in params),
            no_penalties=all(
                p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
                for p in params
            ),
        )


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) int64: where each row's largest value is (the first of equal ones, NaN first).

    ``torch.argmax``, except that on the CPU it goes through NumPy, whose vectorized argmax is ~9x
    faster there (one 49,152-entry row: 5 vs 45 µs): a small model pays this every token, next to
    a decode step of ~4 ms.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
        return torch.from_numpy(x.contiguous().numpy().argmax(-1))
    return x.argmax(dim=-1)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``, for one seeded request.

    The engine keeps one per seeded request for the request's whole life and passes it to
    :func:`sample` at every step. Note that CPU and CUDA generators produce different streams: a
    seed reproduces results on the same kind of device only.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def token_counts(
    token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Count how often each vocabulary entry occurs in each row's token list.

    Args:
        token_ids: B lists of token ids (lengths may differ).
        vocab_size: V.
        device: where the result lives.

    Returns:
        (B, V) int64 counts. ``counts > 0`` is the membership mask (e.g. the ``prompt_mask`` of
        :func:`apply_penalties`).

    Raises:
        ValueError: if a token id is outside ``[0, vocab_size)``.
    """
    batch = len(token_ids)
    max_len = max((len(ids) for ids in token_ids), default=0)
    # Pad with vocab_size into one extra column that is dropped afterwards.
    padded = torch.full((batch, max_len), vocab_size, dtype=torch.int64)  # (B, L)
    for row, ids in enumerate(token_ids):
        if len(ids) == 0:
            continue
        row_ids = torch.as_tensor(list(ids), dtype=torch.int64)
        if int(row_ids.min()) < 0 or int(row_ids.max()) >= vocab_size:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            raise ValueError(
                f"token_counts: row {row} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})"
            )
        padded[row, : len(ids)] = row_ids
    counts = torch.zeros((batch, vocab_size + 1), dtype=torch.int64)  # (B, V+1)
    counts.scatter_add_(1, padded, torch.ones_like(padded))
    return counts[:, :vocab_size].to(device)  # (B, V)


def apply_min_tokens(
    logits: torch.Tensor,
    num_output_tokens: Sequence[int],
    min_tokens: Sequence[int],
    stop_token_ids: Sequence[Iterable[int]],
) -> torch.Tensor:
    """Ban stop tokens (EOS included) in rows that have not yet generated ``min_tokens`` tokens.

    Args:
        logits: (B, V).
        num_output_tokens: B counts of tokens generated so far.
        min_tokens: B values of ``SamplingParams.min_tokens``.
        stop_token_ids: B collections of ids that would end the row (its EOS ids plus ``stop_token_ids``).

    Returns:
        (B, V) float32 logits with those entries set to -inf.
    """
    logits = logits.float()
    rows: list[int] = []
    cols: list[int] = []
    for row, (done, minimum, stops) in enumerate(zip(num_output_tokens, min_tokens, stop_token_ids)):
        if done < minimum:
            for token in stops:
                rows.append(row)
                cols.append(token)
    if not rows:
        return logits
    logits = logits.clone()
    logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = _NEG_INF
    return logits


def apply_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    prompt_mask: torch.Tensor,
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """Apply vLLM's repetition, frequency and presence penalties.

    - repetition (CTRL paper, as vLLM and transformers): for every token present in the prompt OR the
      output so far, a positive logit is divided by the penalty and a negative one multiplied by it;
    - frequency (OpenAI): ``logit -= frequency_penalty * count_in_output``;
    - presence (OpenAI): ``logit -= presence_penalty`` if the token occurs in the output.
    Prompt tokens count only for the repetition penalty.

    Args:
        logits: (B, V).
        output_counts: (B, V) integer counts of each token in the row's generated tokens.
        prompt_mask: (B, V) bool, True where the token occurs in the row's prompt.
        repetition_penalty, presence_penalty, frequency_penalty: (B,) per-row values.

    Returns:
        (B, V) float32 penalised logits.
    """
    logits = logits.float()
    output_mask = output_counts > 0  # (B, V)
    seen = prompt_mask | output_mask  # (B, V)
    rep = repetition_penalty.float().unsqueeze(1)  # (B, 1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - frequency_penalty.float().unsqueeze(1) * output_counts.float()
    logits = logits - presence_penalty.float().unsqueeze(1) * output_mask.float()
    return logits


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature; greedy rows (temperature < 1e-5) are left unchanged.

    Args:
        logits: (B, V).
        temperature: (B,).

    Returns:
        (B, V) float32 scaled logits.
    """
    temperature = temperature.float()
    safe = torch.where(temperature < SAMPLING_EPS, torch.ones_like(temperature), temperature)  # (B,)
    return logits.float() / safe.unsqueeze(1)


def apply_top_k_top_p_min_p(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Mask (to -inf) the tokens that min_p, top-k or top-p exclude, in that order (vLLM v1's).

    Pass temperature-scaled logits (as vLLM does): min_p and top_p depend on the temperature.

    - min_p keeps tokens with ``p >= min_p * p_max``.
    - top_k keeps every token whose logit is >= the k-th largest logit. Ties at the boundary are all
      kept, so more than k tokens may survive when the k-th value is tied (as vLLM's and litgpt's
      threshold comparison do).
    - top_p, computed on the distribution renormalised after min_p and top-k, keeps the minimal
      nucleus: with tokens sorted by decreasing probability, a token survives iff the mass of the
      tokens strictly before it is < top_p. The most probable token therefore always survives. Ties at
      the boundary are all kept: a token survives whenever a token with the same logit does, so the
      result never depends on how the sort orders equal values. (vLLM and transformers split such
      ties in sort order; without ties the sets are identical.)

    Each filter keeps the most probable token, so min_p and top_k commute; top_p after them sees the
    renormalised survivors.

    Args:
        logits: (B, V) temperature-scaled logits.
        top_k: (B,) int; values <= 0 or >= V disable top-k for that row.
        top_p: (B,) float in (0, 1]; 1 disables.
        min_p: (B,) float in [0, 1]; 0 disables.

    Returns:
        (B, V) float32 logits with the excluded tokens at -inf.
    """
    logits = logits.float()
    vocab_size = logits.shape[-1]

    min_p = min_p.float()
    if bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)  # (B, V)
        threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # (B, 1)
        logits = logits.masked_fill(probs < threshold, _NEG_INF)

    k_active = (top_k > 0) & (top_k < vocab_size)  # (B,)
    p_active = top_p < 1.0  # (B,)
    use_k = bool(k_active.any())
    use_p = bool(p_active.any())
    if not (use_k or use_p):
        return logits

    # Only the sorted *values* are needed: both filters reduce to "keep logits >= a per-row threshold",
    # so there is no scatter back through sort indices.
    sorted_logits = logits.sort(dim=-1, descending=True).values  # (B, V)

    if use_k:
        k = torch.where(k_active, top_k.long(), torch.full_like(top_k.long(), vocab_size))  # (B,)
        kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))  # (B, 1) k-th largest logit
        logits = logits.masked_fill(logits < kth, _NEG_INF)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, _NEG_INF)  # still sorted

    if use_p:
        sorted_probs = torch.softmax(sorted_logits, dim=-1)  # (B, V), renormalised over the survivors
        cumulative = sorted_probs.cumsum(dim=-1)  # (B, V)
        # Mass strictly before each position; the shift (rather than cumsum - probs) keeps it monotone.
        mass_before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=-1)  # (B, V)
        keep = mass_before < top_p.float().unsqueeze(1)  # (B, V), a prefix of each row; position 0 always
        keep = keep | ~p_active.unsqueeze(1)  # disabled rows keep everything (avoids fp32 cumsum rounding)
        n_keep = keep.sum(dim=-1)  # (B,)
        boundary = sorted_logits.gather(1, (n_keep - 1).unsqueeze(1))  # (B, 1) smallest kept logit
        logits = logits.masked_fill(logits < boundary, _NEG_INF)

    return logits


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    generators: Sequence[Optional[torch.Generator]],
) -> torch.Tensor:
    """Draw one token per row: argmax for greedy rows, ``softmax(logits / T)`` for the others.

    Random rows use the exponential race (the Gumbel-max trick in another form, gpt-fast's
    ``multinomial_sample_one_no_sync``): with ``q_i ~ Exp(1)`` independent, ``argmax_i p_i / q_i`` is
    distributed exactly as ``Categorical(p)``, because ``q_i / p_i ~ Exp(p_i)`` and the smallest of
    independent exponentials is the i-th with probability ``p_i / sum(p)``. Compared with
    ``torch.multinomial`` this is one elementwise op plus an argmax (no host synchronisation), and it
    lets each row draw its noise ``q`` from its *own* generator: a seeded request then consumes
    exactly V exponentials per step from its generator, whatever the batch size, order or the other
    rows' parameters, so its tokens are reproducible independently of batch composition. Rows without
    a generator share torch's default generator. Greedy rows draw nothing.

    Args:
        logits: (B, V) logits (already penalised / filtered as wanted; -inf entries are never drawn).
        temperature: (B,) per-row temperatures; < 1e-5 means greedy.
        generators: B entries, a ``torch.Generator`` on the logits' device for seeded rows, else None.

    Returns:
        (B,) int64 token ids.

    Raises:
        ValueError: if ``generators`` does not have one entry per row.
    """
    batch = logits.shape[0]
    if len(generators) != batch:
        raise ValueError(f"sample: got {len(generators)} generators for a batch of {batch} rows (need one per row)")
    logits = logits.float()
    greedy_tokens = argmax_rows(logits)  # (B,)
    temps = temperature.float().tolist()
    random_rows = [row for row, t in enumerate(temps) if t >= SAMPLING_EPS]
    if not random_rows:
        return greedy_tokens

    temperature = temperature.float()
    greedy = temperature < SAMPLING_EPS  # (B,)
    safe = torch.where(greedy, torch.ones_like(temperature), temperature)  # (B,)
    probs = torch.softmax(logits / safe.unsqueeze(1), dim=-1)  # (B, V)

    q = torch.empty_like(probs)  # (B, V) Exp(1) noise
    if any(generators[row] is None for row in random_rows):
        q.exponential_()
    for row in random_rows:
        if generators[row] is not None:
            q[row].exponential_(generator=generators[row])
    # Exp(1) may return 0.0 in float32; the floor keeps p / q finite and changes nothing measurable.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    random_tokens = argmax_rows(probs / q)  # (B,)
    return torch.where(greedy, greedy_tokens, random_tokens)


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens and the k most probable tokens of each row.

    Computed as ``log_softmax`` of the logits passed in, in float32. Pass the RAW model logits (before
    penalties, temperature and truncation): that is vLLM's default and what the OpenAI API reports.
    Works for prompt logprobs too: rows are positions, ``token_ids`` the next prompt tokens.

    Args:
        logits: (B, V).
        token_ids: (B,) int ids whose logprob is wanted (the sampled tokens).
        k: number of top entries per row, 0 <= k <= V.

    Returns:
        ``(token_logprobs (B,), topk_ids (B, k) int64, topk_logprobs (B, k))``, the top entries sorted by
        decreasing logprob. The sampled token may or may not be among the top k.

    Raises:
        ValueError: if k is outside [0, V].
    """
    vocab_size = logits.shape[-1]
    if not 0 <= k <= vocab_size:
        raise ValueError(f"compute_logprobs: k={k} must be in [0, vocab_size={vocab_size}]")
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    token_logprobs = logprobs.gather(1, token_ids.long().unsqueeze(1)).squeeze(1)  # (B,)
    topk_logprobs, topk_ids = torch.topk(logprobs, k, dim=-1)  # (B, k)
    return token_logprobs, topk_ids, topk_logprobs


def sample_tokens(
    logits: torch.Tensor,
    tensors: SamplingTensors,
    generators: Sequence[Optional[torch.Generator]],
    output_counts: Optional[torch.Tensor] = None,
    prompt_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The whole sampling step in vLLM's order: penalties, greedy argmax, or temperature, filters, draw.

    ``min_tokens`` is not handled here (it needs the row's stop ids): call :func:`apply_min_tokens`
    on the logits first.

    Args:
        logits: (B, V) model logits for the next position of each row.
        tensors: the batch's :class:`SamplingTensors`.
        generators: B entries, a generator for seeded rows, None otherwise.
        output_counts: (B, V) counts of generated tokens; required unless ``tensors.no_penalties``.
        prompt_mask: (B, V) bool prompt-token mask; required unless ``tensors.no_penalties``.

    Returns:
        (B,) int64 token ids.

    Raises:
        ValueError: if penalties are requested without ``output_counts`` and ``prompt_mask``.
    """
    logits = logits.float()
    if not tensors.no_penalties:
        if output_counts is None or prompt_mask is None:
            raise ValueError("sample_tokens: penalties are set but output_counts / prompt_mask were not given")
        logits = apply_penalties(
            logits,
            output_counts,
            prompt_mask,
            tensors.repetition_penalty,
            tensors.presence_penalty,
            tensors.frequency_penalty,
        )
    if tensors.all_greedy:
        return argmax_rows(logits)
    scaled = apply_temperature(logits, tensors.temperature)
    if not (tensors.no_top_k and tensors.no_top_p and tensors.no_min_p):
        scaled = apply_top_k_top_p_min_p(scaled, tensors.top_k, tensors.top_p, tensors.min_p)
    # Temperature is already applied: draw at T=1, keeping T=0 (argmax) for the greedy rows. Their
    # argmax is unaffected by the division by 1 and by the filters, which all keep the maximum.
    greedy = tensors.temperature < SAMPLING_EPS
    unit = torch.where(greedy, torch.zeros_like(tensors.temperature), torch.ones_like(tensors.temperature))
    return sample(scaled, unit, generators)
