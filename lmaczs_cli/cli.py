"""The `lmaczs` command line: a thin shell over the library.

Parsing, progress and exit codes live here; no ML logic does. Heavy modules (torch,
onnxruntime, ...) are imported inside the command that needs them, so `lmaczs --help`
stays fast.

Exit codes (EXIT_CODES, shown in `lmaczs --help`): 0 all done; 1 some inputs failed (each is
listed, the rest done); 2 usage error or an unusable model, file or path: click's own code for
bad options, and every library error (`LmaczsError`) that stops a command, printed as one line
(--debug: with its traceback); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import LmaczsError

EXIT_OK = 0
EXIT_FAILED = 1  # some inputs failed (they are listed)
EXIT_USAGE = 2  # click.UsageError's exit code; also an unusable model file or path
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_CODES = ((EXIT_OK, "all done"),
              (EXIT_FAILED, "some inputs failed (each is listed; the others were done)"),
              (EXIT_USAGE, "usage error, or an unusable model file or path (one line; --debug shows the traceback)"),
              (EXIT_INTERRUPTED, "interrupted (Ctrl-C); finished work is kept"))

# Library exceptions whose message is meant for the user; the CLI prints them as one line
# and exits with EXIT_USAGE. Add each module's domain exception here, from a module that
# imports without torch, so `lmaczs --help` stays fast.
DOMAIN_ERRORS: tuple[type[Exception], ...] = (LmaczsError,)
DEBUG = "lmaczs.debug"   # ctx.meta key: --debug was given

CLAP_HELP = "demo | laion:NAME | PATH (LAION .pt checkpoint or saved CLAP folder) | hf:DIR (transformers ClapModel folder) | random:ARCH"
DEVICE_HELP = "auto | cpu | cuda | cuda:N  [default: auto: cuda when available]"
EVAL_METHODS = ("lmaczs", "gradcam", "gradcam++", "smoothgrad", "ig")


class UnusableError(click.ClickException):
    """A command cannot run as asked: a model file, a path or an option is unusable (exit 2)."""

    exit_code = EXIT_USAGE


class _Group(click.Group):
    """A click group that turns library (domain) errors and unusable paths into one-line
    messages with exit 2, and Ctrl-C into exit 130; --debug lets the traceback through."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            if ctx.meta.get(DEBUG):
                raise
            click.echo("interrupted; what finished is kept", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except DOMAIN_ERRORS as e:
            if ctx.meta.get(DEBUG):
                raise
            raise UnusableError(" ".join(str(e).split())) from e
        except OSError as e:   # a path the library did not check (disk full, permissions changed)
            if ctx.meta.get(DEBUG) or not e.filename:
                raise
            raise UnusableError(f"{e.filename}: {e.strerror or e}; check the path and its permissions "
                                "(--debug shows where it happened)") from e


def _trust_checkpoint(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """--trust-checkpoint: unpickle .pt checkpoints fully for the rest of this command."""
    if value:
        from .clap import trusting_checkpoints

        ctx.with_resource(trusting_checkpoints())


def clap_options(f: Callable) -> Callable:
    """The options that name the CLAP model, shared by every command that loads one."""
    f = click.option(
        "--trust-checkpoint", is_flag=True, expose_value=False, callback=_trust_checkpoint,
        help="Unpickle a .pt --clap checkpoint fully. Without it only tensors and the numpy scalars of "
             "LAION's checkpoints are read, and a file holding anything else is refused: unpickling "
             "can run code. Give it only for a file from a source you trust.",
    )(f)
    f = click.option(
        "--tokenizer",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help="RoBERTa tokenizer directory; else the HF cache.",
    )(f)
    f = click.option(
        "--clap",
        "--clap-ckpt",
        "clap",
        default="demo",
        show_default=True,
        metavar="TEXT",
        help=CLAP_HELP,
    )(f)
    return f


def _device_option(f: Callable) -> Callable:
    return click.option("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)(f)


def _batch_option(default: int) -> Callable[[Callable], Callable]:
    return click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=default,
        show_default=True,
        help="Clips per model batch.",
    )


def _force_option(f: Callable) -> Callable:
    return click.option(
        "--force",
        is_flag=True,
        help="Load a decoder even if it was trained on a different CLAP (of the same architecture: "
             "a decoder whose input shapes do not fit is refused all the same).",
    )(f)


def _parse_methods(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    methods = tuple(m.strip().lower() for m in value.split(",") if m.strip())
    unknown = [m for m in methods if m not in EVAL_METHODS]
    if unknown or not methods:
        raise click.BadParameter(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {','.join(EVAL_METHODS)}"
        )
    return methods


def _exit_code_help() -> str:
    return "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES)


@click.group(name="lmaczs", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="lmaczs", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error instead of its one-line message.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Listenable explanations for zero-shot audio classifiers.

    LAION-CLAP scores an audio clip against any text prompt. LMAC-ZS (Paissan et al.,
    NeurIPS 2024) explains that score with a small decoder that reads the CLAP audio
    encoder's hidden states and the prompt's text embedding and outputs a
    time-frequency mask; the masked input keeps the original audio-text similarities.
    Applied to the spectrogram with the original phase and inverted, the mask is a wav
    you can play: the part of the sound the model used for that prompt.

    Commands: `explain` (listenable explanations of files and folders), `merge` (join
    the per-rank shards of a torchrun `explain` run), `train` (a
    decoder on audio + captions), `export` (ONNX graphs and TensorRT engines for
    `explain --backend onnx|trt`), `eval` (faithfulness metrics against GradCAM,
    GradCAM++, SmoothGrad and Integrated Gradients), `info`, `completion`.

    Examples:

    \b
      lmaczs info
      lmaczs info --json
      lmaczs explain clips/ --prompt "dog barking" --out explanations/
      lmaczs explain a.wav b.ogg -p siren -p rain --clap 630k-audioset-best.pt --decoder runs/dec1 --out out/
      lmaczs train --data captions.jsonl --clap random:tiny --out runs/dec1
      lmaczs export --out engines/ && lmaczs explain clips/ -p siren --backend onnx --engines engines/ --out out/
      lmaczs eval --data demo --limit 16 --out eval/

    Exit codes:

    \b
    {exit_codes}
    """
    ctx.meta[DEBUG] = debug


main.help = (main.help or "").replace("{exit_codes}", _exit_code_help().replace("\n", "\n    "))


@main.command(short_help="Write listenable explanations for clips and prompts.")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--prompt", "-p", "prompts", multiple=True,
    help="Text prompt to explain; repeat for several prompts per clip.",
)
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="More prompts for every file, one a line (# starts a comment).")
@click.option("--prompts-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Per-file prompts: path,prompt rows (paths relative to the CSV).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Top-k mode: a label set, one a line; each clip is classified zero-shot over it and its "
              "best --top-k labels are explained ('dog' is scored as 'this is the sound of dog'; a line of "
              "4+ words or ending in . ! ? is used as written).")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Labels to explain per clip  [default: 3]")
@click.option(
    "--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Output directory; mirrors the input tree (may be the input folder: inputs are never overwritten).",
)
@clap_options
@click.option("--decoder", type=click.Path(exists=True, path_type=Path), default=None,
              help="Trained decoder: a `lmaczs train` folder (or its decoder.safetensors); "
              "default: the bundled demo decoder with --clap demo.")
@_force_option
@click.option(
    "--backend", type=click.Choice(["torch", "onnx", "trt"]), default="torch",
    show_default=True, help="torch eager, ONNX Runtime, or TensorRT engines from `lmaczs export --trt`.",
)
@click.option("--engines", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="With --backend onnx|trt: the folder written by `lmaczs export` (no torch weights are loaded).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="10-s windows per model batch (windows of several files share a batch).")
@_device_option
@click.option(
    "--workers", type=click.IntRange(min=0), default=None,
    help="Audio decode/resample worker processes (0: decode in the main process)  "
    "[default: 0 on CPU, where workers take cores from the model; 4 on CUDA]",
)
@click.option(
    "--sr", type=click.IntRange(min=1000, max=768_000), default=48_000, show_default=True,
    help="Sample rate of the explanation wavs (Hz).",
)
@click.option("--save-mask", is_flag=True, help="Also write <name>.<prompt>.npz: mask, time_s, freq_hz, domain.")
@click.option("--save-residual", is_flag=True, help="Also write <name>.<prompt>.residual.wav: what the mask removed.")
@click.option("--png/--no-png", "--save-png", "save_png", default=True, show_default=True,
              help="Write <name>.<prompt>.png: spectrogram | mask | masked, shown as thumbnails in index.html "
                   "(--no-png saves their cost, a few tenths of a second per file and prompt).")
@click.option("--listen-check", is_flag=True,
              help="Re-encode each written wav and record the listened similarity beside the masked one.")
@click.option("--no-check", is_flag=True, help="Skip the masked-similarity pass (a second encoder pass).")
@click.option("--compile", "compile_mode", type=click.Choice(["auto", "graphs", "inductor", "off"]), default="auto",
              show_default=True,
              help="CUDA: run fixed-shape batches under CUDA graphs (auto, graphs) or torch.compile (inductor); "
              "off: plain eager. No effect on the CPU.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16", "int8"]), default="auto",
              show_default=True,
              help="CUDA: encoder and decoder precision (auto: fp16; the front end is always fp32). "
              "No effect on the CPU. int8: --backend onnx only, the export folder's int8 graphs "
              "(lmaczs export --int8).")
@click.option("--overwrite", is_flag=True, help="Redo work a previous run finished.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.pass_context
def explain(ctx: click.Context, paths: tuple[Path, ...], prompts: tuple[str, ...], prompts_file: Path | None,
            prompts_csv: Path | None, labels: Path | None, top_k: int | None, out: Path | None,
            backend: str, as_json: bool, tokenizer: Path | None, decoder: Path | None,
            **options: Any) -> None:
    """Explain what CLAP heard for each prompt, as listenable wavs.

    For every audio file in PATHS (files or folders, searched recursively; any soundfile
    format; hidden and non-audio files skipped) and every prompt, writes under --out,
    mirroring the input tree: <name>.<prompt-slug>.wav (the listenable explanation,
    16-bit PCM at --sr), <name>.<prompt-slug>.png (spectrogram | mask | masked; --no-png
    skips it), optional .npz mask and .residual.wav, one results.jsonl line per (file,
    prompt, 10-s window) with the similarity before and after masking, errors.jsonl for
    files that failed, and index.html (open it from disk). An explanation whose mask keeps
    less than 0.1 % of the time-frequency grid, or whose wav is 60 dB or more below its
    input, is marked empty: the model finds nothing of the prompt there. A file of any
    length is explained in overlapping 10-s windows and stitched. A rerun skips finished
    work (and loads no model when nothing is left); a killed run loses only what was in
    flight. Under torchrun each rank takes its share of the files and rank 0 joins the
    results (or `lmaczs merge` later). Exits 0 when all files succeed, 1 when some failed
    (they are listed), 2 on usage errors and unusable models or paths, 130 on Ctrl-C.

    Examples:

    \b
      lmaczs explain clips/ --prompt "dog barking" --out explanations/
      lmaczs explain street.ogg -p "car horn" -p "footsteps" --no-png --out out/
      lmaczs explain clips/ --labels labels.txt --top-k 3 --clap random:tiny --decoder runs/dec1 --out out/
    """
    job_options = _explain_options(ctx, paths, prompts, prompts_file, prompts_csv, labels, top_k, out, backend,
                                   decoder, tokenizer, options)
    import warnings

    from .device import torchrun_rank
    from .runs import ExplainJob, run_explain

    # torch's advice when --workers exceeds the cores it counts: the user chose the number.
    warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes", category=UserWarning)
    quiet = not torchrun_rank().main
    with _explain_progress(quiet) as on_event:
        summary = run_explain(ExplainJob(**job_options), on_event=on_event)
    if not quiet:
        _explain_report(summary, as_json)
    ctx.exit(EXIT_FAILED if summary["failed"] else EXIT_OK)


@main.command(short_help="Join the per-rank shards of an `explain` run.")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def merge(out: Path, as_json: bool) -> None:
    """Join the per-rank shards of a torchrun `explain` run in OUT.

    Each rank of `lmaczs explain` under torchrun writes its own results.rank<N>.jsonl and
    errors.rank<N>.jsonl in --out; rank 0 joins them when every rank finishes. When a run
    stopped before that (a rank was killed, or the ranks ran as separate jobs), this joins
    the shards in OUT into results.jsonl and errors.jsonl and rewrites index.html.

    Examples:

    \b
      lmaczs merge out/
      lmaczs merge out/ --json
    """
    from .runs import merge_outputs

    summary = merge_outputs(out)
    if as_json:
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    click.echo(f"merged {summary['shards']} shards: {summary['results']} results lines for {summary['files']} "
               f"files, {summary['errors']} errors; report {summary['index']}")


def _explain_options(ctx: click.Context, paths: tuple[Path, ...], prompts: tuple[str, ...],
                     prompts_file: Path | None, prompts_csv: Path | None, labels: Path | None,
                     top_k: int | None, out: Path | None, backend: str, decoder: Path | None,
                     tokenizer: Path | None, options: dict[str, Any]) -> dict[str, Any]:
    """Check `explain`'s options together (usage errors exit 2) -> ExplainJob fields."""
    def param(name: str) -> click.Parameter:
        return next(p for p in ctx.command.params if p.name == name)

    _check_backend(backend, options, decoder)
    if not paths:
        raise click.MissingParameter(ctx=ctx, param=param("paths"), param_hint="'PATHS...'")
    if out is None:
        raise click.MissingParameter(ctx=ctx, param=param("out"))
    if top_k is not None and labels is None:
        raise click.UsageError("--top-k needs --labels FILE (the label set to rank)")
    if labels is not None and (prompts or prompts_file or prompts_csv):
        raise click.UsageError("--labels (top-k mode) chooses the prompts itself; "
                               "do not combine it with --prompt, --prompts-file or --prompts-csv")
    if labels is None and not (prompts or prompts_file or prompts_csv):
        raise click.MissingParameter(ctx=ctx, param=param("prompts"),
                                     message="Give one, or --prompts-file, --prompts-csv or --labels.")
    from . import inputs
    from .device import resolve_device

    try:
        inputs.check_prompts(prompts)
        if backend == "torch":      # onnx|trt take their model from --engines
            inputs.check_decoder(options["clap"], decoder)
            if decoder is not None:             # its files, before any model loads
                from .decoder import DecoderError, read_decoder_config

                try:
                    read_decoder_config(decoder)
                except DecoderError as e:
                    raise UnusableError(f"--decoder {e}") from e
        resolve_device(options["device"])
        file_prompts = inputs.read_prompts_csv(prompts_csv) if prompts_csv else {}
        all_prompts = [*prompts, *(inputs.read_lines(prompts_file) if prompts_file else [])]
        label_set = inputs.read_lines(labels) if labels else []
    except inputs.ExplainError as e:
        raise click.UsageError(str(e)) from e
    if labels is not None:
        repeated = sorted({x for x in label_set if label_set.count(x) > 1})
        if not label_set or repeated:
            raise click.UsageError(f"--labels {labels}: " + ("no labels in it" if not label_set
                                   else f"repeated labels: {', '.join(repeated)}"))
        top_k = 3 if top_k is None else top_k
        if top_k > len(label_set):
            raise click.UsageError(f"--top-k {top_k} exceeds the {len(label_set)} labels in {labels}")
    check = not options.pop("no_check")
    return dict(paths=tuple(str(p) for p in paths), out=str(out), prompts=tuple(dict.fromkeys(all_prompts)),
                file_prompts=file_prompts, labels=tuple(label_set), top_k=top_k or 0,
                decoder=str(decoder) if decoder else None, tokenizer=str(tokenizer) if tokenizer else None,
                check=check, backend=backend, **options)


def _check_backend(backend: str, options: dict[str, Any], decoder: Path | None) -> None:
    """--backend onnx|trt needs --engines (an export folder) and takes its model from there;
    trt needs a GPU and tensorrt."""
    engines = options.get("engines")
    if options.get("precision") == "int8" and backend != "onnx":
        raise click.UsageError("--precision int8 is for --backend onnx (the int8 graphs of `lmaczs export --int8`)")
    if backend == "torch":
        if engines is not None:
            raise click.UsageError("--engines is for --backend onnx|trt; --backend torch uses --clap/--decoder")
        return
    if engines is None:
        raise click.UsageError(f"--backend {backend} needs --engines DIR (a folder written by `lmaczs export`)")
    if decoder is not None or options["clap"] != "demo":
        raise click.UsageError(f"--backend {backend} runs the model exported in --engines; "
                               f"drop --clap/--decoder (export them with `lmaczs export --clap ... --decoder ...`)")
    options["engines"] = str(engines)
    if backend == "trt":
        from .export.to_trt import TrtUnavailable, require_trt

        try:
            require_trt()
        except TrtUnavailable as e:
            raise click.UsageError(f"--backend trt: {e}") from e


@contextlib.contextmanager
def _explain_progress(quiet: bool):
    """A rich progress bar on stderr over the run's 10-s windows, so it moves within a long file:
    windows and files done, windows/s with the real-time factor, ETA. Yields the on_event
    callback of `run_explain`."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            if not speed:
                return Text("- windows/s")
            realtime = speed * task.fields["seconds"] / max(task.total or 1, 1)
            return Text(f"{speed:.2f} windows/s ({realtime:.1f} s of audio/s)")

    progress = Progress(TextColumn("[bold]explain[/bold]"), BarColumn(),
                        TextColumn("{task.completed:.0f}/{task.total:.0f} windows, {task.fields[files]} files"),
                        Rate(), TimeRemainingColumn(), console=Console(stderr=True), disable=quiet)
    task = None
    state = {"done": 0, "files": 0}

    def on_event(e: dict[str, Any]) -> None:
        nonlocal task
        if e["event"] == "start" and e["files"]:   # shown from here: errors before it stay one clean line
            progress.start()
            state["files"] = e["files"]
            task = progress.add_task("explain", total=max(e["windows"], 1), files=f"0/{e['files']}",
                                     seconds=e["seconds"])
        elif task is None:
            return
        elif e["event"] == "windows":
            progress.advance(task, e["n"])
        elif e["event"] == "file":
            state["done"] += 1
            progress.update(task, files=f"{state['done']}/{state['files']}")
            if e["status"] == "failed":     # its windows will never come
                progress.advance(task, e.get("windows", 0))

    try:
        yield on_event
        if task is not None:                 # done: windows a file's header under-counted included
            progress.update(task, completed=progress.tasks[0].total)
    finally:
        if task is not None:
            progress.stop()


def _explain_report(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    for f in summary["failures"][:20]:
        click.echo(f"failed: {f['file']}: {f['reason']}", err=True)
    if len(summary["failures"]) > 20:
        click.echo(f"... and {len(summary['failures']) - 20} more in {summary['errors']}", err=True)
    empty = summary.get("empty", 0)
    click.echo(f"explained {summary['explained']} files ({summary['explanations']} explanations"
               + (f", {empty} empty: the model finds nothing of their prompt there" if empty else "")
               + f") into {summary['out']}; {summary['already_done']} already done, {summary['failed']} failed; "
               f"report {summary['index']}")


@main.command(short_help="Train a mask decoder on a frozen CLAP.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Recipe file (TOML) with any of the run's settings, in sections [data] [model] [decoder] "
                   "[optimiser] [loss] [run]; options given here override it. Every run writes its own as "
                   "OUT/recipe.toml.")
@click.option(
    "--data", type=click.Path(exists=True, path_type=Path), default=None,
    help="Training manifest: Clotho CSV (file_name, caption_1..5), JSONL "
    '({"audio": path, "caption": text}) or a labelled folder (class/clip.wav).',
)
@click.option("--audio-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Audio folder of a Clotho CSV (default: beside the CSV).")
@click.option("--val-data", type=click.Path(exists=True, path_type=Path), default=None,
              help="Validation manifest; default: hold out --val-fraction of --data.")
@click.option("--val-fraction", type=click.FloatRange(0, 0.5), default=0.1, show_default=True)
@click.option(
    "--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Run folder: decoder.safetensors + config.json, recipe.toml, metrics.jsonl, skipped.jsonl, train_state/.",
)
@clap_options
@click.option(
    "--domain", type=click.Choice(["mel", "stft"]), default="mel", show_default=True,
    help="Mask on the 64-band mel grid or on the 513-bin linear STFT grid.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True, help="Passes over the data (paper: 2).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many optimizer steps.")
@_batch_option(2)
@click.option("--accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per optimizer step (gradient accumulation).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Adam learning rate (the peak, with a cosine [optimiser] lr_schedule).")
@click.option("--lambda-sparsity", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="Weight of the mask-mean (L1) term.")
@click.option("--lambda-diversity", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the diversity term (paper Eq. 7).")
@click.option("--mismatched", type=click.IntRange(min=0), default=None,
              help="Mismatched captions per clip in the pair term; default: every pair (B*B encoder passes).")
@click.option("--resume", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Continue the run in this folder exactly where it stopped (its settings are reused).")
@click.option("--init", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Start from the decoder saved in this folder (a `lmaczs train` output trained on the same CLAP) "
                   "instead of random weights, with a fresh optimizer and schedule: fine-tuning, e.g. on new data or "
                   "with other loss settings. Its architecture is reused; an operating point it carries "
                   "(logit_bias in its config.json) is not: training starts from the decoder as trained.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@_device_option
@click.option("--amp/--no-amp", default=False, show_default=True,
              help="Autocast the decoder and masked encoder pass (fp16 on CUDA, bf16 on CPU).")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="DataLoader worker processes (decode + resample).")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Optimizer steps between metrics.jsonl lines.")
@click.option("--save-every", type=click.IntRange(min=1), default=200, show_default=True,
              help="Optimizer steps between checkpoints (one is also written at each epoch end).")
@click.option("--strict/--no-strict", default=False, show_default=True,
              help="Stop at the first missing or unreadable manifest row.")
@click.pass_context
def train(ctx: click.Context, config: Path | None, resume: Path | None, **options: Any) -> None:
    """Train an LMAC-ZS mask decoder on a frozen CLAP.

    Only the decoder learns; the CLAP stays frozen and gradients flow through it into
    the mask. The loss keeps the masked audio's similarity to every caption of the
    batch, matched and mismatched (L1), keeps masks sparse, and makes them depend on the
    prompt (diversity). Rows whose audio is missing or unreadable are skipped and listed
    in OUT/skipped.jsonl (--strict stops instead). Under torchrun it trains with DDP
    (gloo on CPU, NCCL on GPU); pairs are formed within each process's micro-batch.

    A recipe file (--config) holds every setting of a run, the decoder's architecture
    ([decoder] width, text_tokens, text_readout, levels, first_level, logmel_skip, skip_gate,
    decision, decision_contrast, projected), the
    learning-rate schedule ([optimiser] lr_schedule: constant or cosine) and the research
    terms beyond the paper's objective ([loss] mask_noise, hard_mask, logit_bound,
    lambda_reach, lambda_out, lambda_overlap, lambda_absent; [data] group_by_audio)
    included, and [decoder] init_any_clap = true lets --init start from a decoder
    trained on another CLAP. Each run writes its whole configuration to
    OUT/recipe.toml.

    Examples:

    \b
      lmaczs train --data captions.jsonl --clap random:tiny --out runs/dec1
      lmaczs train --data clotho_captions_development.csv --clap 630k-audioset-best.pt --domain stft --out runs/stft
      lmaczs train --config recipe.toml --lr 3e-4 --out runs/dec2
      lmaczs train --config runs/dec1/recipe.toml --out runs/dec1-again
      lmaczs train --resume runs/stft --epochs 4
      lmaczs train --data more.jsonl --init runs/dec1 --lr 1e-5 --out runs/dec1-ft
      torchrun --nproc-per-node 2 -m lmaczs_cli train --data captions.jsonl --device cpu --out runs/ddp
    """
    from . import recipe
    from . import train as training

    try:
        fields = recipe.load_recipe(config) if config is not None else {}
        cfg = recipe.resolve_config({**fields, **_train_fields(ctx, options)}, resume)
    except recipe.TrainError as e:
        raise click.UsageError(str(e)) from e
    if cfg.out:
        from .inputs import check_out

        check_out(cfg.out)              # before any model loads
    summary = _run_training(training, cfg, resume is not None)
    if summary.get("skipped") is None:  # not rank 0 under torchrun: rank 0 reports
        return
    click.echo(f"decoder written to {summary['out']} after {summary['steps']} steps"
               + (f"; {summary['skipped']} rows skipped (see skipped.jsonl)" if summary.get("skipped") else ""))


TRAIN_FIELD_OF = {"data": "manifest", "val_data": "val_manifest"}   # `train` option -> TrainConfig field


def _train_fields(ctx: click.Context, options: dict[str, Any]) -> dict[str, Any]:
    """The options typed on the command line (not defaults: those must not override a recipe's
    settings), as TrainConfig fields; paths as strings."""
    from click.core import ParameterSource

    out = {}
    for name, value in options.items():
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            out[TRAIN_FIELD_OF.get(name, name)] = str(value) if isinstance(value, Path) else value
    return out


def _run_training(training: Any, cfg: Any, resume: bool) -> dict[str, Any]:
    """Run training with a rich progress bar (rank 0 only under torchrun)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .device import torchrun_rank

    quiet = not torchrun_rank().main
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]train[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[terms]}"),
        TimeRemainingColumn(), console=console, disable=quiet, transient=False,
    )
    task = None

    def on_event(e: dict[str, Any]) -> None:
        nonlocal task
        if e["event"] == "start":
            task = progress.add_task("train", total=e["total_steps"], completed=e["done_steps"], terms="")
            console.print(f"{e['train_clips']} training clips, {e['val_clips']} validation clips, "
                          f"{e['per_epoch']} steps/epoch, decoder {e['decoder_parameters']:,} parameters")
            if e.get("val_note"):
                console.print(f"note: {e['val_note']}", markup=False)
        elif e["event"] == "step" and task is not None:
            terms = (f"loss {e['total']:.4f} sim {e['similarity']:.4f} spa {e['sparsity']:.3f} "
                     f"div {e['diversity']:.4f} {e['clips_per_s']:.1f} clips/s") if "total" in e else ""
            progress.update(task, completed=e["step"], terms=terms)
        elif e["event"] == "validation":
            console.print(f"epoch {e['epoch']}: similarity error matched {e['matched_similarity_error']:.4f} / "
                          f"mismatched {e['mismatched_similarity_error']:.4f}; mask mean matched "
                          f"{e['matched_mask_mean']:.3f} / mismatched {e['mismatched_mask_mean']:.3f}")
        elif e["event"] == "skip":
            console.print(f"skipped {e['path']}: {e['reason']}")

    with progress:
        return training.train(cfg, resume=resume, on_event=on_event)


@main.command(short_help="Export to ONNX graphs and, with --trt, TensorRT engines.")
@click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the .onnx graphs (and .engine files) with JSON sidecars.",
)
@clap_options
@click.option("--decoder", type=click.Path(exists=True, path_type=Path), default=None,
              help="Trained decoder: a `lmaczs train` folder (or its decoder.safetensors); "
              "default: the bundled demo decoder with --clap demo.")
