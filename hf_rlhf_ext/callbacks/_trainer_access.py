"""What every monitoring callback needs from a TRL trainer, in one place: check that the trainer is one we support,
sample completions for a fixed held-out prompt set, score them, compute per-token log-probabilities under the policy and
under a reference policy.

Why the callbacks take the trainer at all: ``transformers`` callbacks are not handed the trainer, and what we measure
(held-out samples, per-sample rewards and advantages) lives on it. TRL's own ``LogCompletionsCallback(trainer, ...)``
does the same.

Measurements never disturb training: sampling runs under ``torch.random.fork_rng`` with its own seed (a run with the
callbacks draws the same training samples as one without them), the model is put in eval mode (no dropout) and back,
and everything runs under ``torch.no_grad``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .._trl_compat import check_trl_contract
from ..sampling import completion_mask, kv_cache_sampling_supported, sample_policy

__all__ = [
    "UnsupportedTrainerError",
    "check_supported_trainer",
    "HeldOutBatch",
    "HeldOutSampler",
    "reward_func_name",
    "add_metrics",
    "is_main_process",
]


class UnsupportedTrainerError(TypeError):
    """The trainer passed to a callback is not one whose internals the callback knows."""


def _supported_classes() -> tuple[type, ...]:
    from trl import GRPOTrainer, RLOOTrainer

    return (GRPOTrainer, RLOOTrainer)


def check_supported_trainer(trainer: Any, who: str, needs: Sequence[str] = ()) -> None:
    """Raises ``UnsupportedTrainerError`` unless ``trainer`` is a ``trl.GRPOTrainer`` or ``trl.RLOOTrainer`` (or a
    subclass, e.g. our PPO and REINFORCE trainers) that has the attributes ``needs``.

    Checked up front so that a wrong trainer fails at ``add_callback`` time, not after minutes of training.
    """
    classes = _supported_classes()
    if trainer is None:
        raise UnsupportedTrainerError(
            f"{who} needs the trainer: build the trainer first, then `trainer.add_callback({who}(trainer, ...))`."
        )
    if not isinstance(trainer, classes):
        raise UnsupportedTrainerError(
            f"{who} supports trl.GRPOTrainer and trl.RLOOTrainer (and their subclasses); got "
            f"{type(trainer).__module__}.{type(trainer).__name__}. It reads their per-sample logs (`trainer._logs`), "
            "their reward functions and their generation settings, which other trainers do not have."
        )
    check_trl_contract(trainer)  # the private TRL names the callbacks read (a clear error naming the TRL versions)
    missing = [name for name in needs if not hasattr(trainer, name)]
    if missing:
        raise UnsupportedTrainerError(
            f"{who}: this {type(trainer).__name__} has no attribute(s) {missing}; the installed TRL version may have "
            "changed its internals (written against trl 1.16)."
        )


def is_main_process(state: Any = None, trainer: Any = None) -> bool:
    """Whether this process writes files: ``state.is_world_process_zero`` when given, else the accelerator's view."""
    if state is not None and hasattr(state, "is_world_process_zero"):
        return bool(state.is_world_process_zero)
    if trainer is not None:
        return bool(trainer.accelerator.is_main_process)
    return True


def reward_func_name(func: Any) -> str:
    """The name TRL gives a reward function in its logs (``rewards/<name>/mean``)."""
    if isinstance(func, nn.Module):
        return str(getattr(getattr(func, "config", None), "name_or_path", "") or "").split("/")[-1]
    return getattr(func, "__name__", type(func).__name__)


def add_metrics(trainer: Any, metrics: dict[str, float]) -> None:
    """Queues scalars into the trainer's metric buffer, so that TRL's ``log`` averages them into the next log record
    (and every reporter sees them). Mutating the ``logs`` dict in ``on_log`` would not reach ``state.log_history``."""
    mode = "train" if trainer.model.training else "eval"
    for key, value in metrics.items():
        if value is None:
            continue
        trainer._metrics[mode][key].append(float(value))


