"""LAION-CLAP saved by Hugging Face ``transformers`` (``--clap hf:DIR``), loaded into laion's classes.

A ``transformers`` ``ClapModel`` folder (``config.json`` + ``model.safetensors`` and the RoBERTa
tokenizer files: the layout of ``laion/clap-htsat-unfused``) holds the network of LAION's
checkpoints under other names. We read its config, build laion's ``CLAP`` for it
(``clap.build_laion_clap``) and load the renamed weights strictly, so the decoder, export and
explain stages run on the one implementation they already know.

Renaming, transformers -> laion (everything not listed keeps its name)::

  audio_model.audio_encoder.*                          audio_branch.*
    batch_norm                                           bn0
    layers.i.blocks.j.layernorm_before | layernorm_after   ...norm1 | norm2
    layers.i.blocks.j.attention.self.query|key|value       ...attn.qkv   (rows q; k; v, concatenated)
    layers.i.blocks.j.attention.self.relative_position_*   ...attn.relative_position_*
    layers.i.blocks.j.attention.output.dense               ...attn.proj
    layers.i.blocks.j.intermediate.dense | output.dense    ...mlp.fc1 | mlp.fc2
    patch_embed.{proj,norm}, layers.i.downsample.{reduction,norm}, norm: same names
  text_model.*                                         text_branch.*   (both are RoBERTa)
  audio_projection.linear1 | linear2                   audio_projection.0 | .2
  text_projection.linear1 | linear2                    text_projection.0 | .2
  logit_scale_a, logit_scale_t                         same

Tensors on one side only (the strict load allows exactly these):
- transformers only: ``text_model.embeddings.position_ids`` / ``token_type_ids``, constant
  buffers (0..513 and zeros); checked to hold those values, then dropped (laion's RoBERTa
  makes its own).
- laion only, constants kept as built: the STFT basis and mel filterbank of laion's own front
  end (``audio_branch.spectrogram_extractor``, ``logmel_extractor``; lmaczs computes the same
  numbers in ``spectral.py``) and the shifted-window masks ``...blocks.j.attn_mask``
  (``transformers`` recomputes them on every forward).
- laion only, zeroed: the AudioSet tagging head (``audio_branch.tscam_conv``, ``.head``) and
  the training-time MLPs ``audio_transform`` / ``text_transform``. ``transformers``' conversion
  dropped them; no embedding uses them. Zeros rather than random values keep the model's
  identity the same on every machine.

The text LayerNorm epsilon comes from the folder: ``transformers``' conversion kept
``ClapTextConfig``'s default 1e-12 where laion's RoBERTa used roberta-base's 1e-5, and we match
the folder so that our text embeddings equal ``ClapModel.get_text_features``.

Front end. ``ClapModel.get_audio_features`` takes log-mel ``input_features`` (B, 1, 1001, 64);
fed the output of ``ClapModel.front_end`` (laion's numbers) it gives our embeddings. Its own
``ClapFeatureExtractor`` computes that input differently from laion's torchlibrosa front end:
- ``truncation="fusion"`` (its default) uses an HTK-scale mel bank without area normalisation
  and returns four stacked mels (B, 4, 1001, 64) for the fusion models; laion's non-fusion
  models were trained on the Slaney-scale, Slaney-normalised bank, which the extractor uses
  only with ``truncation="rand_trunc"``.
- ``frequency_min`` defaults to 0 Hz; laion's bank starts at 50 Hz (``audio.F_MIN``).
- clips over 10 s are cut at a random offset (``rand_trunc``); lmaczs explains every 10-s
  window of a long file instead (``audio.windows``).
- it computes in numpy (a float64 FFT); laion's front end runs in float32 torch.
Same on both sides: 48 kHz, 1024-point periodic Hann STFT, hop 480, reflect-padded centred
frames, power spectrum, ``10 log10(max(x, 1e-10))`` with no top_db, and short clips repeated
then zero-padded to 10 s ("repeatpad", ``audio.pad_clip``). With ``truncation="rand_trunc",
frequency_min=50`` its log-mel matches ours to 1e-3 dB; with its defaults it is tens of dB off
(``tests/test_hf.py`` measures both).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from .audio import N_MELS
from .clap import (
    ClapConfig,
    ClapError,
    ClapModel,
    RobertaTokenizerWrapper,
    build_laion_clap,
    first_line,
    is_whole_tokenizer,
    load_weights,
    read_safetensors,
    roberta_files,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"   # sharded safetensors
TORCH_WEIGHTS_FILE = "pytorch_model.bin"              # older save_pretrained default

# --------------------------------------------------------------------------- names
# (transformers name, laion name). {i} {j}: stage and block numbers; {p}: the tensor's own
# name in its module; {qkv}: one of HF's three attention projections laion keeps as one.
_FIELDS = {
    "i": r"\d+",
    "j": r"\d+",
    "p": r"weight|bias|running_mean|running_var|num_batches_tracked",
    "qkv": r"query|key|value",
    "rest": r".+",
}
_BLOCK_NAMES = [
    ("layernorm_before.{p}", "norm1.{p}"),
    ("attention.self.{qkv}.{p}", "attn.qkv.{p}"),
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.self.relative_position_index", "attn.relative_position_index"),
    ("attention.output.dense.{p}", "attn.proj.{p}"),
    ("layernorm_after.{p}", "norm2.{p}"),
    ("intermediate.dense.{p}", "mlp.fc1.{p}"),
    ("output.dense.{p}", "mlp.fc2.{p}"),
]
_AUDIO_NAMES = [
    ("batch_norm.{p}", "bn0.{p}"),
    ("patch_embed.proj.{p}", "patch_embed.proj.{p}"),
    ("patch_embed.norm.{p}", "patch_embed.norm.{p}"),
    *[(f"layers.{{i}}.blocks.{{j}}.{h}", f"layers.{{i}}.blocks.{{j}}.{l}") for h, l in _BLOCK_NAMES],
    ("layers.{i}.downsample.reduction.{p}", "layers.{i}.downsample.reduction.{p}"),
    ("layers.{i}.downsample.norm.{p}", "layers.{i}.downsample.norm.{p}"),
    ("norm.{p}", "norm.{p}"),
]
NAMES: list[tuple[str, str]] = [
    ("logit_scale_a", "logit_scale_a"),
    ("logit_scale_t", "logit_scale_t"),
    ("audio_projection.linear1.{p}", "audio_projection.0.{p}"),
    ("audio_projection.linear2.{p}", "audio_projection.2.{p}"),
    ("text_projection.linear1.{p}", "text_projection.0.{p}"),
    ("text_projection.linear2.{p}", "text_projection.2.{p}"),
    *[(f"audio_model.audio_encoder.{h}", f"audio_branch.{l}") for h, l in _AUDIO_NAMES],
    ("text_model.{rest}", "text_branch.{rest}"),
]

# transformers-only constant buffers: name -> the value every ClapModel holds there, given its shape
HF_CONSTANTS: dict[str, Callable[[torch.Size], torch.Tensor]] = {
    "text_model.embeddings.position_ids": lambda s: torch.arange(s[-1]).expand(s),
    "text_model.embeddings.token_type_ids": lambda s: torch.zeros(s, dtype=torch.long),
}
# laion-only tensors (see the module docstring): constants kept as built, and untrained parts zeroed
LAION_CONSTANTS = [
    r"audio_branch\.spectrogram_extractor\.stft\.conv_(real|imag)\.weight",
    r"audio_branch\.logmel_extractor\.melW",
    r"audio_branch\.layers\.\d+\.blocks\.\d+\.attn_mask",
]
LAION_ZEROED = [
    r"audio_branch\.(tscam_conv|head)\.(weight|bias)",
    r"(audio|text)_transform\.sequential\.\d+\.(weight|bias)",
]


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)   # literal, field, literal, field, ...
    return re.compile("".join(
        re.escape(part) if k % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})" for k, part in enumerate(parts)
    ))


_HF_TO_LAION = [(_pattern(h), l) for h, l in NAMES]
_LAION_TO_HF = [(_pattern(l), h) for h, l in NAMES]


def laion_name(hf_name: str) -> tuple[str, str | None] | None:
    """transformers name -> (laion name, which of query/key/value or None); None if unmapped."""
    for pattern, template in _HF_TO_LAION:
        m = pattern.fullmatch(hf_name)
        if m:
            return template.format(**m.groupdict()), m.groupdict().get("qkv")
    return None


def hf_names(laion: str) -> list[str]:
    """laion name -> the transformers name(s) it is made from (three for a fused qkv)."""
    for pattern, template in _LAION_TO_HF:
        m = pattern.fullmatch(laion)
        if m:
            if "{qkv}" in template:
                return [template.format(**m.groupdict(), qkv=q) for q in ("query", "key", "value")]
            return [template.format(**m.groupdict())]
    return []


def _matches(patterns: list[str], name: str) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


# --------------------------------------------------------------------------- config

# ClapAudioConfig fields laion's HTSAT fixes, with the value it is built with
_AUDIO_FIXED: dict[str, Any] = {
    "spec_size": 256, "window_size": 8, "patch_size": (4, 4), "patch_stride": (4, 4),
    "num_mel_bins": N_MELS, "patch_embed_input_channels": 1, "flatten_patch_embeds": True,
    "enable_patch_layer_norm": True, "mlp_ratio": 4.0, "qkv_bias": True, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "projection_hidden_act": "relu",
}
# ClapTextConfig fields laion's RoBERTa (roberta-base's architecture) fixes
_TEXT_FIXED: dict[str, Any] = {
    "hidden_act": "gelu", "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1,
    "projection_hidden_act": "relu",
}
_KNOWN_HTSAT = {  # (stage-1 width, depths, heads) -> laion's name
    (96, (2, 2, 6, 2), (4, 8, 16, 32)): "HTSAT-tiny",
    (128, (2, 2, 12, 2), (4, 8, 16, 32)): "HTSAT-base",
}
_ROBERTA_BASE_SIZES = (768, 12, 12, 50265, 3072)   # width, layers, heads, vocab, FFN


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def read_hf_config(directory: Path) -> Any:
    """``config.json`` of a transformers ClapModel folder, parsed (with its defaults) by transformers."""
    from transformers import ClapConfig as HfClapConfig

    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ClapError(
            f"hf:{directory}: no {CONFIG_FILE} here; point hf: at a folder written by "
            f"transformers' ClapModel.save_pretrained (e.g. a download of laion/clap-htsat-unfused)"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:   # RecursionError: JSON nested too deep
        raise ClapError(f"hf:{directory}: cannot read {CONFIG_FILE}: {first_line(e)}") from e
    if not isinstance(raw, dict):
        raise ClapError(f"hf:{directory}: {CONFIG_FILE} holds a JSON {type(raw).__name__}, not the object "
                        f"ClapModel.save_pretrained writes")
    if raw.get("model_type") != "clap":
        raise ClapError(
            f"hf:{directory}: {CONFIG_FILE} describes model_type {raw.get('model_type')!r}, not a "
            f"transformers ClapModel ('clap'); save the full ClapModel, not one of its towers"
        )
    try:
        return HfClapConfig.from_dict(raw)
    except Exception as e:  # transformers' strict validation raises its own error classes
        raise ClapError(f"hf:{directory}: transformers rejects {CONFIG_FILE}: {e}") from e


def clap_config_from_hf(hf: Any, where: str = "config.json") -> ClapConfig:
    """A transformers ``ClapConfig`` -> our ``ClapConfig``, refusing what laion's classes cannot build."""
    audio, text = hf.audio_config, hf.text_config
    if audio.enable_fusion:
        raise ClapError(
            f"{where}: this is a fusion CLAP (audio_config.enable_fusion = true, e.g. "
            f"laion/clap-htsat-fused); lmaczs supports the non-fusion models: use "
            f"laion/clap-htsat-unfused or one of laion/larger_clap_*"
        )

    def refuse(tower: str, field: str, value: Any, wanted: Any) -> ClapError:
        return ClapError(
            f"{where}: {tower}.{field} = {value!r}; laion's CLAP classes are built with "
            f"{field} = {wanted!r}, so this model cannot be loaded into them"
        )

    for field, wanted in _AUDIO_FIXED.items():
        value = getattr(audio, field)
        if (_pair(value) if field in ("patch_size", "patch_stride") else value) != wanted:
            raise refuse("audio_config", field, value, wanted)
    for field, wanted in _TEXT_FIXED.items():
        if getattr(text, field) != wanted:
            raise refuse("text_config", field, getattr(text, field), wanted)

    embed = audio.patch_embeds_hidden_size
    depths, heads = tuple(audio.depths), tuple(audio.num_attention_heads)
    if len(depths) != 4 or len(heads) != 4:
        raise refuse("audio_config", "depths", list(depths), "four stages")
    if audio.hidden_size != embed * 8:
        raise refuse("audio_config", "hidden_size", audio.hidden_size, embed * 8)
    arch = _KNOWN_HTSAT.get((embed, depths, heads))
    audio_kw: dict[str, Any] = (
        {"audio": arch} if arch else
        {"audio": "HTSAT-custom", "htsat_embed_dim": embed, "htsat_depths": depths, "htsat_heads": heads}
    )

    sizes = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.vocab_size,
             text.intermediate_size)
    if sizes == _ROBERTA_BASE_SIZES:
        text_kw: dict[str, Any] = {"text": "roberta"}
    elif text.intermediate_size == 4 * text.hidden_size:
        text_kw = dict(text="roberta-custom", text_width=text.hidden_size, text_layers=text.num_hidden_layers,
                       text_heads=text.num_attention_heads, vocab_size=text.vocab_size)
    else:
        raise refuse("text_config", "intermediate_size", text.intermediate_size, 4 * text.hidden_size)
    return ClapConfig(joint_dim=hf.projection_dim, text_norm_eps=float(text.layer_norm_eps), **audio_kw, **text_kw)


