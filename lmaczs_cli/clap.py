"""LAION-CLAP, built offline from laion-clap's own classes (work in progress)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_locations() -> dict[str, str]:
    """Where model files are looked for: the HF cache (RoBERTa tokenizer) and torch hub."""
    from huggingface_hub.constants import HF_HUB_CACHE
    import torch.hub

    return {
        "hf_hub_cache": str(HF_HUB_CACHE),
        "torch_hub": str(Path(torch.hub.get_dir())),
        "lmaczs_cache": str(Path(os.environ.get("LMACZS_CACHE", Path.home() / ".cache" / "lmaczs"))),
    }
