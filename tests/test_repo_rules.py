"""Rules of the tree that no single feature test would catch."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package it is installed as (through its link in src/headrace/)
TOP = {
    "client": "headrace.client",
    "server": "headrace.server",
    "edge": "headrace.edge",
    "build": "headrace.build",
    "protos/headrace/v1": "headrace.v1",
}


def test_generated_code_is_fresh() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_generated_code_check_fails_when_stale(tmp_path: Path) -> None:
    """An edited generated file, and one whose .proto is gone, are both reported."""
    import shutil

    tree = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", tree, ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "headrace" / "v1" / "inference_pb2.py").write_text("# edited\n", "utf-8")
    (tree / "headrace" / "v1" / "gone_pb2.py").write_text("# left behind\n", "utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check",
                           str(tree)], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "inference_pb2.py" in proc.stderr and "gone_pb2.py" in proc.stderr
    assert "inference_pb2_grpc.py" not in proc.stderr, proc.stderr


def test_every_package_folder_is_packaged() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = set()
    for folder, name in TOP.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"


def test_src_links_map_each_package_to_its_folder() -> None:
    """src/headrace/ is the layout tools read: one relative link per top-level package."""
    links = {p.name: p for p in (ROOT / "src" / "headrace").iterdir()}
    expected = {name.split(".")[-1]: folder for folder, name in TOP.items()}
    assert set(links) == set(expected), "src/headrace/ holds exactly one link per package"
    for name, folder in expected.items():
        link = links[name]
        assert link.is_symlink() and not Path(link.readlink()).is_absolute(), link
        assert link.resolve() == (ROOT / folder).resolve(), f"{link} -> {link.readlink()}"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_serving_code_never_imports_build() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("client", "server", "edge")
        for p in (ROOT / folder).rglob("*.py")
        if p.name != "cli.py" and any(m.startswith("headrace.build") for m in _imports(p))
    ]
    assert not offenders, f"serving code imports headrace.build: {offenders}"


def test_client_depends_on_grpc_and_protobuf_alone() -> None:
    """The SDK and the generated code it ships (headrace.v1) need grpcio and protobuf alone."""
    allowed = (
        "grpc",
        "google.protobuf",
        "google.rpc",
        "grpc_status",
        "headrace.client",
        "headrace.v1",
    )
    bad = {}
    for p in [*(ROOT / "client").rglob("*.py"), *(ROOT / "protos").rglob("*.py")]:
        third = {m for m in _imports(p) if m.split(".")[0] not in sys.stdlib_module_names}
        extra = {m for m in third if not m.startswith(allowed)}
        if p == ROOT / "client" / "_tracing.py":  # optional, imported under try/except ImportError
            extra = {m for m in extra if m.split(".")[0] != "opentelemetry"}
        if extra:
            bad[str(p.relative_to(ROOT))] = sorted(extra)
    assert not bad, bad


def _serving_modules() -> list[str]:
    """Every module of server/ and edge/ but the backends (which import their runtime)."""
    modules = []
    for folder in ("server", "edge"):
        for p in (ROOT / folder).rglob("*.py"):
            rel = p.relative_to(ROOT / folder).with_suffix("")
            if "backends" in rel.parts or rel.name in ("__main__", "ort_backend"):
                continue
            parts = [TOP[folder], *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules.append(".".join(parts))
    return sorted(modules)


def test_server_and_edge_import_without_ml_runtimes() -> None:
    """Importing every non-backend module pulls in no torch, onnxruntime or tensorrt."""
    modules = _serving_modules()
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "import headrace.server.backends.registry\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'transformers') if m in sys.modules]\n"
        "print(heavy); sys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_serving_code_imports_without_the_sdk() -> None:
    """`headrace.v1` is the contract's own package: serving imports it, not headrace.client."""
    code = (
        "import importlib, sys\n"
        "import headrace.server\n"
        "assert not [m for m in sys.modules if m.startswith('headrace.client')], 'headrace.server'\n"
        f"for m in {_serving_modules()!r}: importlib.import_module(m)\n"
        "import headrace.v1.inference_pb2_grpc\n"
        "sdk = sorted(m for m in sys.modules if m.startswith('headrace.client'))\n"
        "print(sdk); sys.exit(1 if sdk else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _lock_module():  # scripts/ is no package: load lock.py by path
    import importlib.util

    spec = importlib.util.spec_from_file_location("headrace_lock", ROOT / "scripts" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


def test_locks_match_pyproject() -> None:
    lock = _lock_module()
    assert [p for entry in lock.LOCKS for p in lock.problems(entry)] == []
    dev = (ROOT / "requirements" / "dev.lock").read_text()
    assert "torch==2.13.0+cpu" in dev, "the dev lock must pin the CPU build of torch"
    assert "nvidia-" not in dev, "a CUDA build of torch crept into the dev lock"
    edge = lock.pinned((ROOT / "requirements" / "edge.lock").read_text())
    assert not set(edge) & {"torch", "transformers", "tensorrt"}, "the edge lock pulls torch"


def test_lock_check_fails_when_pyproject_moves(tmp_path: Path) -> None:
    """A dependency added (or a range moved) without `make lock` is caught."""
    import shutil

    lock = _lock_module()
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    text = (ROOT / "pyproject.toml").read_text()
    added = text.replace("server = [\n", 'server = [\n    "left-pad>=1.0",\n', 1)
    assert added != text
    (tmp_path / "pyproject.toml").write_text(added)
    found = [p for entry in lock.LOCKS for p in lock.problems(entry, tmp_path)]
    assert any("does not pin left-pad" in p for p in found), found
    assert any("other dependency tables" in p for p in found), found
    moved = text.replace('"numpy>=1.26,<3"', '"numpy>=1.26,<2"', 1)
    assert moved != text
    (tmp_path / "pyproject.toml").write_text(moved)
    found = [p for entry in lock.LOCKS for p in lock.problems(entry, tmp_path)]
    assert any("pins numpy==" in p and "outside" in p for p in found), found


def test_edge_never_imports_the_engine() -> None:
    """Edge backends lean on server/backends/ (sampling_numpy, base), never on the engine."""
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith(ENGINE))
        for p in (ROOT / "edge").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}, offenders
    assert "headrace.server.backends.sampling_numpy" in _imports(ROOT / "edge" / "ort_backend.py")


