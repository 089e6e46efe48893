"""`kiln export` failures: each a clear message, a non-zero exit, and nothing left in the repository
(nor staging dirs beside it)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")

from server.cli import main as kiln  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

BAD_MODELS = '''
import torch
from torch import nn


class Branchy(nn.Module):
    """Python control flow on tensor values: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class Noisy(nn.Module):
    """Dropout forced on at inference: exports fine, never matches."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return torch.nn.functional.dropout(self.fc(x), p=0.5, training=True)


class FixedLength(nn.Module):
    """Reshapes to a fixed length, so a dynamic sequence axis cannot stay dynamic."""

    def forward(self, x):
        return x.reshape(x.shape[0], 5, 1).sum(-1)


class TwoOutputs(nn.Module):
    def forward(self, x):
        return x + 1, x - 1


def branchy():
    return Branchy()


def noisy():
    torch.manual_seed(0)
    return Noisy()


def fixed_length():
    return FixedLength()


def two_outputs():
    return TwoOutputs()


NOT_A_FACTORY = 3
'''


@pytest.fixture
def bad_models(tmp_path: Path, monkeypatch) -> Path:
    """A module of broken models importable as `kiln_bad_models` (export adds the cwd to sys.path)."""
    (tmp_path / "kiln_bad_models.py").write_text(textwrap.dedent(BAD_MODELS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("kiln_bad_models", None)
    repo = tmp_path / "repo"
    repo.mkdir()
    return repo


def _assert_nothing_written(repo: Path) -> None:
    assert list(repo.iterdir()) == [], f"left in the repository: {list(repo.iterdir())}"
    assert not [p.name for p in repo.parent.iterdir() if p.name.startswith(".")], "staging dirs left beside it"


def _export(repo: Path, factory: str, *inputs: str, extra: tuple[str, ...] = ()) -> int:
    argv = ["export", factory, "--name", "m", "--model-repository", str(repo)]
    for i in inputs or ("x:FP32:-1,8",):
        argv += ["--input", i]
    return kiln(argv + list(extra))


def test_factory_not_found(bad_models: Path, capsys) -> None:
    assert _export(bad_models, "kiln_bad_models:no_such_factory") == 1
    err = capsys.readouterr().err
    assert "factory 'no_such_factory' not found in module 'kiln_bad_models'" in err and "branchy" in err
    _assert_nothing_written(bad_models)


def test_module_not_found_subprocess(tmp_path: Path) -> None:
    """Through the real `kiln` process: exit status and stderr."""
    repo = tmp_path / "repo"
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "export", "no_such_pkg.models:build", "--name", "m",
         "--input", "x:FP32:-1,8", "--model-repository", str(repo)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "cannot import module 'no_such_pkg.models'" in proc.stderr
    assert not repo.exists() or list(repo.iterdir()) == []


def test_not_callable_and_bad_spec(bad_models: Path, capsys) -> None:
    assert _export(bad_models, "kiln_bad_models:NOT_A_FACTORY") == 1
    assert "is not callable" in capsys.readouterr().err
    assert _export(bad_models, "kiln_bad_models:branchy", "x:FLOAT:-1,8") == 1
    assert "datatype 'FLOAT' is not one of" in capsys.readouterr().err
    _assert_nothing_written(bad_models)


def test_untraceable_model(bad_models: Path, capsys) -> None:
    assert _export(bad_models, "kiln_bad_models:branchy") == 1
    err = capsys.readouterr().err
    assert "torch.export could not trace 'kiln_bad_models:branchy'" in err
    _assert_nothing_written(bad_models)


def test_parity_failure_nondeterministic(bad_models: Path, capsys) -> None:
    assert _export(bad_models, "kiln_bad_models:noisy", extra=("--parity-batch-sizes", "4")) == 1
    captured = capsys.readouterr()
    assert "parity check failed: onnxruntime does not match PyTorch" in captured.err
    assert "FAIL" in captured.out and "max abs" in captured.out
    _assert_nothing_written(bad_models)


def test_declared_dynamic_axis_gets_fixed(bad_models: Path, capsys) -> None:
    assert _export(bad_models, "kiln_bad_models:fixed_length", "x:FP32:-1,-1") == 1
    err = capsys.readouterr().err
    assert "input 'x' axis 1 is declared dynamic (-1) but the model fixes it to 5" in err
    _assert_nothing_written(bad_models)


def test_misdeclared_outputs(bad_models: Path, capsys) -> None:
    assert _export(bad_models, "kiln_bad_models:two_outputs", extra=("--output", "only")) == 1
    assert "returns 2 output(s) but --output names 1" in capsys.readouterr().err
    _assert_nothing_written(bad_models)


def test_wrong_input_shape(bad_models: Path, capsys) -> None:
    assert _export(bad_models, "kiln_bad_models:branchy", "x:FP32:-1,9") == 1
    assert "the model fails on example inputs (x [2, 9] float32)" in capsys.readouterr().err
    _assert_nothing_written(bad_models)
