"""What `pip install spotguard` takes and pulls, read from the source and the installed metadata (no network).

Every third-party module spotguard imports is declared in pyproject (the lab's may be in the `lab` extra);
constraints.txt pins exactly what a production install pulls, certifi excepted, and constraints-dev.txt adds
the tools on top of it; every dependency has a lower bound that `make test-lower` can pin. With SPOTGUARD_DIST
naming a directory that `python -m build` filled (`make package-check`), the sdist and the wheel are checked too.

Run as a script with --lower-bounds, it prints those pins (`name==lower`), one a line, for `make test-lower`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
NOT_PINNED_FOR_PRODUCTION = {"certifi"}  # a production install takes the current CA bundle
LOWER = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][^,;\s]*)\s*(,\s*<[^,;]+)?$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lower_bounds() -> list[str]:
    """pyproject's dependencies with each `>=` bound pinned exactly (and any `<` cap dropped)."""
    pins = []
    for dependency in PROJECT["dependencies"]:
        match = LOWER.match(dependency.strip())
        if match is None:
            raise ValueError(f"{dependency!r}: every dependency needs a plain lower bound (name>=X[,<Y])")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def pins(name: str) -> dict[str, str]:
    """A constraints file's `name==version` lines by canonical name (its -c lines and comments left out)."""
    found = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            package, _, version = line.partition("==")
            assert version, f"{name}: {line!r} is not name==version"
            found[canonical(package)] = version
    return found


