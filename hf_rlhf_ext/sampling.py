"""Ancestral sampling through the KV cache, returning the sampled tokens' log-probabilities with them.

Why not ``model.generate``: for the small models and short completions of RL experiments, ``generate``'s per-step
machinery (logits processors, stopping criteria, cache bookkeeping) costs as much as the model itself, and a caller
that needs log π(token) must either add a logits processor or run one more forward pass. This loop does one prefill
and one cached forward per token, and reads log π(token) from the logits it samples from.

It draws *exactly* the tokens ``generate(do_sample=True, temperature=T, top_k=0, top_p=1.0)`` draws with the same
seed (``multinomial(softmax(logits / T))`` at every step, finished rows continued with the pad token), so swapping it
in changes nothing but the time.

:func:`sample_policy` is the one way this package samples a policy (the PPO trainer's rollouts, the callbacks'
held-out samples, the recipes' evaluation, best-of-N pools and the lab's data): this loop where it applies, ``generate``
otherwise (encoder-decoders, greedy decoding, or when asked).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

__all__ = [
    "as_chat_prompts", "completion_mask", "encode_prompts", "forward_kwargs", "is_conversational",
    "kv_cache_sampling_supported", "completion_log_softmax", "per_token_logps", "policy_eos_ids", "row_generators",
    "sample_policy", "sample_with_kv_cache", "sampling_row_bytes", "scoring_row_bytes",
]

_OPTIONAL_FORWARD_ARGS = frozenset({"position_ids", "logits_to_keep", "cache"})


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/accelerate wrappers and PEFT."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):  # PEFT: the wrapped model's signature
        model = model.get_base_model()
    return model


def forward_kwargs(model: nn.Module) -> frozenset[str]:
    """The optional arguments among ``position_ids``, ``logits_to_keep`` and ``cache`` (the KV cache's name since
    transformers 5.x; ``past_key_values`` before) that the model's forward accepts."""
    return _forward_kwargs_of(type(_base_model(model)))


_FORWARD_KWARGS_CACHE: dict[type, frozenset[str]] = {}


def _forward_kwargs_of(cls: type) -> frozenset[str]:
    cached = _FORWARD_KWARGS_CACHE.get(cls)
    if cached is None:
        cached = frozenset(set(inspect.signature(cls.forward).parameters) & _OPTIONAL_FORWARD_ARGS)
        _FORWARD_KWARGS_CACHE[cls] = cached
    return cached


def kv_cache_sampling_supported(model: nn.Module) -> bool:
    """Whether the loop applies: a decoder-only model (encoder-decoders need ``generate``'s encoder pass)."""
    config = getattr(_base_model(model), "config", None)
    return config is not None and not getattr(config, "is_encoder_decoder", False)


