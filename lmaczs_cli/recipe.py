"""A training run's configuration: `TrainConfig`, recipe files, and the rules for new,
fine-tuning and resumed runs.

A recipe file is TOML with one section per part of a run; any field left out keeps its default:

    [data]       manifest, audio_dir, val_manifest, val_fraction, val_max, group_by_audio, workers, strict
    [model]      clap, tokenizer, domain
    [decoder]    width, text_tokens, text_readout, levels, first_level, skip_gate, logmel_skip,
                 decision, decision_contrast, projected, init, init_any_clap
    [optimiser]  epochs, max_steps, batch_size, accum, lr, lr_schedule, seed
    [loss]       lambda_sparsity, lambda_diversity, mismatched, mask_noise, hard_mask, logit_bound,
                 lambda_reach, lambda_out, lambda_overlap, lambda_absent
    [run]        out, device, amp, log_every, save_every

`lmaczs train --config FILE` reads one (options on its command line override it), and every run
writes its whole config as ``OUT/recipe.toml`` (`write_recipe`), so a run is reproduced from
that file. `resolve_config` applies the rules of a new run, a fine-tuning run (``init``) and a
resumed run; `train.train` checks them again (`check_resume`, `check_architecture`), so a
library caller meets the refusals the command line shows, in the same words.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import __version__
from .errors import LmaczsError
from .files import atomic_path
from .spectral import MASK_DOMAINS

class TrainError(LmaczsError):
    """Training cannot start or continue; the message names the fix."""


LR_SCHEDULES = ("constant", "cosine")
RECIPE_NAME = "recipe.toml"   # the resolved config a run writes into its --out folder


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; stored in config.json and recipe.toml so ``--resume DIR`` needs nothing else.

    The fields fall into the sections of a recipe file (`RECIPE_SECTIONS`); those not on the
    command line (`COMMAND_LINE`) are set in a recipe file only: the decoder's architecture, the
    learning-rate schedule and the research settings past the paper's objective (``group_by_audio``,
    ``mask_noise`` .. ``lambda_absent``: off by default)."""

    # [data]
    manifest: str                       # Clotho CSV, JSONL or labelled folder (data.read_manifest)
    audio_dir: str | None = None        # Clotho audio folder, if not beside the CSV
    val_manifest: str | None = None     # validation data; else a held-out share of `manifest`
    val_fraction: float = 0.1           # share held out when no val_manifest (at most val_max)
    val_max: int = 256                  # clips at most in the validation pass
    group_by_audio: bool = False        # a clip's texts share micro-batches (data.batches_for_step)
    workers: int = 2                    # DataLoader worker processes (decode + resample)
    strict: bool = False                # a missing/unreadable manifest row is fatal
    # [model]
    clap: str = "demo"                  # demo | laion:NAME | PATH | random:ARCH
    tokenizer: str | None = None        # RoBERTa tokenizer folder (else the HF cache)
    domain: str = "mel"                 # mask grid: mel (1001 x 64) or stft (1001 x 513)
    # [decoder]
    width: int = 64                     # decoder width (DecoderConfig.width)
    text_tokens: int = 8                # decoder cross-attention keys (>= 4)
    text_readout: bool = False          # decoder's text-audio dot-product logits (DecoderConfig)
    levels: int = 4                     # CLAP stages the decoder reads, from the first (DecoderConfig)
    first_level: int = 1                # ... and from which stage on: 3 reads h3, h4; 4 h4 only (DecoderConfig)
    skip_gate: bool = False             # the log-mel skip gates the mask instead of joining the features
    logmel_skip: bool = True            # decoder input from the log-mel itself (DecoderConfig)
    decision: bool = False              # CLAP's per-token audio-text cosine joins and gates the mask (DecoderConfig)
    decision_contrast: bool = False     # ... with the map standardised over the clip as a second channel
    projected: bool = False             # read h4's tokens through CLAP's audio projection (first_level 4)
    init: str | None = None             # start from this saved decoder's weights (train.init_decoder)
    init_any_clap: bool = False         # accept an init decoder trained on another CLAP
    # [optimiser]
    epochs: int = 2                     # passes over the training data (paper: 2)
    max_steps: int | None = None        # stop after this many optimizer steps in total
    batch_size: int = 2                 # clips per micro-batch (paper: 2)
    accum: int = 1                      # micro-batches per optimizer step and rank
    lr: float = 1e-4                    # Adam learning rate (paper: 1e-5, see README)
    lr_schedule: str = "constant"       # constant | cosine (see train.learning_rate)
    seed: int = 0                       # shuffles, crops, pair subsamples and the decoder's initial weights
    # [loss]
    lambda_sparsity: float = 0.05       # λ1, weight of the mean mask value
    lambda_diversity: float = 1.0       # λ2, weight of the diversity term (Eq. 7)
    mismatched: int | None = None       # mismatched texts per clip; None = every pair (B² passes)
    mask_noise: float = 0.0             # scale of logistic noise on the mask logits in training (train.binarising_noise)
    hard_mask: bool = False             # straight-through binary masks in training (train.straight_through)
    logit_bound: float = 0.0            # pull mask logits back inside ±this (train.logit_penalty); 0: off
    lambda_reach: float = 0.0           # weight of train.reach_penalty on the matched pairs' masks; 0: off
    lambda_out: float = 0.0             # weight of the masked-out term (loss.removal_term); 0: off, as the paper
    lambda_overlap: float = 0.0         # weight of the overlap term (loss.overlap_term); 0: off, as the paper
    lambda_absent: float = 0.0          # weight of the absent-prompt term (loss.absent_term); 0: off, as the paper
    # [run]
    out: str = ""                       # output folder (required)
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    amp: bool = False                   # autocast the decoder and masked encoder pass
    log_every: int = 10                 # optimizer steps between metrics lines
    save_every: int = 200               # optimizer steps between checkpoints (and each epoch end)

    def __post_init__(self) -> None:
        if not self.manifest or not self.out:
            raise TrainError("a run needs a manifest and an out folder (--data and --out)")
        if self.init_any_clap and not self.init:
            raise TrainError("init_any_clap only applies with init (a decoder to start from)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise TrainError(f"unknown lr schedule {self.lr_schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
        if self.domain not in MASK_DOMAINS:
            raise TrainError(f"unknown mask domain {self.domain!r}; use one of {', '.join(MASK_DOMAINS)}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("accum", 1), ("max_steps", 1), ("log_every", 1),
                          ("save_every", 1), ("val_max", 0), ("workers", 0), ("mismatched", 0), ("seed", 0),
                          ("width", 8), ("text_tokens", 4)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise TrainError(f"{name} must be {low} or more (got {value})")
        if self.levels not in (2, 3, 4):
            raise TrainError(f"levels must be 2, 3 or 4 (CLAP stages read from the first), not {self.levels}")
        if not 1 <= self.first_level <= self.levels:
            raise TrainError(f"first_level must lie between 1 and levels = {self.levels}, "
                             f"not {self.first_level}: the decoder reads CLAP stages first_level..levels")
        if not 0.0 <= self.val_fraction <= 0.5:
            raise TrainError(f"val_fraction is a share between 0 and 0.5 (got {self.val_fraction:g})")
        if not self.lr > 0:
            raise TrainError(f"lr must be above 0 (got {self.lr:g})")
        for name in ("lambda_sparsity", "lambda_diversity", "mask_noise", "logit_bound", "lambda_reach",
                     "lambda_out", "lambda_overlap", "lambda_absent"):
            if not getattr(self, name) >= 0:
                raise TrainError(f"{name} must be 0 or more (got {getattr(self, name):g})")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """A config from a dict such as config.json's "train"; keys that are not fields (a run's
        world size, settings of older versions) are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- recipes


RECIPE_SECTIONS: dict[str, tuple[str, ...]] = {   # recipe file section -> TrainConfig fields
    "data": ("manifest", "audio_dir", "val_manifest", "val_fraction", "val_max", "group_by_audio", "workers",
             "strict"),
    "model": ("clap", "tokenizer", "domain"),
    "decoder": ("width", "text_tokens", "text_readout", "levels", "first_level", "skip_gate", "logmel_skip",
                "decision", "decision_contrast", "projected", "init", "init_any_clap"),
    "optimiser": ("epochs", "max_steps", "batch_size", "accum", "lr", "lr_schedule", "seed"),
    "loss": ("lambda_sparsity", "lambda_diversity", "mismatched", "mask_noise", "hard_mask", "logit_bound",
             "lambda_reach", "lambda_out", "lambda_overlap", "lambda_absent"),
    "run": ("out", "device", "amp", "log_every", "save_every"),
}
SECTION_OF = {name: section for section, names in RECIPE_SECTIONS.items() for name in names}
ARCHITECTURE = ("domain", "width", "text_tokens", "text_readout", "logmel_skip", "levels", "skip_gate",
                "first_level", "decision", "decision_contrast", "projected")
FIXED_ON_RESUME = {   # fields a resumed run must keep, and why
    "group_by_audio": "it would re-plan the epoch in progress (some clips twice, some never)",
    **dict.fromkeys(ARCHITECTURE, "the checkpoint holds a decoder of the stored shape"),
}


def _field_types() -> dict[str, type]:
    """Field -> its scalar type (str, int, float or bool); None is allowed where the default is None."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = args[0] if args else hint
    return out


def recipe_fields(recipe: Mapping[str, Any], source: str = "recipe") -> dict[str, Any]:
    """The TrainConfig fields a recipe sets: ``{section: {field: value}}`` (as `tomllib` reads a
    recipe file) -> ``{field: value}``, each field checked to be in its section and of its type
    (an int is accepted for a float). Paths are kept as written. A field left out keeps its
    default; there is no TOML null, so leaving one out is how a recipe says None."""
    types = _field_types()
    out: dict[str, Any] = {}
    for section, table in recipe.items():
        if section in SECTION_OF and not isinstance(table, Mapping):
            raise TrainError(f"{source}: {section} belongs in [{SECTION_OF[section]}]: a recipe sets each "
                             "setting under its section")
        if section not in RECIPE_SECTIONS:
            raise TrainError(f"{source}: unknown section [{section}]; the sections are "
                             + ", ".join(f"[{s}]" for s in RECIPE_SECTIONS))
        if not isinstance(table, Mapping):
            raise TrainError(f"{source}: {section} must be a table ([{section}] and its settings under it)")
        for name, value in table.items():
            if name not in SECTION_OF:
                raise TrainError(f"{source}: [{section}] {name}: no such setting; [{section}] holds "
                                 + ", ".join(RECIPE_SECTIONS[section]))
            if SECTION_OF[name] != section:
                raise TrainError(f"{source}: {name} belongs in [{SECTION_OF[name]}], not [{section}]")
            want = types[name]
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not want:
                raise TrainError(f"{source}: [{section}] {name} = {value!r} must be {_KIND[want]}")
            out[name] = value
    return out


_KIND = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The TrainConfig fields set in the TOML file ``path`` (see `recipe_fields`)."""
    try:
        import tomllib
    except ModuleNotFoundError:   # Python 3.10
        import tomli as tomllib

    try:
        with open(path, "rb") as f:
            recipe = tomllib.load(f)
    except OSError as e:
        raise TrainError(f"--config {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise TrainError(f"--config {path}: not a TOML file: {e}") from e
    return recipe_fields(recipe, str(path))


def recipe_text(fields: Mapping[str, Any], header: str = "") -> str:
    """A recipe file (TOML) that sets ``fields`` ({field: value}); None values are left out."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    for section, names in RECIPE_SECTIONS.items():
        body = [f"{name} = {_toml_value(fields[name])}" for name in names if fields.get(name) is not None]
        if body:
            lines += (["", f"[{section}]"] if lines else [f"[{section}]"]) + body
    return "\n".join(lines) + "\n"


def write_recipe(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the whole config as a recipe file: ``lmaczs train --config PATH`` runs it again."""
    path = Path(path)
    text = recipe_text(cfg.to_json(), f"lmaczs {__version__} train recipe: lmaczs train --config {path.name} "
                                      "runs this configuration again\n(options on the command line override it)")
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)   # Python's float repr (1e-05, inf, nan) is valid TOML and reads back exactly
    if isinstance(value, str):
        escaped = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
        return '"' + "".join(escaped.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                             for c in value) + '"'
    raise TypeError(f"no TOML form for {value!r}")


def resolve_config(given: Mapping[str, Any], resume: str | os.PathLike | None = None) -> TrainConfig:
    """The config of a run from the fields a user set (a recipe file's, then the command line's on top).

    New run: ``manifest`` and ``out`` are required; with ``init``, the architecture fields not given
    are the init decoder's, and a given one must equal it (fine-tuning keeps the architecture).
    Resume (``resume`` = the run folder): the run's stored config with ``given`` on top; ``init`` and
    ``init_any_clap`` are refused (they start a new run) and so is a change of a `FIXED_ON_RESUME`
    field. Raises TrainError with the message the CLI shows."""
    if resume is not None:
        for name in ("init", "init_any_clap"):
            if given.get(name):
                raise TrainError(_RESUME_REFUSES[name])
        stored = stored_config(resume)
        cfg = TrainConfig.from_json({**stored.to_json(), **given, "out": str(resume)})
        check_resume(cfg, stored)
        return cfg
    if not given.get("manifest") or not given.get("out"):
        raise TrainError("--data and --out are required (or --resume RUN_DIR), on the command line or in "
                         "the --config recipe ([data] manifest, [run] out)")
    if given.get("init_any_clap") and not given.get("init"):
        raise TrainError(f"{setting_name('init_any_clap')} needs --init DIR (the decoder to start from)")
    fields = dict(given)
    if fields.get("init"):
        stored = init_architecture(fields["init"])
        check_architecture({k: v for k, v in fields.items() if k in ARCHITECTURE}, stored)
        fields = {**stored, **fields}
    return TrainConfig(**fields)


_RESUME_REFUSES = {
    "init": "--init starts a new run; --resume continues from the run's own checkpoint",
    "init_any_clap": "[decoder] init_any_clap goes with --init, which starts a new run; --resume continues from "
                     "the run's own checkpoint",
}


def stored_config(run: str | os.PathLike) -> TrainConfig:
    """The config a run folder was trained with (its config.json)."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise TrainError(f"--resume {run}: no config.json there; pass a folder written by `lmaczs train`")
    return TrainConfig.from_json({**json.loads(path.read_text())["train"], "out": str(run)})


def check_resume(cfg: TrainConfig, stored: TrainConfig) -> None:
    """Refuse a resumed config that changes what the run in progress cannot change."""
    for name in ("init", "init_any_clap"):
        if getattr(cfg, name) != getattr(stored, name):
            raise TrainError(_RESUME_REFUSES[name])
    for name, why in FIXED_ON_RESUME.items():
        if getattr(cfg, name) != getattr(stored, name):
            raise TrainError(f"{setting_name(name)} cannot change on --resume: {why}; start a new run instead")


def init_architecture(directory: str | os.PathLike) -> dict[str, Any]:
    """The architecture fields (`ARCHITECTURE`) of the decoder saved in ``directory``."""
    from .decoder import DecoderConfig, read_decoder_config

    stored = DecoderConfig.from_json(read_decoder_config(directory)["decoder"]).to_json()
    return {name: stored[name] for name in ARCHITECTURE}


def check_architecture(asked: Mapping[str, Any], stored: Mapping[str, Any]) -> None:
    """Refuse architecture fields that differ from the ``--init`` decoder's."""
    for name in ARCHITECTURE:
        if name in asked and asked[name] != stored[name]:
            raise TrainError(f"{setting_name(name)} {_shown(asked[name])} differs from the --init decoder's "
                             f"{_shown(stored[name])}: fine-tuning keeps its architecture")


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


COMMAND_LINE = ("manifest", "audio_dir", "val_manifest", "val_fraction", "workers", "strict", "clap", "tokenizer",
                "domain", "init", "epochs", "max_steps", "batch_size", "accum", "lr", "seed", "lambda_sparsity",
                "lambda_diversity", "mismatched", "out", "device", "amp", "log_every", "save_every")
_OPTION_OF = {"manifest": "--data", "val_manifest": "--val-data"}


def setting_name(name: str) -> str:
    """How a user sets field ``name``: its `lmaczs train` option, or its place in a recipe file."""
    if name in COMMAND_LINE:
        return _OPTION_OF.get(name, f"--{name.replace('_', '-')}")
    return f"[{SECTION_OF[name]}] {name}"
