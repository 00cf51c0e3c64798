"""The locked installs in requirements/: made by uv from pyproject.toml, checked against it.

    python scripts/lock.py            # re-resolve every lock (`make lock`; needs uv and the index)
    python scripts/lock.py --check    # exit 1 when a lock no longer matches pyproject.toml

Each lock starts with a line `# inputs-sha256: ...`, a digest of what it was
resolved from (the dependency tables of pyproject.toml and the lock's own
arguments). `--check` needs no network: it recomputes the digest, and checks
that every requirement of the locked extras is pinned in the lock at a
version its range admits.

torch: the dev lock pins the CPU build (`torch==2.13.0+cpu`) that lies on
local disk (TORCH_FIND_LINKS, default /opt/wheels); a plain torch from the
index is a multi-GB CUDA build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIGEST_PREFIX = "# inputs-sha256: "


@dataclass(frozen=True)
class Lock:
    path: str  # relative to the checkout
    extras: tuple[str, ...]  # extras of headrace it covers
    args: tuple[str, ...]  # uv pip compile arguments beside the extras
    what: str  # one line for the lock's header
    # A lock of its own (not headrace's): these requirements instead of headrace's extras.
    requirements: tuple[str, ...] = ()


LOCKS = (
    Lock(
        "requirements/dev.lock",
        ("dev",),
        ("--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"),
        "make test / make serve: headrace[dev] on Linux x86-64, CPU torch from local disk",
    ),
    Lock(
        "requirements/edge.lock",
        ("edge",),
        ("--python-version", "3.11", "--universal"),
        "the edge profile: headrace[edge], no torch, any platform",
    ),
    # tritonclient pins protobuf<7 (we need 7.x): the Open Inference Protocol tests run it
    # from a virtualenv of its own (tests/kserve/triton_venv.py), a user's client as it is.
    Lock(
        "requirements/tritonclient.lock",
        (),
        ("--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"),
        "the tests' tritonclient virtualenv: tritonclient[grpc] and numpy, nothing of headrace",
        requirements=("tritonclient[grpc]>=2.50,<3", "numpy>=1.26,<3"),
    ),
)


@dataclass(frozen=True)
class NoDepsLock:
    """Packages installed alone (`pip install --no-deps --require-hashes`), outside the
    resolver: their declared dependencies are not wanted (tensorrt-stubs requires the
    multi-GB tensorrt wheel it describes)."""

    path: str
    requirements: tuple[str, ...]  # each pinned by the lock at a version its range admits
    what: str


NO_DEPS_LOCKS = (
    NoDepsLock(
        "requirements/typing.lock",
        ("tensorrt-stubs>=10.13,<11",),
        "make typecheck: the TensorRT API's type stubs alone (into .cache/typestubs, no tensorrt)",
    ),
)


def _dependency_tables(root: Path = ROOT) -> dict[str, object]:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }


def digest(lock: Lock | NoDepsLock, root: Path = ROOT) -> str:
    if isinstance(lock, NoDepsLock):
        blob = json.dumps({"no-deps": lock.requirements}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()
    inputs: dict[str, object] = {"requirements": lock.requirements, "args": lock.args}
    if not lock.requirements:
        inputs = {"tables": _dependency_tables(root), "extras": lock.extras, "args": lock.args}
    blob = json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# -- checking (no network) ----------------------------------------------------------------


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(lock_text: str) -> dict[str, str]:
    """name -> version of every `name==version` line of a lock."""
    found = {}
    for line in lock_text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", line)
        if m:
            found[_canonical(m.group(1))] = m.group(3)
    return found


def requirements_of(extras: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """Every requirement string of headrace with `extras`, headrace[...] self-references expanded."""
    tables = _dependency_tables(root)
    optional: dict[str, list[str]] = tables["optional-dependencies"]  # type: ignore[assignment]
    out: list[str] = list(tables["dependencies"])  # type: ignore[call-overload]
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in optional.get(extra, ()):
            m = re.match(r"^headrace\[([^\]]+)\]", req)
            if m:
                todo.extend(e.strip() for e in m.group(1).split(","))
            else:
                out.append(req)
    return out


def problems(lock: Lock | NoDepsLock, root: Path = ROOT) -> list[str]:
    """What is wrong with one lock, in words; [] when it matches pyproject.toml (or, for a
    no-deps lock, its requirements)."""
    from packaging.requirements import Requirement

    path = root / lock.path
    if not path.is_file():
        return [f"{lock.path} is missing: run `make lock`"]
    text = path.read_text()
    out = []
    first = text.splitlines()[0] if text else ""
    if first != DIGEST_PREFIX + digest(lock, root):
        out.append(
            f"{lock.path} was resolved from other dependency tables than pyproject.toml's now"
        )
    versions = pinned(text)
    if isinstance(lock, NoDepsLock):
        wanted = lock.requirements
        extra = set(versions) - {_canonical(Requirement(r).name) for r in wanted}
        out += [
            f"{lock.path} pins {name}, which is not one of its requirements"
            for name in sorted(extra)
        ]
    else:
        wanted = lock.requirements or requirements_of(lock.extras, root)
    for raw in wanted:
        req = Requirement(raw)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = versions.get(_canonical(req.name))
        if have is None:
            out.append(f"{lock.path} does not pin {req.name} ({raw})")
        elif not req.specifier.contains(have, prereleases=True):
            out.append(f"{lock.path} pins {req.name}=={have}, outside {raw}")
    return out


# -- resolving (uv, the index) ------------------------------------------------------------


def _uv() -> str:
    found = shutil.which(
        "uv", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if found is None:
        sys.exit("uv not found: it is in the dev extra (`make venv`), or `pip install uv`")
    return found


def resolve(lock: Lock) -> None:
    out = ROOT / lock.path
    out.parent.mkdir(parents=True, exist_ok=True)
    source = "pyproject.toml"
    if lock.requirements:  # uv reads them from stdin
        source = "-"
    cmd = [_uv(), "pip", "compile", source, "--generate-hashes", "--quiet",
           "--no-header", *lock.args]  # fmt: skip
    for extra in lock.extras:
        cmd += ["--extra", extra]
    if lock.path.endswith("dev.lock"):
        wheels = os.environ.get("TORCH_FIND_LINKS", "/opt/wheels")
        if not any(Path(wheels).glob("torch-*+cpu-*.whl")):
            sys.exit(f"no CPU torch wheel in {wheels}: set TORCH_FIND_LINKS to its folder")
        cmd += ["--find-links", wheels]
    stdin = "".join(f"{r}\n" for r in lock.requirements) or None
    done = subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr)
    if lock.path.endswith("dev.lock") and not re.search(r"^torch==[^\s]+\+cpu", done.stdout, re.M):
        sys.exit("the dev lock did not pick the CPU build of torch; refusing to write it")
    inputs = " ".join(f"'{r}'" for r in lock.requirements) or " ".join(
        ["pyproject.toml", *(f"--extra {e}" for e in lock.extras)]
    )
    header = [
        DIGEST_PREFIX + digest(lock),
        f"# {lock.what}",
        "# Made by `make lock` (scripts/lock.py, uv pip compile); do not edit by hand.",
        f"#   uv pip compile {inputs} {' '.join(lock.args)} --generate-hashes",
    ]
    out.write_text("\n".join(header) + "\n" + done.stdout)
    print(f"wrote {lock.path}: {len(pinned(done.stdout))} packages")


def resolve_no_deps(lock: NoDepsLock) -> None:
    """uv pip compile --no-deps: each requirement pinned with its hashes, nothing beside it."""
    import tempfile

    out = ROOT / lock.path
    with tempfile.NamedTemporaryFile("w", suffix=".in", delete=False) as f:
        f.write("\n".join(lock.requirements) + "\n")
    try:
        cmd = [_uv(), "pip", "compile", f.name, "--no-deps", "--generate-hashes", "--quiet",
               "--no-header", "--universal", "--python-version", "3.11"]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        sys.exit(done.stderr)
    header = [
        DIGEST_PREFIX + digest(lock),
        f"# {lock.what}",
        "# Made by `make lock` (scripts/lock.py, uv pip compile --no-deps); do not edit by hand.",
        "# Install: pip install --no-deps --require-hashes -r " + lock.path,
    ]
    body = re.sub(r"^\s+# via .*\n", "", done.stdout, flags=re.M)
    out.write_text("\n".join(header) + "\n" + body)
    print(f"wrote {lock.path}: {len(pinned(body))} packages")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check the locks, resolve nothing")
    args = parser.parse_args()
    if args.check:
        bad = [p for lock in (*LOCKS, *NO_DEPS_LOCKS) for p in problems(lock)]
        for line in bad:
            print(line, file=sys.stderr)
        if bad:
            print("run `make lock` to re-resolve, then commit requirements/", file=sys.stderr)
        return 1 if bad else 0
    for lock in LOCKS:
        resolve(lock)
    for no_deps in NO_DEPS_LOCKS:
        resolve_no_deps(no_deps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
