"""The lab build's progress: what it is doing and about how long it will take, as one ``tqdm`` bar counted in
estimated seconds (SFT and reward-model training advance it step by step through a ``TrainerCallback``)."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from transformers import TrainerCallback

from .config import LabConfig

#: Seconds each step of the default build took on one free CPU core (its ``build_times``); a busy machine takes up
#: to about three times as long. Other configs scale with the amount of data each step handles.
STEP_SECONDS = {"setup": 0.1, "sft": 48.0, "sft_eval": 0.5, "pairs": 3.0, "rm": 3.5, "rm_eval": 1.2}
STEP_TITLES = {
    "setup": "tokenizer and prompts",
    "sft": "SFT of the policy",
    "sft_eval": "evaluating the policy",
    "pairs": "sampling preference pairs",
    "rm": "training the proxy reward model",
    "rm_eval": "evaluating the reward model",
}


def step_estimates(config: LabConfig) -> dict[str, float]:
    """Expected seconds per build step for ``config`` (the default config's measured times, scaled)."""
    default = LabConfig()
    scale = {
        "sft": (config.n_sft * config.sft_epochs) / (default.n_sft * default.sft_epochs),
        "sft_eval": config.n_eval_samples / default.n_eval_samples,
        "pairs": (config.n_pairs_train + config.n_pairs_test) / (default.n_pairs_train + default.n_pairs_test),
        "rm": (config.n_pairs_train * config.rm_epochs) / (default.n_pairs_train * default.rm_epochs),
        "rm_eval": (config.n_pairs_train + config.n_pairs_test) / (default.n_pairs_train + default.n_pairs_test),
    }
    return {name: seconds * scale.get(name, 1.0) for name, seconds in STEP_SECONDS.items()}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class BuildProgress:
    """Announces the build (where, which steps, how long) and shows one bar over its steps."""

    def __init__(self, config: LabConfig, root: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self.estimates = step_estimates(config)
        total = sum(self.estimates.values())
        self.done = 0.0
        print(
            f"Building the lab in {root}: a tiny GPT-2 SFT policy, preference pairs from its samples and a proxy "
            f"reward model. About {_duration(total)} on a free CPU core, up to {_duration(3 * total)} on a busy one; "
            "once "
            f"per machine (`hf-rlhf-ext lab build` reuses it).",
            file=sys.stderr,
            flush=True,
        )
        self.bar = tqdm(
            total=round(total, 1), unit="s", desc="lab", disable=not enabled,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| est. {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]",
        )

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """One build step: its title on the bar while it runs, its whole estimate counted when it ends."""
        self.bar.set_description_str(f"lab: {STEP_TITLES[name]}")
        yield
        self.done += self.estimates[name]
        self.bar.n = round(min(self.done, self.bar.total), 1)
        self.bar.refresh()

    def training_callback(self, name: str) -> TrainerCallback:
        """Advances the bar during a training step ``name`` (``sft`` or ``rm``) in proportion to the steps done."""
        return _StepCallback(self, self.estimates[name])

    def close(self) -> None:
        self.bar.set_description_str("lab: done")
        self.bar.close()


class _StepCallback(TrainerCallback):
    def __init__(self, progress: BuildProgress, seconds: float):
        self.progress, self.seconds = progress, seconds

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps:
            within = self.seconds * state.global_step / state.max_steps
            self.progress.bar.n = round(min(self.progress.done + within, self.progress.bar.total), 1)
            self.progress.bar.refresh()
