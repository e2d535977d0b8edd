"""The `lmaczs` command line: help, version, exit codes, `info`, and the CI's README commands."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import lmaczs_cli
from lmaczs_cli.audio import AudioError
from lmaczs_cli.cli import CLAP_HELP, main

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["train", "export", "explain", "merge", "eval", "info", "completion"]
MODEL_COMMANDS = ["train", "export", "explain", "eval"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _example_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("lmaczs ")]


def test_version_prints_package_version(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"lmaczs {lmaczs_cli.__version__}\n"


def test_group_help_explains_and_lists_every_command(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "LMAC-ZS" in result.output
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", result.output, re.M), command
    assert set(main.commands) == set(COMMANDS)
    assert len(_example_lines(result.output)) >= 3


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_an_example(runner: CliRunner, command: str) -> None:
    result = runner.invoke(main, [command, "--help"])
    assert result.exit_code == 0
    examples = _example_lines(result.output)
    assert examples and all(line.startswith(f"lmaczs {command}") for line in examples)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_example_parses(runner: CliRunner, command: str, tmp_path: Path, monkeypatch) -> None:
    """Each example in --help is a command line click accepts in full: its options exist and
    take the values shown. The files and folders it names are made first (in a scratch folder),
    since click stops at the first bad parameter and a missing path would hide the rest."""
    import shlex

    monkeypatch.chdir(tmp_path)
    cmd = main.commands[command]
    for line in _example_lines(runner.invoke(main, [command, "--help"], terminal_width=300).output):
        words = shlex.split(line.split(" #")[0])[2:]
        redirect = [i for i, w in enumerate(words) if w.startswith((">", "|"))]
        args = words[: redirect[0]] if redirect else words          # the shell's part is not ours
        for _ in range(len(args) + 1):
            try:
                cmd.make_context(command, list(args))
                break
            except click.BadParameter as e:
                missing = re.search(r"'([^']+)' does not exist", e.format_message())
                if not missing or not isinstance(e.param.type, click.Path):
                    pytest.fail(f"{line}: {e.format_message()}")
                path = Path(missing.group(1))
                if e.param.type.file_okay and (path.suffix or not e.param.type.dir_okay):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("")
                else:
                    path.mkdir(parents=True)
            except click.ClickException as e:
                pytest.fail(f"{line}: {e.format_message()}")
        else:
            pytest.fail(f"{line}: still refused after making the paths it names")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_model_commands_share_the_clap_options(runner: CliRunner, command: str) -> None:
    result = runner.invoke(main, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "--clap" in result.output and "--tokenizer DIRECTORY" in result.output
    assert CLAP_HELP in result.output
    assert "[default: demo]" in result.output


def test_missing_required_option_is_a_usage_error(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["explain", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "Missing option '--prompt' / '-p'" in result.stderr


def test_eval_rejects_an_unknown_method(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(
        main, ["eval", "--data", str(tmp_path), "--methods", "lmaczs,lime", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "Invalid value for '--methods': unknown method(s) lime" in result.stderr


@pytest.fixture
def failing_command():
    """A throwaway subcommand whose library call raises a domain error."""

    @click.command(name="fail-audio")
    def fail_audio() -> None:
        raise AudioError("not a sound file", "clip.ogg")

    main.add_command(fail_audio)
    yield "fail-audio"
    del main.commands["fail-audio"]


def test_domain_errors_become_one_line_with_exit_2(runner: CliRunner, failing_command: str) -> None:
    result = runner.invoke(main, [failing_command])
    assert result.exit_code == 2
    assert result.stderr == "Error: not a sound file: clip.ogg\n"
    assert "Traceback" not in result.output


def test_debug_lets_the_traceback_through(runner: CliRunner, failing_command: str) -> None:
    result = runner.invoke(main, ["--debug", failing_command])
    assert isinstance(result.exception, AudioError) and result.exit_code == 1
    proc = subprocess.run([sys.executable, "-m", "lmaczs_cli", "--debug", "merge", str(REPO / "man")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("lmaczs_cli.inputs.ExplainError: ")


@pytest.fixture
def raising_command():
    """A throwaway subcommand that raises what its --what option names."""

    @click.command(name="raise")
    @click.option("--what")
    def raise_(what: str) -> None:
        if what == "ctrl-c":
            raise KeyboardInterrupt
        raise PermissionError(13, "Permission denied", "/data/out/x.wav")

    main.add_command(raise_)
    yield "raise"
    del main.commands["raise"]


def test_ctrl_c_exits_130_with_one_line(runner: CliRunner, raising_command: str) -> None:
    result = runner.invoke(main, [raising_command, "--what", "ctrl-c"])
    assert result.exit_code == 130
    assert result.stderr == "interrupted; what finished is kept\n"


def test_an_os_error_on_a_path_is_one_line_with_exit_2(runner: CliRunner, raising_command: str) -> None:
    result = runner.invoke(main, [raising_command, "--what", "os"])
    assert result.exit_code == 2
    assert result.stderr == ("Error: /data/out/x.wav: Permission denied; check the path and its permissions "
                             "(--debug shows where it happened)\n")


def test_exit_codes_are_one_table_in_help_and_readme(runner: CliRunner) -> None:
    from lmaczs_cli.cli import EXIT_CODES

    assert [c for c, _ in EXIT_CODES] == [0, 1, 2, 130]
    text = runner.invoke(main, ["--help"], terminal_width=200).output
    listed = re.findall(r"^\s+(\d+)\s{2,}(.+)$", text.split("Exit codes:")[1].split("Options:")[0], re.M)
    assert listed == [(str(c), m) for c, m in EXIT_CODES]
    readme = (REPO / "README.md").read_text()
    assert re.findall(r"^\| (\d+) \| (.+) \|$", readme, re.M) == [(str(c), m) for c, m in EXIT_CODES]


def test_info_json_is_one_object_with_versions_device_and_caches(runner: CliRunner) -> None:
    result = runner.invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["lmaczs"] == lmaczs_cli.__version__
    assert report["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["platform"]
    expected = {"torch", "torchvision", "laion-clap", "numpy", "soundfile", "libsndfile",
                "soxr", "onnx", "onnxruntime", "tensorrt", "triton"}
    assert set(report["packages"]) == expected
    assert all(isinstance(v, str) and v for v in report["packages"].values())
    assert report["packages"]["torch"].startswith("2.")
    assert "CPUExecutionProvider" in report["onnxruntime_providers"]
    device = report["device"]
    assert device["device"] in {"cpu", "cuda"}
    assert device["cuda_available"] == (device["device"] == "cuda")
    assert device["cuda_device_count"] == len(device["cuda_devices"])
    assert device["torch_threads"] >= 1
    assert {"hf_hub_cache", "torch_hub", "lmaczs_cache"} <= set(report["caches"])


def test_info_never_imports_laion_clap(runner: CliRunner) -> None:
    # laion_clap's __init__ builds hub tokenizers: minutes, and the network.
    already = "laion_clap" in sys.modules
    result = runner.invoke(main, ["info"])
    assert result.exit_code == 0
    assert already or "laion_clap" not in sys.modules


def test_info_table_names_versions_and_device(runner: CliRunner) -> None:
    result = runner.invoke(main, ["info"], terminal_width=200)
    assert result.exit_code == 0
    for label in ("lmaczs", "torch", "laion-clap", "libsndfile", "onnxruntime providers",
                  "torch device", "torch threads", "hf_hub_cache"):
        assert label in result.stdout


def test_info_reports_cuda_devices_when_present(runner: CliRunner, monkeypatch) -> None:
    from lmaczs_cli import environment

    monkeypatch.setattr(environment, "cuda_devices", lambda: ["Fake GPU 0", "Fake GPU 1"])
    report = json.loads(runner.invoke(main, ["info", "--json"]).stdout)
    assert report["device"]["device"] == "cuda"
    assert report["device"]["cuda_devices"] == ["Fake GPU 0", "Fake GPU 1"]
    table = runner.invoke(main, ["info"], terminal_width=200).stdout
    assert "cuda: 2 x Fake GPU 0, Fake GPU 1" in table


def _run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "lmaczs_cli", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )


def test_python_dash_m_runs_the_cli() -> None:
    proc = _run_module("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"lmaczs {lmaczs_cli.__version__}\n"
    usage = _run_module("--help")
    assert usage.stdout.startswith("Usage: lmaczs ")


def _readme_commands() -> dict[str, str]:
    """The command after each `<!-- setup:NAME -->` marker: first non-empty line of its block."""
    lines = (REPO / "README.md").read_text().splitlines()
    commands: dict[str, str] = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!-- setup:(\w+) -->", line)
        if not m:
            continue
        assert lines[i + 1].startswith("```"), f"marker {line} is not followed by a fenced block"
        body = [b for b in lines[i + 2:] if b.strip()]
        assert m.group(1) not in commands, f"marker {line} appears twice"
        assert not body[0].startswith("```"), f"the block after {line} is empty"
        commands[m.group(1)] = body[0]
    return commands


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = _readme_commands()
    assert list(commands) == ["run", "test"]
    assert commands["run"].startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && ")
    assert "pytest" in commands["test"] and "'.[test]'" in commands["test"]


def test_ci_prints_exactly_the_readme_commands() -> None:
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    proc = subprocess.run([str(ci), "--print-commands"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = _readme_commands()
    assert proc.stdout == f"{commands['run']}\n{commands['test']}\n"


def _ci_in(tmp_path: Path, readme: str, *args: str) -> subprocess.CompletedProcess:
    """Run a copy of .ci/run in tmp_path (not a git checkout) with the given README."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_bytes((REPO / ".ci" / "run").read_bytes())
    (tmp_path / "README.md").write_text(readme)
    return subprocess.run(["bash", str(tmp_path / ".ci" / "run"), *args],
                          capture_output=True, text=True, timeout=60)