# --------------------------------------------------------------------------- weights


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a save_pretrained folder: model.safetensors, sharded, or pytorch_model.bin
    (weights only: nothing in it can run code). A cut, corrupt or hostile file, or an index
    naming shards outside the folder, raises ClapError naming the file."""
    fix = "write the model again with ClapModel.save_pretrained(DIR)"
    if (directory / WEIGHTS_FILE).is_file():
        return read_safetensors(directory / WEIGHTS_FILE, fix)
    if (directory / WEIGHTS_INDEX_FILE).is_file():
        out: dict[str, torch.Tensor] = {}
        for shard in _shards(directory / WEIGHTS_INDEX_FILE, fix):
            out.update(read_safetensors(directory / shard, fix))
        return out
    if (directory / TORCH_WEIGHTS_FILE).is_file():
        path = directory / TORCH_WEIGHTS_FILE
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:   # a cut zip, a pickle of anything but tensors (refused), ...
            raise ClapError(f"{path}: not a readable weights-only PyTorch file ({first_line(e)}); {fix}") from e
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise ClapError(f"{path}: not a state dict of named tensors; {fix}")
        return sd
    raise ClapError(
        f"hf:{directory}: no {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE}, {TORCH_WEIGHTS_FILE}) here; "
        f"write the model with ClapModel.save_pretrained(DIR)"
    )


def _shards(index: Path, fix: str) -> list[str]:
    """The shard file names a safetensors index maps weights to: plain names of files beside it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ClapError(f"{index}: not a safetensors index (a JSON object whose weight_map maps weight "
                        f"names to shard files): {first_line(e)}; {fix}") from e
    for shard in shards:
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise ClapError(f"{index}: shard {shard!r} is not a file name in the model's folder; {fix}")
    return shards


