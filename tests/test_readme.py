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
