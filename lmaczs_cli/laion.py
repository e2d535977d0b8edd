"""How lmaczs reaches LAION-CLAP's model code (`laion_module`).

``import laion_clap`` runs a package ``__init__`` that builds three hub tokenizers (it hangs for
minutes without network), and ``clap_module/__init__`` imports laion's training code. The model
files are imported instead under a private package name whose ``__path__`` points into the
installed wheel, so neither ``__init__`` runs and a user's own ``import laion_clap`` is left
untouched; while they import, the heavy packages their top levels name but the models lmaczs
builds never use are stand-ins (`_deferred_imports`).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from typing import Any, Iterator

_PKG = "_lmaczs_laion_clap"  # private alias of the installed laion_clap package directory


def laion_module(name: str = "") -> types.ModuleType:
    """Import ``laion_clap.clap_module[.name]`` without running ``laion_clap/__init__``.

    With a name, ``clap_module/__init__`` does not run either (it imports laion's training
    code: factory, transforms, torchvision, transformers). While laion's modules import,
    transformers, torchvision, h5py and tqdm, when not imported yet, are stand-ins whose
    names resolve to the real objects on first use (`_Deferred`); the demo model (CLIP-BPE
    text, HTSAT audio) never uses them, so loading it imports none of them.
    """
    if _PKG not in sys.modules:
        spec = importlib.util.find_spec("laion_clap")
        if spec is None or not spec.submodule_search_locations:
            from .clap import ClapError

            raise ClapError("laion-clap is not installed: pip install laion-clap==1.1.7")
        pkg = types.ModuleType(_PKG)
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules[_PKG] = pkg
    sub = f"{_PKG}.clap_module"
    if sub not in sys.modules:
        sys.modules[sub] = _bare_package(sub, [os.path.join(p, "clap_module") for p in sys.modules[_PKG].__path__])
    if not name:
        _run_package_init(sys.modules[sub])
        return sys.modules[sub]
    full = f"{sub}.{name}"
    if full in sys.modules:
        return sys.modules[full]
    with _deferred_imports():
        return importlib.import_module(full)


def _bare_package(name: str, path: list[str]) -> types.ModuleType:
    pkg = types.ModuleType(name)
    pkg.__path__ = path
    pkg.__package__ = name
    return pkg


def _run_package_init(pkg: types.ModuleType) -> None:
    """Run ``clap_module/__init__`` into the bare package once (`laion_module()` without a name)."""
    if getattr(pkg, "_lmaczs_init_done", False):
        return
    init = os.path.join(pkg.__path__[0], "__init__.py")
    spec = importlib.util.spec_from_file_location(pkg.__name__, init, submodule_search_locations=pkg.__path__)
    pkg.__spec__, pkg.__file__ = spec, init
    spec.loader.exec_module(pkg)
    pkg._lmaczs_init_done = True


# Imported by laion's model files at top level, used only by model variants lmaczs does not
# build by default (BERT/BART text, timm towers, frozen batch norm, dataset helpers).
_DEFERRABLE = ("transformers", "transformers.tokenization_utils_base", "torchvision", "torchvision.ops",
               "torchvision.ops.misc", "h5py", "tqdm")
_BLOCKED_WHILE_DEFERRED = ("timm",)


class _Deferred:
    """A name laion imported from a module that was not imported yet: the real object is
    imported on first call or attribute access (``RobertaModel.from_pretrained``)."""

    def __init__(self, module: str, name: str) -> None:
        self._where = (module, name)

    def _real(self) -> Any:
        module, name = self._where
        return getattr(importlib.import_module(module), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._real()(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self._real(), attr)

    def __repr__(self) -> str:
        return f"<deferred {'.'.join(self._where)}>"


class _StandIn(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Deferred(self.__name__, attr)


@contextlib.contextmanager
def _deferred_imports() -> Iterator[None]:
    """Stand-ins in ``sys.modules`` for the `_DEFERRABLE` modules not imported yet, removed
    afterwards (a later ``import transformers`` gets the real one)."""
    placed = [m for m in _DEFERRABLE if m not in sys.modules]
    for m in placed:
        mod = _StandIn(m)
        mod.__path__ = []     # a package (an unlisted submodule is not found: import error)
        sys.modules[m] = mod
    # packages laion's modules only try to import (their ImportError is caught), which would
    # otherwise import for the first time here and keep the stand-ins they saw: `timm` (laion's
    # timm towers, not used by HTSAT or PANN) imports torchvision. None in sys.modules makes the
    # import fail; afterwards they import as usual.
    blocked = [m for m in _BLOCKED_WHILE_DEFERRED if m not in sys.modules]
    for m in blocked:
        sys.modules[m] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for m in placed:
            if isinstance(sys.modules.get(m), _StandIn):
                del sys.modules[m]
        for m in blocked:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]
