"""Measure how noisy the policy-gradient estimate is: the variance of the gradient across disjoint slices of one
generation batch.

Why: a baseline in REINFORCE leaves the expected gradient unchanged and is only worth having if it lowers the
variance of the estimate. This module measures that variance on the trainer's *own* loss, so the claim is checked,
not assumed.

How: split the current generation batch into K disjoint slices, compute the gradient g_k of the trainer's loss on
each slice (each a per-slice mean, so every g_k estimates the same full-batch gradient), flatten over the trainable
parameters, and report

    grad_var/total             = 1/(K−1) Σ_k ‖g_k − ḡ‖²     unbiased estimate of tr Cov(g_slice)
    grad_var/mean_grad_sq_norm = ‖ḡ‖²                        squared norm of the mean gradient
    grad_var/snr               = ‖ḡ‖² / grad_var/total       signal-to-noise ratio (higher = cleaner steps)
    grad_var/signal_sq_norm    = ‖ḡ‖² − grad_var/total / K   unbiased estimate of ‖E g‖² (may be < 0 when noisy)

‖ḡ‖² contains the noise of ḡ itself (E‖ḡ‖² = ‖E g‖² + tr Cov / K), so an snr near 1/K means "noise only";
``signal_sq_norm`` removes that term.

The sums are streamed (one running sum vector, float64 norms), so memory is one extra gradient, whatever K.
Measurement happens just before the optimizer step (``on_pre_optimizer_step``), so it sees the parameters that
generated the batch. It is invisible to training: the model runs in eval mode (no dropout; the variance measured
is that of sampling and advantages), gradients are taken with ``torch.autograd.grad`` into fresh tensors (no
``.grad`` of the policy, or of a PPO critic, is written, so the step's accumulated gradients stay as they were), the
RNG state is forked, and the trainer's metric buffers are restored before the four ``grad_var/*`` values are added.
Between measuring steps the callback does nothing.

Works with ``trl.GRPOTrainer`` and ``trl.RLOOTrainer`` and their subclasses (our REINFORCE and PPO trainers), on a
single process or per process under DDP (each rank measures its own shard; rank 0's numbers are logged).
DeepSpeed and FSDP shard gradients, and reentrant gradient checkpointing does not support ``autograd.grad``: all
three are refused with a clear error. Text batches only: vision batches (pixel tensors not laid out per completion
along dim 0) are not sliced correctly.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from ..persisted_state import PersistedState
from ._trainer_access import add_metrics
from ._trainer_access import check_supported_trainer as _check

METRIC_TOTAL = "grad_var/total"
METRIC_MEAN_SQ = "grad_var/mean_grad_sq_norm"
METRIC_SNR = "grad_var/snr"
METRIC_SIGNAL = "grad_var/signal_sq_norm"


@dataclass
class GradVarianceMeasurement:
    """One measurement: ``total`` = tr Cov of a slice gradient (unbiased, K−1), ``mean_grad_sq_norm`` = ‖ḡ‖²."""

    step: int
    num_estimates: int
    samples_per_estimate: int
    total: float
    mean_grad_sq_norm: float
    snr: float
    signal_sq_norm: float
    num_params: int
    estimate_sq_norms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_supported_trainer(trainer: Any) -> None:
    """Raises a clear error for trainers whose generation buffer and loss this module does not know, and for
    sharded-gradient setups where per-slice gradients are not available on one process."""
    _check(trainer, "GradientVarianceCallback", needs=("_buffered_inputs", "_metrics", "compute_loss"))
    ckpt_kwargs = getattr(trainer.args, "gradient_checkpointing_kwargs", None) or {}
    if getattr(trainer.args, "gradient_checkpointing", False) and ckpt_kwargs.get("use_reentrant", False):
        raise NotImplementedError(
            "GradientVarianceCallback takes per-slice gradients with torch.autograd.grad, which reentrant gradient "
            "checkpointing does not support; set gradient_checkpointing_kwargs={'use_reentrant': False} (TRL's "
            "default)."
        )
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise NotImplementedError(
            "GradientVarianceCallback cannot measure per-slice gradients under DeepSpeed or FSDP (gradients are "
            "sharded); run the measurement on a single process or with DDP."
        )


def _batch_size(batch: dict[str, Any]) -> int:
    for key in ("completion_ids", "prompt_ids"):
        if isinstance(batch.get(key), torch.Tensor):
            return batch[key].size(0)
    raise KeyError("The generation batch has no 'completion_ids' tensor; is this a GRPO-family trainer?")


def _is_per_sample(value: Any, size: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() > 0 and value.size(0) == size
    return isinstance(value, list) and len(value) == size


def concat_generation_batch(chunks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Joins the trainer's buffered micro-batches back into one generation batch (per-sample entries concatenated,
    batch-level entries such as ``num_items_in_batch`` taken from the first chunk)."""
    if not chunks:
        raise ValueError("No buffered generation batch yet: measure after the trainer has generated one.")
    sizes = [_batch_size(c) for c in chunks]
    out: dict[str, Any] = {}
    for key, value in chunks[0].items():
        if all(_is_per_sample(c.get(key), n) for c, n in zip(chunks, sizes)):
            if isinstance(value, torch.Tensor):
                out[key] = torch.cat([c[key] for c in chunks], dim=0)
            else:
                out[key] = [v for c in chunks for v in c[key]]
        else:
            out[key] = value
    return out