@torch.no_grad()
def sample_with_kv_cache(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    pad_token_id: int,
    eos_token_ids: Sequence[int] | int | None,
    drop_finished: bool = False,
    num_return_sequences: int = 1,
    generators: Sequence[torch.Generator] | None = None,
    full_log_probs: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Samples up to ``max_new_tokens`` tokens after left-padded prompts ``input_ids`` (B, P).

    One prefill, then one token per step through the KV cache; position ids follow the attention mask (left padding
    does not shift positions); the mask is dropped when no prompt is padded; finished rows continue with
    ``pad_token_id``; stops when every row has emitted one of ``eos_token_ids`` or after ``max_new_tokens``.

    ``drop_finished``: a row that has emitted an EOS leaves the batch (and the KV cache) at once, so the remaining
    steps compute only the unfinished rows (a step costs far more than the few index operations of a drop) — cheaper
    when lengths vary, the same distribution, but other draws than ``generate`` for the same seed once a row has left
    (the random numbers are consumed per row still running). Applied only to a plain ``DynamicCache``; other caches
    keep every row.

    ``num_return_sequences`` = M: M completions per prompt (rows i·M … i·M + M − 1 belong to prompt i), as
    ``generate(num_return_sequences=M)`` draws them — but each prompt is prefilled once and its KV cache repeated, so
    best-of-N pools pay for the prompts once (a plain ``DynamicCache``; other caches prefill every copy).

    ``generators``: one random generator per output row (B·M). Row r then draws from its own generator only (the
    exponential race ``argmax(p / E)``, ``E ~ Exp(1)``, the very algorithm of ``torch.multinomial`` for one sample), so
    its tokens do not depend on which other rows share the batch: a pool sampled in chunks of any size draws the same
    tokens. Without them the global generator is used, as ``generate`` uses it.

    Returns ``(tokens, logps)``, both (B·M, n) with n ≤ ``max_new_tokens``: the sampled tokens and log π(token) in
    float32 at ``temperature`` (log_softmax(logits / T)), from the very logits sampled from. Positions after a row's
    EOS hold the pad token and log-prob 0.

    ``full_log_probs``: also return the whole-vocabulary log π(· | s_t) at ``temperature`` of every step, (B·M, n, V)
    in float32, the distributions sampled from — what a forward pass over the completions would recompute (an exact
    KL needs them); positions after a row's EOS carry no meaning (mask them). It holds B·M·``max_new_tokens``·V floats.
    """
    _check_sampling_args(input_ids, prompt_mask, max_new_tokens, temperature, num_return_sequences)
    if generators is not None and len(generators) != input_ids.shape[0] * num_return_sequences:
        raise ValueError(f"generators: one per output row ({input_ids.shape[0] * num_return_sequences}), "
                         f"got {len(generators)}.")
    repeats, temperature = num_return_sequences, float(temperature)
    stop = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids or [])
    stop_ids = torch.tensor(stop, device=input_ids.device, dtype=torch.long) if stop else None
    step_kwargs = forward_kwargs(model)
    call = _StepCall("cache" if "cache" in step_kwargs else "past_key_values",
                     {"logits_to_keep": 1} if "logits_to_keep" in step_kwargs else {})
    state = _DecodeState.start(input_ids, prompt_mask, max_new_tokens, repeats, pad_token_id,
                               "position_ids" in step_kwargs)
    n = 0
    for t in range(max_new_tokens):
        scores = call.scores(model, state, input_ids.shape[1] + t)
        if t == 0 and repeats > 1:  # the prompts were prefilled once: now each becomes M rows
            scores = scores.repeat_interleave(repeats, dim=0)
            state.repeat_prefill(repeats, call, model, input_ids, prompt_mask)
        next_tokens, step_logps, step_log_probs = _draw(scores, temperature, state.row_generators(generators),
                                                        full_log_probs)
        if stop_ids is not None:
            state.mark_finished(next_tokens, step_logps, stop_ids, pad_token_id)
        state.record(t, next_tokens, step_logps, step_log_probs, max_new_tokens)
        n = t + 1
        if stop_ids is not None:
            n_left = int(state.unfinished.sum())
            if n_left == 0:
                break
            if drop_finished and n_left < state.unfinished.numel() and _can_drop_rows(state.cache):
                next_tokens = state.keep_unfinished(next_tokens)
        state.advance(next_tokens)
    if full_log_probs:
        return state.tokens[:, :n], state.logps[:, :n], state.log_probs[:, :n]
    return state.tokens[:, :n], state.logps[:, :n]


def _draw(scores: torch.Tensor, temperature: float, generators: Sequence[torch.Generator] | None = None,
          full_log_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One token per row from softmax(scores / T), its log-probability at T and, with ``full_log_probs``, the whole
    log-softmax at T (else None: only the sampled token's is computed). With ``generators`` (one per row), row i's
    noise comes from generator i."""
    if temperature != 1.0:
        scores = scores / temperature
    probs = torch.softmax(scores, dim=-1)
    if generators is None:
        next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
    else:
        noise = torch.empty_like(probs)
        for row, generator in zip(noise, generators):
            row.exponential_(generator=generator)
        next_tokens = torch.div(probs, noise, out=noise).argmax(dim=-1)
    del probs
    if full_log_probs:
        log_probs = torch.log_softmax(scores, dim=-1)
        return next_tokens, log_probs.gather(-1, next_tokens[:, None]).squeeze(1), log_probs
    return next_tokens, scores.gather(-1, next_tokens[:, None]).squeeze(1) - torch.logsumexp(scores, dim=-1), None


def row_generators(seed: int, rows: Sequence[int], device: Any = "cpu") -> list[torch.Generator]:
    """One generator per pool row, seeded from (``seed``, the row's index in the pool): the row's draws are then the
    same whichever chunk it is sampled in."""
    out = []
    for row in rows:
        generator = torch.Generator(device=device)
        generator.manual_seed((int(seed) * 0x9E3779B97F4A7C15 + int(row) * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1))
        out.append(generator)
    return out


def sampling_row_bytes(model: nn.Module, prompt_len: int, max_new_tokens: int) -> int:
    """Bytes one sequence holds while :func:`sample_with_kv_cache` samples it: its KV cache over the prompt and the
    completion (2 · layers · KV heads · head dim per token, in the model's dtype), and the step's float32 logits,
    probabilities, noise and log-sum-exp over the vocabulary (about 5 · V floats). What a chunk of rows costs on top
    of the weights is this times the rows in flight."""
    config = _base_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", 1) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 64) // heads
    layers = getattr(config, "num_hidden_layers", 1) or 1
    itemsize = next(model.parameters()).element_size()
    kv = 2 * layers * kv_heads * head_dim * itemsize * (prompt_len + max_new_tokens)
    return int(kv + 5 * getattr(config, "vocab_size", 0) * 4)


def _check_sampling_args(input_ids, prompt_mask, max_new_tokens, temperature, num_return_sequences) -> None:
    if temperature is None or temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if input_ids.shape != prompt_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} differ.")
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}.")


