"""KL(π ‖ π_ref) on held-out prompts, measured every k steps — also when β = 0, where TRL logs no KL at all.

Why our own KL: TRL's ``kl`` is a per-token k3 mean on the training batch, logged only when β > 0, and it spikes to
1e2–1e5 once a policy collapses. The headline number of over-optimisation studies (Gao et al. 2022, arXiv 2210.10760)
is the *sequence-level* KL on fresh samples: Σ_t over the completion of the per-token estimator, averaged over
completions sampled from π. We log both estimators (Schulman, "Approximating KL divergence"):

    k1 = log π − log π_ref              unbiased, high variance, can be negative per sample
    k3 = eˣ − 1 − x,  x = log π_ref − log π   unbiased, ≥ 0, lower variance

    exact = Σ_v π(v|s_t)(log π(v|s_t) − log π_ref(v|s_t))   the KL of each sampled position, over the whole vocabulary

Logged keys (averaged into the trainer's next log record): ``kl_ref/k1_seq``, ``kl_ref/k3_seq``,
``kl_ref/exact_seq`` (means over completions of the per-token terms summed), ``kl_ref/k1_seq_std``,
``kl_ref/k1_token`` (per-token mean) and ``kl_ref/completion_length``. ``exact_seq`` is the reference the two
estimators are read against: the same sampled prefixes, no single-token sampling noise.

The reference (:class:`hf_rlhf_ext.reference.ReferencePolicy`): the LoRA adapter disabled when the policy is a PEFT
model (no copy), the trainer's ``ref_model`` when TRL made one (β > 0), else a frozen copy of the initial policy made
at train begin — only with ``allow_reference_copy=True`` (it doubles the policy's memory), a clear error otherwise.

Cost: nothing between measuring steps (one modulo); at a measuring step one generation of ``num_samples``
completions (the KV-cache sampler of :mod:`hf_rlhf_ext.sampling`, which keeps the whole-vocabulary log π it sampled
from when this process samples at most one micro-batch, ``batch_size`` completions — the default) and one forward
pass of the reference in micro-batches; with more completions, or ``generate``, one forward pass of the policy too.
The exact KL is computed on all the completions k1 and k3 are, no subset.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback

from ..objectives import kl_k1, kl_k3, masked_mean
from ..persisted_state import PersistedState
from ..reference import ReferencePolicy
from ..sampling import completion_log_softmax
from ._trainer_access import HeldOutSampler, add_metrics, check_supported_trainer

__all__ = ["KLToReferenceCallback", "measure_sequence_kl"]


@torch.no_grad()
def measure_sequence_kl(
    sampler: HeldOutSampler, reference: ReferencePolicy, step: int, batch=None, policy=None
) -> dict[str, float]:
    """Samples (or reuses ``batch``) and returns sequence-level k1/k3 statistics over all processes."""

    def _run(policy_model):
        b = batch if batch is not None else sampler.sample(policy_model, step, full_log_probs=True)
        if len(b) == 0:
            return [], [], [], [], []
        logp_sampled, ref_logp, exact = _logps_and_exact_kl(policy_model, reference, b, sampler)
        logp = b.logps.to(ref_logp.device) if b.logps is not None else logp_sampled  # the sampler's, when it has them
        mask = b.completion_mask.to(ref_logp.device, ref_logp.dtype)
        k1 = (kl_k1(logp, ref_logp) * mask).sum(-1)
        k3 = (kl_k3(logp, ref_logp) * mask).sum(-1)
        k1_tok = masked_mean(kl_k1(logp, ref_logp), mask, dim=1)
        return k1.tolist(), k3.tolist(), (exact * mask).sum(-1).tolist(), k1_tok.tolist(), mask.sum(-1).tolist()

    if policy is not None:
        columns = _run(policy)
    else:
        with sampler.policy_for_generation() as unwrapped:
            columns = _run(unwrapped)
    k1, k3, exact, k1_tok, lengths = (sampler.gather(c) for c in columns)
    n = len(k1)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    k1_mean = mean(k1)
    k1_std = math.sqrt(sum((x - k1_mean) ** 2 for x in k1) / (n - 1)) if n > 1 else 0.0
    return {
        "kl_ref/k1_seq": k1_mean,
        "kl_ref/k3_seq": mean(k3),
        "kl_ref/exact_seq": mean(exact),
        "kl_ref/k1_seq_std": k1_std,
        "kl_ref/k1_token": mean(k1_tok),
        "kl_ref/completion_length": mean(lengths),
    }


def _logps_and_exact_kl(policy_model, reference: ReferencePolicy, b, sampler: HeldOutSampler):
    """Per completion token (N, C): log π and log π_ref of the sampled token, and the exact KL of that position,
    Σ_v π(v|s_t)(log π(v|s_t) − log π_ref(v|s_t)), over the whole vocabulary. log π(·|s_t) is the sampler's own
    (``b.log_probs``, the logits sampled from) when it kept it, else a forward pass of the policy; log π_ref is one
    forward pass of the reference, in micro-batches. Summed over a completion, the exact terms estimate the sequence
    KL without the variance of the sampled token (k1, k3 are single-sample estimates of each term); the prefixes s_t
    are still sampled."""
    logps, ref_logps, exact = [], [], []
    for start in range(0, len(b), sampler.batch_size):
        sl = slice(start, start + sampler.batch_size)
        inputs = (b.prompt_ids[sl], b.prompt_mask[sl], b.completion_ids[sl])
        if b.log_probs is not None:
            logp = b.log_probs[sl]
        else:
            logp = completion_log_softmax(policy_model, *inputs, sampler.temperature)
        with reference.model(policy_model) as ref_model:
            logq = completion_log_softmax(ref_model, *inputs, sampler.temperature).to(logp.device)
        ids = b.completion_ids[sl].to(logp.device).unsqueeze(-1)
        logps.append(logp.gather(2, ids).squeeze(-1))
        ref_logps.append(logq.gather(2, ids).squeeze(-1))
        exact.append(_exact_kl_terms(logp, logq))
    return torch.cat(logps), torch.cat(ref_logps), torch.cat(exact)


def _exact_kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ_v exp(log p)(log p − log q) over the last axis; ``logq`` (no longer needed) is overwritten in place, so
    exp(log p) is the only (N, C, V) temporary."""
    return logq.neg_().add_(logp).mul_(logp.exp()).sum(-1)