def _setup_readme(run: str, test: str) -> str:
    return f"# x\n\n<!-- setup:run -->\n```bash\n{run}\n```\n\n<!-- setup:test -->\n```bash\n\n{test}\n```\n"


def test_ci_refuses_a_readme_without_its_markers(tmp_path: Path) -> None:
    proc = _ci_in(tmp_path, "# x\n\n<!-- setup:run -->\n```bash\necho hi\n```\n", "--print-commands")
    assert proc.returncode == 1
    assert "has 1 '<!-- setup:' markers; expected 2" in proc.stderr


def test_ci_runs_both_commands_in_a_scratch_copy_and_reports_times(tmp_path: Path) -> None:
    proc = _ci_in(tmp_path, _setup_readme("echo ran > proof && test ! -e .venv", "cat proof"))
    assert proc.returncode == 0, proc.stderr
    assert "+ echo ran > proof && test ! -e .venv\n" in proc.stdout
    assert "+ cat proof\nran\n" in proc.stdout
    assert "== pip install time: 0.0 s" in proc.stdout
    assert "== total elapsed: " in proc.stdout
    assert not (tmp_path / "proof").exists()  # the repository itself is left alone


def test_ci_fails_when_pytest_collects_no_tests(tmp_path: Path) -> None:
    proc = _ci_in(tmp_path, _setup_readme("true", "exit 5"))
    assert proc.returncode == 1
    assert "collected no tests (exit 5)" in proc.stderr