# ----------------------------------------------------------------------------------------------------------------------
# Held-out sampling


def _is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def _normalise_prompts(eval_prompts: Any) -> tuple[list[Any], dict[str, list[Any]]]:
    """Accepts a list of prompts (text or chat messages) or a ``datasets.Dataset`` with a "prompt" column; returns
    the prompts and the other columns (passed to reward functions, as TRL does)."""
    if eval_prompts is None:
        raise ValueError("eval_prompts is None: give a list of prompts or a Dataset with a 'prompt' column.")
    columns: dict[str, list[Any]] = {}
    if hasattr(eval_prompts, "column_names"):
        if "prompt" not in eval_prompts.column_names:
            raise ValueError(
                f"The held-out prompt data set has no 'prompt' column (columns: {eval_prompts.column_names})."
            )
        prompts = list(eval_prompts["prompt"])
        columns = {c: list(eval_prompts[c]) for c in eval_prompts.column_names if c not in ("prompt", "completion")}
    else:
        prompts = list(eval_prompts)
    if not prompts:
        raise ValueError("The held-out prompt set is empty.")
    bad = [i for i, p in enumerate(prompts) if not (isinstance(p, str) or _is_conversational(p))]
    if bad:
        raise ValueError(
            f"Held-out prompt {bad[0]} is {type(prompts[bad[0]]).__name__}; prompts must be strings or lists of "
            "{'role', 'content'} messages."
        )
    return prompts, columns


@dataclass
class HeldOutBatch:
    """Completions sampled for (a share of) the held-out prompts on this process."""

    prompts: list[Any]
    completions: list[Any]  # str, or [{"role": "assistant", "content": str}] for conversational prompts
    prompt_ids: torch.Tensor  # (N, P), left-padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # (N, C), right-padded
    completion_mask: torch.Tensor  # 1 up to and including the first EOS
    completion_ids_list: list[list[int]]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    # log π(token) (N, C) at the sampling temperature, 0 where masked, read off the logits sampled from; None when
    # the completions came from ``generate`` (then a forward pass computes them)
    logps: torch.Tensor | None = None
    # log π(· | s_t) over the whole vocabulary (N, C, V) from the same logits, when the sampler was asked to keep it
    log_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)


