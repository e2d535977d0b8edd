"""Training the LMAC-ZS decoder on a frozen CLAP: loop, checkpoints, exact resume, DDP.

A run is described by a `TrainConfig` (`lmaczs_cli.recipe`: its fields, recipe files and the
rules for new, fine-tuning and resumed runs); `train` checks those rules again, so a library
caller is refused what the command line refuses.

One optimizer step = ``world * accum`` micro-batches of ``batch_size`` clips (data.shard).
Every random choice — the epoch's shuffle, each clip's 10-s crop, each micro-batch's pair
subsample — is a pure function of (seed, epoch, step, position), so a resumed run, a run
with any number of DataLoader workers and a ``torchrun`` run with gradient accumulation all
form the same batches and pairs.

Under DDP, pairs are formed **within a rank's micro-batch** (embeddings are not gathered):
a 2-process run equals one process with ``accum * 2`` micro-batches per step.

The masked forward is `model.ExplainerModule`'s differentiable part: its front end and encoder
pass (`features`, without gradients: the CLAP is frozen), the decoder (`decode`) and the
masked encoder input (`masked_log_mel`), through which gradients reach the mask.

Outputs in ``--out DIR``:
  decoder.safetensors, config.json   the trained decoder (what `explain` loads)
  recipe.toml                        the run's whole TrainConfig: `--config` it to run it again
  metrics.jsonl                      one line per logged step and per validation pass
  skipped.jsonl                      manifest rows whose audio was missing or unreadable
  train_state/                       optimizer.safetensors + state.json, for --resume
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from . import __version__, data
from .clap import ClapModel, load_clap
from .decoder import DecoderConfig, MaskDecoder, load_decoder, save_decoder
from .device import resolve_device, torchrun_rank
from .files import atomic_path, sha256_file
from .loss import LossTerms, absent_term, all_pairs, lmac_zs_loss, overlap_term, removal_term, sample_pairs
from .model import ExplainerModule, Features
from .recipe import (  # noqa: F401  (TrainConfig, TrainError, resolve_config, load_recipe: this module's API too)
    ARCHITECTURE, RECIPE_NAME, TrainConfig, TrainError, check_architecture, check_resume, init_architecture,
    load_recipe, resolve_config, stored_config, write_recipe,
)

WARMUP_SHARE = 0.05   # cosine: share of the run's steps spent warming up linearly


def learning_rate(cfg: TrainConfig, step: int, total: int) -> float:
    """Adam's learning rate for optimizer step ``step`` (0-based) of ``total``: ``cfg.lr`` throughout,
    or (cosine) a linear warm-up over the first 5 % of the steps, then half a cosine from ``cfg.lr``
    towards 0, reached just after the last step. A pure function of the step, so a resumed run continues the same
    curve (with more ``--epochs`` the curve stretches to the new total)."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warm = max(1, round(WARMUP_SHARE * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the process group that ``torchrun`` describes (NCCL on GPU, gloo on CPU)."""
    launch = torchrun_rank()
    if launch.world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device_name != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), launch.local_rank)


# --------------------------------------------------------------------------- one step


class TextCache:
    """Caption -> CLAP text embedding, computed once per distinct caption (bounded LRU).

    Each caption is encoded on its own: batched matmuls round differently with the batch's
    make-up, and a resumed or multi-process run must see bit-identical text embeddings."""

    def __init__(self, clap: ClapModel, capacity: int = 50_000) -> None:
        self.clap, self.capacity = clap, capacity
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        for c in dict.fromkeys(captions):
            if c not in self._cache:
                self._cache[c] = self.clap.encode_text([c])[0]
        for c in captions:
            self._cache.move_to_end(c)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return torch.stack([self._cache[c] for c in captions])


