"""Packaging: every package folder is listed in pyproject (the root folders map into `distillery`), and
the config tree ships as package data."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapping = setuptools["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == listed, f"add to / remove from pyproject packages: {sorted(found ^ listed)}"


def test_root_folders_import_only_as_distillery_subpackages():
    """`envs`, `policies`, `agents` must never be imported bare (they install under `distillery.`)."""
    offenders = []
    for folder in ("distillery", "envs", "policies", "agents", "benchmarks", "tests"):
        for py in (ROOT / folder).rglob("*.py"):
            for line in py.read_text().splitlines():
                s = line.strip()
                if s.startswith(("from envs", "import envs", "from policies", "import policies", "from agents",
                                 "import agents")):
                    offenders.append(f"{py.relative_to(ROOT)}: {s}")
    assert not offenders, offenders


def test_envs_and_policies_do_not_import_each_other_or_agents():
    """DESIGN.md's import rules: envs/ and policies/ are independent rooms; agents/ joins them."""
    rules = {"envs": ("distillery.policies", "distillery.agents"), "policies": ("distillery.envs", "distillery.agents")}
    offenders = []
    for folder, banned in rules.items():
        for py in (ROOT / folder).rglob("*.py"):
            for line in py.read_text().splitlines():
                if line.strip().startswith(("from ", "import ")) and any(b in line for b in banned):
                    offenders.append(f"{py.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, offenders


def test_config_tree_is_package_data():
    import distillery.configs
    from distillery.config import CONFIG_DIR

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "**/*.yaml" in data["distillery.configs"]
    assert (Path(distillery.configs.__file__).parent / "config.yaml").is_file()
    assert (CONFIG_DIR / "task" / "push_cube.yaml").is_file()
