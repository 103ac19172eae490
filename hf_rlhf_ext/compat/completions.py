"""The old trainer's completion tables: ``generate_completions`` on the eval set, and the ``num_sample_generations``
schedule that calls it during training.

As trl ≤ 1.12: the policy answers each eval prompt near-greedily (sampling at temperature 0.01), up to
``response_length`` tokens, ending at the EOS (or where the old default ``stop_token=None`` ended, ``compat.stop``);
the reward model scores prompt ids + completion ids; the first five rows
are printed (a rich table, or plain text without rich) and the whole table goes to wandb / trackio / comet when they
are in ``report_to``. It is also written to ``<output_dir>/completions/eval_completions_<step>.parquet``, beside
the training completions GRPO writes there.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import torch
from transformers import TrainerCallback

from ..sampling import cut_at_first_eos, sample_with_kv_cache

__all__ = ["EVAL_TEMPERATURE", "completions_table", "show_table", "SampleGenerationsCallback"]

EVAL_TEMPERATURE = 0.01 + 1e-7  # the old generate_completions sampled at this temperature
ROWS_PRINTED = 5


def _left_pad(rows: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def completions_table(trainer: Any, sampling: bool = False) -> dict[str, list]:
    """Columns ``query``, ``model response``, ``score`` for the eval set (only its first batch when ``sampling``),
    gathered from every process."""
    from accelerate.utils import gather_object

    args, tok = trainer.args, trainer.processing_class
    rows = trainer.compat_eval_prompt_ids
    size = args.per_device_eval_batch_size
    policy = trainer.accelerator.unwrap_model(trainer.model)
    stop = trainer.compat_stop  # the old default's tail after the EOS, when it kept one (compat.stop)
    eos_ids = list(stop.stop_ids) if stop is not None else list(trainer.eos_token_ids)
    fill_id = stop.fill_id if stop is not None else tok.pad_token_id
    table: dict[str, list] = defaultdict(list)
    shard = rows[trainer.accelerator.process_index :: trainer.accelerator.num_processes]
    for start in range(0, len(shard) - size + 1, size):  # whole batches only (the old DataLoader dropped the rest)
        prompts = shard[start : start + size]
        ids, mask = _left_pad(prompts, tok.pad_token_id, trainer.accelerator.device)
        tokens, _ = sample_with_kv_cache(
            policy, ids, mask, max_new_tokens=args.max_completion_length, temperature=EVAL_TEMPERATURE,
            pad_token_id=fill_id, eos_token_ids=eos_ids or None,
        )
        responses = tokens.tolist() if stop is not None else cut_at_first_eos(tokens, eos_ids)
        scores = trainer.compat_reward_model.score(prompts, responses)
        table["query"].extend(gather_object(tok.batch_decode(prompts, skip_special_tokens=True)))
        table["model response"].extend(gather_object(tok.batch_decode(responses)))
        table["score"].extend(gather_object([float(s) for s in scores]))
        if sampling:
            break
    return dict(table)


def show_table(trainer: Any, table: dict[str, list]):
    """Prints the first rows, writes the parquet file and logs the table to the trackers in ``report_to``; returns
    the ``pandas.DataFrame``. Main process only."""
    import pandas as pd

    df = pd.DataFrame(table, columns=["query", "model response", "score"])
    if not trainer.accelerator.is_main_process:
        return df
    _print_rows(df.head(ROWS_PRINTED))
    out_dir = os.path.join(trainer.args.output_dir, "completions")
    os.makedirs(out_dir, exist_ok=True)
    df.to_parquet(os.path.join(out_dir, f"eval_completions_{trainer.state.global_step:05d}.parquet"))
    _log_to_trackers(trainer.args.report_to or [], df)
    return df


def _print_rows(df) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(df.to_string(index=False), flush=True)
        return
    table = Table(show_lines=True)
    for column in df.columns:
        table.add_column(column)
    for row in df.itertuples(index=False):
        table.add_row(*(str(v) for v in row))
    Console().print(table)


def _log_to_trackers(report_to: list[str], df) -> None:
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.log({"completions": wandb.Table(dataframe=df)})
    if "trackio" in report_to:
        import trackio

        trackio.log({"completions": trackio.Table(dataframe=df)})
    if "comet_ml" in report_to:
        from trl.trainer.utils import log_table_to_comet_experiment

        log_table_to_comet_experiment(name="completions.csv", table=df)


class SampleGenerationsCallback(TrainerCallback):
    """``num_sample_generations``: after update u (one rollout and its optimizer steps), ``generate_completions(
    sampling=True)`` when (u − 1) is a multiple of ⌈updates / num_sample_generations⌉ — the old schedule."""

    def __init__(self, trainer: Any, every_updates: int, steps_per_update: int):
        self.trainer = trainer
        self.every_updates = every_updates
        self.steps_per_update = steps_per_update

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.steps_per_update == 0:
            update = state.global_step // self.steps_per_update
            if (update - 1) % self.every_updates == 0:
                self.trainer.generate_completions(sampling=True)
        return control