def test_ci_fails_when_the_first_command_fails(tmp_path: Path) -> None:
    proc = _ci_in(tmp_path, _setup_readme("false", "echo never"))
    assert proc.returncode == 1
    assert "== setup:run: exit 1" in proc.stdout
    assert "+ echo never" not in proc.stdout


def test_resume_refuses_to_change_group_by_audio(runner: CliRunner, tmp_path: Path) -> None:
    from lmaczs_cli.train import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(manifest=str(tmp_path / "m.jsonl"), out=str(run))
    (run / "config.json").write_text(json.dumps({"train": cfg.to_json()}))
    grouped = tmp_path / "grouped.toml"
    grouped.write_text("[data]\ngroup_by_audio = true\n")
    result = runner.invoke(main, ["train", "--resume", str(run), "--config", str(grouped)])
    assert result.exit_code == 2
    assert "[data] group_by_audio cannot change on --resume" in result.output
    # the decoder's shape is fixed by the checkpoint: a clear refusal, not a state-dict error
    readout = tmp_path / "readout.toml"
    readout.write_text("[decoder]\ntext_readout = true\n")
    result = runner.invoke(main, ["train", "--resume", str(run), "--config", str(readout)])
    assert result.exit_code == 2
    assert "[decoder] text_readout cannot change on --resume: the checkpoint holds a decoder" in result.output
    result = runner.invoke(main, ["train", "--resume", str(run), "--domain", "stft"])
    assert result.exit_code == 2 and "--domain cannot change on --resume" in result.output


