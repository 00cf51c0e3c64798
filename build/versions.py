"""Writing model-repository versions: staged in a work folder, then published atomically
with their card (the one publish step of the classifier and generator pipelines)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def publish(staged: Path, dest: Path) -> None:
    """Move a complete version into the repository: copied beside it under a hidden name,
    then renamed into place, so a server scanning the repository never sees half of one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.incoming"
    old = dest.parent / f".{dest.name}.replaced"
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    shutil.copytree(staged, tmp)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)


def jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def is_published(out: Path, names: list[str], version: str, build_fingerprint: str) -> bool:
    """Every `out/NAME/version` exists with a manifest written by a build of this fingerprint."""
    from headrace.server.manifest import ManifestError, read_manifest

    for name in names:
        try:
            m = read_manifest(Path(out) / name / version)
        except ManifestError:
            return False
        if m.provenance.get("build_fingerprint") != build_fingerprint:
            return False
    return True


def stage(dest: Path, copies: dict[str, Path], manifest: Any) -> Path:
    """A fresh version folder at `dest`: each `name -> source` copied in (file or folder),
    then `manifest` (a headrace.server.manifest.Manifest) written."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name, src in copies.items():
        if Path(src).is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)
    manifest.write(dest)
    return dest


def publish_with_card(
    staged: Path, dest: Path, card: dict[str, Any], files: dict[str, Path] | None = None
) -> None:
    """Write `card` into the staged version's manifest and MODEL_CARD.md (with `files`, e.g.
    the card's plot, copied beside it), then publish it at `dest`."""
    import dataclasses

    from headrace.build.card import write_card
    from headrace.server.manifest import read_manifest

    for name, src in (files or {}).items():
        shutil.copy2(src, Path(staged) / name)
    write_card(staged, card)
    dataclasses.replace(read_manifest(staged), card=card).write(staged)
    publish(staged, dest)


def card_if_built(cfg: Any, built: bool) -> dict[str, Any] | None:
    """The published card of `cfg` (a classifier or generator config) when its build is up
    to date and not forced; else None, after setting torch's threads and (forced) emptying
    the work folder so no step is reused."""
    from headrace.build.steps import log
    from headrace.server.manifest import read_manifest

    version_dir = Path(cfg.out) / cfg.name / cfg.version
    if built and not cfg.force:
        log(f"{version_dir}: up to date")
        return dict(read_manifest(version_dir).card)
    import torch

    torch.set_num_threads(cfg.threads)
    if cfg.force and cfg.work_dir().exists():  # a true rebuild: no step is reused
        shutil.rmtree(cfg.work_dir())
    return None
