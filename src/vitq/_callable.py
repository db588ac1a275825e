"""Modules you can call: ``vitq.run(spec)``, ``vitq.evaluate(model, data)``, ``vitq.export(qmodel, path)``.

Each of these names is a module of the package (``vitq.run.record``, ``vitq.evaluate.compare_paired``,
``vitq.export.onnx`` stay importable and reachable as attributes) and, called, the function users expect. A
function of the same name would shadow the module attribute and break ``import vitq.export.onnx as vo`` and
``vitq.evaluate.compare_paired``; renaming the modules would break every existing import.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def make_callable(module_name: str, function_name: str) -> None:
    """Calling module ``module_name`` calls its attribute ``function_name`` (looked up at call time)."""
    module = sys.modules[module_name]

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, function_name)(*args, **kwargs)

    CallableModule.__call__.__doc__ = f"``{module_name}(...)`` is ``{module_name}.{function_name}(...)``."
    module.__class__ = CallableModule


__all__ = ["make_callable"]
