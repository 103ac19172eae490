"""Model cards for the output folders of the recipes and experiments, and the push of such a folder to the Hub.

A card is a ``huggingface_hub.ModelCard``: YAML metadata the Hub indexes (``base_model`` only when the base is a Hub
id, ``library_name``, ``tags``, ``datasets``) and a Markdown body that says how the folder was made (recipe and
command), with which settings, what it measured, the plots saved beside it and how to load it. The card is written
last, after ``save_model`` (PEFT writes its own template there) and after the plots, and is pushed as it is:
``push_folder`` uploads the folder with ``HfApi.upload_folder`` instead of ``Trainer.push_to_hub``, whose
``create_model_card`` would overwrite it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from huggingface_hub import ModelCard, ModelCardData

__all__ = [
    "CARD_FILE", "LIBRARY_TAG", "RecipeCard", "RunCard", "flag_value", "hub_id_or_none", "load_snippet",
    "lora_settings", "markdown_table", "push_experiment", "push_folder", "settings_from", "write_experiment_card",
    "write_model_card",
]

CARD_FILE = "README.md"
LIBRARY_TAG = "hf-rlhf-ext"
# what Trainer.push_to_hub leaves out: private files and intermediate checkpoints
PUSH_IGNORE_PATTERNS = ["_*", "checkpoint-*"]


def hub_id_or_none(name_or_path: str | None) -> str | None:
    """``name_or_path`` when it names a Hub repository, None for a local folder (the lab, a path): the Hub links a
    ``base_model`` to its page, and a local path there would only leak a directory name."""
    if not name_or_path or os.path.exists(name_or_path) or os.path.isabs(name_or_path):
        return None
    return name_or_path


@dataclass
class RunCard:
    """What a card says about one output folder.

    Args:
        title: the card's heading (the folder or Hub repository name).
        summary: one paragraph: what was trained or measured, on what.
        recipe: the script that made the folder (``recipes/ppo.py``).
        command: the command line that reproduces it.
        settings: where the run's settings came from (the recipe parser's ``settings:`` line), shown under it.
        tags: method tags (``ppo``, ``grpo``, ``reinforce``, ``reward-model``, ...); ``trl``, ``rlhf`` and
            ``hf-rlhf-ext`` are always added.
        base_model: the base model's Hub id (None: a local model, e.g. the lab's).
        datasets: Hub data sets used (local ones are left out).
        library_name: ``transformers``, or ``peft`` for a LoRA adapter.
        hyperparameters: the settings that matter for this method, in order.
        metrics: rows of the results table: (metric, before, after) or (metric, value).
        metrics_note: one line under the table (what the numbers are measured on).
        results_markdown: an experiment's own results (its Markdown table), shown under Results as it is.
        plots: PNG files in the folder (names relative to it), embedded with a caption each.
        usage: Markdown saying how to load the model (``load_snippet``), or how to read the results.
        sections: more (heading, Markdown) sections at the end.
    """

    title: str
    summary: str
    recipe: str
    command: str
    settings: str = ""
    tags: Sequence[str] = ()
    base_model: str | None = None
    datasets: Sequence[str] = ()
    library_name: str | None = "transformers"
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    metrics: Sequence[tuple] = ()
    metrics_note: str = ""
    results_markdown: str = ""
    plots: Mapping[str, str] = field(default_factory=dict)  # file name -> caption
    usage: str = ""
    sections: Sequence[tuple[str, str]] = ()

    def card_data(self) -> ModelCardData:
        tags = ["trl", "rlhf", *self.tags, LIBRARY_TAG]
        if self.library_name == "peft":
            tags.append("lora")
        return ModelCardData(
            base_model=self.base_model,
            library_name=self.library_name,
            tags=list(dict.fromkeys(tags)),  # ordered, no duplicates
            datasets=list(self.datasets) or None,
            model_name=self.title,
        )

    def body(self) -> str:
        parts = [f"# {self.title}", self.summary, "## How it was made",
                 f"`{self.recipe}` of hf-rlhf-ext {_version()} (TRL {_version('trl')}):",
                 f"```bash\n{self.command}\n```"]
        if self.settings:
            parts.append(f"`{self.settings}`")
        if self.hyperparameters:
            parts += ["### Hyperparameters", markdown_table(["setting", "value"], list(self.hyperparameters.items()))]
        if self.metrics or self.results_markdown:
            parts.append("## Results")
        if self.metrics:
            headers = ["metric", "before", "after"] if any(len(r) == 3 for r in self.metrics) else ["metric", "value"]
            parts.append(markdown_table(headers, self.metrics))
            if self.metrics_note:
                parts.append(self.metrics_note)
        if self.results_markdown:  # its headings go under the card's "Results"
            parts.append("\n".join("##" + line if line.startswith("#") else line
                                   for line in self.results_markdown.strip().splitlines()))
        for name, caption in self.plots.items():
            parts += [f"![{caption}]({name})", f"*{caption}*"]
        if self.usage:
            parts += ["## Usage", self.usage]
        for heading, text in self.sections:
            parts += [f"## {heading}", text]
        return "\n\n".join(parts) + "\n"


@dataclass(frozen=True)
class RecipeCard:
    """What a recipe's model card says beyond the run's own numbers.

    Args:
        script: the recipe (``recipes/ppo.py``).
        method: what it trains, in words ("PPO with a critic").
        tags: method tags for the Hub (``ppo``).
        hyperparameters: names of the settings that matter, read from the training config or the script arguments
            (missing names are skipped); LoRA settings are added with ``--use_peft``.
    """

    script: str
    method: str
    tags: tuple[str, ...]
    hyperparameters: tuple[str, ...]


def settings_from(names: Sequence[str], *sources: Any) -> dict[str, Any]:
    """``{name: value}`` for each name found on the first source that has it (missing names are skipped)."""
    values: dict[str, Any] = {}
    for name in names:
        source = next((s for s in sources if hasattr(s, name)), None)
        if source is not None:
            values[name] = getattr(source, name)
    return values


def lora_settings(peft_config: Any) -> dict[str, Any]:
    """The LoRA settings a card lists (empty without PEFT)."""
    if peft_config is None:
        return {}
    targets = peft_config.target_modules
    return {"lora_r": peft_config.r, "lora_alpha": peft_config.lora_alpha, "lora_dropout": peft_config.lora_dropout,
            "lora_target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets or "PEFT default"}


def _version(package: str = "hf-rlhf-ext") -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(source tree)"


def _cell(value: Any) -> str:
    from enum import Enum

    if isinstance(value, Enum):
        value = value.value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats to 4 significant digits, None / NaN as a dash."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_model_card(output_dir: str, run: RunCard) -> ModelCard:
    """Writes ``<output_dir>/README.md`` (replacing any card there, e.g. PEFT's template) and returns the card.
    Plots named in ``run.plots`` that are not in the folder are left out of the card."""
    present = {name: caption for name, caption in run.plots.items() if os.path.isfile(os.path.join(output_dir, name))}
    run = RunCard(**{**run.__dict__, "plots": present})
    card = ModelCard(f"---\n{run.card_data().to_yaml()}\n---\n\n{run.body()}")
    os.makedirs(output_dir, exist_ok=True)
    card.save(os.path.join(output_dir, CARD_FILE))
    return card


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``--flag value`` or ``--flag=value`` in a command line (the last one wins), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def write_experiment_card(output_dir: str, recipe: str, argv: Sequence[str], summary: str, tags: Sequence[str],
                          table_file: str | None = None, plots: Mapping[str, str] | None = None,
                          settings: Mapping[str, Any] | None = None, usage: str = "",
                          library_name: str | None = None, launcher: str | None = None) -> ModelCard:
    """The card of an experiment's output folder: its command line as typed (``launcher``, e.g. ``python <recipe>``,
    ``accelerate launch <recipe>`` or ``hf-rlhf-ext <name>``, then ``argv``), its settings, its own results table
    (``table_file`` in the folder, shown as it is) and its plots. ``base_model`` and ``datasets`` come from
    ``--model_name_or_path`` / ``--dataset_name`` when those name Hub repositories."""
    import shlex

    table_path = os.path.join(output_dir, table_file) if table_file else None
    table = open(table_path, encoding="utf-8").read() if table_path and os.path.isfile(table_path) else ""
    dataset = hub_id_or_none(flag_value(argv, "--dataset_name"))
    return write_model_card(output_dir, RunCard(
        title=os.path.basename(os.path.abspath(output_dir)), summary=summary, recipe=recipe,
        command=" ".join([launcher or f"python {recipe}", *(shlex.quote(a) for a in argv)]), tags=tags,
        base_model=hub_id_or_none(flag_value(argv, "--model_name_or_path")), datasets=[dataset] if dataset else [],
        library_name=library_name, hyperparameters=dict(settings or {}), results_markdown=table, plots=plots or {},
        usage=usage or f"The numbers behind the table and plots are in `{os.path.join(output_dir, 'metrics.json')}`.",
    ))


def load_snippet(path: str, kind: str, with_critic: bool = False) -> str:
    """Python that loads the model in ``path`` (a folder or Hub id). ``kind``: "causal_lm", "peft" (a LoRA adapter
    on a causal LM), "reward" or "reward_peft" (a sequence classifier with one label)."""
    loaders = {
        "causal_lm": ("from transformers import AutoModelForCausalLM, AutoTokenizer",
                      f'model = AutoModelForCausalLM.from_pretrained("{path}")'),
        "peft": ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer",
                 f'model = AutoPeftModelForCausalLM.from_pretrained("{path}")  # the base with the adapter\n'
                 "merged = model.merge_and_unload()  # optional: one plain model"),
        "reward": ("from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                   f'model = AutoModelForSequenceClassification.from_pretrained("{path}")  # logits[:, 0] = reward'),
        "reward_peft": ("from peft import AutoPeftModelForSequenceClassification\n"
                        "from transformers import AutoTokenizer",
                        f'model = AutoPeftModelForSequenceClassification.from_pretrained("{path}")  '
                        "# logits[:, 0] = reward"),
    }
    if kind not in loaders:
        raise ValueError(f"Unknown model kind {kind!r}; expected one of {sorted(loaders)}.")
    imports, load = loaders[kind]
    lines = [imports, "", load, f'tokenizer = AutoTokenizer.from_pretrained("{path}")']
    if with_critic:  # ValueModel reads a local folder: a Hub repository is downloaded first
        folder = f'"{path}"' if os.path.isdir(path) or os.path.isabs(path) else f'snapshot_download("{path}")'
        lines += ["", "# the PPO critic (value model), saved beside the policy",
                  "import os", "from hf_rlhf_ext.trainers import ValueModel"]
        if folder.startswith("snapshot_download"):
            lines.append("from huggingface_hub import snapshot_download")
        lines.append(f'critic = ValueModel.from_pretrained(os.path.join({folder}, "value_model"))')
    return "```python\n" + "\n".join(lines) + "\n```"


def push_folder(output_dir: str, repo_id: str, token: str | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str = "End of training") -> Any:
    """Uploads ``output_dir`` as it is (card, plots, critic, metrics) to the Hub model repository ``repo_id``,
    creating it if needed, leaving out what ``Trainer.push_to_hub`` leaves out. Returns the commit info."""
    from huggingface_hub import HfApi

    api = HfApi(library_name=LIBRARY_TAG)
    repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message=commit_message, token=token,
                             revision=revision, ignore_patterns=PUSH_IGNORE_PATTERNS)


def push_experiment(output_dir: str, training_args: Any) -> Any:
    """With ``--push_to_hub``: uploads an experiment's folder (card, tables, plots, metrics) once, to
    ``--hub_model_id`` or a repository named after the folder. Its inner runs never push. Returns the commit info."""
    if not training_args.push_to_hub:
        return None
    repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
    return push_folder(output_dir, repo_id, token=training_args.hub_token, private=training_args.hub_private_repo)