@dataclass
class _DecodeState:
    """What the sampling loop carries from one step to the next: the output buffers (all B·M rows), the rows still
    in the batch (``rows``: which output rows they are, once some have left), their attention mask and position ids,
    the KV cache and the next step's input."""

    tokens: torch.Tensor
    logps: torch.Tensor
    unfinished: torch.Tensor
    attention: torch.Tensor | None
    position: torch.Tensor | None
    step_input: torch.Tensor
    cache: Any = None
    rows: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None  # (B·M, max_new_tokens, V), only when the full log-softmax is kept

    @classmethod
    def start(cls, input_ids, prompt_mask, max_new_tokens, repeats, pad_token_id, with_positions) -> "_DecodeState":
        """Position ids follow the attention mask (left padding does not shift positions); the mask is dropped when
        no prompt is padded."""
        device, (B, P) = input_ids.device, input_ids.shape
        attention = None
        if not bool(prompt_mask.all()):
            attention = torch.ones((B, P + max_new_tokens), dtype=prompt_mask.dtype, device=device)
            attention[:, :P] = prompt_mask
        position = None
        if with_positions:
            position = (prompt_mask.long().cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)
        return cls(
            tokens=torch.full((B * repeats, max_new_tokens), pad_token_id, dtype=torch.long, device=device),
            logps=torch.zeros((B * repeats, max_new_tokens), dtype=torch.float32, device=device),
            unfinished=torch.ones(B * repeats, dtype=torch.bool, device=device),
            attention=attention, position=position, step_input=input_ids,
        )

    def repeat_prefill(self, repeats, call, model, input_ids, prompt_mask) -> None:
        """Each prompt's prefill becomes its M rows (the cache, the mask and the position ids)."""
        self.cache = _repeat_rows(self.cache, repeats, model, input_ids, prompt_mask, self.position, call)
        self.attention = self.attention.repeat_interleave(repeats, dim=0) if self.attention is not None else None
        self.position = self.position.repeat_interleave(repeats, dim=0) if self.position is not None else None

    def row_generators(self, generators):
        """The generators of the rows still in the batch (all of them until a row has left)."""
        if generators is None or self.rows is None:
            return generators
        return [generators[r] for r in self.rows.tolist()]

    def mark_finished(self, next_tokens, step_logps, stop_ids, pad_token_id) -> None:
        """Rows that had finished get the pad token and log-prob 0 (in place); rows that emit a stop id finish."""
        finished = ~self.unfinished
        next_tokens.masked_fill_(finished, pad_token_id)
        step_logps.masked_fill_(finished, 0.0)
        hit = (next_tokens == stop_ids[0]) if len(stop_ids) == 1 else torch.isin(next_tokens, stop_ids)
        self.unfinished &= ~hit

    def record(self, t: int, next_tokens: torch.Tensor, step_logps: torch.Tensor,
               step_log_probs: torch.Tensor | None = None, max_new_tokens: int = 0) -> None:
        where = slice(None) if self.rows is None else self.rows
        self.tokens[where, t] = next_tokens
        self.logps[where, t] = step_logps
        if step_log_probs is not None:
            if self.log_probs is None:
                shape = (self.tokens.shape[0], max_new_tokens, step_log_probs.shape[-1])
                self.log_probs = torch.zeros(shape, dtype=torch.float32, device=step_log_probs.device)
            self.log_probs[where, t] = step_log_probs

    def keep_unfinished(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """Finished rows leave the batch and the KV cache; returns the kept rows' ``next_tokens``."""
        keep = self.unfinished.nonzero().squeeze(1)
        self.cache.batch_select_indices(keep)
        self.rows = keep if self.rows is None else self.rows[keep]
        self.unfinished = self.unfinished[keep]
        if self.attention is not None:
            self.attention = self.attention[keep]
        if self.position is not None:
            self.position = self.position[keep]
        return next_tokens[keep]

    def advance(self, next_tokens: torch.Tensor) -> None:
        self.step_input = next_tokens[:, None]
        if self.position is not None:
            self.position = self.position[:, -1:] + 1


@dataclass(frozen=True)
class _StepCall:
    """How this model's forward is called for one step: the KV cache's argument name and ``logits_to_keep``."""

    cache_name: str
    logits_kw: dict[str, int]

    def scores(self, model: nn.Module, state: _DecodeState, length: int) -> torch.Tensor:
        """The next-token logits (float32) of the rows in the batch; updates the state's cache."""
        extra = {self.cache_name: state.cache} if state.cache is not None else {}
        if state.position is not None:
            extra["position_ids"] = state.position
        attention = state.attention[:, :length] if state.attention is not None else None
        if attention is None and state.cache is not None:
            # decode steps of unpadded prompts: finished rows are fed the pad id (as in generate) and a row may sample
            # it; an all-ones mask says it is not padding, which transformers would otherwise warn about on every run
            attention = torch.ones(state.step_input.shape[0], length, dtype=torch.long, device=state.step_input.device)
        out = model(input_ids=state.step_input, attention_mask=attention, use_cache=True, return_dict=True, **extra,
                    **self.logits_kw)
        state.cache = out.get(self.cache_name)
        return out.logits[:, -1, :].float()


def sample_policy(
    model: nn.Module, input_ids: torch.Tensor, prompt_mask: torch.Tensor, *, use_kv_cache: bool = True,
    greedy: bool = False, **settings: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Completions of the left-padded prompts ``input_ids`` (B, P): ``(tokens, logps)``, both (B·M, n), as
    :func:`sample_with_kv_cache` returns them; ``settings`` are its keyword arguments (``max_new_tokens``,
    ``temperature``, ``pad_token_id``, ``eos_token_ids``, ``drop_finished``, ``num_return_sequences``, ``generators``).

    :func:`sample_with_kv_cache` when ``use_kv_cache`` and the model is decoder-only; else ``generate`` with pure
    sampling (``top_k=0``, ``top_p=1``), whose processed scores give the log-probs. ``greedy``: ``generate``'s greedy
    decoding, log-probs of the argmax tokens at temperature 1.
    """
    if use_kv_cache and not greedy and kv_cache_sampling_supported(model):
        return sample_with_kv_cache(model, input_ids, prompt_mask, **settings)
    return _sample_with_generate(model, input_ids, prompt_mask, greedy=greedy, **settings)


def _sample_with_generate(model, input_ids, prompt_mask, *, max_new_tokens, temperature, pad_token_id, eos_token_ids,
                          num_return_sequences=1, greedy=False, drop_finished=False, generators=None):
    """``generate``'s draws and their log-probs (``drop_finished`` and per-row ``generators`` are the KV-cache loop's;
    ``generate`` keeps rows and draws from the global generator)."""
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0,
                                                   "top_p": 1.0}
    eos = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids or [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generate's notes on the settings it was given
        out = model.generate(
            input_ids=input_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
            eos_token_id=eos or None, num_return_sequences=num_return_sequences, output_scores=True,
            return_dict_in_generate=True, **sampling,
        )
    tokens = out.sequences[:, input_ids.shape[1] :]
    scores = torch.stack(out.scores, dim=1).float()  # already divided by the temperature
    logps = torch.log_softmax(scores, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    return tokens, logps * completion_mask(tokens, eos)


def completion_mask(tokens: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """1 up to and including each row's first EOS (the EOS is part of the completion, as in TRL), 0 after it."""
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for e in eos_token_ids:
        is_eos |= tokens == e
    no_eos = torch.full_like(is_eos[:, 0], tokens.shape[1], dtype=torch.long)
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), no_eos)
    return (torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= first[:, None]).long()


