"""The demo model's rebuild chain: rounds in order, each from the one before, resumable."""
from __future__ import annotations

import json

import pytest

from lmaczs_cli.demo import chain
from lmaczs_cli.demo.chain import ROUNDS, ChainError, Round, run_chain

TINY_CLAP = ("--clap-steps", "1", "--clap-batch", "2", "--scenes", "4", "--singles", "2", "--report-scenes", "2")
TINY_DEC = ("--decoder-scenes", "2", "--decoder-epochs", "1", "--decoder-batch", "2", "--decoder-levels", "2",
            "--decoder-skip-gate", "--report-scenes", "2")


class _FakeBuild:
    """Stands in for build.main: records each argv and writes what the round would."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, argv):
        self.calls.append(argv)
        out = argv[argv.index("--out") + 1]
        if self.fail_on and out.endswith(self.fail_on):
            raise RuntimeError("stopped")
        from pathlib import Path

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        if "--clap-only" in argv:
            (folder / "clap.safetensors").write_text(out)
            (folder / "clap.json").write_text("{}")
        else:
            assert (folder / "clap.safetensors").is_file()         # the decoder round runs in a copy of its CLAP
            (folder / "decoder.safetensors").write_text(out)
            (folder / "config.json").write_text("{}")
        (folder / "build.json").write_text("{}")


SMALL = (
    Round("a", "clap", ("--x",), 1.0),
    Round("b", "clap", ("--y",), 1.0, start="a"),
    Round("d", "decoder", ("--z",), 1.0, clap="a"),
    Round("e", "decoder", (), 1.0, clap="b", start="d", any_clap=True),
)


def test_rounds_run_in_order_each_from_the_one_before_and_the_last_model_is_copied_out(tmp_path):
    build = _FakeBuild()
    last = run_chain(tmp_path / "w", tmp_path / "model", SMALL, build=build, log=lambda s: None)
    w = tmp_path / "w"
    assert last == w / "e"
    assert build.calls[0] == ["--out", str(w / "a"), "--work", str(w / "w-clap"), "--clap-only", "--x"]
    assert build.calls[1][-3:] == ["--clap-init", str(w / "a"), "--y"]
    assert build.calls[2] == ["--out", str(w / "d"), "--work", str(w / "w-d"), "--skip-clap", "--z"]
    assert build.calls[3][-3:] == ["--decoder-init", str(w / "d"), "--decoder-init-any-clap"]
    model = tmp_path / "model"
    assert (model / "clap.safetensors").read_text() == str(w / "b")      # e ran in a copy of CLAP b
    assert (model / "decoder.safetensors").read_text() == str(w / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "w"]          # no staging folder left
    assert json.loads((w / "e" / chain.DONE).read_text())["argv"] == build.calls[3]


def test_a_stopped_chain_resumes_at_the_round_it_stopped_in(tmp_path):
    w = tmp_path / "w"
    with pytest.raises(RuntimeError, match="stopped"):
        run_chain(w, None, SMALL, build=_FakeBuild(fail_on="/d"), log=lambda s: None)
    (w / "d" / "half-written.bin").write_text("x")
    again = _FakeBuild()
    run_chain(w, None, SMALL, build=again, log=lambda s: None, threads=2)
    assert [c[1].rsplit("/", 1)[1] for c in again.calls] == ["d", "e"]
    assert not (w / "d" / "half-written.bin").exists()            # the stopped round started over
    assert not (w / "d" / chain.STARTED).exists() and json.loads((w / "d" / chain.DONE).read_text())["threads"] == 2
    nothing = _FakeBuild()
    run_chain(w, None, SMALL, build=nothing, log=lambda s: None)
    assert nothing.calls == []


def test_nothing_the_chain_did_not_make_is_deleted_and_changed_rounds_are_not_reused(tmp_path):
    w = tmp_path / "w"
    (w / "b").mkdir(parents=True)
    (w / "b" / "mine.txt").write_text("keep")                     # a folder of the user's, named like a round
    with pytest.raises(ChainError, match="not a round of this chain"):
        run_chain(w, None, SMALL, build=_FakeBuild(), log=lambda s: None)
    assert (w / "b" / "mine.txt").read_text() == "keep" and not (w / "a").exists()
    (w / "b" / "mine.txt").unlink()
    (w / "b").rmdir()
    run_chain(w, None, SMALL, build=_FakeBuild(), log=lambda s: None)
    changed = (SMALL[0], Round("b", "clap", ("--other",), 1.0, start="a"), *SMALL[2:])
    with pytest.raises(ChainError, match="other options"):
        run_chain(w, None, changed, build=_FakeBuild(), log=lambda s: None)


def test_until_stops_after_the_round_and_bad_chains_and_outputs_are_refused(tmp_path):
    build = _FakeBuild()
    assert run_chain(tmp_path / "w", None, SMALL, until="b", build=build, log=lambda s: None) == tmp_path / "w" / "b"
    assert len(build.calls) == 2
    with pytest.raises(ChainError, match="no round 'z'"):
        run_chain(tmp_path / "w", None, SMALL, until="z", build=build)
    with pytest.raises(ChainError, match="needs an earlier CLAP round"):
        run_chain(tmp_path / "w", None, (Round("d", "decoder", (), 1.0, clap="a"),), build=build)
    with pytest.raises(ChainError, match="not an earlier decoder round"):
        run_chain(tmp_path / "w", None, (SMALL[0], Round("d", "decoder", (), 1.0, clap="a", start="a")), build=build)
    with pytest.raises(ChainError, match="listed twice"):
        run_chain(tmp_path / "w", None, (SMALL[0], SMALL[0]), build=build)
    with pytest.raises(ChainError, match="set any_clap"):
        run_chain(tmp_path / "w", None, (*SMALL[:3], Round("e", "decoder", (), 1.0, clap="b", start="d")), build=build)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    with pytest.raises(ChainError, match="not an empty folder"):
        run_chain(tmp_path / "w", taken, SMALL, build=build)
    assert (taken / "mine.txt").read_text() == "keep"
    a_file = tmp_path / "model.bin"
    a_file.write_text("keep")
    with pytest.raises(ChainError, match="not an empty folder"):
        run_chain(tmp_path / "w", a_file, SMALL, build=build)
    assert a_file.read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    run_chain(tmp_path / "w", empty, SMALL, build=build, log=lambda s: None)
    assert (empty / "decoder.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model.bin", "taken", "w"]   # no staging left


def test_the_bundled_recipe_is_a_valid_chain_whose_options_build_accepts():
    from lmaczs_cli.demo import build

    chain.check(ROUNDS)
    parser_errors = []
    for r in ROUNDS:
        try:
            build.parse_args(r.argv(chain.Path("w")))
        except SystemExit as e:
            parser_errors.append((r.name, e.code))
    assert parser_errors == []
    assert ROUNDS[0].start is None and ROUNDS[-1].kind == "decoder"
    shipped = json.loads((chain.Path(build.__file__).parent / "model" / "build.json").read_text())["decoder"]
    last = build.parse_args(ROUNDS[-1].argv(chain.Path("w")))   # the last round is the bundled decoder's
    assert shipped["init"] == ROUNDS[-1].start
    recipe = {"texts": last.decoder_texts, "events": last.decoder_events, "epochs": last.decoder_epochs,
              "batch_size": last.decoder_batch, "lr": last.decoder_lr, "lr_schedule": last.decoder_lr_schedule,
              "lambda_sparsity": last.lambda_sparsity, "lambda_diversity": last.lambda_diversity,
              "lambda_out": last.lambda_out, "lambda_overlap": last.lambda_overlap, "lambda_reach": last.lambda_reach,
              "lambda_absent": last.lambda_absent, "text_readout": last.decoder_text_readout,
              "group_by_audio": last.decoder_group_by_audio, "mask_noise": last.decoder_mask_noise,
              "hard_mask": last.decoder_hard_mask, "hard_grad": last.decoder_hard_grad,
              "hard_floor_db": last.decoder_hard_floor_db, "logit_bound": last.decoder_logit_bound,
              "logmel_skip": not last.decoder_no_logmel_skip, "levels": last.decoder_levels,
              "skip_gate": last.decoder_skip_gate, "init_any_clap": last.decoder_init_any_clap}
    assert {k: shipped[k] for k in recipe} == recipe
    assert set(shipped) == set(recipe) | {"init"}                 # every recorded setting compared


def test_a_tiny_chain_runs_with_the_real_build(tmp_path, monkeypatch):
    from lmaczs_cli.demo import build

    monkeypatch.setattr(build, "zero_shot_accuracy", lambda model, per_class, seed: {"accuracy": 0.5})
    monkeypatch.setattr(build, "presence_report", lambda model: {"scene": 0.0})
    monkeypatch.setattr(build, "plan_objective", lambda model, **kw: {})
    rounds = (Round("c", "clap", TINY_CLAP, 1.0), Round("c2", "clap", TINY_CLAP, 1.0, start="c"),
              Round("d", "decoder", TINY_DEC, 1.0, clap="c2"))
    run_chain(tmp_path / "w", tmp_path / "model", rounds, log=lambda s: None)
    model = tmp_path / "model"
    assert {"clap.safetensors", "clap.json", "decoder.safetensors", "config.json", "build.json"} <= {
        p.name for p in model.iterdir()}
    history = json.loads((model / "build.json").read_text())["clap_history"]
    assert len(history) == 2 and history[1].startswith(f"1 steps from {tmp_path / 'w' / 'c'}")
