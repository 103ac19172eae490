"""The lab's ready-made reward functions, importable by dotted path for ``trl grpo --reward_funcs ...``.

``lab_gold_reward`` is the lab's programmatic gold reward; ``lab_proxy_reward`` is the lab's proxy reward model (loaded
once, on the first call): ``--reward_funcs hf_rlhf_ext.lab.rewards.lab_proxy_reward
hf_rlhf_ext.lab.rewards.lab_gold_reward``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Sequence

from ..validation import check_rewards

if TYPE_CHECKING:
    from ..rewards import RewardModelFunction

__all__ = ["lab_gold_reward", "lab_proxy_reward", "lab_reward_model_path"]


def lab_gold_reward(
    prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None, **kwargs
) -> list[float]:
    """The lab's gold reward (``hf_rlhf_ext.lab.gold_reward``), logged as ``rewards/lab_gold_reward/mean``.

    Uses the completion ids (which TRL passes) to tell a terminated reply from one cut off by the length limit.
    """
    from .task import gold_reward

    values = gold_reward(prompts, completions, completion_ids=completion_ids)
    return check_rewards(values, len(completions), "lab_gold_reward")


_lab_proxy: RewardModelFunction | None = None
_lab_proxy_lock = threading.Lock()


def lab_reward_model_path() -> str:
    """The proxy RM directory of the lab: ``$HF_RLHF_EXT_LAB_DIR`` if set, else the default lab (put in place on first
    use, then read from ``$HF_RLHF_EXT_HOME/lab/<config hash>``)."""
    from .build import open_lab

    return open_lab().reward_model_path


def lab_proxy_reward(
    prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None, **kwargs
) -> list[float]:
    """The lab's proxy reward model, loaded on the first call (from ``$HF_RLHF_EXT_LAB_DIR`` or the default lab
    cache), logged as ``rewards/lab_proxy_reward/mean``. The EOS token is shown to the RM only where the policy
    emitted it — the format the RM was trained on."""
    global _lab_proxy
    if _lab_proxy is None:
        with _lab_proxy_lock:
            if _lab_proxy is None:
                from ..rewards import RewardModelFunction

                _lab_proxy = RewardModelFunction(lab_reward_model_path(), name="lab_proxy_reward")
    return _lab_proxy(prompts, completions, completion_ids=completion_ids, **kwargs)
