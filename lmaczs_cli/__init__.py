"""lmaczs: listenable explanations (LMAC-ZS) for zero-shot audio classifiers (LAION-CLAP)."""
from __future__ import annotations

__version__ = "0.1.0"

from .audio import AudioError, load_audio

__all__ = ["__version__", "AudioError", "load_audio"]