def check_reference_on_resume(reference: ReferencePolicy, state: Any, who: str) -> None:
    """A frozen copy is taken at train begin: on resume that would be the resumed policy, not the initial one."""
    if state.global_step > 0 and reference.kind == "frozen_copy":
        raise ValueError(
            f"{who}: resuming at step {state.global_step} with a frozen copy of the policy as π_ref would measure the "
            "KL "
            "to the resumed policy, not to the initial one. Resume with a reference that survives checkpoints: a PEFT "
            "policy (adapter disabled) or beta > 0 (TRL's reference model)."
        )


class KLToReferenceCallback(TrainerCallback, PersistedState):
    """Logs sequence-level KL(π ‖ π_ref) on held-out prompts every ``every_n_steps`` optimizer steps.

    Args:
        trainer: a ``trl.GRPOTrainer`` / ``trl.RLOOTrainer`` (or subclass).
        eval_prompts: held-out prompts (list of strings or chat messages, or a Dataset with a "prompt" column).
        every_n_steps: measure when ``global_step % every_n_steps == 0``.
        num_samples: completions per measurement (one per prompt, cycling over the prompt set; rounded up to a
            multiple of the number of processes, each sampling its share). Default: one training generation batch
            (``args.generation_batch_size``), so that a measurement costs about one batch's generation.
        allow_reference_copy: allow a frozen copy of the initial policy as π_ref when there is no cheaper one.
        measure_at_start: also measure at train begin (step 0; ≈ 0 by construction, a sanity check).
        batch_size, max_new_tokens, temperature, seed: sampling settings (defaults: the trainer's per-process
            generation batch, completion length and temperature).

    ``history`` holds every measurement as ``{"step": ..., "kl_ref/k1_seq": ..., ...}``.
    """

    def __init__(
        self,
        trainer: Any,
        eval_prompts: Any,
        every_n_steps: int = 10,
        num_samples: int | None = None,
        allow_reference_copy: bool = False,
        measure_at_start: bool = True,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int = 1234,
    ) -> None:
        check_supported_trainer(trainer, type(self).__name__, needs=("accelerator", "processing_class", "_metrics"))
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        self.trainer = trainer
        self.every_n_steps = int(every_n_steps)
        self.measure_at_start = measure_at_start
        self.sampler = HeldOutSampler(
            trainer, eval_prompts, num_samples=num_samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
            temperature=temperature, seed=seed,
        )
        self.reference = ReferencePolicy(trainer, allow_copy=allow_reference_copy, who=type(self).__name__)
        self.history: list[dict[str, float]] = []
        self._last_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        """Kept across a resume (in the checkpoint's trainer_state.json)."""
        return {"history": self.history, "last_step": self._last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self._last_step = list(state["history"]), state["last_step"]

    def measure(self, step: int) -> dict[str, float]:
        """Measures now, records the result in ``history`` and returns it."""
        stats = measure_sequence_kl(self.sampler, self.reference, step)
        self.history.append({"step": int(step), **stats})
        self._last_step = int(step)
        return stats

    def on_train_begin(self, args, state, control, **kwargs):
        self.restore(args, state, self.trainer.callback_handler.callbacks)
        check_reference_on_resume(self.reference, state, type(self).__name__)
        self.reference.snapshot()
        if self.measure_at_start and state.global_step == 0 and self._last_step != 0:
            self.measure(state.global_step)  # recorded in history; step 0 has no log record of its own

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.every_n_steps != 0 or step == self._last_step:
            return
        add_metrics(self.trainer, self.measure(step))