def completion_lengths(tokens: torch.Tensor, eos_token_ids: Sequence[int]) -> list[int]:
    """Each row's length up to and including its first EOS (the whole row when it has none): where TRL cuts a
    completion, and the one place this package decides it."""
    return completion_mask(tokens, eos_token_ids).sum(1).tolist()


def cut_at_first_eos(tokens: torch.Tensor, eos_token_ids: Sequence[int]) -> list[list[int]]:
    """Each row's token ids up to and including its first EOS (a row ending in an EOS id was terminated; one without
    ran into the length limit)."""
    return [row[:n] for row, n in zip(tokens.tolist(), completion_lengths(tokens, eos_token_ids))]


def policy_eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The ids that end a completion: the model's ``generation_config.eos_token_id`` (one or several) and the
    tokenizer's EOS, sorted."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    ids.discard(None)
    return sorted(int(i) for i in ids)


def _repeat_rows(cache, repeats, model, input_ids, prompt_mask, position, call: _StepCall):
    """The prefill cache with each row repeated ``repeats`` times; caches without row repetition are rebuilt by
    prefilling the repeated prompts (same result, more compute)."""
    if hasattr(cache, "batch_repeat_interleave") and _can_drop_rows(cache):
        cache.batch_repeat_interleave(repeats)
        return cache
    extra = {"position_ids": position.repeat_interleave(repeats, dim=0)} if position is not None else {}
    mask = prompt_mask.repeat_interleave(repeats, dim=0)
    out = model(input_ids=input_ids.repeat_interleave(repeats, dim=0),
                attention_mask=None if bool(mask.all()) else mask,
                use_cache=True, return_dict=True, **extra, **call.logits_kw)
    return out.get(call.cache_name)


