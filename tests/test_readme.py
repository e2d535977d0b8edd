"""The README's first set-up command really explains the bundled sounds with the demo model."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import soundfile as sf
from click.testing import CliRunner

from lmaczs_cli.cli import main

REPO = Path(__file__).resolve().parents[1]


def _readme_command(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- setup:{marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert m, f"README has no setup:{marker} block"
    return m.group(1).strip()


def test_readme_run_command_explains_bundled_examples(tmp_path, monkeypatch):
    command = _readme_command("run")
    explain = next(part.strip() for part in command.split("&&") if part.strip().startswith("lmaczs explain"))
    args = shlex.split(explain)[1:]
    out = tmp_path / "explanations"
    args[args.index("--out") + 1] = str(out)
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    prompts = [args[i + 1] for i, a in enumerate(args) if a in ("--prompt", "-p")]
    examples = sorted((REPO / "lmaczs_cli" / "demo" / "examples").glob("*.flac"))
    wavs = sorted(out.rglob("*.wav"))
    assert len(examples) >= 2 and len(wavs) == len(examples) * len(prompts)
    for wav in wavs:
        info = sf.info(str(wav))
        assert info.samplerate == 48_000 and abs(info.duration - 10.0) < 1e-3
    assert (out / "index.html").is_file() and (out / "results.jsonl").is_file()


def test_readme_python_section_runs(tmp_path, monkeypatch):
    """The README's "From Python" block, run as written from the repository's files."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- python-api -->\s*```python\n(.+?)\n```", text, re.S)
    assert m, "README has no python-api block"
    for name in ("lmaczs_cli",):
        (tmp_path / name).symlink_to(REPO / name)          # the example paths, read from the checkout
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(m.group(1), "README.md", "exec"), scope)
    siren = scope["siren"]
    assert siren.mask.shape == (1001, 64) and siren.times.shape == (1001,) and siren.freqs.shape == (64,)
    assert siren.sample_rate == 48_000 and 0 <= siren.mask.min() and siren.mask.max() <= 1
    info = sf.info(str(tmp_path / "explanations-py" / "example1.siren.wav"))
    assert info.samplerate == 48_000 and abs(info.duration - 10.0) < 1e-3
