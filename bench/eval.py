"""The method x metric tables of `lmaczs eval` on the demo world, clean and contaminated, with
the cost side (seconds per clip per method: LMAC-ZS one decoder pass; IG and SmoothGrad many
encoder passes), and the published report.

    python bench/eval.py --n 16 --out /tmp/eval-bench                # selection split, for choosing
    python bench/eval.py --frozen --out results/frozen --readme README.md   # the published report

Variants: clean (with the randomisation and prompt-sensitivity studies), white-noise, mix
(another scene of the set), speech (English sentences spoken by espeak-ng, shipped with the
package: `lmaczs_cli.demo.speech`) and speech-in-domain (the demo world's own formant
"speech-like voice", an event kind the demo CLAP knows: not out of domain), each at --snr dB.
Each variant is its own `lmaczs eval` run under OUT/<variant> (resumable).

Without --frozen the runs read the *selection* split (`--data demo`): the scenes every choice of
recipe, threshold and model is made on; all tables are printed at the end, plus one JSON line per
variant with seconds per clip per method.

--frozen reads the frozen *test* split (`--data demo-test`, `lmaczs_cli.demo.scores.SPLITS`), which
nothing else reads, and writes the report every results figure of README.md is copied from:
OUT/<variant>/ (metrics.json/csv/md, plots, per-clip records; the clean run also insertion and
deletion curves at equal budgets, curves.md/png), OUT/localization.json (the demo tests' bounds —
mask mass on the event, absent / matched mask means, similarity gap — and LMAC-ZS's masks under
cascading randomisation, on the same split), OUT/report.md (every table), OUT/report.json (every
figure, with the exact command, the date, the machine and the package versions). With --readme
FILE the block between ``<!-- frozen-report:begin -->`` and ``<!-- frozen-report:end -->`` in FILE
is replaced by report.md, so the README's tables are the report's.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmaczs_cli.baselines import BaselineSettings
from lmaczs_cli.demo.speech import SPOKEN_DIR
from lmaczs_cli.evaluate import METHODS, EvalConfig, run_eval

VARIANTS = ("clean", "white-noise", "mix", "speech", "speech-in-domain")
NAMES = {"lmaczs": "LMAC-ZS", "gradcam": "GradCAM", "gradcam++": "GradCAM++", "smoothgrad": "SmoothGrad",
         "ig": "IG"}
DATA_NAMES = {"clean": "clean", "white-noise": "+ white noise", "mix": "+ another scene",
              "speech": "+ speech (espeak-ng)", "speech-in-domain": "+ in-domain formant speech"}
README_BEGIN, README_END = "<!-- frozen-report:begin -->", "<!-- frozen-report:end -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frozen", action="store_true",
                    help="the published report on the frozen test split (default: the selection split)")
    ap.add_argument("--n", type=int, default=None, help="demo scenes per variant (default 16; --frozen 32)")
    ap.add_argument("--out", default=None, help="default /tmp/lmaczs-eval-bench; --frozen results/frozen")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--snr", type=float, default=3.0)
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--smoothgrad-samples", type=int, default=25)
    ap.add_argument("--study-clips", type=int, default=None, help="default 2; --frozen 8")
    ap.add_argument("--localization-scenes", type=int, default=48,
                    help="--frozen: scenes of the localization report (as the demo tests' bounds)")
    ap.add_argument("--clap", default="demo")
    ap.add_argument("--decoder", default=None, help="a `lmaczs train` folder; default the bundled decoder")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the figures' machine: 2 cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--readme", type=Path, default=None,
                    help="--frozen: replace the report block of this file (README.md) with report.md")
    args = ap.parse_args()
    if args.readme and not args.frozen:
        ap.error("--readme copies the frozen report; add --frozen")
    n = args.n or (32 if args.frozen else 16)
    study_clips = args.study_clips or (8 if args.frozen else 2)
    out = Path(args.out or ("results/frozen" if args.frozen else "/tmp/lmaczs-eval-bench"))
    torch.set_num_threads(args.threads)
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    speech_dir = os.path.relpath(SPOKEN_DIR)           # the shipped clips, read in place
    made = f"English sentences spoken by {json.loads((SPOKEN_DIR / 'sources.json').read_text())['program']}"
    settings = BaselineSettings(ig_steps=args.ig_steps, smoothgrad_samples=args.smoothgrad_samples)
    runs: dict[str, dict[str, Any]] = {}
    for variant in args.variants.split(","):
        clean = variant == "clean"
        cfg = EvalConfig(data="demo-test" if args.frozen else "demo", out=str(out / variant),
                         methods=tuple(args.methods.split(",")), clap=args.clap, decoder=args.decoder, limit=n,
                         device=args.device, contaminate=None if clean else variant, snr=args.snr,
                         speech=speech_dir if variant == "speech" else None, randomization=clean,
                         prompt_sensitivity=clean, study_clips=study_clips, curves=clean and args.frozen,
                         baselines=settings)
        t = time.perf_counter()
        runs[variant] = {"summary": run_eval(cfg), "wall_s": round(time.perf_counter() - t, 1)}
    if not args.frozen:
        _print_selection_tables(out, runs, n, args, f"{speech_dir} ({made})")
        return
    t = time.perf_counter()
    localization = localization_study(args.clap, args.decoder, args.device, args.localization_scenes, study_clips)
    localization["wall_s"] = round(time.perf_counter() - t, 1)
    (out / "localization.json").write_text(json.dumps(localization, indent=2) + "\n", encoding="utf-8")
    report = {"command": "python " + shlex.join(sys.argv), "date": started.strftime("%Y-%m-%d %H:%M UTC"),
              "wall_s": round(time.perf_counter() - t0, 1), "machine": machine(args.threads),
              "model": model_identity(args.clap, args.decoder), "split": "test (frozen)", "scenes": n,
              "study_clips": study_clips, "snr_db": args.snr, "speech": made,
              "baselines": {"ig_steps": args.ig_steps, "smoothgrad_samples": args.smoothgrad_samples},
              "variants": {v: {"wall_s": r["wall_s"], **r["summary"]} for v, r in runs.items()},
              "localization": localization}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    md = report_markdown(report, out)
    (out / "report.md").write_text(md, encoding="utf-8")
    if args.readme:
        replace_block(args.readme, md)
    print(md)


def _print_selection_tables(out: Path, runs: dict[str, dict[str, Any]], n: int, args: argparse.Namespace,
                            speech: str) -> None:
    print("\n".join(f"### {v}\n\n" + (out / v / "metrics.md").read_text() for v in runs))
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "ig_steps": args.ig_steps, "smoothgrad_samples": args.smoothgrad_samples, "speech": speech}))
    for v, r in runs.items():
        s = r["summary"]
        print(json.dumps({"variant": v, "wall_s": r["wall_s"], "clips": n, "accuracy": s["accuracy"],
                          "seconds_per_clip": {m: round(x["time_per_clip_s"], 3) for m, x in s["methods"].items()},
                          **({"randomization_ssim": s["studies"]["randomization"]["ssim"],
                              "prompt_sensitivity": s["studies"]["prompt_sensitivity"]} if v == "clean" else {})}))


def localization_study(clap: str, decoder: str | None, device: str, n_scenes: int, study_clips: int) -> dict[str, Any]:
    """The demo tests' localization figures and LMAC-ZS's masks under cascading randomisation,
    on the frozen test split."""
    from lmaczs_cli.demo import scores, world
    from lmaczs_cli.explain import Explainer

    explainer = Explainer.load(clap=clap, decoder=decoder, device=device)
    rows = scores.prompt_rows(explainer, n_scenes, split="test")
    grid = scores.background_rows(explainer, split="test")
    white3 = scores.background_rows(explainer, ("white",), (3.0,), split="test")
    return {"scenes": n_scenes, "report": scores.localization_report(None, rows=rows),
            "by_event": scores.by_event(rows),
            "randomization": {"scenes": study_clips,
                              "stages": scores.cascading_report(explainer, study_clips, split="test")},
            "generalisation": {"snrs": list(scores.SNRS), "backgrounds": list(world.UNSEEN_BACKGROUNDS),
                               "grid": scores.background_summary(grid),
                               "white_3db": scores.background_summary(white3).get("all")}}   # None: all buried


def machine(threads: int) -> dict[str, Any]:
    """CPU model, cores, torch threads, and the versions the figures depend on."""
    from lmaczs_cli.environment import collect_info

    info = collect_info()
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "gpu": torch.cuda.is_available(),
            "platform": info["platform"], "python": info["python"], "lmaczs": info["lmaczs"],
            "packages": {k: info["packages"][k] for k in ("torch", "laion-clap", "numpy", "onnxruntime")}}


def model_identity(clap: str, decoder: str | None) -> dict[str, Any]:
    """Which CLAP and decoder: names, the SHA-256 of the decoder's weights file, and its
    `decoder_hash` (config and weights: what tells two operating points of one decoder apart)."""
    from lmaczs_cli.clap import demo_dir
    from lmaczs_cli.decoder import decoder_hash, load_decoder
    from lmaczs_cli.files import sha256_file

    folder = Path(decoder) if decoder else demo_dir()
    weights = folder / "decoder.safetensors"
    dec = load_decoder(folder)[0] if weights.is_file() else None
    return {"clap": clap, "decoder": str(decoder) if decoder else "bundled demo decoder",
            "decoder_sha256": sha256_file(weights) if weights.is_file() else None,
            "decoder_hash": decoder_hash(dec) if dec is not None else None,
            "logit_bias": dec.cfg.logit_bias if dec is not None else None}


def _decoder_id(model: dict[str, Any]) -> str:
    """The decoder as the report header names it: its decoder_hash and operating point where the
    report records them (reports written before, the weights file's sha256 alone)."""
    if model.get("decoder_hash"):
        return f"decoder_hash {model['decoder_hash'][:12]}, logit bias {model['logit_bias']:g}"
    return f"sha256 {str(model['decoder_sha256'])[:12]}"


def _known(v: Any) -> bool:
    """A figure that was measured: not None (JSON) and not NaN."""
    return v is not None and v == v


def _f(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if _known(v) else "nan"


def report_markdown(report: dict[str, Any], out: Path) -> str:
    """Every table of the frozen report, with the command that made it; paths relative to the
    repository root when OUT lies inside it."""
    rel = _relative(out)
    m = report["machine"]
    clean = report["variants"].get("clean")
    parts = [f"Frozen test split ({report['scenes']} scenes; models are chosen on the selection split: this one "
             "reports them, and the demo tests' small slice of it can reject a chosen model), "
             f"`{report['command']}`, {report['date']}, {m['cpu']} ({m['cores']} cores, {m['torch_threads']} "
             f"torch threads), torch {m['packages']['torch']}, laion-clap {m['packages']['laion-clap']}; "
             f"{report['model']['decoder']} ({_decoder_id(report['model'])}); "
             f"IG {report['baselines']['ig_steps']} steps, SmoothGrad {report['baselines']['smoothgrad_samples']} "
             f"samples; {report['wall_s'] / 60:.0f} min in all. Artifacts: `{rel}/`.", ""]
    if clean:
        parts += [f"**Faithfulness and localization** (`{rel}/clean/metrics.md`), each method at its own mask:", "",
                  (out / "clean" / "metrics.md").read_text(encoding="utf-8").strip(), ""]
        if (out / "clean" / "curves.md").is_file():
            parts += [f"**Equal budgets** (`{rel}/clean/curves.md`, plot `{rel}/clean/curves.png`): every "
                      "method's mask cut to its top q % of cells:", "",
                      (out / "clean" / "curves.md").read_text(encoding="utf-8").strip(), "",
                      curve_leaders(clean["curves"]["methods"]), ""]
    parts += [ood_table(report), ""]
    parts += [localization_table(report["localization"]), ""]
    if "generalisation" in report["localization"]:
        parts += [generalisation_table(report["localization"]["generalisation"]), ""]
    if clean and "randomization" in clean["studies"]:
        parts += [randomization_table(clean["studies"]["randomization"], report["localization"]["randomization"],
                                      report["study_clips"], rel), ""]
    if clean and "prompt_sensitivity" in clean["studies"]:
        ps = clean["studies"]["prompt_sensitivity"]
        parts += [f"**Prompt sensitivity** ({report['study_clips']} scenes x 14 prompts, "
                  f"`{rel}/clean/prompt_sensitivity.png`): mask mean matched / mismatched, Pearson r with the "
                  "prompt's similarity: " + "; ".join(
                      f"{NAMES.get(k, k)} {_f(v['mask_mean_matched'])} / {_f(v['mask_mean_mismatched'])}, "
                      f"r {_f(v['pearson_r'], 2)}" for k, v in ps.items()) + ".", ""]
    return "\n".join(parts)


def curve_leaders(methods: dict[str, dict[str, Any]]) -> str:
    """Which method leads each area, and where LMAC-ZS stands."""
    def ranking(key: str, higher: bool) -> list[str]:
        return sorted(methods, key=lambda m: methods[m][key], reverse=higher)

    words = []
    for key, higher, label in (("insertion_auc", True, "insertion area"), ("deletion_auc", False, "deletion area")):
        order = ranking(key, higher)
        best = order[0]
        where = "" if best == "lmaczs" or "lmaczs" not in order else \
            f"; LMAC-ZS is {order.index('lmaczs') + 1} of {len(order)} ({_f(methods['lmaczs'][key])})"
        words.append(f"{label}: {NAMES.get(best, best)} leads ({_f(methods[best][key])}){where}")
    return "At equal budgets, " + "; ".join(words) + "."


def ood_table(report: dict[str, Any]) -> str:
    """Zero-shot accuracy, chance, and per method loc_mass / AD for every variant."""
    variants = report["variants"]
    methods = list(next(iter(variants.values()))["methods"])
    lines = [f"**Out of domain** (contamination at {report['snr_db']:g} dB SNR; speech: {report['speech']}). "
             "loc_mass ↑ / AD ↓ (%) per method, best loc_mass in bold:", "",
             "| data | zero-shot | chance | " + " | ".join(NAMES.get(x, x) for x in methods) + " |",
             "|---|---:|---:|" + "---:|" * len(methods)]
    for v, run in variants.items():
        rows = run["methods"]
        located = [x for x in methods if _known(rows[x]["loc_mass"])]     # none where ĉ has no truth
        best = max(located, key=lambda x: rows[x]["loc_mass"], default=None)
        cells = [("**{}**" if x == best else "{}").format(_f(rows[x]["loc_mass"])) + f" / {_f(rows[x]['AD'], 1)}"
                 for x in methods]
        chance = rows[methods[0]]["loc_chance"]
        lines.append(f"| {DATA_NAMES.get(v, v)} | {run['accuracy']:.1f} % | {_f(chance)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def localization_table(loc: dict[str, Any]) -> str:
    r = loc["report"]
    return "\n".join([
        f"**LMAC-ZS localization** ({loc['scenes']} scenes, every present event's prompt and one absent prompt "
        "per scene; the bounds the demo tests hold the bundled model to on the selection split):", "",
        "| mass on event ↑ | chance | absent ÷ matched mask mean ↓ | similarity gap ↓ (max) | prompt corr "
        "| empty masks |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {_f(r['mass'])} | {_f(r['chance'])} | {_f(r['ratio'])} ({_f(r['absent'])} / {_f(r['matched'])}) | "
        f"{_f(r['gap'])} ({_f(r['gap_max'])}) | {_f(r['prompt_corr'])} | {_f(r['empty'], 2)} |"])


def generalisation_table(gen: dict[str, Any]) -> str:
    """LMAC-ZS over backgrounds no training recipe used: mass on the event (chance) / absent ÷
    matched per background and SNR, their averages, and white noise at 3 dB."""
    snrs, kinds, grid = gen["snrs"], gen["backgrounds"], gen["grid"]

    def cell(key: str) -> str:
        v = grid.get(key)
        return f"{_f(v['mass'])} ({_f(v['chance'])}) / {_f(v['ratio'], 2)}" if v else "—"

    w3 = gen["white_3db"]
    white = (f"mass {_f(w3['mass'])}, {w3['mass'] / max(w3['chance'], 1e-12):.1f} x chance ({_f(w3['chance'])})"
             if w3 else "no composition could be scored (the noise owns the events' cells)")
    lines = ["**Unseen backgrounds** (one event of each kind over noise no training recipe used, "
             "`scores.background_rows`): LMAC-ZS's mass on the event (chance) / absent ÷ matched mask mean:", "",
             "| SNR | " + " | ".join(kinds) + " |", "|---:|" + "---|" * len(kinds)]
    lines += [f"| {snr:g} dB | " + " | ".join(cell(f"{k} @ {snr:g} dB") for k in kinds) + " |" for snr in snrs]
    lines.append(f"| {snrs[0]:g}-{snrs[-1]:g} dB | " + " | ".join(cell(f"{k} (all)") for k in kinds) + " |")
    a = grid["all"]
    lines.append(f"\nAveraged over the three kinds and {len(snrs)} SNRs ({a['n']} compositions): mass "
                 f"{_f(a['mass'])} (chance {_f(a['chance'])}), absent ÷ matched {_f(a['ratio'])}; white noise at "
                 f"3 dB: {white}.")
    lines += ["", "**Does CLAP itself hear the event?** The share of these compositions on which CLAP's zero-shot "
              "scores rank the event's prompt first of the 14 event prompts (chance 0.07); where it does not, "
              "the classifier cannot tell the matched prompt from an absent one, and neither can a faithful "
              "explanation:", "",
              "| SNR | " + " | ".join(kinds) + " |", "|---:|" + "---:|" * len(kinds)]
    lines += [f"| {snr:g} dB | " + " | ".join(_f(grid[f"{k} @ {snr:g} dB"]["heard"], 2)
                                               if f"{k} @ {snr:g} dB" in grid else "—" for k in kinds) + " |"
              for snr in snrs]
    h = a.get("when_heard")
    lines.append("\n" + (f"Over the {h['n']} compositions CLAP ranks first ({a['heard']:.0%}): LMAC-ZS's mass "
                         f"{_f(h['mass'])} (chance {_f(h['chance'])}), absent ÷ matched {_f(h['ratio'])}."
                         if h else "CLAP ranks the event first on none of them."))
    return "\n".join(lines)


def randomization_table(study: dict[str, Any], lmaczs: dict[str, Any], clips: int, rel: str) -> str:
    """SSIM to the intact masks per cumulatively re-initialised stage, every method; LMAC-ZS's
    mass on the event and mask mean beside it."""
    stages = study["stages"]
    lines = [f"**Cascading randomisation** (`{rel}/clean/randomization.png`; stages re-initialised from the top, "
             f"cumulatively): every method's SSIM to the intact model's masks for ĉ on the first {clips} scenes; "
             f"LMAC-ZS's mass on each scene's first event for that event's prompt, {lmaczs['scenes']} scenes:", "",
             "| re-initialised down to | " + " | ".join(f"SSIM {NAMES.get(m, m)}" for m in study["ssim"])
             + " | LMAC-ZS mass on event (chance) | LMAC-ZS mask mean |",
             "|---|" + "---:|" * (len(study["ssim"]) + 2)]
    for i, stage in enumerate(stages):
        mine = lmaczs["stages"].get(stage, {})
        lines.append(f"| {stage} | " + " | ".join(_f(v[i]) for v in study["ssim"].values())
                     + f" | {_f(mine.get('mass'))} ({_f(mine.get('chance'))}) | {_f(mine.get('mask_mean'))} |")
    intact = lmaczs["stages"]["intact"]
    lines.append(f"\nIntact: LMAC-ZS mass on event {_f(intact['mass'])} (chance {_f(intact['chance'])}), "
                 f"mask mean {_f(intact['mask_mean'])}.")
    return "\n".join(lines)


def _relative(out: Path) -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        return str(out.resolve().relative_to(root))
    except ValueError:
        return str(out)


def replace_block(path: Path, md: str) -> None:
    """Put md between the report markers of path (which must hold them once each)."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"{path}: needs one {README_BEGIN} ... {README_END} block for the report")
    path.write_text(pattern.sub(lambda _: f"{README_BEGIN}\n{md.strip()}\n{README_END}", text), encoding="utf-8")


if __name__ == "__main__":
    main()