def third_party_imports(paths: list[Path]) -> dict[str, set[str]]:
    """Top-level module → the files importing it, for every import (lazy ones too) that is not stdlib or ours."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in {"spotguard", "__future__"}:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def declared(requirements: list[str]) -> set[str]:
    return {canonical(re.split(r"[\s\[<>=!~;]", r.strip(), maxsplit=1)[0]) for r in requirements}


# ---------------------------------------------------------------------- the tests


def test_every_third_party_module_spotguard_imports_is_declared():
    distributions = importlib.metadata.packages_distributions()
    base = declared(PROJECT["dependencies"])
    lab = base | declared(PROJECT["optional-dependencies"]["lab"])
    package = ROOT / "spotguard"
    lab_files = sorted((package / "lab").rglob("*.py"))
    imported = {"production": third_party_imports(sorted(set(package.rglob("*.py")) - set(lab_files))),
                "lab": third_party_imports(lab_files)}
    assert {"aiobotocore", "botocore", "aiohttp", "prometheus_client"} <= imported["production"].keys()
    missing = []
    for where, allowed in (("production", base), ("lab", lab)):
        for module, files in sorted(imported[where].items()):
            owners = {canonical(d) for d in distributions.get(module, [])}
            if not owners & allowed:
                missing.append(f"{module} (from {sorted(owners) or 'no installed distribution'}): {sorted(files)}")
    assert missing == [], "imported but not declared in pyproject:\n" + "\n".join(missing)


def test_constraints_pin_exactly_what_a_production_install_pulls_but_certifi():
    from packaging.requirements import Requirement

    closure: dict[str, str] = {}
    todo = [Requirement(r) for r in PROJECT["dependencies"]]
    while todo:
        requirement = todo.pop()
        name = canonical(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if name in closure:
            continue
        closure[name] = importlib.metadata.version(name)
        for text in importlib.metadata.requires(name) or []:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in requirement.extras or {""}):
                todo.append(child)
    production = pins("constraints.txt")
    assert NOT_PINNED_FOR_PRODUCTION <= closure.keys(), "certifi is no longer pulled: drop the exception"
    assert production.keys() == closure.keys() - NOT_PINNED_FOR_PRODUCTION, (
        f"pinned, not pulled: {sorted(production.keys() - closure.keys())}; "
        f"pulled, not pinned: {sorted(closure.keys() - production.keys() - NOT_PINNED_FOR_PRODUCTION)}")
    stale = {name: (pin, closure[name]) for name, pin in production.items() if closure[name] != pin}
    assert stale == {}, f"constraints.txt differs from what is installed (make install): {stale}"


def test_the_dev_constraints_add_the_tools_on_top_of_the_production_ones():
    lines = (ROOT / "constraints-dev.txt").read_text().splitlines()
    assert "-c constraints.txt" in lines
    production, dev = pins("constraints.txt"), pins("constraints-dev.txt")
    assert production.keys().isdisjoint(dev.keys()), "pinned in both files"
    assert "certifi" in dev  # the tests and the lab run on a fixed CA bundle; production does not
    extras = declared(PROJECT["optional-dependencies"]["dev"]) | declared(PROJECT["optional-dependencies"]["lab"])
    assert extras <= dev.keys(), f"dev or lab extra not pinned: {sorted(extras - dev.keys())}"
    assert "cfn-lint" in declared(PROJECT["optional-dependencies"]["dev"])  # tests run .venv/bin/cfn-lint
    assert "constraints-dev.txt" in (ROOT / "Makefile").read_text()


def test_every_dependency_has_a_lower_bound_to_test():
    bounds = lower_bounds()
    assert len(bounds) == len(PROJECT["dependencies"])
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.]*", b) for b in bounds), bounds
    assert PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]  # PEP 639: license = "SPDX expression"
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]


# ---------------------------------------------------------------------- the archives (make package-check)

DIST = os.environ.get("SPOTGUARD_DIST")


def _archives() -> tuple[list[str], list[str], str]:
    import pytest

    if not DIST:
        pytest.skip("SPOTGUARD_DIST is not set: `make package-check` builds the archives and checks them")
    import spotguard

    version = spotguard.__version__
    sdist, wheel = Path(DIST) / f"spotguard-{version}.tar.gz", Path(DIST) / f"spotguard-{version}-py3-none-any.whl"
    assert sdist.exists() and wheel.exists(), sorted(p.name for p in Path(DIST).iterdir())
    with tarfile.open(sdist) as archive:
        prefix = f"spotguard-{version}/"
        assert all(n.startswith(prefix) or n == prefix[:-1] for n in archive.getnames())
        in_sdist = [n[len(prefix):] for n in archive.getnames() if archive.getmember(n).isfile()]
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = archive.namelist()
        metadata = archive.read(f"spotguard-{version}.dist-info/METADATA").decode()
    return in_sdist, in_wheel, metadata


def _source_files(*folders: str) -> set[str]:
    return {str(p.relative_to(ROOT)) for folder in folders for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_the_sdist_holds_what_its_tests_need():
    in_sdist, _, _ = _archives()
    top = {"LICENSE", "README.md", "Makefile", "MANIFEST.in", "pyproject.toml", "config.example.toml",
           "constraints.txt", "constraints-dev.txt"}
    needed = top | _source_files("spotguard", "tests", "bench", "docs", "systemd")
    assert not needed - set(in_sdist), sorted(needed - set(in_sdist))
    assert {"tests/conftest.py", "tests/events/index.json", "systemd/spotguard.service"} <= set(in_sdist)
    noise = [n for n in in_sdist if "__pycache__" in n or n.endswith(".pyc")
             or n.split("/")[0] in {".ci", ".git", ".venv", ".hypothesis", ".pytest_cache", ".ruff_cache", "build"}]
    assert noise == []


def test_the_wheel_holds_the_package_and_its_data_only():
    _, in_wheel, metadata = _archives()
    import spotguard

    dist_info, data = f"spotguard-{spotguard.__version__}.dist-info/", f"spotguard-{spotguard.__version__}.data/"
    # The package, its metadata, and the docs the systemd units' Documentation= names under the prefix.
    stray = [n for n in in_wheel if not n.startswith(("spotguard/", dist_info, data + "data/share/doc/spotguard/"))]
    assert stray == []
    package = _source_files("spotguard")
    assert package <= set(in_wheel), sorted(package - set(in_wheel))
    assert {"spotguard/data/traces.json", "spotguard/data/ec2/2016-11-15/service-2.json"} <= set(in_wheel)
    assert f"{dist_info}licenses/LICENSE" in in_wheel
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert f"Version: {spotguard.__version__}" in metadata.splitlines()


if __name__ == "__main__":
    if sys.argv[1:] != ["--lower-bounds"]:
        sys.exit("usage: tests/test_packaging.py --lower-bounds")
    print("\n".join(lower_bounds()))
