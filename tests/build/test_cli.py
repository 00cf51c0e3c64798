from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from headrace.build.cli import main, register
from headrace.server.manifest import read_manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headrace")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_imports_without_torch() -> None:
    code = (
        "import sys, headrace.build.cli as c, argparse; "
        "p = argparse.ArgumentParser(); c.register(p.add_subparsers()); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'onnxruntime', 'onnx')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv",
    [
        ["build", "classifier", "--quick", "--out", "m", "--student-layers", "2"],
        ["build", "generator", "--teacher-steps", "5", "--serve", "student"],
        ["build", "demo", "--out", "m", "--quick"],
        ["build", "tiny", "--out", "m"],
        ["build", "evaluate", "m/sentiment/1", "--limit", "10"],
        ["build", "card", "m/sentiment/1"],
    ],
)
def test_every_command_parses_to_a_function(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    assert callable(args.func)


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["build", "--help"])
    text = capsys.readouterr().out
    for name in ("classifier", "generator", "demo", "tiny", "evaluate", "card"):
        assert name in text


def test_tiny_and_card_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiny", "--out", str(tmp_path)]) == 0
    version = tmp_path / "tiny-classifier" / "1"
    assert read_manifest(version).labels == ("negative", "neutral", "positive")
    assert main(["card", str(version)]) == 1  # no card yet
    card = {"model": "tiny", "forms": [{"form": "x", "accuracy": 0.5}]}
    dataclasses.replace(read_manifest(version), card=card).write(version)
    capsys.readouterr()
    assert main(["card", str(version)]) == 0
    assert "# Model card: tiny" in capsys.readouterr().out
    assert (version / "MODEL_CARD.md").exists()


@pytest.mark.parametrize("command", ["classifier", "generator"])
def test_train_precision_has_one_name_on_both_pipelines(command: str) -> None:
    args = _parser().parse_args(["build", command, "--train-precision", "fp32"])
    assert args.train_precision == "fp32"
    with pytest.raises(SystemExit):  # choices are checked
        _parser().parse_args(["build", command, "--train-precision", "fp16"])


def test_generator_keeps_its_earlier_precision_flag() -> None:
    args = _parser().parse_args(["build", "generator", "--precision", "bf16"])
    assert args.train_precision == "bf16"
