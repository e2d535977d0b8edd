"""`lmaczs eval`: LMAC-ZS against GradCAM, GradCAM++, SmoothGrad and Integrated Gradients.

For each clip (its first 10-s window; shorter clips repeat-padded as CLAP was trained):
CLAP scores it against every label prompt, ĉ is the top prompt, and each method explains
the similarity to ĉ's prompt with a mask on the decoder's grid. The masked input M⊙X
(the mask a gain on magnitude before the log) and the input with the explanation removed
(x − x_int, x_int the listenable explanation, as in the LMAC-ZS paper) are scored again, giving the
metrics of `metrics` (AI, AD, AG, FF, Fid-In, SPS, COMP, MM) and, where the data has ground
truth (the demo world), localization of ĉ's event.

Data (`load_dataset`): a labelled folder (``class/clip.wav``), ESC-50's layout
(``meta/esc50.csv`` + ``audio/``, ``fold``), UrbanSound8K's (``metadata/UrbanSound8K.csv`` +
``audio/foldN/``) or a named set of `NAMED_DATASETS` (``demo``: held-out scenes of the demo
world with ground truth, its selection split; ``demo-test``: its frozen test split, for reports
only), imported only when named; `run_eval` also takes a `Dataset` built
by the caller.

Studies: contamination at an SNR (`contaminate`), cascading randomisation of the audio
encoder (`randomization_study`) and prompt sensitivity (`prompt_sensitivity_study`).
Per-clip records go to ``OUT/clips/<method>.jsonl`` as they are computed, so a rerun
resumes each method where it stopped; tables and plots are written from them (`report_eval`).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import metrics, spectral
from .audio import CLIP_SAMPLES, is_audio_name, load_audio, pad_clip
from .baselines import BASELINES, BaselineSettings, explain_baseline
from .errors import LmaczsError
from .files import atomic_path
from .model import ExplainerModule

METHODS = ("lmaczs", *BASELINES)
# "speech": recordings from a folder (--speech; `lmaczs_cli.demo.speech` ships speech from outside
# the demo world); "speech-in-domain": the demo world's own formant "speech-like voice", labelled
# as what it is: for the demo CLAP it is a known event kind, not out-of-domain audio.
CONTAMINATIONS = ("mix", "white-noise", "speech", "speech-in-domain")
RUN_FORMAT = "lmaczs-eval/1"


class EvalError(LmaczsError):
    """An evaluation that cannot run as asked; the message names the fix."""


@dataclass(frozen=True)
class EvalConfig:
    """One `lmaczs eval` run; stored in OUT/run.json (a rerun must match it to resume)."""

    data: str                                  # "demo", a labelled folder, ESC-50 or UrbanSound8K root
    out: str
    methods: tuple[str, ...] = METHODS
    clap: str = "demo"
    decoder: str | None = None                 # `lmaczs train` folder; None: the demo decoder
    tokenizer: str | None = None
    force: bool = False
    batch_size: int = 8
    device: str = "auto"
    fold: int | None = None                    # ESC-50 / UrbanSound8K: only this fold
    limit: int | None = None                   # first N clips (demo: N scenes, default 32)
    contaminate: str | None = None             # mix | white-noise | speech
    snr: float = 3.0                           # dB, clip power over contamination power
    speech: str | None = None                  # folder of speech audio for contaminate=speech
    randomization: bool = False
    prompt_sensitivity: bool = False
    study_clips: int = 4                       # clips the two studies use (the first N)
    logit_scale: float = 1.0                   # softmax temperature of p_c; 1: the paper's formula
    ad_convention: str = "paper"               # "paper", or "speechbrain": AD on probabilities softmaxed
                                               # twice, as SpeechBrain's L-MAC code (metrics.AD_CONVENTIONS)
    curves: bool = False                       # insertion and deletion curves at equal budgets for
                                               # every method, with their areas
    budgets: tuple[float, ...] = metrics.BUDGETS   # the curves' shares of mask cells kept / removed
    seed: int = 0
    baselines: BaselineSettings = field(default_factory=BaselineSettings)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise EvalError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if self.contaminate not in (None, *CONTAMINATIONS):
            raise EvalError(f"unknown contamination {self.contaminate!r}; use one of {', '.join(CONTAMINATIONS)}")
        if self.contaminate == "speech" and not self.speech:
            raise EvalError("--contaminate speech needs --speech DIR (a folder of speech recordings; "
                            "`python -m lmaczs_cli.demo.speech DIR` writes one)")
        budgets = list(self.budgets)
        if len(budgets) < 2 or not all(0 < q <= 1 for q in budgets) or budgets != sorted(set(budgets)):
            raise EvalError(f"budgets must be at least two increasing shares in (0, 1]; got {self.budgets}")
        if self.ad_convention not in metrics.AD_CONVENTIONS:
            raise EvalError(f"unknown AD convention {self.ad_convention!r}; "
                            f"use one of {', '.join(metrics.AD_CONVENTIONS)}")

    def settings(self) -> dict[str, Any]:
        """What the numbers depend on (not where they are written or on which device)."""
        d = dataclasses.asdict(self)
        for k in ("out", "device", "batch_size", "methods"):
            d.pop(k)
        return d

    def identity(self) -> dict[str, Any]:
        """What per-clip records depend on: a rerun resumes only when this matches (the
        studies are recomputed every run, so their options may change)."""
        d = self.settings()
        for k in ("randomization", "prompt_sensitivity", "study_clips"):
            d.pop(k)
        return d


# ----------------------------------------------------------------------------- data


@dataclass
class EvalClip:
    """One clip to explain: where its audio comes from, its labels and ground truth."""

    key: str                                   # unique in the run (relative path or scene id)
    labels: tuple[int, ...]                    # class indices present (one for labelled data)
    path: Path | None = None
    # a synthetic clip with ground truth instead of a file: () -> an object with .wave, float32
    # (480000,), and .mel_masks, {class name: bool (1001, 64) region of the mel grid}
    scene: Callable[[], Any] | None = None

    def wave(self) -> np.ndarray:
        """The first 10-s window, float32 (480000,)."""
        if self.scene is not None:
            return self.scene().wave
        x = load_audio(self.path)
        return pad_clip(x) if x.size <= CLIP_SAMPLES else x[:CLIP_SAMPLES].copy()

    def regions(self, classes: Sequence[str]) -> dict[int, np.ndarray]:
        """Ground truth: class index -> bool (1001, 64) mel-grid region; {} without truth."""
        if self.scene is None:
            return {}
        return {classes.index(n): m for n, m in self.scene().mel_masks.items()}


@dataclass
class Dataset:
    classes: list[str]
    prompts: list[str]                         # one per class: what CLAP scores and LMAC-ZS is conditioned on
    clips: list[EvalClip]
    layout: str


# Data sets named rather than found on disk: name -> "module:function", the function taking
# (limit, seed) and returning a Dataset. Imported only when named, so this module needs none of them.
NAMED_DATASETS = {"demo": "lmaczs_cli.demo.dataset:eval_dataset",                # selection split
                  "demo-test": "lmaczs_cli.demo.dataset:frozen_test_dataset"}   # frozen test split


def load_dataset(data: str, fold: int | None = None, limit: int | None = None, seed: int = 0) -> Dataset:
    """Find the clips and classes of ``data`` (see module docstring)."""
    if data in NAMED_DATASETS:
        import importlib

        module, function = NAMED_DATASETS[data].split(":")
        return getattr(importlib.import_module(module), function)(limit, seed)
    root = Path(data)
    if (root / "meta" / "esc50.csv").is_file():
        ds = _table_dataset(root, root / "meta" / "esc50.csv", "esc50", "filename", "category", fold,
                            lambda row: root / "audio" / row["filename"])
    elif (root / "metadata" / "UrbanSound8K.csv").is_file():
        ds = _table_dataset(root, root / "metadata" / "UrbanSound8K.csv", "urbansound8k", "slice_file_name",
                            "class", fold, lambda row: root / "audio" / f"fold{row['fold']}" / row["slice_file_name"])
    elif root.is_dir():
        if fold is not None:
            raise EvalError("--fold applies to ESC-50 and UrbanSound8K layouts, not to a labelled folder")
        ds = _folder_dataset(root)
    else:
        raise EvalError(f"--data {data}: use demo, a labelled folder (class/clip.wav), ESC-50's folder "
                        "(meta/esc50.csv + audio/) or UrbanSound8K's (metadata/UrbanSound8K.csv + audio/foldN/)")
    if not ds.clips:
        raise EvalError(f"--data {data}: no clips" + (f" in fold {fold}" if fold is not None else ""))
    ds.clips = ds.clips[:limit] if limit else ds.clips
    return ds


def _table_dataset(root: Path, table: Path, layout: str, file_col: str, class_col: str, fold: int | None,
                   path_of: Callable[[dict[str, str]], Path]) -> Dataset:
    from .data import class_caption

    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or file_col not in rows[0] or class_col not in rows[0]:
        raise EvalError(f"{table}: expected columns {file_col}, {class_col}, fold")
    classes = sorted({r[class_col] for r in rows})
    keep = [r for r in rows if fold is None or int(r["fold"]) == fold]
    clips = [EvalClip(str(path_of(r).relative_to(root)), (classes.index(r[class_col]),), path=path_of(r))
             for r in keep]
    missing = [c.key for c in clips if not c.path.is_file()]
    if missing:
        raise EvalError(f"{root}: {len(missing)} clips listed in {table.name} are missing, e.g. {missing[0]}")
    return Dataset(classes, [class_caption(c) for c in classes], clips, layout)


def _folder_dataset(root: Path) -> Dataset:
    from .data import read_manifest

    items, _ = read_manifest(root)
    classes = sorted({Path(i.source).parts[1] for i in items})
    from .data import class_caption

    clips = [EvalClip("/".join(Path(i.source).parts[1:]), (classes.index(Path(i.source).parts[1]),), path=i.audio)
             for i in items]
    return Dataset(classes, [class_caption(c) for c in classes], clips, "folder")


# ----------------------------------------------------------------------------- contamination


def mix_at_snr(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """wave + noise scaled so that 10·log10(P_wave / P_noise) = snr_db. Both (n,) float32."""
    pw, pn = float(np.mean(wave.astype(np.float64) ** 2)), float(np.mean(noise.astype(np.float64) ** 2))
    if pn <= 0:
        return wave.copy()
    gain = np.sqrt(pw / (pn * 10 ** (snr_db / 10)))
    return (wave + gain * noise).astype(np.float32)


class Contaminator:
    """Adds mix (the next clip of the set), white noise, speech (a folder, cycled) or the demo
    world's in-domain formant speech at an SNR."""

    def __init__(self, kind: str, snr: float, clips: Sequence[EvalClip], speech: str | None, seed: int) -> None:
        self.kind, self.snr, self.clips, self.seed = kind, snr, list(clips), seed
        self.speech: list[Path] = []
        if kind == "speech":
            folder = Path(speech or "")
            self.speech = sorted(p for p in folder.rglob("*") if is_audio_name(p.name))
            if not self.speech:
                raise EvalError(f"--speech {speech}: no audio files there")

    def noise(self, index: int) -> np.ndarray:
        if self.kind == "white-noise":
            return np.random.default_rng([self.seed, index]).standard_normal(CLIP_SAMPLES).astype(np.float32)
        if self.kind == "mix":
            return self.clips[(index + 1) % len(self.clips)].wave()
        if self.kind == "speech-in-domain":
            from .demo.speech import formant_speech

            return formant_speech(self.seed * 1_000_003 + index)
        x = load_audio(self.speech[index % len(self.speech)])
        return pad_clip(x) if x.size <= CLIP_SAMPLES else x[:CLIP_SAMPLES]

    def __call__(self, wave: np.ndarray, index: int) -> np.ndarray:
        return mix_at_snr(wave, self.noise(index), self.snr)


