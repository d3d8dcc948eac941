"""The runtime set-up: offline ultralytics, everything inside the project, all CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stages.pipeline.outputs import atomic_path, write_json
from stages.pipeline.runtime import CACHE_DIR, cpu_threads


def test_environment_is_offline_and_inside_the_project() -> None:
    assert os.environ["YOLO_OFFLINE"] == "1"
    assert os.environ["YOLO_AUTOINSTALL"] == "false"
    for var in ("YOLO_CONFIG_DIR", "MPLCONFIGDIR", "TORCH_HOME", "XDG_CACHE_HOME", "TMPDIR"):
        assert Path(os.environ[var]).is_relative_to(CACHE_DIR), var
    from ultralytics.utils import USER_CONFIG_DIR
    from ultralytics.utils.checks import check_font

    assert USER_CONFIG_DIR.is_relative_to(CACHE_DIR)
    for font in ("Arial.ttf", "Arial.Unicode.ttf"):  # found locally: no download (no network here)
        found = check_font(font)
        assert found == USER_CONFIG_DIR / font and found.stat().st_size > 10_000


def test_ultralytics_settings_and_threads() -> None:
    import torch
    import ultralytics.utils as ul_utils

    import stages.yolo  # noqa: F401

    assert ul_utils.SETTINGS["sync"] is False
    assert Path(ul_utils.SETTINGS["runs_dir"]).is_relative_to(CACHE_DIR)
    assert not ul_utils.is_online()
    from ultralytics.utils.torch_utils import select_device

    select_device("cpu", verbose=False)  # ultralytics resets the thread count here
    assert torch.get_num_threads() == cpu_threads()


def test_atomic_path_keeps_the_old_output_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_text("good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_atomic_path_replaces_folders_whole(tmp_path: Path) -> None:
    target = tmp_path / "data"
    (target / "old").mkdir(parents=True)
    with atomic_path(target) as tmp:
        (tmp / "new").mkdir(parents=True)
    assert [p.name for p in target.iterdir()] == ["new"]
    write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n'


def test_kernels_are_capped_to_avx2_where_the_cpu_has_it_and_a_user_value_wins() -> None:
    import subprocess
    import sys

    from stages.pipeline.runtime import KERNEL_CAPS, PROJECT_ROOT, has_avx2

    show = (
        "import os, stages, torch; "
        "print(os.environ.get('ONEDNN_MAX_CPU_ISA'), torch.backends.cpu.get_cpu_capability())"
    )
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CAPS}
    done = subprocess.run(
        [sys.executable, "-c", show], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    if has_avx2():
        assert done.stdout.split() == ["AVX2", "AVX2"]
    else:
        assert done.stdout.split()[0] == "None"
    env["ATEN_CPU_CAPABILITY"] = "default"  # the user's choice is kept
    done = subprocess.run(
        [sys.executable, "-c", show], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert done.stdout.split()[-1] == "DEFAULT"


def test_installed_environment_is_the_pinned_one() -> None:
    """constraints.txt lists exactly the project's dependency closure, and the environment the
    tests run in has those versions (the README's commands install with -c constraints.txt)."""
    import importlib.metadata as metadata

    from stages.pipeline.runtime import PROJECT_ROOT
    from stages.tools.constraints import EXTRAS, PROJECT, closure, render

    pinned = (PROJECT_ROOT / "constraints.txt").read_text()
    assert render(closure(PROJECT, EXTRAS)) == pinned, (
        "constraints.txt is stale: run `python -m stages.tools.constraints > constraints.txt`"
    )
    for line in pinned.splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            assert metadata.version(name).split("+")[0] == version, name
