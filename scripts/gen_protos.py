"""Regenerate the committed Python code for the proto trees under protos/.

    python scripts/gen_protos.py            # write every tree's *_pb2*.py(i)
    python scripts/gen_protos.py --check    # exit 1 when committed files are stale

Each tree is one import root under protos/ and one output package:

    protos/headrace/v1/*.proto  -> client/v1/         (headrace.client.v1: the SDK's stubs)
    protos/kserve/inference/*   -> server/kserve/pb/  (headrace.server.kserve.pb: server only)

protoc names modules after the .proto path (headrace.v1.*, inference.*); the
packages ship them under headrace.*, so imports between generated files are rewritten.
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
    include: Path  # protoc -I: the import root
    package: str  # the protos' folder under `include`, dotted (their proto package path)
    out: Path  # where the generated modules are committed
    module: str  # the import name of `out`

    @property
    def protos(self) -> list[Path]:
        return sorted((self.include / self.package.replace(".", "/")).glob("*.proto"))

    def rewrite(self, text: str) -> str:
        # Module names only: the serialized descriptors keep their proto package names.
        text = text.replace(f"from {self.package} import", f"from {self.module} import")
        for proto in self.protos:
            name = f"{self.package}.{proto.stem}_pb2"
            text = text.replace(name, f"{self.module}.{proto.stem}_pb2")
        return text


TREES = (
    Tree(ROOT / "protos", "headrace.v1", ROOT / "client" / "v1", "headrace.client.v1"),
    Tree(
        ROOT / "protos" / "kserve",
        "inference",
        ROOT / "server" / "kserve" / "pb",
        "headrace.server.kserve.pb",
    ),
)


def generate(tree: Tree, dest: Path) -> list[Path]:
    """Run protoc for one tree into a temporary folder and copy the rewritten files to dest."""
    plugin = shutil.which("protoc-gen-mypy_grpc") or str(
        Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{tree.include}",
            f"--python_out={tmp}",
            f"--plugin=protoc-gen-mypy={plugin.replace('_grpc', '')}",
            f"--mypy_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy_grpc={plugin}",
            f"--mypy_grpc_out={tmp}",
            *[str(p) for p in tree.protos],
        ]
        subprocess.run(cmd, check=True)
        written = []
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted(Path(tmp, *tree.package.split(".")).iterdir()):
            if not src.name.endswith(GENERATED_SUFFIXES):
                continue
            out = dest / src.name
            out.write_text(tree.rewrite(src.read_text()))
            written.append(out)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when committed code is stale")
    args = parser.parse_args()
    if not args.check:
        for tree in TREES:
            for path in generate(tree, tree.out):
                print(f"wrote {path.relative_to(ROOT)}")
        return 0
    stale = []
    for tree in TREES:
        with tempfile.TemporaryDirectory() as tmp:
            for p in generate(tree, Path(tmp)):
                committed = tree.out / p.name
                if not committed.exists() or committed.read_text() != p.read_text():
                    stale.append(str(committed.relative_to(ROOT)))
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run `make protos`", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
