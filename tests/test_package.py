"""The package as a user gets it: models, losses, datasets and evaluation import without
Hydra; ``UserError`` is segtrain's own; the repository names no path outside itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from segtrain.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ["segtrain.core", "segtrain.models", "segtrain.losses", "segtrain.data", "segtrain.eval"]


def test_models_losses_data_and_eval_import_without_hydra():
    code = (
        "import importlib, pkgutil, sys\n"
        f"for pkg in {LIBRARY!r}:\n"
        "    path = importlib.import_module(pkg).__path__\n"
        "    for m in pkgutil.walk_packages(path, pkg + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'hydra', 'omegaconf'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_user_error_is_segtrains_own_exception():
    # no Hydra class among its bases: catching it needs nothing but segtrain
    for cls in (UserError, ConfigError):
        assert all(not base.__module__.startswith("hydra") for base in cls.__mro__), cls.__mro__
    assert issubclass(ConfigError, ValueError)


def test_configs_are_installed_as_segtrains_data_and_found_from_any_directory(tmp_path):
    """A regular (non-editable) install: the wheel holds conf/ as segtrain/conf (no top-level
    ``conf`` package; predict's conf_predict/ likewise), and ``python -m segtrain`` run
    elsewhere composes an experiment."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info into it
    for name in ("segtrain", "conf", "conf_predict"):
        shutil.copytree(REPO / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel")],
                   cwd=tmp_path, capture_output=True, text=True, check=True)
    (wheel,) = (tmp_path / "wheel").glob("segtrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    configs = sorted(p.relative_to(REPO).as_posix() for folder in ("conf", "conf_predict")
                     for p in (REPO / folder).rglob("*.y*ml"))
    assert {f"segtrain/{c}" for c in configs} <= set(names)
    assert {n.split("/")[0] for n in names} == {"segtrain", wheel.name.split("-py3")[0]
                                                 + ".dist-info"}
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = ("import segtrain, sys; from segtrain.__main__ import main; print(segtrain.__file__);"
            " sys.argv = ['segtrain', 'experiment=deeplabv2_voc', '--cfg', 'job']; main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(tmp_path / "site" / "segtrain")), proc.stdout
    assert "segtrain.data.voc.VOCSegmentation" in proc.stdout


def test_the_repository_names_no_path_outside_itself():
    """Docs, configs and code point inside the repository (the tests find a real CamVid in
    one conftest fixture); no file names the machine the project was made on."""
    import re

    outside = re.compile(r"/work/|\.\./shared|shared/data|DESIGN\.md|paper_numbers\.md")
    files = [REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml",
             *(REPO / "docs").rglob("*.md"), *(REPO / "conf").rglob("*.y*ml"),
             *(REPO / "scripts").rglob("*.py"), *(REPO / "segtrain").rglob("*.py"),
             *(p for p in (REPO / "tests").glob("*.py")
               if p.name not in ("conftest.py", "test_package.py"))]
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
             for i, line in enumerate(p.read_text().splitlines(), 1) if outside.search(line)]
    assert not found, "\n".join(found)
    assert (REPO / "docs" / "architecture.md").is_file()
    assert "(docs/architecture.md)" in (REPO / "README.md").read_text()
