"""What `lmaczs info` reports: package versions, the compute device and model cache locations,
gathered without touching the network or loading a model (`collect_info`, the `info --json`
schema). The command-line layer only prints it."""
from __future__ import annotations

import importlib
import importlib.metadata
import platform
from typing import Any

from . import __version__


def dist_version(dist: str) -> str:
    """A distribution's version from its metadata, without importing it."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _module_version(module: str, dist: str | None = None) -> str:
    """An importable module's version; "not installed", or why the import failed."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return "not installed"
    except Exception as e:  # e.g. a GPU library whose shared objects fail to load
        return f"import failed: {type(e).__name__}: {e}"
    version = getattr(mod, "__version__", None)
    return str(version) if version else dist_version(dist or module)


def collect_info() -> dict[str, Any]:
    """Versions, device and caches as one JSON-able dict (the `info --json` schema)."""
    import torch

    from .clap import cache_locations

    packages: dict[str, str] = {
        "torch": torch.__version__,
        "torchvision": dist_version("torchvision"),
        # Never import laion_clap: its __init__ builds hub tokenizers (minutes, network).
        "laion-clap": dist_version("laion-clap"),
        "numpy": _module_version("numpy"),
        "soundfile": _module_version("soundfile"),
        "libsndfile": _libsndfile_version(),
        "soxr": _module_version("soxr"),
        "onnx": dist_version("onnx"),
        "onnxruntime": _module_version("onnxruntime"),
        "tensorrt": _module_version("tensorrt"),
        "triton": _module_version("triton"),
    }
    try:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    except Exception:  # not installed or broken: the version above says which
        providers = []

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    device = {
        "device": "cuda" if cuda else "cpu",
        "cuda_available": cuda,
        "cuda_device_count": count,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(count)],
        "torch_cuda_version": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
    }
    return {
        "lmaczs": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "onnxruntime_providers": providers,
        "device": device,
        "caches": cache_locations(),
    }


def _libsndfile_version() -> str:
    try:
        import soundfile
    except ImportError:
        return "not installed"
    except Exception as e:  # soundfile present but libsndfile missing
        return f"import failed: {type(e).__name__}: {e}"
    return str(soundfile.__libsndfile_version__)
