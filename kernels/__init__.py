if __name__ == "kernels":  # pragma: no cover - exercised by tests/test_packaging.py in a subprocess
    # This folder is ``icecache_ray.kernels``. Run from the checkout (``python -m`` there, or Ray
    # workers, which put the driver's working directory first on sys.path), ``import kernels``
    # finds it before the installed Hugging Face ``kernels`` package that transformers imports;
    # hand that import the installed package instead.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ImportError("no installed 'kernels' package (this folder is icecache_ray.kernels, not it)")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    import numpy as _np

    EMPTY = _np.zeros(0, _np.int64)  # the one empty id array of the project (ragged selections, copies)
