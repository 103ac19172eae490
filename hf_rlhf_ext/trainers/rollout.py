"""PPO's rollout: the per-rollout record, and the one seam that holds the rollout's speed-ups.

* :class:`Rollout` — everything one rollout produces, created when the rollout starts and filled in as it is scored.
* :class:`RolloutEngine` — every model pass of a rollout (sampling, log π_old of the sampled tokens, V(s_t)). With its
  speed-ups off it is the plain path: ``generate``, a forward pass of the policy, a forward pass of the critic. The
  speed-ups, each chosen once at construction:

  - KV-cache sampling (:func:`sample_completions`): draws exactly what ``generate`` draws and keeps the sampled tokens'
    log-probs; on the ``generate`` path a logits processor records them (:class:`SampledLogProbs`);
  - log π_old from the sampler instead of a forward pass, checked once against a forward pass
    (:class:`SamplerLogpsCheck`);
  - ``value_head_on_policy``: V(s_t) read by a head on the policy's hidden states in the passes that run anyway (the
    sampler's, or the forward pass that computes log π_old), so no pass of a separate critic;
  - the critic's rollout pass keeps its graph when the first optimizer step's micro-batch is the whole rollout.
* The plain LM head (:func:`plain_head_logps`): in full precision, when the logits are small, the policy's log-probs
  come from log_softmax(logits / T) instead of GRPO's chunked head, which only pays off for large logits.
* The guard of the fast path: settings that change the sampling distribution are refused
  (:func:`check_sampling_distribution`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..sampling import completion_lengths, forward_kwargs, sample_with_kv_cache
from .critic import critic_values
from .value_model import capture_last_hidden_states, policy_backbone

logger = logging.getLogger(__name__)

SAMPLING_LOGPS_TOLERANCE = 1e-3  # max |log π_sampler − log π_forward| accepted for the logprobs_from_sampling shortcut
# Above this many logits per forward chunk (rows × (T+1) × vocab) the policy's log-probs use GRPO's fused LM head.
PLAIN_LOGITS_MAX_ELEMENTS = 1 << 24

__all__ = [
    "PLAIN_LOGITS_MAX_ELEMENTS",
    "SAMPLING_LOGPS_TOLERANCE",
    "Forward",
    "Rollout",
    "RolloutEngine",
    "SampledLogProbs",
    "SamplerLogpsCheck",
    "SamplerOutput",
    "check_sampling_distribution",
    "fast_generation_supported",
    "plain_head_logps",
    "sample_completions",
    "use_plain_head",
]


@dataclass
class Rollout:
    """One rollout on this process: what each step of scoring consumed and produced. All (B, T) tensors are in the
    rollout's order, 0 on padding; ``B`` is this process's share.

    Filled in the order of ``PPOTrainer._generate_and_score_completions``: ``rewards_per_func``, ``scores``,
    ``has_eos``, ``mask`` by scoring; ``logps``, ``values`` (and ``critic_pass``, ``policy_pass_values``,
    ``sampler_values``) by :meth:`RolloutEngine.policy_and_values`; ``ref_logps``; ``kl``, ``token_rewards``,
    ``returns``, ``advantages`` by the rewards and GAE. The batch dict carries the rows the loss needs (``old_values``,
    ``returns``, ``advantages``, ``old_per_token_logps``); this record keeps the rest for logging and inspection
    (``PPOTrainer.last_rollout``).
    """

    mode: str  # "train" or "eval"
    step: int  # the optimizer step the rollout was collected at
    kl_coef: float  # β used for this rollout's rewards
    rewards_per_func: torch.Tensor | None = None  # (B_global, n_funcs), gathered over processes; NaN = not scored
    logps: torch.Tensor | None = None  # log π_old(y_t): the rollout policy's log-probs of the sampled tokens
    ref_logps: torch.Tensor | None = None  # log π_ref(y_t); None when β = 0 (no reference)
    scores: torch.Tensor | None = None  # (B,) weighted sum of the reward functions, minus missing_eos_penalty
    has_eos: torch.Tensor | None = None  # (B,) whether each completion ended with an EOS token
    mask: torch.Tensor | None = None  # completion tokens that count (unscorable completions masked out)
    values: torch.Tensor | None = None  # V(s_t) at rollout time, detached
    # The same values with their graph, when the first optimizer step's micro-batch is this whole rollout: that step
    # backpropagates through them instead of running the critic again. Taken once (:meth:`take_critic_pass`).
    critic_pass: torch.Tensor | None = None
    # value_head_on_policy: V(s_t) read from the policy forward pass that computed log π_old, when one ran (chunks).
    policy_pass_values: list[torch.Tensor] | None = None
    # value_head_on_policy: V(s_t) read while the KV-cache sampler drew the rollout, (B, sampled length).
    sampler_values: torch.Tensor | None = None
    kl: torch.Tensor | None = None  # per-token KL estimate between π_old and π_ref
    token_rewards: torch.Tensor | None = None  # r_t = −β·KL_t, plus the score at the last token
    non_score_rewards: torch.Tensor | None = None  # −β·KL_t alone
    returns: torch.Tensor | None = None  # GAE λ-returns: the critic's targets
    advantages: torch.Tensor | None = None  # GAE advantages, whitened

    def take_critic_pass(self, step: int, rows: torch.Tensor, completion_length: int) -> torch.Tensor | None:
        """The rollout's critic values with their graph for the micro-batch made of ``rows`` of this rollout, once,
        and only while the critic has not moved since (same optimizer step) and the micro-batch is the whole rollout."""
        values, self.critic_pass = self.critic_pass, None
        if (values is None or self.mode != "train" or step != self.step or rows.numel() != values.size(0)
                or values.size(1) != completion_length):
            return None
        return values[rows]


@dataclass
class SamplerLogpsCheck:
    """Whether the sampler's log-probs can stand in for a forward pass: decided once, on the first rollout.

    They can differ beyond rounding: under bf16, or with left-padded prompts on a model with absolute position
    embeddings (GPT-2), where ``generate`` derives positions from the attention mask and the trainer's forward pass
    does not. A KL between the two conventions is biased (≈ 0.3 nats per completion at step 0 on the lab), so on a
    mismatch the rollout log-probs come from forward passes from then on.
    """

    passed: bool | None = None  # None until checked
    max_diff: float | None = None

    def verify(self, sampled: torch.Tensor, forward: torch.Tensor, mask: torch.Tensor, gather_max: Callable) -> bool:
        diff = (forward - sampled).abs().masked_fill(~mask.bool(), 0.0).max().reshape(1)
        self.max_diff = float(gather_max(diff))  # the same decision on every process
        self.passed = self.max_diff <= SAMPLING_LOGPS_TOLERANCE
        if not self.passed:
            logger.warning(
                "The sampler's log-probs differ from the forward pass by up to %.3g (bf16, or left padding with "
                "absolute position embeddings): taking the rollout log-probs from forward passes instead.",
                self.max_diff,
            )
        return self.passed


# ----------------------------------------------------------------------------------------------------------------------
# Sampling with log-probs
# ----------------------------------------------------------------------------------------------------------------------
class SampledLogProbs(LogitsProcessor):
    """Records log π(y_t) of each sampled token from the logits ``generate`` saw (no extra forward pass).

    Custom processors run before transformers' temperature warper, so it divides by the temperature itself, exactly
    as the policy's log-probs are computed in training. Keeps only one step of (B, V) log-probs in memory.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.logps: torch.Tensor | None = None  # (B, generated tokens), set by finish()
        self._prev: torch.Tensor | None = None
        self._out: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prev is not None:
            self._out.append(self._prev.gather(-1, input_ids[:, -1:]))  # the token sampled at the previous step
        self._prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.LongTensor) -> torch.Tensor:
        if self._prev is not None:
            self._out.append(self._prev.gather(-1, sequences[:, -1:]))
            self._prev = None
        empty = sequences.new_zeros((sequences.size(0), 0), dtype=torch.float)
        self.logps = torch.cat(self._out, dim=1) if self._out else empty
        return self.logps


