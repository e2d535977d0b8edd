"""The checkout's own top-level folders must not shadow installed packages.

Commands run from the repository root (`python -m lmaczs_cli`, torchrun, bench/run.py) put it first
on sys.path, so a top-level package folder there hides an installed distribution of the same import
name: transformers >= 5.25 imports `kernels` (Hugging Face's), which a `kernels/` folder here once
shadowed, breaking every CLAP load.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_package_folder_shares_an_installed_import_name():
    installed = importlib.metadata.packages_distributions()
    ours = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    clashes = {name: installed[name] for name in ours if set(installed.get(name, ["lmaczs"])) != {"lmaczs"}}
    assert not clashes, f"repository folders shadow installed packages: {clashes}"


def test_the_kernels_package_is_ours_only_under_lmaczs_cli():
    res = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                          "print(s.origin if s else '')"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert not res.stdout.strip().startswith(str(ROOT / "kernels"))
