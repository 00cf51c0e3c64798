"""Session fixtures: tiny real models (random weights, real tokenizers), built once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine model repository with tiny-classifier/1 and tiny-generator/1 (torch artifacts).

    Session-scoped and shared: never write into it. Copy it (`model_repo`) to change it.
    """
    from headrace.build.tiny import make_tiny_classifier, make_tiny_generator

    root = tmp_path_factory.mktemp("tiny-models")
    make_tiny_classifier(root / "tiny-classifier" / "1")
    make_tiny_generator(root / "tiny-generator" / "1")
    return root


@pytest.fixture()
def model_repo(tiny_models: Path, tmp_path: Path) -> Path:
    """A private copy of `tiny_models` that a test may change (add versions, break files)."""
    dest = tmp_path / "models"
    shutil.copytree(tiny_models, dest)
    return dest


@pytest.fixture(scope="session")
def onnx_models(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_models` plus ONNX artifacts: model.int8.onnx and model.onnx in each version,
    listed in its manifest (int8 first). Session-scoped and shared: never write into it."""
    from headrace.build.export import export_version

    root = tmp_path_factory.mktemp("onnx-models")
    shutil.copytree(tiny_models, root, dirs_exist_ok=True)
    for version_dir in sorted(root.glob("*/*/")):
        export_version(version_dir)
    return root