# ----------------------------------------------------------------------------- masks


class MaskMethods:
    """Every method's mask for a batch, on the decoder's grid (B, 1001, bins) in [0, 1]."""

    def __init__(self, clap: Any, decoder: nn.Module, domain: str, text: torch.Tensor,
                 settings: BaselineSettings) -> None:
        self.clap, self.decoder, self.domain = clap, decoder, domain
        self.model = ExplainerModule(clap, decoder, domain)
        self.text, self.settings = text, settings      # text (C, D) label prompt embeddings

    def __call__(self, method: str, waves: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        """waves (B, 480000), target (B,) class indices -> masks (B, 1001, bins) float32."""
        if method == "lmaczs":
            with torch.no_grad():
                out = self.model(waves, self.text[target][:, None], check=False, listen=False)
            return out["masks"][:, 0].float().cpu().numpy()
        logmel = spectral.log_mel(waves)
        masks = explain_baseline(method, self.clap, self.text, logmel, target, self.settings)
        if self.domain == "stft":   # the same grid as LMAC-ZS: mel-grid maps spread over linear bins
            masks = spectral.mel_mask_to_linear(torch.from_numpy(masks)).numpy()
        return masks


@torch.no_grad()
def probabilities(clap: Any, text: torch.Tensor, logmel: torch.Tensor, logit_scale: float) -> np.ndarray:
    """log-mel (B, 1001, 64) -> p_c (B, C) over the label prompts."""
    emb, _ = clap.encode(logmel)
    return metrics.class_probabilities((emb @ text.T).cpu().numpy(), logit_scale)


@torch.no_grad()
def masked_probabilities(model: ExplainerModule, text: torch.Tensor, waves: torch.Tensor, masks: np.ndarray,
                         logit_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """p_c of M⊙X and of X − X_int (the explanation removed from the waveform): two (B, C).
    masks (B, 1001, bins) on the model's grid, whichever method made them."""
    m = torch.from_numpy(masks).to(waves.device)
    with torch.no_grad():
        spec = model.analyse(waves)
        masked = model.masked_log_mel(spec, 1, m)
        removed = waves - model.listen(spec, m, 1, waves.shape[-1])
    return (probabilities(model.clap, text, masked, logit_scale),
            probabilities(model.clap, text, spectral.log_mel(removed), logit_scale))


# ----------------------------------------------------------------------------- the run


class Records:
    """OUT/clips/<method>.jsonl: one line per explained clip, appended as computed."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "clips"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, method: str) -> Path:
        return self.dir / f"{method.replace('+', 'p')}.jsonl"

    def read(self, method: str) -> list[dict[str, Any]]:
        p = self.path(method)
        if not p.is_file():
            return []
        out = []
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:   # a line cut by a crash: that clip is redone
                continue
        return out

    def done(self, method: str) -> set[str]:
        return {r["key"] for r in self.read(method)}

    def append(self, method: str, records: Sequence[dict[str, Any]]) -> None:
        with open(self.path(method), "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def model_identity(clap: Any, decoder: nn.Module) -> dict[str, str]:
    """What the models are, not what they were called: the CLAP's identity hash and the decoder's
    (`decoder.decoder_hash`). ``--decoder`` names a folder (or nothing: the bundled one), whose
    contents may change between two runs of the same settings."""
    from .decoder import decoder_hash

    return {"clap": clap.identity(), "decoder": decoder_hash(decoder)}


def _check_run(out: Path, cfg: EvalConfig, models: dict[str, str]) -> None:
    """A rerun in the same OUT must have the same settings and models (then it resumes)."""
    path = out / "run.json"
    mine = {"format": RUN_FORMAT, "settings": json.loads(json.dumps(cfg.identity())), "models": models}
    if path.is_file():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            diff = sorted(k for k in mine["settings"] if theirs.get("settings", {}).get(k) != mine["settings"][k])
            if "models" not in theirs:
                diff.append("the models, which that run did not record")
            else:
                diff += [f"the {k} ({str(theirs['models'].get(k))[:12]} there, {v[:12]} now)"
                         for k, v in models.items() if theirs["models"].get(k) != v]
            raise EvalError(f"{out} holds an eval run with other settings ({', '.join(diff) or 'format'}); "
                            "use another --out, or delete it to start over")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(mine, indent=2) + "\n")


def _clip_records(method: str, batch: Sequence[EvalClip], pred: np.ndarray, prob: np.ndarray,
                  values: dict[str, np.ndarray], masks: np.ndarray, classes: Sequence[str],
                  seconds: float) -> list[dict[str, Any]]:
    out = []
    for i, clip in enumerate(batch):
        c = int(pred[i])
        rec = {"key": clip.key, "method": method, "labels": [classes[k] for k in clip.labels],
               "pred": classes[c], "correct": c in clip.labels, "p_pred": float(prob[i, c]),
               "seconds": seconds / len(batch), **{k: float(v[i]) for k, v in values.items()}}
        regions = clip.regions(classes)
        if c in regions and masks.shape[-1] == regions[c].shape[-1]:
            rec.update(metrics.localization(masks[i], regions[c]))
        out.append(rec)
    return out


def load_models(cfg: EvalConfig) -> tuple[Any, nn.Module, str]:
    """(CLAP, decoder, mask domain) from the run's model options."""
    from .explain import Explainer

    ex = Explainer.load(clap=cfg.clap, decoder=cfg.decoder, tokenizer=cfg.tokenizer, device=cfg.device,
                        force=cfg.force)
    return ex.clap, ex.decoder, ex.domain


def run_eval(cfg: EvalConfig, on_event: Callable[[dict[str, Any]], None] | None = None,
             dataset: Dataset | None = None) -> dict[str, Any]:
    """Run (or resume) an evaluation; write the tables and plots; return the summary (metrics.json).
    ``dataset``: the clips to evaluate, when the caller built them (else `load_dataset` of ``cfg.data``)."""
    emit = on_event or (lambda e: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clap, decoder, domain = load_models(cfg)
    _check_run(out, cfg, model_identity(clap, decoder))
    ds = dataset if dataset is not None else load_dataset(cfg.data, cfg.fold, cfg.limit, cfg.seed)
    text = clap.encode_text(ds.prompts).detach()
    masker = MaskMethods(clap, decoder, domain, text, cfg.baselines)
    dirty = Contaminator(cfg.contaminate, cfg.snr, ds.clips, cfg.speech, cfg.seed) if cfg.contaminate else None
    records = Records(out)
    done = {m: records.done(m) for m in cfg.methods}
    todo = [i for i, c in enumerate(ds.clips) if any(c.key not in done[m] for m in cfg.methods)]
    emit({"event": "start", "clips": len(ds.clips), "methods": list(cfg.methods),
          "todo": sum(c.key not in done[m] for c in ds.clips for m in cfg.methods), "layout": ds.layout})
    for k in range(0, len(todo), cfg.batch_size):       # each batch decoded once for every method
        idx = todo[k: k + cfg.batch_size]
        waves = _waves([ds.clips[i] for i in idx], idx, dirty).to(clap.device)
        prob = probabilities(clap, text, spectral.log_mel(waves), cfg.logit_scale)
        for method in cfg.methods:
            rows = [j for j, i in enumerate(idx) if ds.clips[i].key not in done[method]]
            if rows:
                _run_method(method, masker, [ds.clips[idx[j]] for j in rows], waves[rows], prob[rows],
                            ds.classes, records, cfg)
                emit({"event": "batch", "method": method, "clips": len(rows)})
    studies: dict[str, Any] = {}
    study = ds.clips[: cfg.study_clips]
    if cfg.randomization or cfg.prompt_sensitivity:
        waves = _waves(study, list(range(len(study))), dirty).to(clap.device)
        if cfg.randomization:
            emit({"event": "study", "name": "randomization"})
            studies["randomization"] = randomization_study(clap, decoder, domain, text, waves, cfg)
        if cfg.prompt_sensitivity:
            emit({"event": "study", "name": "prompt_sensitivity"})
            studies["prompt_sensitivity"] = prompt_sensitivity_study(masker, clap, text, waves, study, cfg)
    qualitative = _qualitative(masker, clap, text, ds, dirty, cfg)
    from .eval_report import report_eval

    return report_eval(out, cfg, ds, {m: records.read(m) for m in cfg.methods}, studies, qualitative)


def _run_method(method: str, masker: MaskMethods, batch: Sequence[EvalClip], waves: torch.Tensor,
                prob: np.ndarray, classes: Sequence[str], records: Records, cfg: EvalConfig) -> None:
    """One method on one batch: masks for ĉ, re-scored inputs, per-clip records appended."""
    pred = prob.argmax(axis=1)
    t0 = time.perf_counter()
    masks = masker(method, waves, torch.from_numpy(pred).to(waves.device))
    seconds = time.perf_counter() - t0
    pm, pr = masked_probabilities(masker.model, masker.text, waves, masks, cfg.logit_scale)
    values = metrics.per_clip_metrics(prob, pm, pr, masks, ad=cfg.ad_convention)
    rows = _clip_records(method, batch, pred, prob, values, masks, classes, seconds)
    if cfg.curves:
        inserted, deleted = budget_curves(masker.model, masker.text, waves, masks, pred, cfg.logit_scale,
                                          cfg.budgets)
        areas = zip(metrics.curve_area(inserted, cfg.budgets), metrics.curve_area(deleted, cfg.budgets))
        for row, ins, dele, (ins_area, del_area) in zip(rows, inserted, deleted, areas):
            row.update({"insertion": ins.tolist(), "deletion": dele.tolist(),
                        "insertion_auc": float(ins_area), "deletion_auc": float(del_area)})
    records.append(method, rows)


@torch.no_grad()
def budget_curves(model: ExplainerModule, text: torch.Tensor, waves: torch.Tensor, masks: np.ndarray,
                  target: np.ndarray, logit_scale: float,
                  budgets: tuple[float, ...] = metrics.BUDGETS) -> tuple[np.ndarray, np.ndarray]:
    """Insertion and deletion at equal budgets (`metrics.top_cells`): each mask binarised to its top
    share q of cells; p of class ``target`` (B,) with only those cells kept (insertion) and with
    them removed (deletion), both applied as `masked_probabilities` applies a mask (a gain on
    magnitude before the log: a removed cell is silence). waves (B, 480000), masks (B, 1001, bins)
    -> two (B, Q), column q for budgets[q]."""
    spec = model.analyse(waves)
    rows = np.arange(len(target))
    inserted, deleted = [], []
    for keep in metrics.top_cells(masks, budgets):
        kept = torch.from_numpy(keep.astype(np.float32)).to(waves.device)
        for curve, m in ((inserted, kept), (deleted, 1 - kept)):
            curve.append(probabilities(model.clap, text, model.masked_log_mel(spec, 1, m), logit_scale)[rows, target])
    return np.stack(inserted, axis=1), np.stack(deleted, axis=1)


def _waves(batch: Sequence[EvalClip], idx: Sequence[int], dirty: Contaminator | None) -> torch.Tensor:
    waves = [c.wave() for c in batch]
    if dirty is not None:
        waves = [dirty(w, i) for w, i in zip(waves, idx)]
    return torch.from_numpy(np.stack(waves))


# ----------------------------------------------------------------------------- studies


def encoder_stages(clap: Any) -> list[tuple[str, list[nn.Module]]]:
    """The audio encoder's stages from the top (projection) down, for cascading randomisation."""
    b = clap.branch
    top = [clap.clap.audio_projection]
    if clap.cfg.is_htsat:
        stages = [("projection", top), ("stage 4", [b.layers[3], b.norm])]
        stages += [(f"stage {i + 1}", [b.layers[i]]) for i in (2, 1, 0)]
        return stages + [("patch embedding", [b.patch_embed])]
    stages = [("projection", top + [b.fc1])]
    return stages + [(f"conv block {i}", [getattr(b, f"conv_block{i}")]) for i in range(6, 0, -1)]


def reinitialise_(modules: Sequence[nn.Module], seed: int) -> None:
    """Fresh random weights: reset_parameters() where a layer has it (Linear, Conv, norms), a
    truncated normal (σ 0.02, Swin's init) for other parameters (relative position tables)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for top in modules:
            for m in top.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
                else:
                    for p in m.parameters(recurse=False):
                        nn.init.trunc_normal_(p, std=0.02)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two (T, F) masks in [0, 1] (scikit-image, data range 1)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(np.asarray(a, np.float64), np.asarray(b, np.float64), data_range=1.0))


def cascading_masks(clap: Any, decoder: nn.Module, domain: str, text: torch.Tensor, settings: BaselineSettings,
                    methods: Sequence[str], waves: torch.Tensor, target: torch.Tensor,
                    seed: int) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Cascading randomisation (Adebayo et al. 2018) of a copy of `clap` (the original is left
    alone): encoder stages re-initialised from the top down, cumulatively. Yields ("intact",
    masks) first, then (stage, masks) after each stage: each method's masks (B, 1001, bins) for
    `target` (B,) (rows of `text`)."""
    yield "intact", {m: MaskMethods(clap, decoder, domain, text, settings)(m, waves, target) for m in methods}
    broken = type(clap)(copy.deepcopy(clap.clap), clap.cfg, clap.tokenizer, f"{clap.source} (randomised)")
    for s, (name, modules) in enumerate(encoder_stages(broken)):
        reinitialise_(modules, seed + s)
        masker = MaskMethods(broken, decoder, domain, text, settings)
        yield name, {m: masker(m, waves, target) for m in methods}


def cascading_ssim(clap: Any, decoder: nn.Module, domain: str, text: torch.Tensor, settings: BaselineSettings,
                   methods: Sequence[str], waves: torch.Tensor, target: torch.Tensor,
                   seed: int) -> dict[str, dict[str, float]]:
    """`cascading_masks` compared with the intact model's by SSIM. Returns {stage: {method: mean SSIM}}."""
    stages = cascading_masks(clap, decoder, domain, text, settings, methods, waves, target, seed)
    _, original = next(stages)
    return {name: {m: float(np.mean([ssim(a, b) for a, b in zip(original[m], masks[m])])) for m in methods}
            for name, masks in stages}


def randomization_study(clap: Any, decoder: nn.Module, domain: str, text: torch.Tensor, waves: torch.Tensor,
                        cfg: EvalConfig) -> dict[str, Any]:
    """`cascading_ssim` for the original ĉ of each clip. Returns {"stages": [...],
    "ssim": {method: [mean per stage]}}."""
    prob = probabilities(clap, text, spectral.log_mel(waves), cfg.logit_scale)
    target = torch.from_numpy(prob.argmax(axis=1)).to(waves.device)
    per_stage = cascading_ssim(clap, decoder, domain, text, cfg.baselines, cfg.methods, waves, target, cfg.seed)
    return {"stages": list(per_stage), "ssim": {m: [v[m] for v in per_stage.values()] for m in cfg.methods}}


def prompt_sensitivity_study(masker: MaskMethods, clap: Any, text: torch.Tensor, waves: torch.Tensor,
                             clips: Sequence[EvalClip], cfg: EvalConfig) -> dict[str, Any]:
    """Each method's mask for every label prompt of each study clip: mask mean vs the prompt's
    similarity, matched (the class is in the clip) vs mismatched. Returns per method the points
    and summaries (mean MM matched / mismatched, Pearson r of MM with similarity)."""
    with torch.no_grad():
        sims = (clap.encode(spectral.log_mel(waves))[0] @ text.T).cpu().numpy()   # (B, C)
    out: dict[str, Any] = {}
    for m in cfg.methods:
        points = []
        for c in range(text.shape[0]):
            target = torch.full((waves.shape[0],), c, device=waves.device, dtype=torch.long)
            mm = metrics.mask_mean(masker(m, waves, target))
            points += [{"similarity": float(sims[i, c]), "mask_mean": float(mm[i]),
                        "matched": c in clips[i].labels} for i in range(len(clips))]
        sim = np.array([p["similarity"] for p in points])
        mm = np.array([p["mask_mean"] for p in points])
        matched = np.array([p["matched"] for p in points])
        r = float(np.corrcoef(sim, mm)[0, 1]) if mm.std() > 0 and sim.std() > 0 else float("nan")
        out[m] = {"points": points, "pearson_r": r,
                  "mask_mean_matched": float(mm[matched].mean()) if matched.any() else float("nan"),
                  "mask_mean_mismatched": float(mm[~matched].mean()) if (~matched).any() else float("nan")}
    return out


def _qualitative(masker: MaskMethods, clap: Any, text: torch.Tensor, ds: Dataset, dirty: Contaminator | None,
                 cfg: EvalConfig) -> dict[str, Any]:
    """Masks of every method for the first clip: the top prompt (matched) and the least similar
    prompt (mismatched)."""
    waves = _waves(ds.clips[:1], [0], dirty).to(clap.device)
    with torch.no_grad():
        sims = (clap.encode(spectral.log_mel(waves))[0] @ text.T)[0]
    best, worst = int(sims.argmax()), int(sims.argmin())
    masks = {m: {kind: masker(m, waves, torch.tensor([c], device=waves.device))[0]
                 for kind, c in (("matched", best), ("mismatched", worst))} for m in cfg.methods}
    return {"key": ds.clips[0].key, "wave": waves[0].cpu().numpy(), "domain": masker.domain,
            "prompts": {"matched": ds.prompts[best], "mismatched": ds.prompts[worst]}, "masks": masks}
