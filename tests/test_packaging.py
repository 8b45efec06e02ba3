"""The package builds as a wheel with everything a user installs, and the README's installation
section matches pyproject.toml (the package is installed from a clone: it is not on the index)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def packages() -> list[str]:
    """Top-level packages pyproject.toml ships (its `find` include patterns, applied to the repository)."""
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()
                  and any(re.fullmatch(pattern.replace("*", ".*"), p.name) for pattern in include))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """`pip wheel --no-deps` of a copy of the packaging inputs (no build/ or egg-info left in the clone)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in packages():
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # Offline: the venv's setuptools builds it (no isolated build environment to download).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(source)], check=True, capture_output=True, text=True, timeout=300)
    (built,) = out.glob("serial_lora-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_holds_every_package_module_and_package_data(wheel):
    names = set(wheel.namelist())
    expected = {str(p.relative_to(ROOT)) for name in packages() for p in (ROOT / name).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
                and (p.suffix == ".py" or p.name in package_data_files(name))}
    assert expected, "no packages found"
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert {"serial_lora_core", "timm_plugin", "diffusers_loader", "comfyui_nodes", "transformers_plugin",
            "serial_lora_train"} <= set(packages())
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/", "third_party/"))]


def package_data_files(package: str) -> set[str]:
    return set(PYPROJECT["tool"]["setuptools"].get("package-data", {}).get(package, []))


def test_wheel_declares_the_command_and_every_extra(wheel):
    dist_info = next(n.split("/")[0] for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert re.search(r"^serial-lora\s*=\s*serial_lora_core\.cli:main$", entry_points, re.M)
    metadata = wheel.read(f"{dist_info}/METADATA").decode()
    extras = set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.M))
    assert extras == set(PYPROJECT["project"]["optional-dependencies"])


def installation_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Installation\n(.*?)^## ", text, re.M | re.S)
    assert match, "README.md has no '## Installation' section"
    return match.group(1)


def test_readme_installs_from_a_clone_and_lists_every_extra():
    section = installation_section()
    assert 'pip install -c constraints.txt ".[timm]"' in section
    for doc in ("README.md", "comfyui_nodes/README.md"):  # not on the package index: no "pip install serial-lora"
        assert not re.search(r"pip install [\"']?serial-lora\b", (ROOT / doc).read_text()), doc
    missing = [e for e in PYPROJECT["project"]["optional-dependencies"] if f"`{e}`" not in section]
    assert not missing, f"extras of pyproject.toml not described in README's Installation section: {missing}"


def test_constraints_stay_inside_the_repository():
    for name in ("constraints.txt", "requirements.txt", "scripts/comfyui-runtime.txt", ".ci/run"):
        text = (ROOT / name).read_text()
        assert "../" not in text and "/shared" not in text, f"{name} refers outside the repository"
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["torch"] == "2.13.0"