ENGINE = "headrace.server.engine"
MAX_LINES = 400
# module -> why it may be longer than MAX_LINES (remove an entry once the module is shorter)
LONG_MODULES = {
    "build/export.py": "ONNX export, int8 quantization and their parity checks for both tasks",
}


def test_modules_stay_under_the_line_limit() -> None:
    sizes = {}
    for folder in ("client", "server", "edge", "build"):
        for p in (ROOT / folder).rglob("*.py"):
            if p.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue  # generated
            sizes[str(p.relative_to(ROOT))] = len(p.read_text("utf-8").splitlines())
    over = {m: n for m, n in sizes.items() if n > MAX_LINES and m not in LONG_MODULES}
    assert not over, f"split these, or list them in LONG_MODULES with a reason: {over}"
    stale = sorted(m for m in LONG_MODULES if sizes.get(m, 0) <= MAX_LINES)
    assert not stale, f"no longer over {MAX_LINES} lines; drop from LONG_MODULES: {stale}"


# The typed path of a call: front -> typed call -> checks -> repository -> model -> engine.
TYPED_CALL_PATH = (
    "server/types.py",
    "server/calls.py",
    "server/convert.py",
    "server/models.py",
    "server/repository.py",
    "server/profiles.py",
    "server/backends/registry.py",
    "server/engine/scheduler.py",
    "server/engine/batcher.py",
)


def _any_in_annotations(path: Path) -> list[str]:
    """`Any` in the annotations of every function, class attribute and module-level name."""
    tree = ast.parse(path.read_text("utf-8"))
    found = []
    annotations: list[tuple[int, ast.expr]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if a is not None and a.annotation is not None:
                    annotations.append((node.lineno, a.annotation))
            if node.returns is not None:
                annotations.append((node.lineno, node.returns))
        elif isinstance(node, ast.AnnAssign):
            annotations.append((node.lineno, node.annotation))
    for line, annotation in annotations:
        text = ast.unparse(annotation)
        names = {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)}
        if "Any" in names or "typing.Any" in text or "'Any'" in text or "Any]" in text:
            found.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    return found


def test_no_any_in_the_typed_call_path() -> None:
    found = [hit for module in TYPED_CALL_PATH for hit in _any_in_annotations(ROOT / module)]
    assert not found, found


def test_any_rule_sees_string_and_nested_annotations() -> None:
    probe = ROOT / "tests" / ".any_probe.py"  # under ROOT: the hits are named relative to it
    probe.write_text(
        "from typing import Any\n"
        "def f(x: 'dict[str, Any]') -> None: ...\n"
        "def g(**kw: Any) -> list[Any]: ...\n"
        "class C:\n    y: 'Any'\n"
    )
    try:
        assert len(_any_in_annotations(probe)) == 4
    finally:
        probe.unlink()