def _can_drop_rows(cache) -> bool:
    """Rows can leave a plain ``DynamicCache`` whose layers all hold key/value tensors (not linear-attention or
    static caches, whose row selection differs)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(isinstance(layer, DynamicLayer) for layer in cache.layers)


def per_token_logps(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    batch_size: int = 32,
) -> torch.Tensor:
    """Log-probabilities (N, C) of the completion tokens under ``model`` at ``temperature`` (as TRL scores them:
    logits / T). Position ids follow the attention mask so left padding does not shift positions.

    The logits over the vocabulary are the pass's largest tensors (N · C · V floats): without gradients they are
    divided by T in place, so a pass holds them and their log-softmax, not a third copy."""
    out = []
    for start in range(0, prompt_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        logps = completion_log_softmax(model, prompt_ids[sl], prompt_mask[sl], completion_ids[sl], temperature)
        out.append(torch.gather(logps, 2, completion_ids[sl].to(logps.device).unsqueeze(-1)).squeeze(-1))
        del logps
    return torch.cat(out, dim=0).to(completion_mask.device) * completion_mask


def scoring_row_bytes(model: nn.Module, completion_len: int) -> int:
    """Bytes one sequence holds while :func:`per_token_logps` scores it: its float32 logits at the completion
    positions and their log-softmax (2 · (C + 1) · V floats)."""
    config = _base_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return 2 * (completion_len + 1) * int(getattr(config, "vocab_size", 0)) * 4


def completion_log_softmax(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           completion_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(· | s_t) over the whole vocabulary (N, C, V) at every completion position, at ``temperature``; position
    ids follow the attention mask (left padding does not shift positions), completion positions all attended."""
    return torch.log_softmax(_completion_scores(model, prompt_ids, prompt_mask, completion_ids, temperature), dim=-1)