def sample_completions(model: Any, input_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                       temperature: float, pad_token_id: int, eos_token_ids: Any, eos_ids: torch.Tensor
                       ) -> tuple[list[list[int]], list[list[float]]]:
    """:func:`hf_rlhf_ext.sampling.sample_with_kv_cache` with GRPO's conventions: the completions cut after their
    first EOS, and the log-prob of each kept token (float32 values as Python floats)."""
    tokens, logps = sample_with_kv_cache(model, input_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                         temperature=temperature, pad_token_id=pad_token_id,
                                         eos_token_ids=eos_token_ids)
    lengths = completion_lengths(tokens, eos_ids.tolist())
    return ([row[:n] for row, n in zip(tokens.tolist(), lengths)],
            [row[:n] for row, n in zip(logps.tolist(), lengths)])


@dataclass
class Forward:
    """A rollout's rows as every forward pass reads them: prompt + completion ids, their attention mask, the
    completion length ``T`` and the rows per chunk."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_length: int
    batch_size: int


class SamplerOutput(list):
    """What a sampler knows beyond its tokens: the sampled tokens' log-probs, one list per completion (GRPO carries
    this list from ``_generate_single_turn`` back to the rollout untouched), and ``values``, (B, sampled length), the
    V(s_t) a value head on the policy read from the sampler's own forward passes (else None)."""

    def __init__(self, logps: list[list[float]], values: torch.Tensor | None = None):
        super().__init__(logps)
        self.values = values