def laion_state_dict_from_hf(
    hf_sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: str = "weights"
) -> dict[str, torch.Tensor]:
    """Rename a transformers ClapModel state dict onto laion's ``own`` (a built model's state
    dict). Strict: every transformers tensor is used or is a checked constant, every laion
    tensor is provided or listed in LAION_CONSTANTS / LAION_ZEROED; otherwise ClapError names
    the tensors."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    for name, t in hf_sd.items():
        mapped = laion_name(name)
        if name in HF_CONSTANTS and (mapped is None or mapped[0] not in own):
            if not torch.equal(t, HF_CONSTANTS[name](t.shape)):
                raise ClapError(f"{where}: {name} holds unusual values; laion's RoBERTa computes "
                                f"this buffer itself and cannot take them")
            continue
        if mapped is None or mapped[0] not in own:
            unexpected.append(name)
            continue
        laion, part = mapped
        t = t.float() if t.is_floating_point() else t
        if part is None:
            out[laion] = t
        else:
            qkv.setdefault(laion, {})[part] = t
    for laion, parts in qkv.items():
        if len(parts) == 3:   # laion's Swin computes q, k, v with one Linear: rows q; k; v
            out[laion] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)

    missing = [
        hf for laion in own if laion not in out
        and not _matches(LAION_CONSTANTS + LAION_ZEROED, laion)
        for hf in (hf_names(laion) or [f"(laion) {laion}"]) if hf not in hf_sd
    ]
    if missing or unexpected:
        raise ClapError(
            f"{where}: weights do not match the architecture in config.json "
            f"(missing {len(missing)}: {missing[:5]}; unexpected {len(unexpected)}: {unexpected[:5]})"
        )
    for laion, t in out.items():
        if t.shape != own[laion].shape:
            raise ClapError(
                f"{where}: {' + '.join(hf_names(laion))} has shape {tuple(t.shape)} where config.json "
                f"implies {tuple(own[laion].shape)} ({laion})"
            )
    for laion, t in own.items():
        if laion not in out:
            out[laion] = torch.zeros_like(t) if _matches(LAION_ZEROED, laion) else t
    return out


# --------------------------------------------------------------------------- loading


def load_hf_clap(directory: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> ClapModel:
    """Load a transformers ``ClapModel`` folder (non-fusion HTSAT audio, RoBERTa text) into
    laion's classes. The RoBERTa tokenizer comes from ``tokenizer`` if given, else from the folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ClapError(f"hf:{directory}: no such folder")
    where = f"hf:{directory}"
    cfg = clap_config_from_hf(read_hf_config(directory), where=f"{where}/{CONFIG_FILE}")
    if tokenizer is None and not is_whole_tokenizer(roberta_files(directory)):
        raise ClapError(
            f"{where}: no tokenizer saved with the model (vocab.json + merges.txt, or tokenizer.json); "
            f"save the RoBERTa tokenizer into the folder or pass --tokenizer DIR"
        )
    tok = RobertaTokenizerWrapper(tokenizer if tokenizer is not None else directory, cfg.context_length)
    if len(tok._tok) > cfg.vocab_size:
        raise ClapError(
            f"{where}: the tokenizer has {len(tok._tok)} tokens but the text model embeds only "
            f"{cfg.vocab_size}; pass the tokenizer saved with this model"
        )
    hf_sd = read_hf_weights(directory)
    clap = build_laion_clap(cfg)
    load_weights(clap, laion_state_dict_from_hf(hf_sd, clap.state_dict(), where), where)
    return ClapModel(clap, cfg, tok, source=where)