def _fresh_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=REPO, check=True).stdout


def test_info_says_what_torch_says_without_importing_it() -> None:
    ours = json.loads(_fresh_python(
        "import json, sys; from lmaczs_cli.environment import collect_info; r = collect_info(); "
        "assert 'torch' not in sys.modules, 'info imported torch'; print(json.dumps(r))"))
    theirs = json.loads(_fresh_python(
        "import json, torch, torch.hub; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda, "
        "'threads': torch.get_num_threads(), 'available': torch.cuda.is_available(), 'hub': torch.hub.get_dir(), "
        "'devices': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}))"))
    assert ours["packages"]["torch"] == theirs["version"]
    dev = ours["device"]
    assert (dev["torch_cuda_version"], dev["torch_threads"]) == (theirs["cuda"], theirs["threads"])
    assert (dev["cuda_available"], dev["cuda_devices"]) == (theirs["available"], theirs["devices"])
    assert ours["caches"]["torch_hub"] == theirs["hub"]


def test_help_and_package_import_load_no_heavy_module() -> None:
    loaded = _fresh_python(
        "import sys, lmaczs_cli; from lmaczs_cli.cli import main; "
        "print(' '.join(m for m in ('torch', 'numpy', 'soundfile', 'rich', 'transformers') if m in sys.modules))")
    assert loaded.strip() == ""


def test_a_validation_fraction_that_rounds_to_no_clip_says_so(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    from lmaczs_cli import train as training

    cfg = training.TrainConfig(manifest="m.jsonl", out="o", val_fraction=0.1)
    assert training.validation_note(40, cfg) is None                             # 4 clips: a pass
    assert training.validation_note(12, cfg) == (
        "--val-fraction 0.1 of 12 clips is 1 clip, fewer than the 2 a validation pass needs: training on all 12 "
        "clips without validation (give --val-data FILE, or a --val-fraction that holds out 2 or more)")
    assert training.validation_note(12, training.TrainConfig(manifest="m", out="o", val_fraction=0.0)) is None

    def fake_train(cfg, resume=False, on_event=None, clap=None):       # the loop's events, without the loop
        on_event({"event": "start", "total_steps": 6, "done_steps": 0, "per_epoch": 3, "train_clips": 12,
                  "val_clips": 0, "rank": 0, "world": 1, "decoder_parameters": 10,
                  "val_note": training.validation_note(12, cfg)})
        return {"out": cfg.out, "steps": 6, "skipped": 0}

    monkeypatch.setattr(training, "train", fake_train)
    (tmp_path / "m.jsonl").write_text("")
    result = runner.invoke(main, ["train", "--data", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "run")],
                           terminal_width=400)
    assert result.exit_code == 0, result.output
    printed = " ".join(result.stderr.split())                    # rich wraps lines to the terminal
    assert f"note: {training.validation_note(12, cfg)}" in printed