class RolloutEngine:
    """The seam between PPO's rollout and its speed-ups: the rollout asks it for completions (:meth:`sample`) and for
    log π_old and V(s_t) of them (:meth:`policy_and_values`); how each is computed is decided here, once, at
    construction (see the module docstring). ``trainer`` is the :class:`PPOTrainer`; ``grpo_generate`` GRPO's own
    ``_generate_single_turn`` (vLLM, continuous batching, multimodal prompts, or the plain ``generate``)."""

    def __init__(self, trainer: Any, grpo_generate: Callable):
        self.trainer, self.grpo_generate = trainer, grpo_generate
        args, accelerator = trainer.args, trainer.accelerator
        policy = accelerator.unwrap_model(trainer.model)
        external = trainer.use_vllm or trainer.use_transformers_continuous_batching  # they bring their own sampler
        # Under FSDP every rank must run the same forward passes: generate() syncs them, the KV-cache sampler does not.
        plain_transformers = not (external or trainer._is_vlm or trainer.is_fsdp_enabled)
        self.kv_cache = args.fast_generation and fast_generation_supported(
            trainer.generation_kwargs, trainer.temperature, plain_transformers, policy.config.is_encoder_decoder)
        self.external_sampler = external
        # Under bf16/fp16 the sampler's log-probs differ from the training forward's by ~1e-2: as π_old of several
        # PPO epochs that would show as clipping on the first pass, so π_old then comes from a forward pass.
        self.low_precision = bool(args.bf16 or args.fp16)
        self.head = trainer.value_model if args.value_head_on_policy else None
        self.backbone = policy_backbone(policy) if args.value_head_on_policy else None
        self.check = SamplerLogpsCheck()  # may the sampler's log-probs replace a forward pass? (first rollout)

    @property
    def sampler_logps(self) -> bool:
        """Whether log π_old may come from the sampler (``logprobs_from_sampling``, read live: a subclass may turn it
        off after construction)."""
        return self.trainer.args.logprobs_from_sampling and not self.external_sampler

    # -- sampling ------------------------------------------------------------------------------------------------------
    def sample(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """``(completion_ids, logps)`` as GRPO's ``_generate_single_turn`` returns them; ``logps`` is a
        :class:`SamplerOutput` when this engine sampled (else GRPO's: vLLM's log-probs, or None)."""
        text_only = images is None and not multimodal_fields and not has_tool_images
        if self.kv_cache and text_only:
            return self._sample_with_kv_cache(prompt_ids)
        if self.sampler_logps and self.check.passed is not False and text_only:
            return self._generate_recording_logps(prompt_ids)
        return self.grpo_generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

    def _left_padded(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        from trl.trainer.utils import pad

        t = self.trainer
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, padding_value=t._tokenizer.pad_token_id, padding_side="left",
                        pad_to_multiple_of=t.pad_to_multiple_of)
        prompt_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left",
                          pad_to_multiple_of=t.pad_to_multiple_of)
        return input_ids.to(t.accelerator.device), prompt_mask.to(t.accelerator.device)

    @contextlib.contextmanager
    def _unwrapped_for_generation(self):
        """The policy as GRPO's plain-transformers generation unwraps it, without a graph."""
        from trl.models.utils import unwrap_model_for_generation

        t = self.trainer
        with (
            unwrap_model_for_generation(
                t.model_wrapped, t.accelerator, gather_deepspeed3_params=t.args.ds3_gather_for_generation,
                generation_kwargs=t.generation_kwargs,
                gradient_checkpointing_kwargs=t.args.gradient_checkpointing_kwargs,
            ) as unwrapped,
            torch.no_grad(),
            t._dist.summon_full_params(t.model_wrapped, recurse=False),
        ):
            yield unwrapped

    def _sample_with_kv_cache(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], SamplerOutput]:
        """The KV-cache sampler (the same draws as ``generate``, :func:`sample_completions`). With a value head on the
        policy the head also reads the sampler's hidden states — the prefill's last prompt position (the state
        before completion token 0), then each decoding step's (before token t + 1): V(s_t) without another pass."""
        t = self.trainer
        input_ids, prompt_mask = self._left_padded(prompt_ids)
        kwargs = t.generation_kwargs or {}
        sink = [] if self.head is not None else None
        read_last = (lambda hidden: self.head(hidden[:, -1:])) if self.head is not None else None
        with self._unwrapped_for_generation() as unwrapped, capture_last_hidden_states(self.backbone, sink, read_last):
            completions, logps = sample_completions(
                unwrapped, input_ids, prompt_mask, eos_ids=t._completion_end_ids, temperature=float(t.temperature),
                max_new_tokens=int(kwargs.get("max_new_tokens", t.max_completion_length)),
                pad_token_id=kwargs.get("pad_token_id", t._tokenizer.pad_token_id),
                eos_token_ids=kwargs.get("eos_token_id", t.eos_token_ids),
            )
        return completions, SamplerOutput(logps, torch.cat(sink, dim=1) if sink else None)

    def _generate_recording_logps(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], SamplerOutput]:
        """``generate`` exactly as GRPO calls it, plus a logits processor that records the sampled tokens'
        log-probs; completions cut after their first EOS, as GRPO cuts them."""
        t = self.trainer
        input_ids, prompt_mask = self._left_padded(prompt_ids)
        recorder = SampledLogProbs(float(t.temperature))
        with self._unwrapped_for_generation() as unwrapped:
            sequences = unwrapped.generate(input_ids=input_ids, attention_mask=prompt_mask,
                                           generation_config=t.generation_config,
                                           logits_processor=LogitsProcessorList([recorder]))
        logps = recorder.finish(sequences)
        completion_ids = sequences[:, input_ids.size(1):]
        lengths = completion_lengths(completion_ids, t._eos_ids.tolist())
        return ([row[:n] for row, n in zip(completion_ids.tolist(), lengths)],
                SamplerOutput([row[:n] for row, n in zip(logps.tolist(), lengths)]))

    # -- log π_old and V(s_t) ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def policy_and_values(self, rollout: Rollout, forward: Forward, sampled: Any, need_pi_old: bool) -> None:
        """Fills ``rollout.logps`` (log π_old of the sampled tokens) and ``rollout.values`` (V(s_t), not yet masked),
        with what they were read from: the sampler's log-probs when they may stand in for a forward pass (checked
        once against one), else a forward pass of the policy; the values from the value head in the passes that ran
        (``value_head_on_policy``), else from the critic."""
        t, T = self.trainer, forward.completion_length
        rollout.sampler_values = sampled.values if isinstance(sampled, SamplerOutput) else None
        logps, head_values = None, None
        sampler_pi_old = not (need_pi_old and self.low_precision)
        if (isinstance(sampled, SamplerOutput) and self.sampler_logps and self.check.passed is not False
                and sampler_pi_old):
            from trl.trainer.utils import pad

            rows = [torch.tensor(row, dtype=torch.float32) for row in sampled]
            logps = pad(rows, padding_value=0.0, padding_side="right",
                        pad_to_multiple_of=t.pad_to_multiple_of).to(forward.input_ids.device)[:, :T]
            if self.check.passed is None:
                exact, head_values = self._policy_forward(forward)
                mask = forward.attention_mask[:, -T:]
                if not self.check.verify(logps, exact, mask, lambda d: t.accelerator.gather(d).max()):
                    logps = exact
                t._metrics["train"]["sampling/logp_max_diff"].append(self.check.max_diff)
        if logps is None:
            logps, head_values = self._policy_forward(forward)
        rollout.logps, rollout.policy_pass_values = logps, head_values
        rollout.values, rollout.critic_pass = self._values(rollout, forward, head_values)

    def _policy_forward(self, forward: Forward) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """log π of the sampled tokens from a forward pass of the policy; with a value head on the policy, the values
        it read in the same pass (one chunk per forward)."""
        t = self.trainer
        sink = [] if self.head is not None else None
        read = (lambda hidden: self.head(hidden, forward.completion_length)) if self.head is not None else None
        with capture_last_hidden_states(self.backbone, sink, read):
            logps = t._get_per_token_logps_and_entropies(t.model, forward.input_ids, forward.attention_mask,
                                                         forward.completion_length, batch_size=forward.batch_size)[0]
        return logps, sink

    def _values(self, rollout: Rollout, forward: Forward, head_values: list[torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(values, critic_pass)``. A value head on the policy: the values read in the forward pass that computed
        log π_old; when the sampler gave π_old (no such pass), those read while sampling (KV cache: equal up to
        float rounding); else a pass of the policy's body alone (no LM head). A critic: its forward pass, which
        keeps its graph (``critic_pass``) when the first optimizer step can backpropagate through it."""
        t, T = self.trainer, forward.completion_length
        ids, att, bs = forward.input_ids, forward.attention_mask, forward.batch_size
        if self.head is not None:
            if head_values is not None:
                return policy_pass_values(head_values, self.backbone), None
            sampled = rollout.sampler_values
            if sampled is not None and sampled.size(0) == ids.size(0) and sampled.size(1) >= T:
                return sampled[:, :T], None
            chunks = []
            for i in range(0, ids.size(0), bs):
                with t.accelerator.autocast():
                    out = self.backbone(input_ids=ids[i : i + bs], attention_mask=att[i : i + bs], use_cache=False)
                chunks.append(self.head(out.last_hidden_state, T))
            return torch.cat(chunks, dim=0), None
        if self.can_reuse_critic_pass(rollout, bs):
            with torch.enable_grad(), t.accelerator.autocast():
                critic_pass = t.value_model(ids, att, completion_length=T)
            return critic_pass.detach(), critic_pass
        with t.accelerator.autocast():
            return critic_values(t.value_model, ids, att, T, bs), None

    def can_reuse_critic_pass(self, rollout: Rollout, batch_size: int) -> bool:
        """Holds when the first step's micro-batch is the whole rollout (one mini-batch, no gradient accumulation), on
        one process (a DDP or FSDP critic must be called by the step that backpropagates), with no dropout (the same
        values) and every completion scorable (the loss then sees the same attention mask)."""
        t = self.trainer
        return (
            rollout.mode == "train" and t.args.steps_per_generation == 1 and rollout.mask.size(0) == batch_size
            and t.accelerator.num_processes == 1 and t.args.disable_dropout
            and bool(rollout.mask.any(dim=1).all())
        )


def policy_pass_values(chunks: list[torch.Tensor], backbone: torch.nn.Module) -> torch.Tensor:
    """The values the value head read during a forward pass of the policy; an error if that pass never reached the
    policy's body (a model whose forward bypasses it cannot carry a value head on its hidden states)."""
    if not chunks:
        raise RuntimeError(f"value_head_on_policy: the policy's forward pass did not run {type(backbone).__name__}, "
                           "so no hidden states were read; use a separate critic (value_head_on_policy=False).")
    return torch.cat(chunks, dim=0)


# ----------------------------------------------------------------------------------------------------------------------
# Guards of the fast path
# ----------------------------------------------------------------------------------------------------------------------
SAMPLING_SETTINGS = (
    "do_sample", "num_beams", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h",
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "sequence_bias", "min_length", "min_new_tokens", "suppress_tokens", "begin_suppress_tokens",
    "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty", "guidance_scale",
    "watermarking_config",
)

# Generation settings the KV-cache sampler reproduces; anything else in generation_kwargs goes through generate().
FAST_GENERATION_KEYS = frozenset({
    "max_new_tokens", "do_sample", "pad_token_id", "bos_token_id", "eos_token_id", "temperature", "top_p", "top_k",
    "min_p", "repetition_penalty", "cache_implementation", "disable_compile", "use_cache",
})


def changes_distribution(name: str, value: Any) -> bool:
    """Whether a generation setting makes the sampling distribution differ from softmax(logits / temperature)."""
    if value is None:
        return False
    if name in ("top_k", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "min_new_tokens", "min_length"):
        return int(value) > 0
    if name in ("top_p", "typical_p"):
        return float(value) < 1.0
    if name in ("min_p", "epsilon_cutoff", "eta_cutoff"):
        return float(value) > 0.0
    if name in ("repetition_penalty", "encoder_repetition_penalty", "guidance_scale", "num_beams"):
        return float(value) != 1.0
    if name == "do_sample":
        return value is False
    if name in ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "sequence_bias"):
        return len(value) > 0
    return True  # top_h, forced_bos_token_id, forced_eos_token_id, exponential_decay_length_penalty, watermarking


def check_sampling_distribution(settings: dict[str, Any]) -> None:
    """Refuses generation settings under which samples do not come from softmax(logits / temperature).

    The KL penalty and the ratio are computed from the policy's own log-probs. With a logits processor in the sampler
    (``min_new_tokens`` banning EOS, top-k/p, repetition penalty, ...) the tokens come from another distribution, and
    E[k1] is no longer KL(π‖π_ref): it can go negative and turn into a *reward* (a prototype's policy put its mass on
    the banned EOS, KL reached −84 and the score collapsed). Hence an error, not a warning.
    """
    bad = {k: settings[k] for k in SAMPLING_SETTINGS if changes_distribution(k, settings.get(k))}
    if bad:
        raise ValueError(
            f"PPOTrainer refuses generation settings that change the sampling distribution: {bad}. The KL penalty "
            "and the PPO ratio use the policy's own (temperature-scaled) log-probabilities; tokens drawn from "
            "another distribution bias the KL estimate (it can turn negative and become a reward: with "
            "min_new_tokens banning EOS, the policy learns to put its mass on EOS). Use top_k=0, top_p=1.0, "
            "min_p=None, repetition_penalty=1.0 and no min_new_tokens/min_length/bad_words_ids/suppress_tokens "
            "(check the model's generation_config.json too). For completions of a fixed length, pass "
            "generation_kwargs={'eos_token_id': None} instead of min_new_tokens."
        )


def fast_generation_supported(generation_kwargs: dict | None, temperature: float | None, plain_transformers: bool,
                              is_encoder_decoder: bool) -> bool:
    """Whether :func:`sample_completions` draws exactly what ``generate`` would. ``plain_transformers``: neither
    vLLM, nor continuous batching, nor a vision-language model. Distribution-changing settings are refused earlier."""
    kwargs = generation_kwargs or {}
    return (
        plain_transformers and not is_encoder_decoder
        and set(kwargs) <= FAST_GENERATION_KEYS and kwargs.get("cache_implementation") is None
        and kwargs.get("do_sample", True) is True and kwargs.get("use_cache", True) is not False
        and temperature is not None and temperature > 0
    )


# ----------------------------------------------------------------------------------------------------------------------
# The plain LM head
# ----------------------------------------------------------------------------------------------------------------------
def use_plain_head(model: Any, rows: int, logits_to_keep: int, vocab_size: int, low_precision: bool,
                   extra_inputs: dict) -> bool:
    """Whether :func:`plain_head_logps` applies: a text-only batch (no extra model inputs) in full precision whose
    logits per chunk stay under ``PLAIN_LOGITS_MAX_ELEMENTS``."""
    return (
        not low_precision and all(v is None for v in extra_inputs.values())
        and rows * (logits_to_keep + 1) * vocab_size <= PLAIN_LOGITS_MAX_ELEMENTS
        and next(model.parameters()).dtype == torch.float32
    )


def plain_head_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                     batch_size: int, temperature: float, compute_entropy: bool, entropy_grad: bool,
                     autocast: Callable) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the last ``logits_to_keep`` tokens from log_softmax(logits / T).

    The same maths as GRPO's fused head, which exists to avoid materialising the (B, T, V) logits; below that size it
    only costs time (≈ 1/3 of a small policy's forward + backward). Values differ by float rounding (≈ 1e-7); like
    the fused head, padded positions get 0. ``entropy_grad``: keep the entropies' graph (an entropy bonus).
    Position ids follow the attention mask, as in ``generate`` and our sampler: left padding does not shift the
    positions of a model with absolute position embeddings (GPT-2), so these log-probs equal the sampler's.
    """
    accepted = forward_kwargs(model)
    keep = {"logits_to_keep": logits_to_keep + 1} if "logits_to_keep" in accepted else {}
    all_logps, all_entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, att = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        positions = {"position_ids": (att.long().cumsum(-1) - 1).clamp(min=0)} if "position_ids" in accepted else {}
        with autocast():
            logits = model(input_ids=ids, attention_mask=att, use_cache=False, **keep, **positions).logits
        logits = logits[:, -logits_to_keep - 1 : -1].float() / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        padding = att[:, -logits_to_keep:] == 0
        logps = logp_all.gather(-1, ids[:, -logits_to_keep:].unsqueeze(-1)).squeeze(-1)
        all_logps.append(logps.masked_fill(padding, 0.0))
        if compute_entropy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
            all_entropies.append(entropy.masked_fill(padding, 0.0))
    return torch.cat(all_logps, dim=0), torch.cat(all_entropies, dim=0) if compute_entropy else None
