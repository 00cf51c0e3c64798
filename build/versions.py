"""Writing model-repository versions: publish a complete folder atomically."""

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