class HeldOutSampler:
    """Samples completions for a fixed held-out prompt set with the trainer's policy.

    ``num_samples`` defaults to one training generation batch (``args.generation_batch_size``, all processes): a
    measurement then costs about what the trainer spends generating one batch, i.e. well under one optimizer step.
    ``batch_size`` (completions sampled at once per process) defaults to the trainer's per-process generation batch.

    The prompt set is fixed (the same ``num_samples`` prompts every time, cycling if there are fewer) so that curves
    over training compare like with like; the sampling seed is ``seed + global_step``. Sampling is pure temperature
    sampling at the trainer's temperature (no top-k/top-p), so that the log-probabilities we compute are those of the
    distribution we sampled from. In a multi-process run each process samples its share.

    Sampling is :func:`hf_rlhf_ext.sampling.sample_policy`: with ``use_kv_cache`` (default) decoder-only models go
    through the KV-cache loop with finished rows leaving the batch — the same distribution as ``generate``, faster,
    and the policy's log-probs come with the tokens (no forward pass for them); ``use_kv_cache=False`` or an
    encoder-decoder model goes through ``generate`` (log π then comes from a forward pass).
    """

    def __init__(
        self,
        trainer: Any,
        eval_prompts: Any,
        num_samples: int | None = None,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int = 1234,
        use_kv_cache: bool = True,
    ) -> None:
        self.trainer = trainer
        self.use_kv_cache = use_kv_cache
        self.prompts, self.columns = _normalise_prompts(eval_prompts)
        generation_batch = generation_batch_size(trainer)
        self.num_samples = int(num_samples if num_samples is not None else (generation_batch or len(self.prompts)))
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if batch_size is None:  # as many at once as the trainer generates per process
            batch_size = max(1, (generation_batch or 32) // trainer.accelerator.num_processes)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens or getattr(trainer, "max_completion_length", None) or 64)
        self.temperature = float(temperature if temperature is not None else getattr(trainer, "temperature", 1.0))
        self.seed = seed
        self.tokenizer = trainer._tokenizer  # the text tokenizer, also of a vision-language processor
        self._encoded: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- helpers -------------------------------------------------------------------------------------------------------
    def _indices_for_this_process(self) -> list[int]:
        acc = self.trainer.accelerator
        # every process gets the same number of prompts (rounded up), so that sharded models (ZeRO-3, FSDP) run the
        # same number of forward passes on every rank
        n = -(-self.num_samples // acc.num_processes) * acc.num_processes
        idx = [i % len(self.prompts) for i in range(n)]
        return idx[acc.process_index :: acc.num_processes]

    def _eos_ids(self) -> list[int]:
        eos = getattr(self.trainer, "eos_token_ids", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]

    def _tokenize(self, prompts: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        if _is_conversational(prompts[0]):
            chat_template = getattr(self.trainer, "chat_template", None)
            texts = [
                tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True, chat_template=chat_template)
                for p in prompts
            ]
            enc = tok(text=texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
        else:
            enc = tok(text=prompts, padding=True, padding_side="left", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    @contextlib.contextmanager
    def policy_for_generation(self) -> Iterator[nn.Module]:
        """The unwrapped policy in eval mode (ZeRO-3 parameters gathered by TRL's helper), restored afterwards."""
        from trl.models.utils import unwrap_model_for_generation

        trainer = self.trainer
        model = trainer.model_wrapped if getattr(trainer, "model_wrapped", None) is not None else trainer.model
        was_training = trainer.model.training
        with unwrap_model_for_generation(model, trainer.accelerator) as unwrapped:
            unwrapped.eval()
            try:
                yield unwrapped
            finally:
                if was_training:
                    unwrapped.train()
                    trainer.model.train()

    # -- sampling ------------------------------------------------------------------------------------------------------
    def _pad_id(self, eos_ids: list[int]) -> int:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = eos_ids[0] if eos_ids else 0
        return pad_id

    def _encoded_chunk(self, idx: list[int], start: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's left-padded prompt ids and mask; the prompt set is fixed, so each chunk is tokenised once."""
        key = (tuple(idx[start : start + self.batch_size]), device)
        if key not in self._encoded:
            chunk = [self.prompts[i] for i in key[0]]
            self._encoded[key] = tuple(t.to(device) for t in self._tokenize(chunk))
        return self._encoded[key]

    @torch.no_grad()
    def sample(self, policy: nn.Module, step: int, full_log_probs: bool = False) -> HeldOutBatch:
        """Samples one completion per selected held-out prompt on this process (:func:`hf_rlhf_ext.sampling.
        sample_policy`, with its own seed: the caller's random state is left as it was).

        ``full_log_probs``: also keep the whole-vocabulary log π of every completion position (``log_probs``), read
        off the sampling logits — only on the KV-cache path and when this process samples at most ``batch_size``
        completions, so that it holds no more than one micro-batch's forward pass would; else ``log_probs`` is None."""
        device = next(policy.parameters()).device
        idx = self._indices_for_this_process()
        prompts = [self.prompts[i] for i in idx]
        eos_ids = self._eos_ids()
        pad_id = self._pad_id(eos_ids)
        use_kv_cache = self.use_kv_cache and kv_cache_sampling_supported(policy)
        keep_full = full_log_probs and use_kv_cache and len(prompts) <= self.batch_size
        parts: dict[str, list] = {"p_ids": [], "p_mask": [], "c_ids": [], "c_mask": [], "logps": []}
        log_probs = None
        devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + int(step) * 1009 + self.trainer.accelerator.process_index)
            for start in range(0, len(prompts), self.batch_size):
                ids, mask = self._encoded_chunk(idx, start, device)
                comp, logp, *full = sample_policy(
                    policy, ids, mask, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                    pad_token_id=pad_id, eos_token_ids=eos_ids, drop_finished=True, use_kv_cache=use_kv_cache,
                    **({"full_log_probs": True} if keep_full else {}),
                )
                log_probs = full[0] if full else None  # one chunk only (keep_full)
                cmask = completion_mask(comp, eos_ids)
                for key, value in zip(parts, (ids, mask, comp, cmask, logp * cmask)):
                    parts[key].append(value)
        batch = self._batch(prompts, idx, parts, pad_id, with_logps=use_kv_cache)
        batch.log_probs = log_probs
        return batch

    def _batch(self, prompts: list[Any], idx: list[int], parts: dict[str, list], pad_id: int,
               with_logps: bool) -> HeldOutBatch:
        """The sampled chunks as one batch: the completions as text (chat messages for chat prompts) and ids."""
        c_lists = [row[m.bool()].tolist() for comp, cmask in zip(parts["c_ids"], parts["c_mask"])
                   for row, m in zip(comp, cmask)]
        texts = self.tokenizer.batch_decode(c_lists, skip_special_tokens=True)
        conversational = bool(prompts) and _is_conversational(prompts[0])
        completions: list[Any] = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        return HeldOutBatch(
            prompts=prompts,
            completions=completions,
            prompt_ids=_pad_cat(parts["p_ids"], pad_id, left=True),
            prompt_mask=_pad_cat(parts["p_mask"], 0, left=True),
            completion_ids=_pad_cat(parts["c_ids"], pad_id, left=False),
            completion_mask=_pad_cat(parts["c_mask"], 0, left=False),
            completion_ids_list=c_lists,
            columns={k: [v[i] for i in idx] for k, v in self.columns.items()},
            # with ``generate`` a forward pass computes log π (the measurement does not trust generate's scores)
            logps=_pad_cat(parts["logps"], 0, left=False) if with_logps and parts["logps"] else None,
        )

    def score(self, funcs: Sequence[Callable[..., Any]], batch: HeldOutBatch, state: Any = None) -> list[list[float]]:
        """Scores the batch with TRL-signature reward functions; returns one list of floats (NaN for None) per func."""
        from ..validation import check_rewards

        results = []
        for func in funcs:
            name = reward_func_name(func)
            if isinstance(func, nn.Module):
                raise TypeError(
                    f"Reward model '{name}' passed as a module: wrap it with hf_rlhf_ext.rewards.RewardModelFunction "
                    "so that it re-tokenises the text with its own tokenizer."
                )
            if len(batch) == 0:
                results.append([])
                continue
            values = func(
                prompts=batch.prompts,
                completions=batch.completions,
                completion_ids=batch.completion_ids_list,
                trainer_state=state,
                **batch.columns,
            )
            values = check_rewards(values, len(batch), name)
            results.append([float("nan") if v is None else float(v) for v in values])
        return results

    def gather(self, values: list[float]) -> list[float]:
        """Per-sample values from every process, in process order (each process sampled its own share)."""
        acc = self.trainer.accelerator
        if acc.num_processes == 1:
            return list(values)
        from accelerate.utils import gather_object

        return list(gather_object(list(values)))


def generation_batch_size(trainer: Any) -> int | None:
    """Completions the trainer generates per generation batch, over all processes (GRPO/RLOO
    ``args.generation_batch_size``), or None when it does not say."""
    value = getattr(getattr(trainer, "args", None), "generation_batch_size", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _pad_cat(tensors: list[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, 0, dtype=torch.long)
    width = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
        padded.append(torch.cat([pad, t], 1) if left else torch.cat([t, pad], 1))
    return torch.cat(padded, 0)
