"""Lazy re-exports: ``import lightning_lens.x`` stays cheap and a package can list names whose modules load on use."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return ``(__getattr__, __dir__)`` for a package whose public names live in submodules.

    Args:
        package: the package's ``__name__``.
        names: public name -> submodule (relative, without the leading dot; each extra leading dot goes one package
            up, so ``".lightning_modules"`` names ``lightning_lens.lightning_modules`` from a subpackage).
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f".{names[name]}", package)
        return getattr(module, name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