@_force_option
@click.option("--trt", is_flag=True, help="Also build TensorRT engines (needs a CUDA GPU and tensorrt).")
@click.option("--fp16/--fp32", default=False, show_default=True,
              help="Precision of the audio encoder and decoder layers, written into the graphs (and so into "
              "the strongly typed engines built from them); STFT, mel, log, iSTFT and the text encoder "
              "always stay fp32.")
@click.option("--int8", is_flag=True,
              help="Also write int8 variants of the audio-side graphs (<graph>_int8.onnx: the CLAP encoder's "
              "MatMuls dynamically quantised, for ONNX Runtime on the CPU; the explainers without their STFT "
              "and inverse, which the runner computes with torch's FFT), each audited against its fp32 "
              "graph; a variant that drifts fails the export. Run them with --backend onnx --precision int8.")
@click.option("--opset", type=click.IntRange(min=17, max=20), default=17, show_default=True,
              help="ONNX opset (17: LayerNormalization; 20: the newest the TorchScript exporter writes).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Largest batch (and prompts per clip) of the engines' optimisation profile.")
@click.option("--workspace-gib", type=click.FloatRange(min=0, min_open=True), default=None,
              help="TensorRT builder workspace limit (GiB)  [default: TensorRT's own]")
@click.pass_context
def export(ctx: click.Context, out: Path, clap: str, tokenizer: Path | None, decoder: Path | None, force: bool,
           trt: bool, fp16: bool, int8: bool, opset: int, max_batch: int, workspace_gib: float | None) -> None:
    """Export the explainer to ONNX and, with --trt, TensorRT.

    Writes audio_encoder.onnx (waveforms -> embedding, hidden states), text_encoder.onnx
    (token ids -> embedding, fp32), explainer.onnx (the fused graph: waveforms (B, 480000)
    and text embeddings (B, K, D) in; masks, listenable waveforms and similarities out,
    its STFT and iSTFT as MatMuls), its forms without the masked check and for top-k, the
    tokenizer files (tokenizer/) and manifest.json: all `lmaczs explain --backend onnx|trt
    --engines OUT` needs. With --trt, a <graph>.engine plan per graph with a .engine.json
    sidecar (TensorRT 10.x or 11.x); an engine whose sidecar still matches is kept.

    Every graph is audited against TensorRT's operators and types; a problem fails the
    export with exit 2, naming the node, and no engine is built.

    Examples:

    \b
      lmaczs export --out engines/
      lmaczs export --clap 630k-audioset-best.pt --decoder runs/dec1 --trt --fp16 --out engines/
    """
    from .export import export_explainer_folder

    if trt:
        from .export.to_trt import TrtUnavailable, require_trt

        try:
            require_trt()
        except TrtUnavailable as e:
            raise click.UsageError(f"--trt: {e}") from e
    from .export.to_onnx import audit_problems, check_audit

    manifest = export_explainer_folder(out, clap=clap, decoder=decoder, tokenizer=tokenizer, force=force,
                                       opset=opset, max_batch=max_batch, fp16=fp16, int8=int8)
    for graph, spec in [*manifest["graphs"].items(), *manifest.get("int8", {}).get("graphs", {}).items()]:
        click.echo(f"wrote {out / spec['file']} ({spec['precision']})")
    click.echo(f"copied the tokenizer into {out / manifest['tokenizer']['dir']}")
    problems = audit_problems(manifest)
    click.echo(f"TensorRT {manifest['tensorrt_audit']['tensorrt']} operator audit: "
               + ("ok" if not problems else f"{len(problems)} problem(s)"))
    for p in problems:
        click.echo(f"  {p}", err=True)
    check_audit(manifest, out)           # exit 2 naming the first problem; no engine is built
    if trt:
        from .export.to_trt import export_engines

        for graph, key in export_engines(out, max_batch=max_batch, max_prompts=max_batch,
                                         workspace_gib=workspace_gib).items():
            click.echo(f"engine {out / (graph + '.engine')} ({key.precision}, TensorRT {key.tensorrt}, {key.gpu})")


