"""The package imports cheaply and every name it re-exports resolves."""

import subprocess
import sys

import hf_rlhf_ext


def test_import_is_lazy():
    code = "import sys, hf_rlhf_ext; assert 'trl' not in sys.modules and 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_every_export_resolves():
    for name in hf_rlhf_ext.__all__:
        assert getattr(hf_rlhf_ext, name) is not None, name
    assert "PPOTrainer" in dir(hf_rlhf_ext)