def binarising_noise(masks: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """sigmoid(logit(M) + scale * g), g ~ Logistic(0, 1) drawn from `generator` (on the CPU).

    At scale 1 a cell whose logit is 0 becomes uniform on [0, 1] and one at logit +-5 stays within
    ~0.05 of 0 or 1 most of the time: only masks that commit to keeping or dropping a cell keep the
    similarity term steady. Without it a uniform attenuation (mask ~0.3 everywhere, a few dB down:
    CLAP hardly notices a gain change) meets the similarity term and pays little sparsity, and
    training settles there instead of isolating the prompted sound. Training only: the saved
    decoder's mask is the clean sigmoid."""
    eps = 1e-6
    u = torch.rand(masks.shape, generator=generator).to(masks.device).clamp(eps, 1 - eps)
    logistic = u.log() - (-u).log1p()
    return torch.sigmoid(torch.logit(masks.clamp(eps, 1 - eps)) + scale * logistic.to(masks.dtype))


def straight_through(masks: torch.Tensor) -> torch.Tensor:
    """Forward: the mask thresholded at 0.5 (each cell kept whole or dropped to the floor);
    backward: the gradient of the soft mask (straight-through estimator).

    A sigmoid mask leaves a dropped cell ~30 dB down, not gone, and a CLAP still hears an event
    30 dB down: so in training the encoder is shown what a committed mask does (the events the
    prompt does not name removed, as a listener of the explanation would hear them gone), while
    the decoder still gets a gradient for every cell kept. Training only; the saved decoder's mask
    is the clean sigmoid."""
    hard = (masks > 0.5).to(masks.dtype)
    return hard + masks - masks.detach()


def mask_logits(masks: torch.Tensor) -> torch.Tensor:
    """logit(m) in float32 for masks in [0, 1], finite at both ends (0 reads about -85, 1 about +16)."""
    m = masks.float().clamp(1e-37, 1.0)
    return torch.log(m) - torch.log1p(-m.clamp_max(1 - 1e-7))


def logit_penalty(masks: torch.Tensor, bound: float) -> torch.Tensor:
    """mean(relu(|logit(m)| - bound)²): zero while every mask logit is inside ±bound. A sigmoid
    mask whose logits for a prompt sink far below 0 has no gradient left to bring the prompt's
    events back (an empty mask kept for good, whatever it costs in similarity); Adam's normalised
    steps keep pushing them down regardless. This term holds them where the gradient still flows.
    Logits below about -85 or above about +16 (where float32 masks read 0 or 1) are out of its reach."""
    return torch.relu(mask_logits(masks).abs() - bound).square().mean()


REACH_SHARE = 0.005   # reach_penalty's top cells: 0.5 % of the grid (~320 of 1001 x 64, e.g. 0.8 s x 4 bands)


def reach_penalty(masks: torch.Tensor, share: float = REACH_SHARE) -> torch.Tensor:
    """Mean over masks of relu(-mean logit of the mask's top `share` of cells)²: zero once each
    mask's strongest cells reach the 0.5 threshold. masks (P, T, F) in [0, 1].

    For matched pairs only (a caption and the clip it describes: there is something to point
    at). A mask whose every logit sank far below 0 gets a similarity gradient damped by
    m(1 - m) (~1e-3 at -7), and Adam's steps, normalised over every prompt, leave it there: the
    prompt's explanation stays empty whatever it costs in similarity. This term lifts only the
    strongest cells to where that gradient is whole again; which cells they become is left to the
    similarity term. Under CUDA autocast the sigmoid runs in float16, where logits below about -17
    read 0: masks sunk that far are out of its reach."""
    flat = masks.flatten(1)
    k = max(1, int(round(share * flat.shape[1])))
    return torch.relu(-mask_logits(flat.topk(k, dim=1).values).mean(1)).square().mean()


def masked_embeddings(
    module: ExplainerModule, feats: Features, text: torch.Tensor, pairs: torch.Tensor, noise: float = 0.0,
    generator: torch.Generator | None = None, hard: bool = False, logit_bound: float = 0.0, reach: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks for every (text i, audio j) pair and the embeddings of the masked audio; with `noise`,
    the masks pass through `binarising_noise` first (`generator` required); with `hard`, then
    through `straight_through`; with `logit_bound`, the decoder's own masks' `logit_penalty`, plus
    `reach` times `reach_penalty` on the matched pairs' masks (text i on audio i).

    feats: `module.features` of the B clips; text (B, D); pairs (P, 2) of (text, clip) indices
    -> (masked embeddings (P, D), the masks CLAP was shown (P, 1001, bins), penalty ()).
    Gradients flow through the frozen CLAP into the masks."""
    ti, aj = pairs[:, 0], pairs[:, 1]
    masks = module.decode(feats, aj, text[ti])                       # (P, 1001, bins)
    penalty = logit_penalty(masks, logit_bound) if logit_bound > 0 else masks.new_zeros((), dtype=torch.float32)
    matched = ti == aj
    if reach > 0 and bool(matched.any()):
        penalty = penalty + reach * reach_penalty(masks[matched])
    if noise > 0:
        if generator is None:
            raise ValueError("mask noise needs a generator")
        masks = binarising_noise(masks, noise, generator)
    if hard:
        masks = straight_through(masks)
    masked, _ = module.clap.encode(module.masked_log_mel(feats, aj, masks))
    return masked, masks, penalty


def removal_loss(module: ExplainerModule, feats: Features, text: torch.Tensor, pairs: torch.Tensor,
                 masks: torch.Tensor) -> torch.Tensor:
    """`loss.removal_term` for the matched pairs among `pairs`, with the masks (after any training
    noise) the similarity term saw: one encoder pass per matched pair, one for silence."""
    matched = (pairs[:, 0] == pairs[:, 1]).nonzero().squeeze(1)
    clips = pairs[matched, 1]
    removed, _ = module.clap.encode(module.masked_log_mel(feats, clips, 1.0 - masks[matched].float()))
    silence, _ = module.clap.encode(module.masked_log_mel(feats, clips[:1], torch.zeros_like(masks[matched[:1]])))
    return removal_term(text[pairs[matched, 0]], removed.float(), silence[0].float())


def pair_generator(seed: int, epoch: int, step: int, position: int) -> torch.Generator:
    """The pair subsample of a micro-batch depends only on where it sits in the run."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{step}/{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def micro_batch_loss(
    module: ExplainerModule, texts: Callable[[list[str]], torch.Tensor], waves: torch.Tensor, captions: list[str],
    cfg: TrainConfig, generator: torch.Generator,
) -> tuple[LossTerms, int]:
    """LMAC-ZS loss of one micro-batch, waves (B, n) with a caption each -> (terms, number of
    masked encoder passes). `module` holds the frozen CLAP and the decoder being trained."""
    with torch.no_grad():
        feats = module.features(waves)
    text = texts(captions)
    b = waves.shape[0]
    if cfg.mismatched is None:
        pairs = all_pairs(b)
    else:
        pairs = sample_pairs(b, cfg.mismatched, generator)
    pairs = pairs.to(waves.device)
    use_amp = cfg.amp
    amp_dtype = torch.float16 if waves.device.type == "cuda" else torch.bfloat16
    with torch.autocast(device_type=waves.device.type, dtype=amp_dtype, enabled=use_amp):
        masked, masks, penalty = masked_embeddings(module, feats, text, pairs, cfg.mask_noise, generator,
                                                   cfg.hard_mask, cfg.logit_bound, cfg.lambda_reach)
    terms = lmac_zs_loss(text, feats.embedding, pairs, masked.float(), masks.float(),
                         cfg.lambda_sparsity, cfg.lambda_diversity)
    if cfg.logit_bound > 0 or cfg.lambda_reach > 0:
        terms = dataclasses.replace(terms, total=terms.total + penalty)
    if cfg.lambda_overlap > 0:
        shared = overlap_term(text, pairs, masks)
        terms = dataclasses.replace(terms, total=terms.total + cfg.lambda_overlap * shared, overlap=shared)
    if cfg.lambda_absent > 0:
        absent = absent_term(text, feats.embedding, pairs, masks)
        terms = dataclasses.replace(terms, total=terms.total + cfg.lambda_absent * absent, absent=absent)
    if cfg.lambda_out > 0:
        with torch.autocast(device_type=waves.device.type, dtype=amp_dtype, enabled=use_amp):
            out = removal_loss(module, feats, text, pairs, masks)
        terms = dataclasses.replace(terms, total=terms.total + cfg.lambda_out * out, removal=out)
        return terms, len(pairs) + int((pairs[:, 0] == pairs[:, 1]).sum()) + 1
    return terms, len(pairs)


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(module: ExplainerModule, texts: TextCache, loader: Any, device: torch.device) -> dict[str, float]:
    """Similarity-preservation error and mask mean, matched vs mismatched prompts."""
    sums = {"matched_err": 0.0, "mismatched_err": 0.0, "matched_mask": 0.0, "mismatched_mask": 0.0}
    counts = {"matched": 0, "mismatched": 0}
    for batch in loader:
        if len(batch) == 0:
            continue
        waves = batch.waves.to(device)
        feats = module.features(waves)
        text = texts(batch.captions)
        pairs = all_pairs(len(batch), device)
        masked, masks, _ = masked_embeddings(module, feats, text, pairs)
        ti, aj = pairs[:, 0], pairs[:, 1]
        err = ((text[ti] * feats.embedding[aj]).sum(-1) - (text[ti] * masked).sum(-1)).abs()
        mean = masks.flatten(1).mean(1)
        same = ti == aj
        # the same caption on two clips is not a mismatch
        same |= torch.tensor([batch.captions[i] == batch.captions[j] for i, j in pairs.tolist()], device=device)
        for key, sel in (("matched", same), ("mismatched", ~same)):
            sums[f"{key}_err"] += float(err[sel].sum())
            sums[f"{key}_mask"] += float(mean[sel].sum())
            counts[key] += int(sel.sum())
    out = {}
    for key in ("matched", "mismatched"):
        n = counts[key]
        out[f"{key}_similarity_error"] = sums[f"{key}_err"] / n if n else math.nan
        out[f"{key}_mask_mean"] = sums[f"{key}_mask"] / n if n else math.nan
        out[f"{key}_pairs"] = n
    return out


def init_decoder(directory: str, clap: ClapModel, dec_cfg: DecoderConfig, any_clap: bool = False) -> MaskDecoder:
    """The decoder saved in ``directory`` (a ``lmaczs train`` output), to fine-tune: it must have
    been trained on this CLAP (unless ``any_clap``: e.g. on an earlier round of a CLAP fine-tuned
    since) and have the architecture ``dec_cfg`` asks for."""
    decoder, _ = load_decoder(directory, clap, force=any_clap)
    # an operating point (DecoderConfig.logit_bias) is chosen for a decoder once trained: training
    # goes on from the decoder as trained, and its result needs its own
    decoder.cfg = dataclasses.replace(decoder.cfg, logit_bias=0.0)
    if decoder.cfg != dec_cfg:
        have, want = decoder.cfg.to_json(), dec_cfg.to_json()
        diff = ", ".join(f"{k} {have[k]!r} (asked: {want[k]!r})" for k in have if have[k] != want[k])
        raise TrainError(f"--init {directory}: its decoder has another architecture: {diff}; "
                         "pass the same architecture options or leave them out")
    return decoder.train()


# --------------------------------------------------------------------------- checkpoints


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(out: Path, decoder: MaskDecoder, opt: torch.optim.Optimizer, meta: dict[str, Any],
                    progress: dict[str, int]) -> None:
    """Publish decoder + config, then the optimizer, then state.json last (it vouches for the rest)."""
    from safetensors.torch import save_file

    save_decoder(decoder, out, meta)
    state_dir = out / "train_state"
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors, opt_meta = _optimizer_tensors(opt)
    with atomic_path(state_dir / "optimizer.safetensors") as tmp:
        save_file(tensors, str(tmp))
    state = {**progress, "optimizer": opt_meta,
             "decoder_sha256": sha256_file(out / "decoder.safetensors"),
             "optimizer_sha256": sha256_file(state_dir / "optimizer.safetensors")}
    with atomic_path(state_dir / "state.json") as tmp:
        tmp.write_text(json.dumps(state, indent=1) + "\n")


def load_checkpoint(out: Path, decoder: MaskDecoder, opt: torch.optim.Optimizer) -> dict[str, int]:
    from safetensors.torch import load_file

    state_path = out / "train_state" / "state.json"
    if not state_path.is_file():
        raise TrainError(f"--resume {out}: no train_state/state.json; was this folder written by `lmaczs train`?")
    state = json.loads(state_path.read_text())
    if sha256_file(out / "decoder.safetensors") != state["decoder_sha256"] or \
            sha256_file(out / "train_state" / "optimizer.safetensors") != state["optimizer_sha256"]:
        raise TrainError(f"--resume {out}: the checkpoint files do not match train_state/state.json "
                         "(a save was interrupted); restore them or start a new run")
    decoder.load_state_dict(load_file(str(out / "decoder.safetensors")), strict=True)
    _load_optimizer(opt, load_file(str(out / "train_state" / "optimizer.safetensors")), state["optimizer"])
    return {"step": state["step"], "epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"]}


