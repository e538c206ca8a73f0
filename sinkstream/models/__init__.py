"""Model families, one file each, found by the `model_type` of a Hugging Face config."""
from __future__ import annotations

from ..errors import UnsupportedModelError

_REGISTRY: dict[str, type] = {}
_FAMILIES: dict[str, tuple[str, str]] = {}  # family -> (model_types, what it needs)


def register(*model_types: str, family: str, needs: str = ""):
    def deco(cls):
        for mt in model_types:
            _REGISTRY[mt] = cls
        _FAMILIES[family] = (", ".join(model_types), needs)
        return cls
    return deco


def _import_families() -> None:
    import importlib
    import pkgutil
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in ("base",):
            importlib.import_module(f"{__name__}.{info.name}")


def model_class(model_type: str):
    _import_families()
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; supported model_type values: {', '.join(supported())}")
    return _REGISTRY[model_type]


def supported() -> list[str]:
    _import_families()
    return sorted(_REGISTRY)


def families() -> dict[str, tuple[str, str]]:
    _import_families()
    return dict(sorted(_FAMILIES.items()))
