"""Entry points: a user's mistake is one line, a bug a traceback; --help everywhere; installs that
cannot work are refused; every third-party import is a declared dependency."""

from __future__ import annotations

import ast
import importlib.metadata
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from stages.pipeline import cli
from stages.tools.constraints import PROJECT
from tests.conftest import PROJECT_ROOT, STAGES
from tests.test_pipeline import make_repo

ENTRY_POINTS = sorted(
    ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    for path in (PROJECT_ROOT / "stages").rglob("*.py")
    if 'if __name__ == "__main__":' in path.read_text()
)


def test_every_stage_and_tool_is_an_entry_point_that_runs_through_cli() -> None:
    stages = [m for m in ENTRY_POINTS if not m.startswith("stages.tools.")]
    assert stages == sorted(f"stages.{s}" for s in STAGES)
    assert len(ENTRY_POINTS) - len(stages) >= 7  # the tools
    for module in ENTRY_POINTS:
        source = (PROJECT_ROOT / Path(*module.split("."))).with_suffix(".py").read_text()
        assert "cli.run(main" in source.split('if __name__ == "__main__":')[1], module


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-runs it
@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_says_what_the_command_reads_and_writes(
    module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert done.value.code == 0
    out = capsys.readouterr().out
    doc = ast.get_docstring(
        ast.parse((PROJECT_ROOT / Path(*module.split("."))).with_suffix(".py").read_text())
    )
    assert out.startswith(f"usage: python -m {module}")
    assert doc.splitlines()[0] in out
    assert "reads" in out.lower() and "writes" in out.lower(), f"{module}: say what it reads/writes"


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def user_mistake() -> None:
        raise cli.UserError("params.yaml: x = 2 is invalid: expected 1")

    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
    with pytest.raises(SystemExit) as done:
        cli.run(user_mistake)
    assert done.value.code == 1
    assert capsys.readouterr().err.endswith(": params.yaml: x = 2 is invalid: expected 1\n")

    monkeypatch.setenv(cli.TRACEBACK_VARIABLE, "1")  # the switch: the user error raises as is
    with pytest.raises(cli.UserError, match="x = 2 is invalid"):
        cli.run(user_mistake)

    monkeypatch.delenv(cli.TRACEBACK_VARIABLE)
    with pytest.raises(ZeroDivisionError):  # a bug is never turned into a message
        cli.run(lambda: 1 / 0)


def _python(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python <args>`` in ``cwd``, output captured (these tests expect it to fail)."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _edit_params(repo: Path, section: str, **values: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _prune_ratio(repo: Path) -> None:
    _edit_params(repo, "prune", ratio=1.5)


def _no_upstream_model(repo: Path) -> None:
    (repo / "models").mkdir(exist_ok=True)


def _corrupt_checkpoint(repo: Path) -> None:
    (repo / "models").mkdir(exist_ok=True)
    (repo / "models" / "sparse.pt").write_bytes(b"half of a checkpoint")


def _wrong_sha256(repo: Path) -> None:
    (repo / "weights.pt").write_bytes(b"someone else's weights")
    _edit_params(repo, "baseline", model="weights.pt", weights_sha256="0" * 64)


def _missing_raw_data(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dataset"]["source"] = "visdrone"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


USER_ERRORS = {
    # kind: (command, set-up, what stderr must say)
    "bad param": ("stages.prune", _prune_ratio, "prune: params.yaml: prune.ratio = 1.5 is invalid"),
    "missing dataset": ("stages.baseline", None, "baseline: ", "dataset.yaml not found: run"),
    "missing upstream model": (
        "stages.prune",
        _no_upstream_model,
        "prune: ",
        "sparse.pt not found",
    ),
    "corrupt checkpoint": ("stages.prune", _corrupt_checkpoint, "not an ultralytics checkpoint"),
    "sha256 mismatch": ("stages.baseline", _wrong_sha256, "baseline: ", "sha256 is"),
    "missing raw data": ("stages.dataset", _missing_raw_data, "dataset: ", "not found"),
    "tool without inputs": ("stages.tools.pr_comment", None, "pr_comment: dvc.lock not found"),
}


@pytest.fixture(scope="module")
def fresh_checkout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the project that has run nothing: no data, no models, no dvc.lock."""
    return make_repo(tmp_path_factory.mktemp("cli"), {})


@pytest.mark.parametrize("kind", USER_ERRORS)
def test_each_kind_of_user_error_exits_non_zero_with_a_message_not_a_traceback(
    kind: str, fresh_checkout: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    checkout, env = fresh_checkout
    repo = tmp_path / "repo"
    subprocess.run(["cp", "-a", str(checkout), str(repo)], check=True)
    env = {**env, "PYTHONPATH": str(repo)}
    env.pop(cli.TRACEBACK_VARIABLE, None)
    module, setup, *expected = USER_ERRORS[kind]
    if setup:
        setup(repo)
    done = _python(["-m", module], repo, env)
    assert done.returncode == 1, done.stderr
    print(done.stderr.splitlines()[-1])  # the message, shown with `pytest -s`
    assert "Traceback" not in done.stderr
    for text in expected:
        assert text in done.stderr, done.stderr

    if kind == "bad param":  # the documented switch shows where it came from
        env[cli.TRACEBACK_VARIABLE] = "1"
        done = _python(["-m", module], repo, env)
        assert done.returncode == 1 and "Traceback" in done.stderr
        assert "ParamsError: params.yaml: prune.ratio = 1.5" in done.stderr


def test_a_genuine_bug_in_a_subprocess_shows_its_traceback(
    fresh_checkout: tuple[Path, dict[str, str]],
) -> None:
    repo, env = fresh_checkout
    done = _python(["-c", "from stages.pipeline import cli; cli.run(lambda: 1 / 0)"], repo, env)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr


def test_a_non_editable_install_is_refused_before_it_writes_anything(
    fresh_checkout: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    repo, env = fresh_checkout
    site = tmp_path / "site-packages"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(repo),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    done = _python(["-m", "stages.prune"], elsewhere, {**env, "PYTHONPATH": str(site)})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"stages: {site} has no dvc.yaml or params.yaml" in done.stderr
    assert "pip install -e ." in done.stderr
    assert not (site / ".cache").exists()  # nothing was written into site-packages


def _third_party_imports(root: Path) -> set[str]:
    """Top-level names of every module imported by the code under ``root`` (static imports and
    importlib.import_module("...") with a literal name), minus the standard library and ours."""
    names: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names.add(node.args[0].value)
    tops = {name.split(".")[0] for name in names}
    return {n for n in tops if n not in sys.stdlib_module_names and n != "stages"}


def test_every_third_party_import_of_stages_is_a_declared_dependency() -> None:
    # pyproject.toml's dependencies and extras, as installed (a test of tests/test_runtime.py
    # checks that the install is current); the `test` extra is not there when the pipeline runs.
    requirements = [Requirement(r) for r in importlib.metadata.requires(PROJECT) or []]
    declared = {
        canonicalize_name(r.name)
        for r in requirements
        if r.marker is None or not r.marker.evaluate({"extra": "test"})
    }
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in sorted(_third_party_imports(PROJECT_ROOT / "stages")):
        # A module that is not installed here (tensorrt) must be named as its distribution is.
        dists = {canonicalize_name(d) for d in providers.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(dists)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert {"thop", "cv2", "PIL", "yaml"} <= _third_party_imports(PROJECT_ROOT / "stages")
