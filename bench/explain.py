"""Throughput of `lmaczs explain` end to end against its own compute and bare CLAP embedding.

    python bench/explain.py --n 16 --clap random:HTSAT-tiny --batch-size 8 --repeats 3
    python bench/explain.py --demo            # the bundled demo CLAP + decoder

All on N generated 10-s files and one model (a fresh seeded decoder for --clap random:...):
  embed           CLAP audio embedding of the pre-decoded clips (`ClapModel.embed_audio`)
  compute         the explainer alone on the pre-decoded clips (`Explainer.run_windows`),
                  with and without the masked-similarity check (a second encoder pass)
  end_to_end      `run_explain` on the files: discovery, decode workers, model, wav writes,
                  results.jsonl and index.html, into a fresh --out each repeat (no resume)
Prints one JSON object: clips/s medians of --repeats timed runs (after a warm-up) and the
ratios that show where time goes, with their targets (end to end >= 0.9 x compute: files,
decoding and writing hide behind the model; explain without the check >= 0.8 x embed, with it
>= 0.45 x).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from lmaczs_cli.audio import SAMPLE_RATE, load_audio
from lmaczs_cli.explain import Explainer
from lmaczs_cli.runs import ExplainJob, auto_workers, run_explain
from run import clips, timed  # bench/run.py: the shared timing and test clips


def _median_rate(fn, clips: int, repeats: int, sync) -> dict[str, float]:
    r = timed(fn, clips, repeats, sync)
    return {"clips_per_s": round(r["median"], 3), "min": round(r["min"], 3), "max": round(r["max"], 3)}


def _files(folder: Path, n: int) -> list[Path]:
    """n 10-s scenes at 48 kHz (bench/run.py's `clips`) written as 16-bit WAV files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"scene{k:04d}.wav" for k in range(n)]
    for path, wave in zip(paths, clips(n).numpy()):
        sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")
    return paths


def _explainer(args: argparse.Namespace) -> Explainer:
    if args.demo:
        return Explainer.load("demo", device=args.device, batch_size=args.batch_size)
    from lmaczs_cli.clap import load_clap
    from lmaczs_cli.decoder import DecoderConfig, MaskDecoder

    clap = load_clap(args.clap)
    torch.manual_seed(0)
    decoder = MaskDecoder(DecoderConfig.for_clap(clap))
    return Explainer.from_models(clap, decoder, {"domain": "mel", "mel_to_linear": "linear"}, device=args.device,
                     batch_size=args.batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="10-s files")
    ap.add_argument("--clap", default="random:HTSAT-tiny")
    ap.add_argument("--demo", action="store_true", help="the bundled demo CLAP and decoder instead of --clap")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: explain's auto)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ex = _explainer(args)
    sync = torch.cuda.synchronize if ex.device.type == "cuda" else (lambda: None)
    prompt = "a tone"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        paths = _files(tmp / "in", args.n)
        waves = torch.from_numpy(np.stack([load_audio(p) for p in paths]))     # (N, 480000), pre-decoded
        batches = [waves[i: i + args.batch_size] for i in range(0, args.n, args.batch_size)]

        def embed() -> None:
            with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=ex.device.type == "cuda"):
                for b in batches:
                    ex.clap.embed_audio(b.to(ex.device)).cpu()

        def compute(check: bool):
            def run() -> None:
                for b in batches:
                    {k: v.cpu() for k, v in ex.run_windows(b, [prompt], check=check).items()}
            return run

        runs = iter(range(10_000))

        def end_to_end(check: bool):
            def run() -> None:
                out = tmp / f"out{next(runs)}"
                summary = run_explain(ExplainJob(paths=(str(tmp / "in"),), out=str(out), prompts=(prompt,),
                                                 batch_size=args.batch_size, workers=args.workers, check=check),
                                      explainer=ex)
                assert summary["explained"] == args.n and summary["failed"] == 0, summary
            return run

        result = {
            "model": "demo" if args.demo else args.clap, "device": str(ex.device), "n": args.n,
            "batch_size": args.batch_size, "threads": args.threads,
            "workers": auto_workers(ex.device) if args.workers is None else args.workers,
            "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "embed": _median_rate(embed, args.n, args.repeats, sync),
            "compute_check": _median_rate(compute(True), args.n, args.repeats, sync),
            "compute_no_check": _median_rate(compute(False), args.n, args.repeats, sync),
            "end_to_end_check": _median_rate(end_to_end(True), args.n, args.repeats, sync),
            "end_to_end_no_check": _median_rate(end_to_end(False), args.n, args.repeats, sync),
        }
    rate = {k: v["clips_per_s"] for k, v in result.items() if isinstance(v, dict)}
    result["ratios"] = {
        "end_to_end_over_compute_check": round(rate["end_to_end_check"] / rate["compute_check"], 3),
        "end_to_end_over_compute_no_check": round(rate["end_to_end_no_check"] / rate["compute_no_check"], 3),
        "compute_no_check_over_embed": round(rate["compute_no_check"] / rate["embed"], 3),
        "compute_check_over_embed": round(rate["compute_check"] / rate["embed"], 3),
        "end_to_end_no_check_over_embed": round(rate["end_to_end_no_check"] / rate["embed"], 3),
        "end_to_end_check_over_embed": round(rate["end_to_end_check"] / rate["embed"], 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
