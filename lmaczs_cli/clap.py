"""LAION-CLAP from the ``laion-clap`` package, built offline, split into the parts we need.

Two traps handled here:
- ``import laion_clap`` runs a package ``__init__`` that builds three hub tokenizers (it
  hangs for minutes without network). The model code (``clap_module``) is imported without
  it (``laion.laion_module``), and a user's own ``import laion_clap`` is left untouched.
- ``CLAP.__init__`` calls ``RobertaModel.from_pretrained("roberta-base")`` (a weights
  download). During construction we swap in a RoBERTa built from roberta-base's known
  config; the checkpoint's weights are then loaded into it.

The split API (all tensors float32, embeddings L2-normalised as laion does):
  front_end(wave (B, 480000))  -> log-mel (B, 1001, 64)         [our ops, spectral.py]
  encode(logmel)               -> embedding (B, 512), hidden states h1..h4
  encode_text(list[str])       -> (B, 512)

Hidden states are the outputs of the last four encoder stages, as (B, C, H, W) grids:
  HTSAT-tiny  (folded image; rows = chunk*mel, cols = time in chunk, see ``unfold``)
      h1 (B, 192, 32, 32)  h2 (B, 384, 16, 16)  h3 (B, 768, 8, 8)  h4 (B, 768, 8, 8)
  HTSAT-base  h1 (B, 256, 32, 32)  h2 (B, 512, 16, 16)  h3 (B, 1024, 8, 8)  h4 (B, 1024, 8, 8)
  PANN-14     (time, mel) grids from conv blocks 3..6:
      h1 (B, 256, 125, 8)  h2 (B, 512, 62, 4)  h3 (B, 1024, 31, 2)  h4 (B, 2048, 31, 2)
h4 of HTSAT is taken after the final LayerNorm (the tokens the embedding is pooled from).

Short clips are repeat-padded to one window (``audio.pad_clip``), as LAION trained its
non-fusion models; longer files are explained in windows (``audio.windows``).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import spectral
from .audio import CLIP_SAMPLES, F_MAX, F_MIN, HOP, N_FFT, N_MELS, SAMPLE_RATE
from .errors import LmaczsError
from .laion import laion_module


# roberta-base's architecture, as published with the model (config.json on the hub).
ROBERTA_BASE = dict(
    vocab_size=50265,
    max_position_embeddings=514,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)

# LAION's released checkpoints (laion:NAME): file name on their hub repo -> audio architecture.
LAION_CHECKPOINTS = {
    "630k-best": "HTSAT-tiny",
    "630k-audioset-best": "HTSAT-tiny",
    "music_audioset_epoch_15_esc_90.14": "HTSAT-base",
    "music_speech_epoch_15_esc_89.25": "HTSAT-base",
    "music_speech_audioset_epoch_15_esc_89.98": "HTSAT-base",
}
LAION_FUSION_CHECKPOINTS = {"630k-fusion-best", "630k-audioset-fusion-best"}
LAION_HUB_REPO = "lukewys/laion_clap"


class ClapError(LmaczsError):
    """A CLAP model or tokenizer could not be built or loaded; the message names the fix."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ClapConfig:
    """Everything needed to rebuild a CLAP's architecture; travels with its weights."""

    audio: str = "HTSAT-tiny"        # HTSAT-tiny | HTSAT-base | PANN-14 | HTSAT-custom
    text: str = "roberta"            # roberta (RoBERTa-base) | roberta-custom (RoBERTa at the text_*
                                     # sizes below, FFN 4 x width) | transformer (CLIP-style, CLIP BPE)
    joint_dim: int = 512             # width of the shared audio-text embedding
    # HTSAT-custom only: Swin width of stage 1, blocks and heads per stage
    htsat_embed_dim: int = 96
    htsat_depths: tuple[int, ...] = (2, 2, 6, 2)
    htsat_heads: tuple[int, ...] = (4, 8, 16, 32)
    # transformer and roberta-custom text towers
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77         # tokens per prompt (laion pads/truncates to 77)
    vocab_size: int = 49408          # CLIP BPE vocabulary shipped in the laion-clap wheel
    text_norm_eps: float = 1e-5      # RoBERTa LayerNorm epsilon: roberta-base's; transformers'
                                     # ClapModel folders carry ClapTextConfig's default 1e-12

    def __post_init__(self) -> None:
        if self.audio not in ("HTSAT-tiny", "HTSAT-base", "PANN-14", "HTSAT-custom"):
            raise ClapError(f"unknown audio architecture {self.audio!r}: use HTSAT-tiny, HTSAT-base, PANN-14")
        if self.text not in ("roberta", "roberta-custom", "transformer"):
            raise ClapError(f"unknown text tower {self.text!r}: use roberta, roberta-custom or transformer")
        if self.text == "roberta":  # roberta-base's own sizes; the transformer fields do not apply
            for k, v in dict(text_width=768, text_layers=12, text_heads=12, vocab_size=50265).items():
                object.__setattr__(self, k, v)
        object.__setattr__(self, "htsat_depths", tuple(self.htsat_depths))
        object.__setattr__(self, "htsat_heads", tuple(self.htsat_heads))

    @property
    def is_htsat(self) -> bool:
        return self.audio.startswith("HTSAT")

    @property
    def is_roberta(self) -> bool:
        return self.text.startswith("roberta")

    @property
    def audio_width(self) -> int:
        """Width of the audio branch's pooled embedding (before the projection)."""
        return {"HTSAT-tiny": 768, "HTSAT-base": 1024, "PANN-14": 2048}.get(
            self.audio, self.htsat_embed_dim * 8
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ClapConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ClapError(f"unknown CLAP config fields {sorted(unknown)}: written by a newer lmaczs?")
        return cls(**d)


# Architectures for random:ARCH. Text defaults to a small CLIP-style tower with the CLIP BPE
# tokenizer from the wheel (fully offline); append "+roberta" for the RoBERTa text tower.
RANDOM_ARCHS: dict[str, ClapConfig] = {
    "HTSAT-tiny": ClapConfig("HTSAT-tiny", "transformer", text_width=256, text_layers=2, text_heads=4),
    "HTSAT-base": ClapConfig("HTSAT-base", "transformer", text_width=256, text_layers=2, text_heads=4),
    "PANN-14": ClapConfig("PANN-14", "transformer", text_width=256, text_layers=2, text_heads=4),
    # the test-suite fixture: the real HTSAT class at 1/6 width, one block per stage
    "tiny": ClapConfig(
        "HTSAT-custom", "transformer", htsat_embed_dim=16, htsat_depths=(1, 1, 1, 1),
        htsat_heads=(1, 2, 4, 8), text_width=64, text_layers=1, text_heads=2,
    ),
}


def _audio_cfg(cfg: ClapConfig) -> dict[str, Any]:
    is_pann = cfg.audio == "PANN-14"
    return dict(
        model_type="PANN" if is_pann else "HTSAT",
        model_name="Cnn14" if is_pann else {"HTSAT-base": "base"}.get(cfg.audio, "tiny"),
        sample_rate=SAMPLE_RATE, audio_length=1024, clip_samples=CLIP_SAMPLES,
        window_size=N_FFT, hop_size=HOP, fmin=F_MIN, fmax=F_MAX, mel_bins=N_MELS, class_num=527,
    )


def roberta_config(cfg: ClapConfig) -> dict[str, Any]:
    """``RobertaConfig`` arguments for cfg's text tower: roberta-base, at cfg's sizes for roberta-custom."""
    return dict(
        ROBERTA_BASE, hidden_size=cfg.text_width, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, intermediate_size=4 * cfg.text_width,
        vocab_size=cfg.vocab_size, layer_norm_eps=cfg.text_norm_eps,
    )


@contextlib.contextmanager
def _offline_construction(cfg: ClapConfig) -> Iterator[None]:
    """Patch laion's model module for the duration of ``CLAP(...)``: no hub access, custom HTSAT."""
    model_mod = laion_module("model")
    htsat_mod = laion_module("htsat")

    class _OfflineRoberta:
        @staticmethod
        def from_pretrained(name: str, *args: Any, **kwargs: Any) -> nn.Module:
            if name != "roberta-base":
                raise ClapError(f"laion asked for text model {name!r}; only roberta-base is supported")
            from transformers import RobertaConfig, RobertaModel

            return RobertaModel(RobertaConfig(**roberta_config(cfg)))

    def _create_htsat(audio_cfg: Any, enable_fusion: bool = False, fusion_type: str = "None") -> nn.Module:
        return htsat_mod.HTSAT_Swin_Transformer(
            spec_size=256, patch_size=4, patch_stride=(4, 4), num_classes=audio_cfg.class_num,
            embed_dim=cfg.htsat_embed_dim, depths=list(cfg.htsat_depths),
            num_heads=list(cfg.htsat_heads), window_size=8, config=audio_cfg,
            enable_fusion=enable_fusion, fusion_type=fusion_type,
        )

    saved = {k: getattr(model_mod, k) for k in ("RobertaModel", "create_htsat_model")}
    model_mod.RobertaModel = _OfflineRoberta
    if cfg.audio == "HTSAT-custom":
        model_mod.create_htsat_model = _create_htsat
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(model_mod, k, v)


def build_laion_clap(cfg: ClapConfig) -> nn.Module:
    """Construct laion's ``CLAP`` for ``cfg`` with random weights, offline. Returns it in eval mode."""
    model_mod = laion_module("model")
    text_cfg = dict(
        context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
        heads=cfg.text_heads, layers=cfg.text_layers, model_type="roberta" if cfg.is_roberta else cfg.text,
    )
    with _offline_construction(cfg), warnings.catch_warnings():
        # laion's Swin blocks call torch.meshgrid without `indexing` (the default, "ij", is what
        # they mean); torch warns once per process about a future default that does not apply.
        warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
        model = model_mod.CLAP(
            embed_dim=cfg.audio_width, audio_cfg=_audio_cfg(cfg), text_cfg=text_cfg,
            joint_embed_shape=cfg.joint_dim, enable_fusion=False,
        )
    if cfg.is_roberta and cfg.text_width != model.text_projection[0].in_features:
        # laion hard-codes Linear(768, joint) after RoBERTa; a roberta-custom tower is narrower
        model.text_projection[0] = nn.Linear(cfg.text_width, cfg.joint_dim)
    return model.eval()


@contextlib.contextmanager
def _weights_follow() -> Iterator[None]:
    """Build a model whose every weight is loaded next (`load_weights` is strict), skipping
    what that load replaces: torchlibrosa's STFT and mel layers compute their DFT matrix,
    window and filter bank at construction through librosa (scipy.signal and numba: about
    2 s of imports and JIT at start-up), and those values are parameters in the checkpoint.
    Here they get zeros of the right shapes instead. Not for `random_clap`, which keeps them."""
    import numpy as np
    from torchlibrosa import stft as tl

    class _ShapesOnly:    # the three librosa calls torchlibrosa's STFT and mel layers make
        class filters:
            @staticmethod
            def get_window(window: Any, win_length: int, fftbins: bool = True) -> np.ndarray:
                return np.zeros(win_length)

            @staticmethod
            def mel(*, sr: int, n_fft: int, n_mels: int, **_: Any) -> np.ndarray:
                return np.zeros((n_mels, n_fft // 2 + 1), np.float32)

        class util:
            @staticmethod
            def pad_center(data: np.ndarray, *, size: int, **_: Any) -> np.ndarray:
                return np.zeros(size)

    saved = tl.librosa, tl.DFTBase.dft_matrix
    tl.librosa = _ShapesOnly
    tl.DFTBase.dft_matrix = lambda self, n: np.broadcast_to(np.complex64(0), (n, n))
    try:
        yield
    finally:
        tl.librosa, tl.DFTBase.dft_matrix = saved


# --------------------------------------------------------------------------- tokenizers


class ClipBpeTokenizer:
    """laion's CLIP BPE tokenizer (vocabulary file ships in the laion-clap wheel)."""

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = context_length
        self._tok = laion_module("tokenizer")

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tok.tokenize(list(texts), context_length=self.context_length)  # (N, 77) int


ROBERTA_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def roberta_files(directory: str | os.PathLike | None) -> set[str]:
    """Which of a saved RoBERTa tokenizer's files `directory` holds (none for None)."""
    return {f for f in ROBERTA_FILES if directory and (Path(directory) / f).is_file()}


def is_whole_tokenizer(files: set[str]) -> bool:
    """Whether those files make a tokenizer: tokenizer.json, or vocab.json + merges.txt."""
    return "tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files


class RobertaTokenizerWrapper:
    """RoBERTa tokenizer from ``--tokenizer DIR`` or the local HF cache, padded to 77 as laion does."""

    def __init__(self, directory: str | os.PathLike | None, context_length: int = 77) -> None:
        from transformers import AutoTokenizer

        self.context_length = context_length
        source = str(directory) if directory else "roberta-base"
        try:
            self._tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception as e:  # transformers raises OSError/ValueError/EnvironmentError variants
            from huggingface_hub.constants import HF_HUB_CACHE

            here = roberta_files(directory)
            if is_whole_tokenizer(here):
                raise ClapError(f"{directory}: the tokenizer files there ({', '.join(sorted(here))}) cannot be "
                                f"read ({first_line(e)}); save the RoBERTa tokenizer again") from e
            if here:
                lacking = " and ".join(sorted({"vocab.json", "merges.txt"} - here))
                raise ClapError(f"{directory}: the RoBERTa tokenizer there is incomplete: {lacking} missing "
                                f"(it needs vocab.json + merges.txt, or tokenizer.json)") from e
            where = f"--tokenizer {directory}" if directory else "--tokenizer (not given)"
            raise ClapError(
                f"RoBERTa tokenizer not found: looked in {where} and in the Hugging Face cache "
                f"{HF_HUB_CACHE} (roberta-base). Put roberta-base's tokenizer files "
                f"(vocab.json, merges.txt) in a folder and pass --tokenizer DIR."
            ) from e

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self._tok(
            list(texts), padding="max_length", truncation=True,
            max_length=self.context_length, return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# --------------------------------------------------------------------------- the model


class ClapModel(nn.Module):
    """A frozen LAION-CLAP (laion's ``CLAP`` inside) with the split API lmaczs needs."""

    def __init__(self, clap: nn.Module, cfg: ClapConfig, tokenizer: Any, source: str) -> None:
        super().__init__()
        self.clap = clap
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.source = source  # where it came from, for messages and records
        self._identity: str | None = None
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "ClapModel":
        # CLAP is always frozen in lmaczs: laion's train mode turns on SpecAugment and dropout.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def branch(self) -> nn.Module:
        return self.clap.audio_branch

    # ---- audio

    def front_end(self, wave: torch.Tensor) -> torch.Tensor:
        """wave (B, n) at 48 kHz -> log-mel (B, n // 480 + 1, 64) dB. Our ops, laion's numbers."""
        return spectral.log_mel(wave)

    def encode(self, logmel: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """log-mel (B, 1001, 64) -> (embedding (B, joint_dim) L2-normalised, [h1, h2, h3, h4])."""
        if self.cfg.is_htsat:
            pooled, hidden = self._encode_htsat(logmel)
        else:
            pooled, hidden = self._encode_pann(logmel)
        emb = self.clap.audio_projection(pooled)
        return F.normalize(emb, dim=-1), hidden

    def embed_audio(self, wave: torch.Tensor) -> torch.Tensor:
        """wave (B, 480000) -> audio embedding (B, joint_dim), L2-normalised."""
        return self.encode(self.front_end(wave))[0]

    def _bn0(self, logmel: torch.Tensor) -> torch.Tensor:
        x = logmel.unsqueeze(1)                            # (B, 1, T, 64)
        return self.branch.bn0(x.transpose(1, 3)).transpose(1, 3)

    def _encode_htsat(self, logmel: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b = self.branch
        x = b.reshape_wav2img(self._bn0(logmel))           # (B, 1, 256, 256) folded image
        x = b.patch_embed(x)                               # (B, 64*64, C)
        if b.ape:
            x = x + b.absolute_pos_embed
        x = b.pos_drop(x)
        hidden = []
        for layer in b.layers:
            x, _ = layer(x)                                # (B, L_i, C_i)
            hidden.append(x)
        x = b.norm(x)
        hidden[-1] = x
        pooled = x.mean(dim=1)                             # laion's avgpool over all tokens
        grids = []
        for h in hidden:
            side = int(round(int(h.shape[1]) ** 0.5))      # int(): a traced size is a tensor (export)
            grids.append(h.transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side))
        return pooled, grids

    def _encode_pann(self, logmel: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b = self.branch
        x = self._bn0(logmel)                              # (B, 1, T, 64)
        hidden = []
        blocks = [b.conv_block1, b.conv_block2, b.conv_block3, b.conv_block4, b.conv_block5, b.conv_block6]
        for i, block in enumerate(blocks):
            x = block(x, pool_size=(2, 2) if i < 5 else (1, 1), pool_type="avg")  # (B, C, T', F')
            if i >= 2:
                hidden.append(x)
        x = torch.mean(x, dim=3)                           # (B, 2048, T')
        x = torch.amax(x, dim=2) + torch.mean(x, dim=2)    # laion's max + mean over time
        pooled = F.relu(b.fc1(x))
        return pooled, hidden

    # ---- text

    def tokenize(self, texts: Sequence[str]) -> Any:
        return self.tokenizer(texts)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Prompts -> text embeddings (B, joint_dim), L2-normalised."""
        tokens = self.tokenize(texts)
        if isinstance(tokens, dict):
            tokens = {k: v.to(self.device) for k, v in tokens.items()}
        else:
            tokens = tokens.to(self.device)
        return F.normalize(self.clap.encode_text(tokens, device=self.device), dim=-1)

    # ---- identity

    def identity(self) -> str:
        """sha256 over the architecture config and every weight: names a CLAP exactly."""
        if self._identity is None:
            arch = self.cfg.to_json()
            if arch.get("text_norm_eps") == 1e-5:
                del arch["text_norm_eps"]  # added later: identities recorded before it stay valid
            h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
            for name, t in sorted(self.clap.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
            self._identity = h.hexdigest()
        return self._identity


# --------------------------------------------------------------------------- checkpoints


# --- safe loading of third-party .pt files
#
# A .pt file is a pickle: unpickling it can run any code. LAION's released checkpoints hold
# tensors plus, in the optimizer state, a learning rate that laion's cosine schedule computes
# with numpy (a numpy float64 scalar: `numpy.core.multiarray.scalar` with its dtype). Those are
# the only globals allowed beyond torch's own tensor rebuilders; anything else is refused unless
# the user trusts the file (`trust=True`, `--trust-checkpoint`).

_TRUST = contextvars.ContextVar("lmaczs_trust_checkpoints", default=False)
TRUST_HINT = "If you trust where it came from, pass --trust-checkpoint (Python: trust=True)"


@contextlib.contextmanager
def trusting_checkpoints(trust: bool = True) -> Iterator[None]:
    """Within this block `load_clap` unpickles .pt checkpoints fully (``--trust-checkpoint``):
    for a file from a source you trust that holds more than tensors. Like torch's own
    ``serialization.safe_globals``, it applies to the current thread only."""
    token = _TRUST.set(trust)
    try:
        yield
    finally:
        _TRUST.reset(token)


def laion_safe_globals() -> list[Any]:
    """The globals a LAION ``.pt`` checkpoint may name besides tensors (torch's safe-globals form)."""
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # numpy 2 moved numpy.core to numpy._core
        scalar = np.core.multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "int64")]   # BUILD of a pickled dtype
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, *dtypes]


_ZIP_MAGIC = b"PK\x03\x04"        # torch.save's format since torch 1.6
_PICKLE_MAGIC = b"\x80"            # torch's legacy format: a pickle (protocol 2+) from byte 0
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([A-Za-z_][\w.]*\w) was not an allowed global")


def checkpoint_format(path: Path) -> str:
    """What a model file is, by its first bytes: "zip" (torch.save), "pickle" (torch's legacy
    format), "safetensors", "empty" or "unknown"."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_PICKLE_MAGIC):
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    return "unknown"


def _torch_load(path: Path, trust: bool = False) -> Any:
    """torch.load a third-party checkpoint safely: weights only, plus `laion_safe_globals`;
    every way the file can be unusable raises ClapError naming the file and the fix."""
    import pickle

    what = checkpoint_format(path)
    if what == "empty":
        raise ClapError(f"{path}: empty file (0 bytes); download the checkpoint again")
    if what == "safetensors":
        raise ClapError(f"{path}: a safetensors file, not a LAION .pt checkpoint; pass the folder that "
                        "holds it with its clap.json (a CLAP saved by lmaczs), or hf:DIR for a transformers "
                        "ClapModel folder")
    if what == "unknown":
        raise ClapError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); "
                        "pass a LAION .pt checkpoint such as 630k-audioset-best.pt")
    if what == "zip":
        import zipfile

        if not zipfile.is_zipfile(path):
            raise ClapError(f"{path}: truncated or corrupt (its zip archive has no central directory, as "
                            "when a download stops early); download the checkpoint again")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(laion_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _UNSAFE_GLOBAL.search(str(e))
        if unsafe and not trust:
            raise ClapError(
                f"{path}: refused: it pickles {unsafe.group(1)}, which is neither a tensor nor one of "
                f"the numpy scalars LAION's checkpoints hold, and unpickling it could run code. "
                f"{TRUST_HINT}."
            ) from e
        raise ClapError(f"{path}: corrupt checkpoint ({first_line(e)}); download it again") from e
    except Exception as e:   # zip members missing, cut pickles (EOFError), storages out of range, ...
        raise ClapError(f"{path}: corrupt checkpoint ({first_line(e)}); download it again") from e


def first_line(e: BaseException) -> str:
    """A one-line reason: torch's weights-only messages put it after "Unpickler error:"."""
    text = str(e)
    if "Unpickler error:" in text:
        text = text.split("Unpickler error:", 1)[1]
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    line = line[:160] + ("..." if len(line) > 160 else "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def read_safetensors(path: str | os.PathLike, fix: str,
                     error: type[LmaczsError] = ClapError) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, empty, cut or corrupt file raises `error`
    naming the file and `fix` (what to do about it)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: missing; {fix}")
    try:
        return load_file(str(path))
    except Exception as e:   # safetensors' SafetensorError: header too large / too small, cut buffer
        raise error(f"{path}: not a readable safetensors file ({first_line(e)}); {fix}") from e


def laion_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """laion's key handling: ``state_dict`` entry, ``module.`` prefix; epoch/optimizer dropped."""
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise ClapError("not a LAION-CLAP checkpoint: no state_dict of tensors inside; "
                        "pass a LAION-CLAP .pt such as 630k-audioset-best.pt")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def infer_config(sd: dict[str, torch.Tensor]) -> ClapConfig:
    """Recognise the architecture of a laion state dict from its keys and shapes."""
    if any("fusion_model" in k or "mel_conv2d" in k or "mel_conv1d" in k for k in sd):
        raise ClapError(
            "this is a fusion CLAP checkpoint (e.g. 630k-fusion-best.pt); lmaczs supports the "
            "non-fusion models: use 630k-best.pt or 630k-audioset-best.pt"
        )
    if "text_branch.embeddings.word_embeddings.weight" in sd:
        text: dict[str, Any] = {"text": "roberta"}
    elif "token_embedding.weight" in sd:
        width = sd["token_embedding.weight"].shape[1]
        layers = len({k.split(".")[2] for k in sd if k.startswith("text_branch.resblocks.")})
        text = dict(
            text="transformer", text_width=width, text_layers=layers, text_heads=max(1, width // 64),
            vocab_size=sd["token_embedding.weight"].shape[0],
            context_length=sd["positional_embedding"].shape[0],
        )
    else:
        raise ClapError("not a LAION-CLAP checkpoint: no RoBERTa or transformer text branch keys; "
                        "pass a LAION-CLAP .pt such as 630k-audioset-best.pt")
    joint = sd["audio_projection.0.weight"].shape[0]
    if "audio_branch.conv_block1.conv1.weight" in sd:
        return ClapConfig("PANN-14", joint_dim=joint, **text)
    w = sd.get("audio_branch.patch_embed.proj.weight")
    if w is None:
        raise ClapError("not a LAION-CLAP checkpoint: neither HTSAT nor PANN-14 audio branch keys; "
                        "pass a LAION-CLAP .pt such as 630k-audioset-best.pt")
    width = w.shape[0]
    depths = tuple(
        len({k.split(".")[4] for k in sd if k.startswith(f"audio_branch.layers.{i}.blocks.")})
        for i in range(4)
    )
    known = {(96, (2, 2, 6, 2)): "HTSAT-tiny", (128, (2, 2, 12, 2)): "HTSAT-base"}
    if (width, depths) in known:
        return ClapConfig(known[(width, depths)], joint_dim=joint, **text)
    heads = tuple(
        int(sd[f"audio_branch.layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
        for i in range(4)
    )
    return ClapConfig("HTSAT-custom", joint_dim=joint, htsat_embed_dim=width, htsat_depths=depths,
                      htsat_heads=heads, **text)


def load_weights(clap: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load; the one tolerated difference is laion's position_ids buffer (transformers-version dependent)."""
    sd = dict(sd)
    own = clap.state_dict()
    pid = "text_branch.embeddings.position_ids"
    if pid in sd and pid not in own:
        del sd[pid]
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise ClapError(
            f"{source}: weights do not match the architecture "
            f"(missing {len(missing)}: {missing[:5]}; unexpected {len(extra)}: {extra[:5]})"
        )
    shapes = [f"{k} {tuple(sd[k].shape)} where the model has {tuple(v.shape)}"
              for k, v in own.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if shapes:
        raise ClapError(f"{source}: weights do not match the architecture ({len(shapes)} shapes differ: "
                        + "; ".join(shapes[:3]) + ")")
    clap.load_state_dict(sd, strict=True)


def _make_tokenizer(cfg: ClapConfig, tokenizer_dir: str | os.PathLike | None) -> Any:
    if cfg.is_roberta:
        return RobertaTokenizerWrapper(tokenizer_dir, cfg.context_length)
    return ClipBpeTokenizer(cfg.context_length)


def load_laion_checkpoint(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                          trust: bool | None = None) -> ClapModel:
    """Load one of LAION's ``.pt`` CLAP checkpoints (non-fusion HTSAT or PANN-14).

    The file is unpickled with weights only (tensors and `laion_safe_globals`); ``trust=True``
    unpickles it fully, for a file from a source you trust (None: `trusting_checkpoints`)."""
    path = Path(path)
    if not path.is_file():
        raise ClapError(f"CLAP checkpoint not found: {path}")
    try:
        sd = laion_state_dict(_torch_load(path, _TRUST.get() if trust is None else trust))
        cfg = infer_config(sd)
    except ClapError as e:
        if str(e).startswith(str(path)):
            raise
        raise ClapError(f"{path}: {e}") from e
    except (KeyError, IndexError) as e:   # a state dict with some of laion's keys but not all
        raise ClapError(f"{path}: not a LAION-CLAP checkpoint (no {e}); pass a LAION-CLAP .pt such as "
                        "630k-audioset-best.pt") from e
    tok = _make_tokenizer(cfg, tokenizer)  # fail early, before building a large model
    with _weights_follow():
        clap = build_laion_clap(cfg)
    load_weights(clap, sd, str(path))
    return ClapModel(clap, cfg, tok, source=str(path))


def save_clap(model: ClapModel, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write a CLAP as ``clap.safetensors`` + ``clap.json`` (our format: no pickle).
    ``dtype=torch.float16`` halves the file; loading casts back to float32."""
    from safetensors.torch import save_file

    from .files import atomic_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.clap.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    with atomic_path(directory / "clap.safetensors") as tmp:
        save_file(tensors, str(tmp))
    meta = {"format": "lmaczs-clap/1", "config": model.cfg.to_json(), "identity": model.identity()}
    with atomic_path(directory / "clap.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_clap_dir(directory: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> ClapModel:
    """Load a CLAP saved by ``save_clap`` (``clap.json`` + ``clap.safetensors``)."""
    directory = Path(directory)
    meta_path = directory / "clap.json"
    if not meta_path.is_file():
        raise ClapError(f"{directory}: no clap.json in this folder; pass a folder with clap.json + "
                        "clap.safetensors (a CLAP saved by lmaczs), a LAION .pt file, or hf:DIR")
    cfg = _read_clap_config(meta_path)
    weights = read_safetensors(directory / "clap.safetensors", "copy the CLAP folder again")
    tok = _make_tokenizer(cfg, tokenizer)
    with _weights_follow():
        clap = build_laion_clap(cfg)
    load_weights(clap, weights, str(directory / "clap.safetensors"))
    return ClapModel(clap, cfg, tok, source=str(directory))


def _read_clap_config(path: Path) -> ClapConfig:
    """The ClapConfig in a clap.json; anything unreadable raises ClapError naming the file."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ClapError(f"{path}: not readable JSON ({first_line(e)}); copy the CLAP folder again") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ClapError(f"{path}: not an lmaczs CLAP config (no \"config\" object); copy the CLAP folder again")
    try:
        return ClapConfig.from_json(meta["config"])
    except ClapError as e:
        raise ClapError(f"{path}: {e}") from e
    except (TypeError, ValueError) as e:
        raise ClapError(f"{path}: not a valid CLAP config ({first_line(e)}); copy the CLAP folder again") from e


def random_clap(arch: str, seed: int = 0, tokenizer: str | os.PathLike | None = None) -> ClapModel:
    """The real laion classes with random weights: ``tiny``, ``HTSAT-tiny``, ``HTSAT-base``,
    ``PANN-14``, each optionally ``+roberta`` for the RoBERTa text tower."""
    name, _, text = arch.partition("+")
    if name not in RANDOM_ARCHS or text not in ("", "roberta"):
        raise ClapError(
            f"unknown architecture random:{arch}; choose one of "
            + ", ".join(f"random:{a}" for a in RANDOM_ARCHS) + " (optionally +roberta)"
        )
    cfg = RANDOM_ARCHS[name]
    if text == "roberta":
        cfg = dataclasses.replace(cfg, text="roberta")
    tok = _make_tokenizer(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clap = build_laion_clap(cfg)
    return ClapModel(clap, cfg, tok, source=f"random:{arch}")


def laion_checkpoint_path(name: str) -> Path:
    """Find ``laion:NAME`` locally (lmaczs cache, torch hub), else fetch it with laion's hub repo.

    Without a reachable hub (HF_HUB_OFFLINE set, or no connection to it within a few seconds)
    this fails at once, rather than after huggingface_hub's retries."""
    stem = name[:-3] if name.endswith(".pt") else name
    if stem in LAION_FUSION_CHECKPOINTS:
        raise ClapError(f"laion:{stem} is a fusion model; lmaczs supports non-fusion CLAP (e.g. laion:630k-audioset-best)")
    if stem not in LAION_CHECKPOINTS:
        raise ClapError(f"unknown LAION checkpoint {stem!r}; known: {', '.join(LAION_CHECKPOINTS)}")
    fname = stem + ".pt"
    caches = cache_locations()
    folders = (caches["lmaczs_cache"], caches["torch_hub"])
    for folder in folders:
        if (Path(folder) / fname).is_file():
            return Path(folder) / fname

    def unreachable(why: str) -> ClapError:
        return ClapError(f"laion:{stem}: {fname} is not in {folders[0]} or {folders[1]} and the Hugging Face "
                         f"hub is not reachable ({why}). Download {fname} yourself and pass --clap PATH/{fname}, "
                         f"or put it in {folders[0]}.")

    why = _hub_unreachable()
    if why:
        raise unreachable(why)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(LAION_HUB_REPO, fname))
    except Exception as e:
        raise unreachable(type(e).__name__) from e


HUB_PROBE_TIMEOUT_S = 3.0   # a hub that does not answer a TCP connect in this time counts as offline


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None: HF_HUB_OFFLINE, or no TCP
    connection to its host (DNS failure, refused, or silent for HUB_PROBE_TIMEOUT_S)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"no connection to {url.hostname}: {e.strerror or type(e).__name__}"
    return None


def demo_dir() -> Path:
    """Folder of the bundled demo model (CLAP + decoder)."""
    return Path(__file__).parent / "demo" / "model"


def load_clap(spec: str = "demo", tokenizer: str | os.PathLike | None = None,
              trust: bool | None = None) -> ClapModel:
    """Resolve the one model option: ``demo | laion:NAME | hf:DIR | PATH | random:ARCH``.

    A ``.pt`` file (PATH, laion:NAME) is unpickled with weights only; ``trust=True`` opts in to
    full unpickling for a file you trust (None: as `trusting_checkpoints` says, else False)."""
    if spec == "demo":
        if not (demo_dir() / "clap.json").is_file():
            raise ClapError("the bundled demo model is not in this installation yet; use --clap random:ARCH or PATH")
        return load_clap_dir(demo_dir(), tokenizer)
    if spec.startswith("random:"):
        return random_clap(spec[len("random:"):], tokenizer=tokenizer)
    if spec.startswith("hf:"):
        from .hf import load_hf_clap

        return load_hf_clap(spec[len("hf:"):], tokenizer)
    if spec.startswith("laion:"):
        return load_laion_checkpoint(laion_checkpoint_path(spec[len("laion:"):]), tokenizer, trust)
    path = Path(spec)
    if path.is_dir():
        return load_clap_dir(path, tokenizer)
    if path.is_file():
        return load_laion_checkpoint(path, tokenizer, trust)
    raise ClapError(f"--clap {spec}: no such file or folder (use demo, laion:NAME, hf:DIR, PATH or random:ARCH)")


def cache_locations() -> dict[str, str]:
    """Where model files are looked for: the HF cache (RoBERTa tokenizer), torch hub, our cache."""
    from .environment import cache_locations as locations

    return locations()
