"""The layer rules (docs/testing.md, "Layer rules"), checked over every import statement (ast, no
import-linter): each violation is reported as file:line.

1. nothing imports a `device_sim.cli` module except `device_sim/cli/**` (tests may);
2. `device_sim/common` imports nothing else of the project;
3. `device_sim/stub` does not import `device_sim.device`, and imports `hsm_setup` only in
   the modules of STUB_TOKEN_MODULES (token operations);
4. `device_sim/stub/core` imports no socket, ssl, OpenSSL or select module.

KNOWN_VIOLATIONS lists the ones still on main while the layout work lands; it is meant
to shrink to empty, and an entry that no longer happens fails the test too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("device_sim", "hsm_setup")
PROJECT = ("device_sim", "hsm_setup")
NETWORK = ("socket", "ssl", "OpenSSL", "select")

# Modules of device_sim/stub that may use hsm_setup (token operations only).
STUB_TOKEN_MODULES: frozenset[str] = frozenset({
    "device_sim.stub.issuing_token",  # an issuing CA key in a PKCS#11 token (docs/certificate-issuance.md)
})

# (rule, module doing the import, module imported) still broken on main.
KNOWN_VIOLATIONS: frozenset[tuple[str, str, str]] = frozenset()


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path = ROOT):
    """(line, imported module) for every import in `path`, relative ones resolved;
    `from package import name` counts as importing `package.name` when that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            prefix = ".".join([*base, node.module] if node.module else base)
            for alias in node.names:
                candidate = root.joinpath(*prefix.split("."), alias.name)
                is_module = candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file()
                yield node.lineno, f"{prefix}.{alias.name}" if is_module else prefix


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def rules_broken(importer: str, imported: str):
    if within(imported, "device_sim.cli") and not within(importer, "device_sim.cli"):
        yield "cli"
    if within(importer, "device_sim.common") and any(within(imported, p) for p in PROJECT) \
            and not within(imported, "device_sim.common"):
        yield "common"
    if within(importer, "device_sim.stub"):
        if within(imported, "device_sim.device"):
            yield "stub-device"
        if within(imported, "hsm_setup") and importer not in STUB_TOKEN_MODULES:
            yield "stub-hsm_setup"
    if within(importer, "device_sim.stub.core") and any(within(imported, n) for n in NETWORK):
        yield "core-network"


def violations():
    sources = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    sources += sorted((ROOT / "bench").glob("*.py"))
    for path in sources:
        importer = module_name(path)
        seen = set()
        for line, imported in imports(path):
            for rule in rules_broken(importer, imported):
                key = (rule, importer, imported, line)
                if key not in seen:
                    seen.add(key)
                    yield rule, importer, imported, f"{path.relative_to(ROOT)}:{line}"


def test_layer_rules_hold():
    found = list(violations())
    new = [f"{where}: [{rule}] {importer} imports {imported}" for rule, importer, imported, where in found
           if (rule, importer, imported) not in KNOWN_VIOLATIONS]
    assert not new, "layer rules broken (docs/testing.md):\n" + "\n".join(new)


def test_known_violations_still_happen():
    """An allow-list entry that no longer happens must be removed."""
    happening = {(rule, importer, imported) for rule, importer, imported, _ in violations()}
    assert not KNOWN_VIOLATIONS - happening, sorted(KNOWN_VIOLATIONS - happening)


def test_the_checker_sees_each_kind_of_violation():
    cases = {
        ("cli", "device_sim.fleet.runner", "device_sim.cli.register"),
        ("common", "device_sim.common.files", "hsm_setup.tokens"),
        ("stub-device", "device_sim.stub.server", "device_sim.device.identity"),
        ("stub-hsm_setup", "device_sim.stub.server", "hsm_setup.tokens"),
        ("core-network", "device_sim.stub.core.store", "socket"),
    }
    for rule, importer, imported in cases:
        assert rule in set(rules_broken(importer, imported)), (rule, importer, imported)
    assert not list(rules_broken("device_sim.cli.main", "device_sim.cli.runner"))
    assert not list(rules_broken("device_sim.common.x509util", "device_sim.common.errors"))
    assert not list(rules_broken("device_sim.stub.net.tls", "OpenSSL"))


def test_relative_imports_are_resolved(tmp_path):
    core = tmp_path / "device_sim" / "stub" / "core"
    (tmp_path / "device_sim" / "stub" / "net").mkdir(parents=True)
    core.mkdir()
    (tmp_path / "device_sim" / "stub" / "net" / "tls.py").write_text("")
    (core / "store.py").write_text("")
    source = core / "probe.py"
    source.write_text("from ..net import tls\nfrom . import store\nfrom .store import Store\nimport socket\n")
    found = {name for _, name in imports(source, tmp_path)}
    assert found == {"device_sim.stub.net.tls", "device_sim.stub.core.store", "socket"}
