"""What `lmaczs info` reports: package versions, the compute device and model cache locations,
gathered without touching the network or loading a model (`collect_info`, the `info --json`
schema). The command-line layer only prints it.

It answers in well under 2 s by not importing torch (over a second by itself): torch's build
is read from ``torch/version.py``, the GPUs from the CUDA driver (the library torch calls too),
and the thread count the way torch picks its default (`torch_default_threads`).
"""
from __future__ import annotations

import ast
import ctypes
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path
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
    build = torch_build()
    packages: dict[str, str] = {
        "torch": build.get("__version__") or dist_version("torch"),
        "torchvision": dist_version("torchvision"),
        # Never import laion_clap: its __init__ builds hub tokenizers (minutes, network).
        "laion-clap": dist_version("laion-clap"),
        "numpy": _module_version("numpy"),
        "soundfile": _module_version("soundfile"),
        "libsndfile": _libsndfile_version(),
        "soxr": _module_version("soxr"),
        "onnx": dist_version("onnx"),
        "onnxruntime": _module_version("onnxruntime"),
        # From metadata: importing them takes longer than all of `info` may (triton pulls in
        # torch's compiler stack); whether they load is for the commands that use them to say.
        "tensorrt": dist_version("tensorrt"),
        "triton": dist_version("triton"),
    }
    ort = onnxruntime_providers()

    gpus = cuda_devices() if build.get("cuda") else []    # a CPU-only torch cannot use a GPU
    device = {
        "device": "cuda" if gpus else "cpu",
        "cuda_available": bool(gpus),
        "cuda_device_count": len(gpus),
        "cuda_devices": gpus,
        "torch_cuda_version": build.get("cuda"),
        "torch_threads": torch_default_threads(),
    }
    return {
        "lmaczs": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "onnxruntime_providers": ort["providers"],
        "onnxruntime_problem": ort["problem"],
        "device": device,
        "caches": cache_locations(),
    }


def cache_locations() -> dict[str, str]:
    """Where model files are looked for (`lmaczs info`, and laion:NAME before it downloads):
    the HF cache (RoBERTa tokenizer), torch hub, our cache."""
    from huggingface_hub.constants import HF_HUB_CACHE

    torch_home = os.path.expanduser(os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "torch"))      # torch.hub.get_dir()'s rule
    return {
        "hf_hub_cache": str(HF_HUB_CACHE),
        "torch_hub": str(Path(torch_home) / "hub"),
        "lmaczs_cache": str(Path(os.environ.get("LMACZS_CACHE", Path.home() / ".cache" / "lmaczs"))),
    }


def torch_build() -> dict[str, Any]:
    """torch's ``version.py`` (``__version__``, ``cuda``: the CUDA it was built for, or None),
    read without importing torch; {} when torch is not installed."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return {}
    out: dict[str, Any] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and getattr(node, "value", None) is not None:
            try:
                out[target.id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out


def cuda_devices() -> list[str]:
    """Names of the CUDA devices the driver shows this process (CUDA_VISIBLE_DEVICES applies),
    asked through the driver API (libcuda) as torch does; [] without a driver or a device."""
    try:
        lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return []
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    names = []
    for i in range(count.value):
        dev, name = ctypes.c_int(0), ctypes.create_string_buffer(256)
        if lib.cuDeviceGet(ctypes.byref(dev), i) != 0 or lib.cuDeviceGetName(name, 256, dev) != 0:
            return names
        names.append(name.value.decode("utf-8", "replace"))
    return names


def torch_default_threads() -> int:
    """The intra-op thread count torch starts with: MKL_NUM_THREADS, else OMP_NUM_THREADS, else
    the machine's physical cores (its logical CPUs where the topology is not known), as torch's
    ``intraop_default_num_threads`` picks it."""
    n = 0
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):   # the later one wins, as in torch
        value = os.environ.get(var, "")
        if value.strip().isdigit() and int(value) > 0:
            n = int(value)
    return n or physical_cores()


def physical_cores() -> int:
    """Physical cores of the machine (Linux: distinct (package, core) pairs in sysfs); else the
    logical CPU count."""
    cores = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            continue
    logical = os.cpu_count() or 1
    return len(cores) if 0 < len(cores) <= logical else logical


def _libsndfile_version() -> str:
    try:
        import soundfile
    except ImportError:
        return "not installed"
    except Exception as e:  # soundfile present but libsndfile missing
        return f"import failed: {type(e).__name__}: {e}"
    return str(soundfile.__libsndfile_version__)


def onnxruntime_providers() -> dict[str, Any]:
    """ONNX Runtime's execution providers here, and which onnxruntime distributions are installed.

    {"providers": [...], "distributions": {name: version}, "problem": str | None}. Two
    distributions side by side (onnxruntime and onnxruntime-gpu share one import name) is the
    usual reason the CUDA provider goes missing: the problem line names the fix."""
    from importlib import metadata

    dists = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            dists[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    except Exception:  # not installed, or its libraries fail to load
        providers = []
    problem = None
    if len(dists) > 1:
        problem = ("onnxruntime and onnxruntime-gpu are both installed and overwrite each other: "
                   "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    elif not dists:
        problem = "onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)"
    return {"providers": providers, "distributions": dists, "problem": problem}
