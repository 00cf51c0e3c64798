"""Regenerate the committed Python code of the .proto trees.

    python scripts/gen_protos.py                  # write every tree's *_pb2*.py(i)
    python scripts/gen_protos.py --check          # exit 1 when the committed files are stale
    python scripts/gen_protos.py --check DIR...   # the same for other include roots (in place)

Each tree is one protoc include root and one output folder:

    protos/headrace/v1/*.proto    -> beside them      headrace.v1 (the contract, the SDK's stubs)
    protos/kserve/inference/*     -> server/kserve/pb  headrace.server.kserve.pb (server only)

protoc names a module after its .proto path under the include root
(headrace/v1/inference.proto -> headrace.v1.inference_pb2). headrace.v1 is installed
under that same name (pyproject: src/headrace/v1 links to protos/headrace/v1), so its
imports stay as protoc writes them; the KServe tree ships under headrace.server.kserve.pb,
so the imports between its generated files are rewritten to that name.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


@dataclass(frozen=True)
class Tree:
    include: Path  # protoc -I
    folder: str  # the .proto files' folder under `include`: their proto package path
    out: Path  # where the generated modules are committed
    module: str | None = None  # their import name when it is not the proto package

    @property
    def protos(self) -> list[Path]:
        return sorted((self.include / self.folder).glob("*.proto"))

    def rewrite(self, text: str) -> str:
        if self.module is None:
            return text
        # module names only: the serialized descriptors keep their proto package names
        package = self.folder.replace("/", ".")
        text = text.replace(f"from {package} import", f"from {self.module} import")
        for proto in self.protos:
            text = text.replace(f"{package}.{proto.stem}_pb2", f"{self.module}.{proto.stem}_pb2")
        return text


TREES = (
    Tree(ROOT / "protos", "headrace/v1", ROOT / "protos" / "headrace" / "v1"),
    Tree(
        ROOT / "protos" / "kserve",
        "inference",
        ROOT / "server" / "kserve" / "pb",
        "headrace.server.kserve.pb",
    ),
)


def protoc(tree: Tree, out: Path) -> None:
    """Compile the tree's .proto files into `out` (messages, services, .pyi stubs).

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
        f"-I{tree.include}",
        f"--python_out={out}",
        f"--plugin=protoc-gen-mypy={plugin.replace('_grpc', '')}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--mypy_grpc_out={out}",
        *[str(p) for p in tree.protos],
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)  # the plugins chat on stderr
    if done.returncode != 0:
        sys.exit(f"protoc failed for {tree.include}:\n{done.stderr}")


def generated(tree: Tree) -> dict[str, str]:
    """The fresh generated files of one tree: file name -> text."""
    with tempfile.TemporaryDirectory() as tmp:
        protoc(tree, Path(tmp))
        return {
            p.name: tree.rewrite(p.read_text())
            for p in sorted(Path(tmp, tree.folder).iterdir())
            if p.name.endswith(GENERATED_SUFFIXES)
        }


def _in_place(root: Path) -> list[Tree]:
    """Every folder of .proto files under an include root, generated beside them."""
    folders = sorted({p.parent for p in root.rglob("*.proto")})
    return [Tree(root, str(f.relative_to(root)), f) for f in folders]


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when committed code is stale")
    parser.add_argument("roots", nargs="*", type=Path, help="other include roots (in place)")
    args = parser.parse_args()
    trees = [t for root in args.roots for t in _in_place(root.resolve())] or list(TREES)
    stale = []
    for tree in trees:
        fresh = generated(tree)
        tree.out.mkdir(parents=True, exist_ok=True)
        for name, text in fresh.items():
            path = tree.out / name
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(_shown(path))
            else:
                path.write_text(text)
                print(f"wrote {_shown(path)}")
        # a generated file whose .proto is gone is stale too
        for path in sorted(tree.out.iterdir()):
            if path.name.endswith(GENERATED_SUFFIXES) and path.name not in fresh:
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