def select_samples(batch: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """The sub-batch of the samples in ``index`` (per-sample entries indexed, batch-level entries kept)."""
    size = _batch_size(batch)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and _is_per_sample(value, size):
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list) and len(value) == size:
            out[key] = [value[i] for i in index.tolist()]
        else:
            out[key] = value
    return out


def _slice_normaliser(trainer: Any, part: dict[str, Any]) -> dict[str, Any]:
    """Make losses normalised by the batch's token count (GRPO 'dapo', 'cispo', 'vespo') a mean over this slice."""
    num_items, mask = part.get("num_items_in_batch"), part.get("completion_mask")
    if isinstance(num_items, torch.Tensor) and isinstance(mask, torch.Tensor):
        tokens = part["completion_mask"].sum().to(part["num_items_in_batch"].dtype)
        # in eval mode GRPO divides by num_items_in_batch / num_processes
        part = dict(part, num_items_in_batch=tokens * trainer.accelerator.num_processes)
    return part


def measure_gradient_variance(
    trainer: Any,
    batch: dict[str, Any] | None = None,
    num_estimates: int = 4,
    step: int | None = None,
) -> GradVarianceMeasurement:
    """Variance of the trainer's policy-gradient estimate across ``num_estimates`` disjoint slices of ``batch``.

    ``batch`` defaults to the trainer's current generation batch (its buffered micro-batches, joined). Passing a
    batch with different ``advantages`` (same samples) isolates what the advantages do to the variance. Leaves the
    parameters, their ``.grad``, the RNG state and the trainer's metric buffers as they were.
    """
    check_supported_trainer(trainer)
    if num_estimates < 2:
        raise ValueError(f"num_estimates must be at least 2 to measure a variance, got {num_estimates}.")
    if batch is None:
        buffered = trainer._buffered_inputs  # named in _trl_compat (GRPOTrainer's generation buffer)
        if not buffered:
            raise ValueError(
                "The trainer has no buffered generation batch yet; pass `batch` or measure during training."
            )
        batch = concat_generation_batch(buffered)
    size = _batch_size(batch)
    if size < num_estimates:
        raise ValueError(
            f"Cannot split a generation batch of {size} completions into {num_estimates} disjoint slices; lower "
            "num_estimates or raise the batch size."
        )
    slices = torch.arange(size).tensor_split(num_estimates)

    model = trainer.model  # the unwrapped module: no DDP gradient sync during measurement
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters to measure a gradient on.")
    saved_metrics = copy.deepcopy(trainer._metrics)
    was_training = model.training
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    sum_grad = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    sq_norms: list[float] = []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda))
            for name in ("model_wrapped", "value_model_wrapped"):  # DDP modules: no gradient all-reduce bookkeeping
                wrapped = getattr(trainer, name, None)
                if wrapped is not None and hasattr(wrapped, "no_sync"):
                    stack.enter_context(wrapped.no_sync())
            model.eval()
            for index in slices:
                part = _slice_normaliser(trainer, select_samples(batch, index))
                with trainer.compute_loss_context_manager():
                    loss = trainer.compute_loss(model, part)
                # autograd.grad returns fresh tensors and writes no `.grad` anywhere (policy, critic, ...): the
                # gradients the trainer has accumulated for this step are never touched.
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                sq = 0.0
                for g, acc in zip(grads, sum_grad):
                    if g is not None:
                        g = g.detach().float()
                        acc.add_(g)
                        sq += g.double().pow(2).sum().item()
                sq_norms.append(sq)
    finally:
        model.train(was_training)
        trainer._metrics = saved_metrics  # the measurement's own loss metrics must not reach the logs

    k = len(slices)
    mean_sq = sum(acc.double().pow(2).sum().item() for acc in sum_grad) / k**2
    # Σ‖g_k − ḡ‖² = Σ‖g_k‖² − K‖ḡ‖²; clamp the float residue at 0
    total = max(sum(sq_norms) - k * mean_sq, 0.0) / (k - 1)
    snr = mean_sq / total if total > 0 else float("inf")
    return GradVarianceMeasurement(
        step=int(step if step is not None else trainer.state.global_step),
        num_estimates=k,
        samples_per_estimate=size // k,
        total=total,
        mean_grad_sq_norm=mean_sq,
        snr=snr,
        signal_sq_norm=mean_sq - total / k,
        num_params=sum(p.numel() for p in params),
        estimate_sq_norms=sq_norms,
    )


