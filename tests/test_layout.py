"""The checkout's own top-level folders must not shadow installed packages.

Commands run from the repository root (`python -m lmaczs_cli`, torchrun, bench/run.py) put it first
on sys.path, so a top-level package folder there hides an installed distribution of the same import
name: transformers >= 5.25 imports `kernels` (Hugging Face's). Our top-level `kernels/` (installed as
`lmaczs_cli.kernels`) therefore hands the top-level name over to the installed package when it is
imported under it.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_package_folder_shares_an_installed_import_name():
    installed = importlib.metadata.packages_distributions()
    ours = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} - {"kernels"}
    clashes = {name: installed[name] for name in ours if set(installed.get(name, ["lmaczs"])) != {"lmaczs"}}
    assert not clashes, f"repository folders shadow installed packages: {clashes}"


def test_top_level_kernels_name_goes_to_the_installed_package_from_the_repository_root():
    code = ("import kernels, lmaczs_cli.kernels.istft as ours; "
            "print(getattr(kernels, '__file__', '') or ''); print(ours.__file__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if "kernels" not in importlib.metadata.packages_distributions():
        assert "No module named 'kernels'" in res.stderr          # nothing installed under that name
        return
    assert res.returncode == 0, res.stderr
    top, ours = res.stdout.split("\n")[:2]
    assert not top.startswith(str(ROOT / "kernels")), top       # the installed distribution's package
    assert ours == str(ROOT / "kernels" / "istft.py")           # ours, under lmaczs_cli


def test_kernels_sit_at_the_top_level_beside_export():
    assert (ROOT / "kernels" / "istft.py").is_file() and (ROOT / "export" / "to_onnx.py").is_file()
    assert not (ROOT / "lmaczs_cli" / "kernels").exists()