class MetricsLog:
    """metrics.jsonl: one JSON object per line. On resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.is_file():
            keep = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with atomic_path(path) as tmp:
                tmp.write_text("".join(k + "\n" for k in keep))
        elif enabled and resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- the loop


def _split_validation(items: list[data.Item], cfg: TrainConfig) -> tuple[list[data.Item], list[data.Item]]:
    if cfg.val_manifest:
        val, _ = data.read_manifest(cfg.val_manifest, cfg.audio_dir)
        return items, val[: cfg.val_max]
    n_val = min(cfg.val_max, int(len(items) * cfg.val_fraction))
    if n_val < 2:
        return items, []
    order = np.random.default_rng((cfg.seed, 987654321)).permutation(len(items))
    val_idx = set(order[:n_val].tolist())
    return [it for k, it in enumerate(items) if k not in val_idx], [items[k] for k in sorted(val_idx)]


def validation_note(n_items: int, cfg: TrainConfig) -> str | None:
    """What happens when --val-fraction of the data rounds to fewer than the 2 clips a validation
    pass needs (None when it does not, or when no held-out share was asked for)."""
    if cfg.val_manifest or cfg.val_fraction <= 0:
        return None
    n_val = min(cfg.val_max, int(n_items * cfg.val_fraction))
    if n_val >= 2:
        return None
    return (f"--val-fraction {cfg.val_fraction:g} of {n_items} clips is {n_val} clip{'s' * (n_val != 1)}, fewer "
            f"than the 2 a validation pass needs: training on all {n_items} clips without validation "
            "(give --val-data FILE, or a --val-fraction that holds out 2 or more)")


def train(cfg: TrainConfig, resume: bool = False, on_event: Callable[[dict[str, Any]], None] | None = None,
          clap: ClapModel | None = None) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) a decoder. Returns the final summary.

    ``on_event`` receives dicts: {"event": "start", "total_steps"...}, {"event": "step", ...},
    {"event": "validation", ...}, {"event": "skip", ...}; the CLI turns them into progress bars.
    ``clap`` may be passed in to reuse an already loaded model (it must match ``cfg.clap``).

    Refuses (TrainError, with the message the CLI shows) a resumed config that changes what a run
    in progress cannot (`check_resume`) and an ``init`` decoder of another architecture
    (`check_architecture`); `resolve_config` builds a config that passes both.
    """
    emit = on_event or (lambda e: None)
    if resume:
        check_resume(cfg, stored_config(cfg.out))
    elif cfg.init:
        check_architecture({name: getattr(cfg, name) for name in ARCHITECTURE}, init_architecture(cfg.init))
    dd = init_distributed(cfg.device)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dd.world > 1:
        device = torch.device("cuda", dd.local_rank)
    out = Path(cfg.out)
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        write_recipe(cfg, out / RECIPE_NAME)

    items, skips = data.read_manifest(cfg.manifest, cfg.audio_dir)
    skip_log = data.SkipLog(out / "skipped.jsonl")
    if dd.main:
        skip_log.extend(skips)
        for s in skips:
            emit({"event": "skip", **s.to_json()})
    if skips and cfg.strict:
        raise TrainError(f"{len(skips)} manifest rows have no usable audio (first: {skips[0].path}: "
                         f"{skips[0].reason}); see {out / 'skipped.jsonl'} or drop --strict")
    train_items, val_items = _split_validation(items, cfg)
    if not train_items:
        raise TrainError(f"{cfg.manifest}: no usable training clips")

    clap = clap or load_clap(cfg.clap, cfg.tokenizer)
    clap.to(device)
    torch.manual_seed(cfg.seed)
    dec_cfg = DecoderConfig.for_clap(clap, domain=cfg.domain, width=cfg.width, text_tokens=cfg.text_tokens,
                                      text_readout=cfg.text_readout, logmel_skip=cfg.logmel_skip,
                                      levels=cfg.levels, skip_gate=cfg.skip_gate, first_level=cfg.first_level,
                                      decision=cfg.decision, decision_contrast=cfg.decision_contrast,
                                      projected=cfg.projected)
    decoder = (init_decoder(cfg.init, clap, dec_cfg, cfg.init_any_clap) if cfg.init and not resume
               else MaskDecoder(dec_cfg)).to(device)
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    explainer = ExplainerModule(clap, decoder, cfg.domain)       # validation, on rank 0

    progress = {"step": 0, "epoch": 0, "step_in_epoch": 0}
    if resume:
        progress = load_checkpoint(out, decoder, opt)
    model: torch.nn.Module = decoder
    if dd.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            decoder, device_ids=[device.index] if device.type == "cuda" else None)
    trainer = ExplainerModule(clap, model, cfg.domain)          # the decoder under DDP when there is one

    meta = {
        "lmaczs": __version__,
        "clap": {"spec": cfg.clap, "source": clap.source, "identity": clap.identity(), "config": clap.cfg.to_json()},
        "domain": cfg.domain,
        "mel_to_linear": "linear",
        "loss": {"lambda_sparsity": cfg.lambda_sparsity, "lambda_diversity": cfg.lambda_diversity,
                 "mismatched_per_clip": cfg.mismatched, "logit_scale": None, "reduction": "mean",
                 "lambda_out": cfg.lambda_out, "lambda_overlap": cfg.lambda_overlap,
                 "lambda_absent": cfg.lambda_absent},
        "data": {"manifest": str(cfg.manifest), "manifest_hash": data.manifest_hash(train_items),
                 "train_clips": len(train_items), "val_clips": len(val_items)},
        "train": {**cfg.to_json(), "world": dd.world, "pairs": "rank-local"},
    }
    metrics = MetricsLog(out / "metrics.jsonl", dd.main, progress["step"] if resume else None)
    texts = TextCache(clap)
    dataset = data.ClipDataset(train_items, seed=cfg.seed)
    val_loader = _loader(data.ClipDataset(val_items, seed=cfg.seed), _fixed_batches(len(val_items), cfg.batch_size),
                         cfg, device) if val_items else None

    per_epoch = data.steps_per_epoch(len(train_items), cfg.batch_size, dd.world, cfg.accum)
    if per_epoch == 0:
        raise TrainError(f"{len(train_items)} clips cannot fill one step of {dd.world * cfg.accum} "
                         f"micro-batches of {cfg.batch_size}; lower --batch-size or --accum")
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    emit({"event": "start", "total_steps": total, "done_steps": progress["step"], "per_epoch": per_epoch,
          "train_clips": len(train_items), "val_clips": len(val_items), "rank": dd.rank, "world": dd.world,
          "val_note": validation_note(len(train_items) + len(val_items), cfg),
          "decoder_parameters": sum(p.numel() for p in decoder.parameters())})

    step = progress["step"]
    last_saved = step
    t_last, clips_since = time.perf_counter(), 0
    groups = [str(it.audio) for it in train_items] if cfg.group_by_audio else None   # one key per clip
    for epoch in range(progress["epoch"], cfg.epochs):
        if step >= total:
            break
        dataset.set_epoch(epoch)
        first = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
        micro = data.batches_for_step(len(train_items), cfg.batch_size, epoch, cfg.seed, groups)
        plan = [mb for mb in data.shard(micro, dd.rank, dd.world, cfg.accum) if mb.step >= first]
        loader = _loader(dataset, [mb.indices for mb in plan], cfg, device)
        step_in_epoch, position, sums = first, 0, {}
        for mb, batch in zip(plan, loader):
            if batch.skipped or dd.world > 1:
                _record_skips(batch.skipped, skip_log, dd, emit, cfg, out)
            waves = batch.waves.to(device, non_blocking=True)
            ctx = model.no_sync() if (dd.world > 1 and not mb.last) else contextlib.nullcontext()
            with ctx:
                if len(batch) == 0:
                    # keep DDP's collectives in step even when every clip failed to decode
                    (sum(p.sum() for p in model.parameters()) * 0.0).backward()
                else:
                    gen = pair_generator(cfg.seed, epoch, mb.step, dd.rank + position * dd.world)
                    terms, _ = micro_batch_loss(trainer, texts, waves, batch.captions, cfg, gen)
                    (terms.total / cfg.accum).backward()
                    for k, v in terms.as_floats().items():
                        sums[k] = sums.get(k, 0.0) + v / cfg.accum
            clips_since += len(batch)
            position += 1
            if not mb.last:
                continue
            lr = learning_rate(cfg, step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            step, step_in_epoch, position = step + 1, mb.step + 1, 0
            now = time.perf_counter()
            record = {"step": step, "epoch": epoch, **sums,
                      "clips_per_s": clips_since * dd.world / max(now - t_last, 1e-9), "lr": lr}
            sums, t_last, clips_since = {}, now, 0
            emit({"event": "step", **record})
            if step % cfg.log_every == 0 or step == total:
                metrics.write(record)
            if dd.main and step % cfg.save_every == 0 and step_in_epoch < per_epoch:
                save_checkpoint(out, decoder, opt, meta, {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch})
                last_saved = step
            if step >= total:
                break
        epoch_done = step_in_epoch >= per_epoch
        if epoch_done and val_loader is not None and dd.main:
            decoder.eval()
            val = validate(explainer, texts, val_loader, device)
            decoder.train()
            metrics.write({"step": step, "epoch": epoch, "validation": val})
            emit({"event": "validation", "epoch": epoch, **val})
        if dd.main and (step != last_saved or epoch_done):
            where = {"epoch": epoch + 1, "step_in_epoch": 0} if epoch_done else {"epoch": epoch, "step_in_epoch": step_in_epoch}
            save_checkpoint(out, decoder, opt, meta, {"step": step, **where})
            last_saved = step
        if not epoch_done:
            break
    if dd.world > 1:
        dist.barrier()
    return {"out": str(out), "steps": step, "skipped": skip_log.count if dd.main else None,
            "decoder_parameters": sum(p.numel() for p in decoder.parameters())}


def _fixed_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(k, min(n, k + batch_size))) for k in range(0, n, batch_size)]


def _loader(dataset: data.ClipDataset, batches: list[list[int]], cfg: TrainConfig, device: torch.device) -> Any:
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=cfg.workers, collate_fn=data.collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )


def _record_skips(skipped: list[data.Skip], log: data.SkipLog, dd: Dist, emit: Callable, cfg: TrainConfig,
                  out: Path) -> None:
    if dd.world > 1:
        gathered: list[Any] = [None] * dd.world
        # decode failures are rare; gather them so rank 0 writes one skipped.jsonl
        dist.all_gather_object(gathered, [s.to_json() for s in skipped])
        skipped = [data.Skip(**s) for part in gathered for s in part]
    if dd.main:
        for s in skipped:
            if log.add(s):
                emit({"event": "skip", **s.to_json()})
    if cfg.strict and skipped:
        first = skipped[0]
        raise TrainError(f"unreadable audio {first.path}: {first.reason} (--strict); see {out / 'skipped.jsonl'}")
