"""The services talk only over Kafka: no service imports another service's code, and `shared/`, the
library they have in common, imports no service. Read from the source (every import statement,
function-level and `TYPE_CHECKING` ones included), so a forbidden import fails here even on a path
no other test runs."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def services(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "services").iterdir() if (p / "__init__.py").is_file())


def imported_modules(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute name) of each module an import in `path` may name: `from a import b` gives
    `a` and `a.b` (b may be a module); relative imports resolved against the file's package."""
    package = path.relative_to(root).parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def offences(root: Path, directory: str, allowed: str | None) -> list[str]:
    """Each import under `root/directory` of a service other than `allowed`, once per line."""
    found: set[tuple[str, int, str]] = set()
    for path in sorted((root / directory).rglob("*.py")):
        for line, module in imported_modules(path, root):
            parts = module.split(".")
            if len(parts) > 1 and parts[0] == "services" and parts[1] != allowed:
                found.add((str(path.relative_to(root)), line, parts[1]))
    return [f"{path}:{line} imports services.{service}" for path, line, service in sorted(found)]


def test_the_scan_resolves_every_kind_of_import_it_must_refuse(tmp_path: Path) -> None:
    store = tmp_path / "services" / "ingest" / "store"
    store.mkdir(parents=True)
    for package in (tmp_path / "services", tmp_path / "services" / "ingest", store):
        (package / "__init__.py").write_text("")
    (store / "probe.py").write_text(
        "from ..api import tracking\n"  # its own service: allowed
        "from ...segmenter import app\n"
        "from shared.contracts import Headers\n"
        "def f() -> None:\n"
        "    import services.notifier.delivery\n"
        "    from services import journey_engine\n"
    )
    modules = [m for _, m in imported_modules(store / "probe.py", tmp_path)]
    assert "services.ingest.api.tracking" in modules and "services.segmenter.app" in modules
    assert offences(tmp_path, "services/ingest", "ingest") == [
        "services/ingest/store/probe.py:2 imports services.segmenter",
        "services/ingest/store/probe.py:5 imports services.notifier",
        "services/ingest/store/probe.py:6 imports services.journey_engine",
    ]
    assert len(offences(tmp_path, "services/ingest", None)) == 4  # as `shared/` is checked


def test_no_service_imports_another_service() -> None:
    names = services(ROOT)
    assert names == ["ingest", "journey_engine", "notifier", "segmenter"]
    assert [o for name in names for o in offences(ROOT, f"services/{name}", name)] == []


def test_shared_imports_no_service() -> None:
    assert list((ROOT / "shared").rglob("*.py"))
    assert offences(ROOT, "shared", None) == []