def _completion_scores(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                       completion_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """The float32 logits / T (N, C, V) that predict each completion token (a view of the model's output)."""
    dev = next(model.parameters()).device
    prompt_ids, prompt_mask, completion_ids = prompt_ids.to(dev), prompt_mask.to(dev), completion_ids.to(dev)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(completion_ids)], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    c_len = completion_ids.shape[1]
    # the LM head only where a completion token is predicted (the last prompt position onwards)
    keep = {"logits_to_keep": c_len + 1} if "logits_to_keep" in forward_kwargs(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **keep).logits
    scores = logits[:, -c_len - 1 : -1, :].float()
    if temperature == 1.0:
        return scores
    return scores / temperature if torch.is_grad_enabled() else scores.div_(temperature)  # in place: no third copy


def is_conversational(prompt: Any) -> bool:
    """A chat prompt: a non-empty list of ``{"role": ..., "content": ...}`` messages."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def encode_prompts(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids of each prompt, as TRL renders them: plain text as it is, chat prompts through the chat template
    with the generation prompt; no special tokens added."""
    ids = []
    for p in prompts:
        if is_conversational(p):
            text = tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        elif isinstance(p, str):
            text = p
        else:
            raise TypeError(f"A prompt must be a string or a list of chat messages, got {type(p).__name__}.")
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


_SLOT = "\x00prompt\x00"


def as_chat_prompts(tokenizer: Any, prompts: Sequence[Any]) -> list[Any]:
    """``prompts`` with each plain-text prompt made one user turn, ``[{"role": "user", "content": p}]``, when the
    tokenizer has a chat template: a chat model fed raw text sees a format it was never tuned on, while TRL and
    :func:`encode_prompts` render a conversational prompt through the template with the generation prompt.

    Left as they are: chat prompts, every prompt when the tokenizer has no template, and plain prompts already in the
    template's format (they begin with what the template puts before a user turn's text and end with what follows
    it up to the generation prompt), such as the lab's "customer : ... agent :" under the lab's own template.
    """
    frame = _user_turn_frame(tokenizer)
    if frame is None:
        return list(prompts)
    head, tail = frame
    return [[{"role": "user", "content": p}]
            if isinstance(p, str) and not (p.lstrip().startswith(head) and p.rstrip().endswith(tail)) else p
            for p in prompts]


def _user_turn_frame(tokenizer: Any) -> tuple[str, str] | None:
    """(text before, text after) a user turn's content as the chat template renders it with the generation prompt,
    stripped of surrounding whitespace; ``None`` when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SLOT}], tokenize=False,
                                             add_generation_prompt=True)
    head, _, tail = rendered.partition(_SLOT)
    return head.strip(), tail.strip()