@main.command(name="eval", short_help="Compare LMAC-ZS with baselines by faithfulness and localization.")
@click.option(
    "--data", required=True, metavar="SRC",
    help="demo (world scenes with ground truth: the selection split), demo-test (the frozen test split, for "
    "reports only), a labelled folder (class/clip.wav), ESC-50's folder "
    "(meta/esc50.csv + audio/) or UrbanSound8K's (metadata/UrbanSound8K.csv + audio/foldN/).",
)
@click.option(
    "--methods", default=",".join(EVAL_METHODS), show_default=True, callback=_parse_methods,
    help="Comma-separated explanation methods to compare.",
)
@click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Directory for metrics.json/.csv/.md, plots and per-clip records (clips/<method>.jsonl).",
)
@clap_options
@click.option("--decoder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Decoder folder written by `lmaczs train`; default: the bundled demo decoder with --clap demo.")
@_force_option
@_batch_option(8)
@_device_option
@click.option("--fold", type=click.IntRange(min=1), default=None, help="ESC-50 / UrbanSound8K: only this fold.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N clips (demo: N scenes; default 32).")
@click.option("--contaminate", type=click.Choice(["mix", "white-noise", "speech", "speech-in-domain"]), default=None,
              help="Out-of-domain study: add another clip of the set, white noise or speech (--speech); "
              "speech-in-domain: the demo world's own formant voice (an in-domain case).")
