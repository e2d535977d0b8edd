"""lmaczs: listenable explanations (LMAC-ZS) for zero-shot audio classifiers (LAION-CLAP).

    from lmaczs_cli import Explainer, load_audio
    ex = Explainer.load("demo")
    r = ex.explain(load_audio("clip.wav"), "dog barking")
    r.save("dog.wav"); r.mask, r.times, r.freqs

Names are imported on first use, so ``import lmaczs_cli`` (and ``lmaczs --help``) stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "AudioError": "audio", "load_audio": "audio",
    "Explainer": "explain", "Explanation": "explain", "Clip": "explain", "ClipResult": "explain",
    "ExplainError": "inputs", "LmaczsError": "errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
