"""Shared fixtures: a tiny *real* laion HTSAT CLAP (random weights) and generated audio."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# The suite never touches the network; make any accidental hub access fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_clap():
    """laion's HTSAT_Swin_Transformer at embed_dim 16, depths [1,1,1,1] + a 1-layer text tower."""
    from lmaczs_cli.clap import random_clap

    return random_clap("tiny", seed=0)


@pytest.fixture(scope="session")
def roberta_tokenizer_dir(tmp_path_factory):
    """A RoBERTa tokenizer built offline from a small byte-level BPE vocabulary."""
    import json

    from transformers import RobertaTokenizer

    d = tmp_path_factory.mktemp("roberta_tok")
    byte_chars = [chr(c) for c in range(33, 127)] + ["Ġ"]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in byte_chars:
        vocab.setdefault(ch, len(vocab))
    merges = ["Ġ d", "o g", "Ġd og", "Ġ g", "l a"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<mask>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = RobertaTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    out = d / "saved"
    tok.save_pretrained(str(out))
    return out


def tone(freq_hz: float, seconds: float, sr: int = 48_000, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