@click.option("--curves", is_flag=True,
              help="Insertion and deletion curves at equal budgets (each mask cut to its top 1-50 % of cells) "
              "for every method, with their areas (curves.md, curves.png).")
@click.option("--ad-convention", type=click.Choice(["paper", "speechbrain"]), default="paper", show_default=True,
              help="AD as the paper defines it, or as SpeechBrain's L-MAC code computes it (probabilities "
              "softmaxed twice), to set figures beside theirs.")
@click.option("--snr", type=float, default=3.0, show_default=True, help="dB, clip over contamination.")
@click.option("--speech", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of speech recordings for --contaminate speech.")
@click.option("--randomization", is_flag=True,
              help="Cascading randomisation of the audio encoder from the top; SSIM of masks to the originals.")
@click.option("--prompt-sensitivity", is_flag=True,
              help="Mask mean vs prompt similarity for every label prompt, matched vs mismatched.")
@click.option("--study-clips", type=click.IntRange(min=1), default=4, show_default=True,
              help="Clips the two studies and their plots use.")
@click.option("--logit-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Temperature of p_c = softmax(scale * similarity); 1 is the paper's formula.")
@click.option("--gradcam-layer", default=None, metavar="MODULE",
              help="GradCAM(++) layer in the audio branch [default: norm (HTSAT), conv_block6 (PANN-14)].")
@click.option("--ig-steps", type=click.IntRange(min=2), default=32, show_default=True,
              help="Integrated Gradients steps.")
@click.option("--ig-baseline", type=click.Choice(["silence", "mean"]), default="silence", show_default=True,
              help="IG reference input: silence (-100 dB) or the clip's mean level.")
@click.option("--smoothgrad-samples", type=click.IntRange(min=1), default=25, show_default=True,
              help="SmoothGrad noisy copies per clip.")
@click.option("--smoothgrad-sigma", type=click.FloatRange(min=0), default=0.15, show_default=True,
              help="SmoothGrad noise sigma as a share of the clip's log-mel range.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json on stdout.")
def eval_(data: str, out: Path, as_json: bool, **options: Any) -> None:
    """Compare LMAC-ZS with GradCAM, GradCAM++, SmoothGrad and Integrated Gradients.

    Each method explains CLAP's similarity to the predicted class's prompt ("this is the
    sound of <class>"); the masks are scored by the faithfulness metrics of the paper (AI,
    AD, AG, FF, Fid-In, SPS, COMP, MM) beside the zero-shot accuracy, and by localization
    where the data has ground truth (--data demo). A rerun with the same --out resumes each
    method where it stopped.

    Examples:

    \b
      lmaczs eval --data demo --limit 32 --randomization --prompt-sensitivity --out eval/demo
      lmaczs eval --data ESC-50-master --fold 1 --methods lmaczs,gradcam,ig --out eval/esc50
      lmaczs eval --data demo --contaminate white-noise --snr 3 --out eval/demo-noise
    """
    from .baselines import BaselineSettings
    from .evaluate import EvalConfig, run_eval

    baseline_keys = ("gradcam_layer", "ig_steps", "ig_baseline", "smoothgrad_samples", "smoothgrad_sigma")
    settings = BaselineSettings(**{k: options.pop(k) for k in baseline_keys})
    cfg = EvalConfig(
        data=data if data == "demo" else str(data), out=str(out), clap=options.pop("clap"),
        decoder=str(options.pop("decoder")) if options.get("decoder") else options.pop("decoder"),
        tokenizer=str(options.pop("tokenizer")) if options.get("tokenizer") else options.pop("tokenizer"),
        speech=str(options.pop("speech")) if options.get("speech") else options.pop("speech"),
        baselines=settings, **options,
    )
    from .inputs import check_out

    check_out(out)                      # before any model loads
    summary = _run_eval(run_eval, cfg)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    click.echo((Path(out) / "metrics.md").read_text(encoding="utf-8"), nl=False)
    click.echo(f"wrote {out}/metrics.json, metrics.csv, metrics.md and plots")


def _run_eval(run_eval: Callable[..., dict[str, Any]], cfg: Any) -> dict[str, Any]:
    """Run an evaluation with a rich progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    progress = Progress(TextColumn("[bold]eval[/bold] {task.fields[method]}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=console)
    task = None

    def on_event(e: dict[str, Any]) -> None:
        nonlocal task
        if e["event"] == "start":
            console.print(f"{e['clips']} clips ({e['layout']}), methods {', '.join(e['methods'])}; "
                          f"{e['todo']} clip explanations to compute")
            task = progress.add_task("eval", total=e["todo"], method="")
        elif e["event"] == "batch" and task is not None:
            progress.update(task, advance=e["clips"], method=e["method"])
        elif e["event"] == "study":
            console.print(f"study: {e['name']}")

    with progress:
        return run_eval(cfg, on_event=on_event)


COMPLETION_SHELLS = ("bash", "zsh", "fish")


@main.command(short_help="Print the shell completion script for bash, zsh or fish.")
@click.argument("shell", type=click.Choice(COMPLETION_SHELLS))
def completion(shell: str) -> None:
    """Print the completion script of SHELL (click's own completion mechanism).

    Completes commands, options, choices (such as --backend and --device) and paths.
    Load it in the current shell, or save it where your shell reads completions.

    Examples:

    \b
      eval "$(lmaczs completion bash)"                      # bash, this shell
      lmaczs completion bash > ~/.local/share/bash-completion/completions/lmaczs
      lmaczs completion zsh > "${fpath[1]}/_lmaczs"          # zsh
      lmaczs completion fish > ~/.config/fish/completions/lmaczs.fish
    """
    from click.shell_completion import get_completion_class

    comp_cls = get_completion_class(shell)
    comp = comp_cls(main, {}, "lmaczs", "_LMACZS_COMPLETE")
    click.echo(comp.source())


@main.command(short_help="Show versions, the compute device and model caches.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def info(as_json: bool) -> None:
    """Show versions, the compute device and model cache locations.

    Touches no network and loads no model.

    Examples:

    \b
      lmaczs info
      lmaczs info --json
    """
    from .environment import collect_info

    # Keep stray prints of imported libraries off stdout, which --json owns.
    with contextlib.redirect_stdout(sys.stderr):
        report = collect_info()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_info(report)


def _print_info(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")

    def section(title: str) -> None:
        table.add_row(f"[cyan]{title}[/cyan]", "")

    section("lmaczs")
    table.add_row("  lmaczs", report["lmaczs"])
    table.add_row("  python", report["python"])
    table.add_row("  platform", report["platform"])
    section("packages")
    for name, version in report["packages"].items():
        table.add_row(f"  {name}", version)
    table.add_row("  onnxruntime providers", ", ".join(report["onnxruntime_providers"]) or "none")
    if report.get("onnxruntime_problem"):
        table.add_row("  onnxruntime problem", report["onnxruntime_problem"])
    section("device")
    dev = report["device"]
    if dev["cuda_available"]:
        names = ", ".join(dev["cuda_devices"])
        table.add_row("  torch device", f"cuda: {dev['cuda_device_count']} x {names}")
        table.add_row("  torch CUDA", str(dev["torch_cuda_version"]))
    else:
        table.add_row("  torch device", "cpu (no CUDA device)")
    table.add_row("  torch threads", str(dev["torch_threads"]))
    section("caches")
    for name, path in report["caches"].items():
        table.add_row(f"  {name}", path)
    Console(highlight=False).print(table)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="lmaczs")
