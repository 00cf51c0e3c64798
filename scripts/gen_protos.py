"""Regenerate the committed Python code for protos/ into client/v1/.

    python scripts/gen_protos.py            # write client/v1/*_pb2*.py(i)
    python scripts/gen_protos.py --check    # exit 1 when the committed files are stale

protoc names modules after the .proto path (headrace.v1.*); the SDK ships them
as headrace.client.v1.*, so imports between generated files are rewritten.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "client" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(dest: Path) -> list[Path]:
    """Run protoc into a temporary folder and copy the rewritten files to dest."""
    protos = sorted(PROTOS.rglob("*.proto"))
    plugin = shutil.which("protoc-gen-mypy_grpc") or str(
        Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"--python_out={tmp}",
            f"--plugin=protoc-gen-mypy={plugin.replace('_grpc', '')}",
            f"--mypy_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy_grpc={plugin}",
            f"--mypy_grpc_out={tmp}",
            *[str(p) for p in protos],
        ]
        subprocess.run(cmd, check=True)
        written = []
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted(Path(tmp, "headrace", "v1").iterdir()):
            if not src.name.endswith(GENERATED_SUFFIXES):
                continue
            text = src.read_text()
            text = text.replace("from headrace.v1 import", "from headrace.client.v1 import")
            text = text.replace("import headrace.v1.", "import headrace.client.v1.")
            text = text.replace("headrace.v1.inference_pb2", "headrace.client.v1.inference_pb2")
            out = dest / src.name
            out.write_text(text)
            written.append(out)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when committed code is stale")
    args = parser.parse_args()
    if not args.check:
        for path in generate(OUT):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [
            p.name
            for p in fresh
            if not (OUT / p.name).exists() or (OUT / p.name).read_text() != p.read_text()
        ]
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run `make protos`", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
