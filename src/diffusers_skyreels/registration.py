"""Make Diffusers' loaders find this package's classes, without `trust_remote_code`.

Diffusers resolves a saved component `["<library>", "<Class>"]` through `LOADABLE_CLASSES` and a pipeline's
`_class_name` through attributes of the `diffusers` module. Neither has a public plugin API, so this module patches
both, in one place, when `diffusers_skyreels` is imported:

- `LOADABLE_CLASSES["diffusers_skyreels"]` makes `save_pretrained` record the short library name and lets
  `DiffusionPipeline.from_pretrained` / `AutoModel.from_pretrained(..., subfolder=...)` load our components (the Hub
  download path accepts the name for the same reason);
- our public classes become attributes of `diffusers`, so `model_index.json`'s `_class_name` and a component's
  `config.json` `_class_name` resolve.

Loading a SkyReels folder without importing the package first fails inside Diffusers with its own message, which
names the library to import (`import diffusers_skyreels`).
"""

from __future__ import annotations

import sys
from types import ModuleType

LIBRARY_NAME = "diffusers_skyreels"

# The base classes Diffusers checks components against, with the methods it uses to save and load them.
_BASE_CLASS_METHODS = {
    "ModelMixin": ["save_pretrained", "from_pretrained"],
    "SchedulerMixin": ["save_pretrained", "from_pretrained"],
    "DiffusionPipeline": ["save_pretrained", "from_pretrained"],
}


def register_with_diffusers(package: ModuleType, public_names: list[str]) -> None:
    """Register `package` as a library Diffusers can load components from, and expose `public_names` on `diffusers`.

    The package must expose the base classes named in `_BASE_CLASS_METHODS` (Diffusers picks a component's load
    method with `issubclass` against `getattr(library, "ModelMixin")` and friends). Idempotent.
    """
    import diffusers
    from diffusers.pipelines import pipeline_loading_utils

    missing = [name for name in _BASE_CLASS_METHODS if not hasattr(package, name)]
    if missing:
        raise AttributeError(f"{package.__name__} must expose {missing} for Diffusers to load its components.")

    pipeline_loading_utils.LOADABLE_CLASSES.setdefault(LIBRARY_NAME, dict(_BASE_CLASS_METHODS))
    for name in public_names:
        setattr(diffusers, name, getattr(package, name))
    sys.modules.setdefault(LIBRARY_NAME, package)
