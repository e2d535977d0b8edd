"""Man pages are generated from the click definitions, checked in, up to date, and render."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmaczs_cli import manpages
from lmaczs_cli.cli import main

ROOT = Path(__file__).resolve().parents[1]
MAN = ROOT / "man"
COMMANDS = ["train", "export", "explain", "merge", "eval", "info"]


def test_every_command_has_a_checked_in_page_equal_to_a_fresh_one():
    pages = manpages.all_pages(main)
    assert set(pages) == {"lmaczs.1", *(f"lmaczs-{c}.1" for c in COMMANDS)} | (
        {f"lmaczs-{c}.1" for c in main.commands if c not in COMMANDS})
    stale = manpages.stale_pages(MAN, pages)
    assert not stale, f"out of date: {stale}; run `python -m lmaczs_cli.manpages --out man`"


def test_check_mode_fails_on_a_stale_page_and_write_mode_fixes_it(tmp_path):
    for page in MAN.glob("*.1"):
        shutil.copy(page, tmp_path / page.name)
    (tmp_path / "lmaczs-info.1").write_text((tmp_path / "lmaczs-info.1").read_text().replace("versions", "versoins"))
    (tmp_path / "lmaczs-gone.1").write_text(".TH GONE 1\n")
    assert manpages.main(["--out", str(tmp_path), "--check"]) == 1
    assert manpages.main(["--out", str(tmp_path)]) == 0
    assert manpages.main(["--out", str(tmp_path), "--check"]) == 0
    assert not (tmp_path / "lmaczs-gone.1").exists()


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("page", ["lmaczs.1", *(f"lmaczs-{c}.1" for c in main.commands)])  # completion too
def test_page_renders_without_warnings(page):
    res = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN / page)],
                         capture_output=True, text=True, env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and res.stderr == "", res.stderr
    if shutil.which("man"):
        text = subprocess.run(["man", "-l", str(MAN / page)], capture_output=True, text=True,
                              env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}).stdout
        for heading in ("NAME", "SYNOPSIS", "OPTIONS", "EXAMPLES", "SEE ALSO"):
            assert heading in text, (page, heading)


def test_roff_escape_protects_requests_and_backslashes():
    text = manpages.roff_escape(".SH not a heading\n'also not\npath C:\\tmp --opt")
    assert text.splitlines() == ["\\&.SH not a heading", "\\&'also not", "path C:\\etmp \\-\\-opt"]


def test_pages_carry_each_option_and_example_of_the_help():
    pages = manpages.all_pages(main)
    for name, cmd in main.commands.items():
        page = pages[f"lmaczs-{name}.1"]
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-") and not getattr(param, "hidden", False):
                    assert manpages.roff_escape(opt) in page, (name, opt)
        assert "\n.SH EXAMPLES\n" in page and f"lmaczs {name}" in page.split(".SH EXAMPLES")[1]


def test_the_wheel_installs_the_man_pages_and_the_bundled_model(tmp_path):
    """What `pip install .` installs: a wheel built from the sources (pip's own build, in a copy)
    carries every man page under share/man/man1 and the demo model and examples as package data,
    and none of recipes/ (the demo CLAP's training, the chain, the lab notes).
    (`pip install -e .` installs no data files; read the pages there with `man -l man/...`.)"""
    import zipfile

    src = tmp_path / "src"       # the checkout without what git ignores (stale build/ output would leak in)
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", ".whl", "explanations"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                          str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("lmaczs-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    pages = sorted(n.rsplit("/", 1)[1] for n in names if "/data/share/man/man1/" in n)
    assert pages == sorted(p.name for p in MAN.glob("*.1")) and "lmaczs-explain.1" in pages
    for data in ("lmaczs_cli/demo/model/clap.safetensors", "lmaczs_cli/demo/model/decoder.safetensors",
                 "lmaczs_cli/demo/model/config.json"):
        assert data in names, data
    assert any(n.startswith("lmaczs_cli/demo/examples/") and n.endswith(".flac") for n in names)
    assert "lmaczs_cli/export/trt_ops.json" in names and "lmaczs_cli/export/to_trt.py" in names
    # the world that tests and `eval --data demo` use ships; how the demo CLAP was trained does not
    for module in ("lmaczs_cli/demo/world.py", "lmaczs_cli/demo/events.py", "lmaczs_cli/demo/scores.py",
                   "lmaczs_cli/demo/dataset.py"):
        assert module in names, module
    assert not [n for n in names if n.startswith("recipes/") or n.endswith(".md")
                or n.rsplit("/", 1)[-1] in ("build.py", "chain.py", "clap_losses.py")]
    wheel_zip = zipfile.ZipFile(wheel)
    trains_a_clap = [n for n in names if n.endswith(".py") and any(
        word in wheel_zip.read(n).decode() for word in ("def train_clap", "def presence_loss", "\nROUNDS"))]
    assert trains_a_clap == []


def test_generator_runs_as_a_module(tmp_path):
    res = subprocess.run([sys.executable, "-m", "lmaczs_cli.manpages", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.glob("*.1")) == sorted(manpages.all_pages(main))


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F _lmaczs_completion lmaczs"),
                                           ("zsh", "#compdef lmaczs"), ("fish", "complete --no-files --command lmaczs")])
def test_completion_prints_the_shell_script(shell, marker):
    from click.testing import CliRunner

    res = CliRunner().invoke(main, ["completion", shell])
    assert res.exit_code == 0 and marker in res.output and "_LMACZS_COMPLETE" in res.output


def _complete(words: str, cword: int) -> list[str]:
    import os

    env = {**os.environ, "_LMACZS_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    res = subprocess.run([sys.executable, "-m", "lmaczs_cli"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_bash_completion_completes_commands_options_and_choices():
    assert _complete("lmaczs ex", 1) == ["plain,explain", "plain,export"]
    assert _complete("lmaczs explain --backend ", 3) == ["plain,torch", "plain,onnx", "plain,trt"]
    assert "plain,--prompt" in _complete("lmaczs explain --pro", 2)
