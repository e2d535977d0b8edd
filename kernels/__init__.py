"""Fused GPU kernels (Triton), installed as ``lmaczs_cli.kernels``.

``istft.masked_istft``: the listenable step (mask expansion -> complex multiply -> inverse DFT ->
synthesis window -> overlap-add -> window-sum normalisation) in one launch, with its torch
reference ``istft.masked_istft_reference``. ``lmaczs_cli.model`` calls it through its ``triton``
spectral implementation. Importing this package never needs triton.
"""
if __name__ == "kernels":
    # This folder is `lmaczs_cli.kernels`. It is imported as a top-level `kernels` only when the
    # repository root is on sys.path (`python -m ...` run in a checkout), where it would shadow the
    # installed package of that name (Hugging Face's `kernels`, which transformers imports). Hand
    # the name over to that package, or fail as if this folder were not there.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None or _spec.loader is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