class GradientVarianceCallback(TrainerCallback, PersistedState):
    """Every ``every_n_steps`` optimizer steps (counting from step 0, the initial policy), measures the variance of
    the policy-gradient estimate on the current generation batch and logs ``grad_var/total``,
    ``grad_var/mean_grad_sq_norm`` and ``grad_var/snr`` with that step's metrics. Measurements are kept in
    ``self.measurements`` (a list of :class:`GradVarianceMeasurement`).

    Usage: ``trainer.add_callback(GradientVarianceCallback(trainer, every_n_steps=10, num_estimates=4))``.
    """

    def __init__(self, trainer: Any, every_n_steps: int = 10, num_estimates: int = 4) -> None:
        check_supported_trainer(trainer)
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if num_estimates < 2:
            raise ValueError(f"num_estimates must be at least 2 to measure a variance, got {num_estimates}.")
        generation_batch = getattr(trainer.args, "generation_batch_size", None)
        num_processes = trainer.accelerator.num_processes
        if generation_batch is not None and generation_batch // num_processes < num_estimates:
            raise ValueError(
                f"Each process holds {generation_batch // num_processes} completions per generation batch, fewer than "
                f"num_estimates={num_estimates}; lower num_estimates or raise the batch size."
            )
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self.num_estimates = num_estimates
        self.measurements: list[GradVarianceMeasurement] = []

    def state_dict(self) -> dict[str, Any]:
        """Kept across a resume (in the checkpoint's trainer_state.json)."""
        return {"measurements": [asdict(m) for m in self.measurements]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.measurements = [GradVarianceMeasurement(**m) for m in state["measurements"]]

    def on_train_begin(self, args, state, control, **kwargs):
        self.restore(args, state, self.trainer.callback_handler.callbacks)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps != 0:
            return  # nothing at all between measuring steps
        m = measure_gradient_variance(self.trainer, num_estimates=self.num_estimates, step=state.global_step)
        self.measurements.append(m)
        # queued in the trainer's metric buffer: averaged into this step's log record by the trainer's own `log`
        add_metrics(
            self.trainer,
            {
                METRIC_TOTAL: m.total,
                METRIC_MEAN_SQ: m.mean_grad_sq_norm,
                METRIC_SNR: m.snr,
                METRIC_SIGNAL: m.signal_sq_norm,
            },
        )

    def summary(self) -> dict[str, float]:
        """Means over all measurements (for ``metrics.json``); empty when nothing was measured."""
        if not self.measurements:
            return {}
        n = len(self.measurements)
        finite_snr = [m.snr for m in self.measurements if m.snr != float("inf")]
        return {
            METRIC_TOTAL: sum(m.total for m in self.measurements) / n,
            METRIC_MEAN_SQ: sum(m.mean_grad_sq_norm for m in self.measurements) / n,
            METRIC_SNR: sum(finite_snr) / len(finite_snr) if finite_snr else float("inf"),
            METRIC_SIGNAL: sum(m.signal_sq_norm for m in self.measurements) / n,
            "grad_var/num_measurements": n,
        }


__all__ = [
    "GradVarianceMeasurement",
    "GradientVarianceCallback",
    "concat_generation_batch",
    "measure_gradient_variance",
    "select_samples",
]
