"""Regenerate the committed Python code of the .proto trees, beside the .proto files.

    python scripts/gen_protos.py            # write *_pb2*.py(i) next to each .proto
    python scripts/gen_protos.py --check    # exit 1 when the committed files are stale
    python scripts/gen_protos.py --check DIR...   # the same for other include roots

protoc names a module after its .proto path under the include root
(protos/headrace/v1/inference.proto -> headrace.v1.inference_pb2), and each tree is
installed under that same name (pyproject package-dir), so imports between
generated files stay as protoc writes them.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Include roots, one per tree: every .proto below one is compiled with it as -I, and
# the generated code is written into that root, mirroring the .proto's folders.
TREES = (ROOT / "protos",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def protoc(root: Path, out: Path) -> None:
    """Compile every .proto below `root` into `out` (messages, services, .pyi stubs).

    `python -m grpc_tools.protoc` adds the well-known types (google/protobuf/*.proto)
    to the include path itself.
    """
    plugin = shutil.which("protoc-gen-mypy_grpc") or str(
        Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    )
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{root}",
        f"--python_out={out}",
        f"--plugin=protoc-gen-mypy={plugin.replace('_grpc', '')}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--mypy_grpc_out={out}",
        *[str(p) for p in sorted(root.rglob("*.proto"))],
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)  # the plugins chat on stderr
    if done.returncode != 0:
        sys.exit(f"protoc failed for {root}:\n{done.stderr}")


def generated(root: Path) -> dict[Path, str]:
    """The fresh generated files of one tree: path relative to the root -> text."""
    with tempfile.TemporaryDirectory() as tmp:
        protoc(root, Path(tmp))
        return {
            p.relative_to(tmp): p.read_text()
            for p in sorted(Path(tmp).rglob("*"))
            if p.name.endswith(GENERATED_SUFFIXES)
        }


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when committed code is stale")
    parser.add_argument("trees", nargs="*", type=Path, help="include roots (default: protos/)")
    args = parser.parse_args()
    stale = []
    for root in [p.resolve() for p in args.trees] or TREES:
        fresh = generated(root)
        for rel, text in fresh.items():
            path = root / rel
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(_shown(path))
            else:
                path.write_text(text)
                print(f"wrote {_shown(path)}")
        # a generated file whose .proto is gone is stale too
        for path in sorted(root.rglob("*")):
            if path.name.endswith(GENERATED_SUFFIXES) and path.relative_to(root) not in fresh:
                if args.check:
                    stale.append(_shown(path))
                else:
                    path.unlink()
                    print(f"removed {_shown(path)}")
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run `make protos`", file=sys.stderr)
        return 1
    if args.check:
        print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
