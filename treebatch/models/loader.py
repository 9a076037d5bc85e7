"""Load a model: a Hugging Face folder, a GGUF file, or the embedded default model.

Whatever the source, the result is float32 tensors under Hugging Face Llama names
with q/k rows in the HF (rotate_half) order, plus a ModelConfig and a tokenizer
folder that `transformers.AutoTokenizer.from_pretrained` loads quickly.

A GGUF file is converted once: its weights go to a safetensors file and its
tokenizer to a saved fast tokenizer under `cache_root()/models/<hash of the file>/`,
so later loads only hash the file and memory-map the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from treebatch.config import ModelConfig
from treebatch.host import cache_root
from treebatch.models.checks import ModelLoadError, check_shapes
from treebatch.models.families import HF_MODEL_TYPES, hf_features, hf_rope_scaling, rope_theta

# Bump when the conversion changes, so stale caches are not reused.
CACHE_FORMAT = b"treebatch-gguf-3"


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: Mapping[str, torch.Tensor]  # float32 when read, HF Llama names
    tokenizer_path: str  # folder for AutoTokenizer.from_pretrained
    chat_template: str | None
    name: str  # served model name
    context_length: int


def load_model(path: str | None, cache_dir: str | Path | None = None) -> LoadedModel:
    """Load `path`: a HF folder, a .gguf file, or None for the embedded default model.

    `cache_dir` replaces `cache_root()` for the GGUF conversion cache. A known model name
    (treebatch/models/named.py: "gemma3-270m") is fetched once and served under that name.
    """
    from treebatch.models.named import resolve_model

    path, served_name = resolve_model(path)
    if served_name is not None:
        named = load_model(path, cache_dir)
        named.name = served_name
        return named
    p = Path(path).expanduser()
    if p.is_dir():
        return load_hf_folder(p)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return load_gguf(p, Path(cache_dir) if cache_dir is not None else cache_root())
    raise FileNotFoundError(f"{path}: not a model folder (config.json + *.safetensors) nor a .gguf file")


# ---------------------------------------------------------------- Hugging Face folders


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def config_from_hf(cfg: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    """ModelConfig from a config.json dict (and generation_config.json, for extra EOS ids)."""
    model_type = cfg.get("model_type", "llama")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(HF_MODEL_TYPES))}")
    family = HF_MODEL_TYPES[model_type]
    if "text_config" in cfg:  # a multimodal wrapper (Gemma 3 4B+): only its text model is supported
        raise ValueError(f"{model_type}: a multimodal model; point treebatch at its text-only checkpoint")
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    eos = _as_ids(cfg.get("eos_token_id")) + _as_ids((generation or {}).get("eos_token_id"))
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=rope_theta(cfg),
        rope_scaling=hf_rope_scaling(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family in ("gemma2", "gemma3"))),
        # Qwen2 always has q/k/v biases, though its config.json does not say so.
        attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        architecture=family,
        **hf_features(family, cfg, int(cfg["num_hidden_layers"]), head_dim),
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _hf_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = (_read_json(folder / "tokenizer_config.json") or {}).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


class LazyWeights(Mapping[str, torch.Tensor]):
    """The tensors of safetensors files, each read (and widened to float32) only when asked for.

    Building a model asks for one tensor at a time, converts it to the compute dtype and packs
    it, so loading holds the model as packed plus one tensor in flight, not a float32 copy of
    every weight beside it (for a 1B-class model in bfloat16: 8.0 GiB at peak before, measured
    by benchmarks/memory.py)."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Any] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as exc:  # safetensors' own error type: a truncated or corrupt file
                raise ModelLoadError(f"{f}: not a readable safetensors file (truncated or corrupt: {exc})") from exc
            for name in handle.keys():
                if not name.endswith("rotary_emb.inv_freq"):  # an old buffer, recomputed from the config
                    self._where[name] = handle

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name).to(torch.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file's header (no data read)."""
        return tuple(self._where[name].get_slice(name).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def discard(self, name: str) -> None:
        self._where.pop(name, None)


def load_hf_folder(folder: Path) -> LoadedModel:
    cfg = _read_json(folder / "config.json")
    if cfg is None:
        raise FileNotFoundError(f"{folder}: no config.json")
    config = config_from_hf(cfg, _read_json(folder / "generation_config.json"))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    weights = LazyWeights(files)
    if not config.tie_word_embeddings and "lm_head.weight" not in weights:
        config = dataclasses.replace(config, tie_word_embeddings=True)  # saved without its tied copy
    if config.tie_word_embeddings:
        weights.discard("lm_head.weight")  # the embedding serves as the output head
    if "model.layers.0.self_attn.q_proj.bias" in weights and not config.attention_bias:
        config = dataclasses.replace(config, attention_bias=True)
    check_shapes(config, weights, weights.shape, str(folder))
    return LoadedModel(
        config=config,
        weights=weights,
        tokenizer_path=str(folder),
        chat_template=_hf_chat_template(folder),
        name=folder.resolve().name,
        context_length=config.max_position_embeddings,
    )


# ---------------------------------------------------------------- GGUF files, cached


def file_hash(path: Path) -> str:
    """Content hash of the file (and the cache format), read in 16 MiB chunks."""
    h = hashlib.blake2b(digest_size=16, person=CACHE_FORMAT[:16])
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _cached_file_hash(path: Path, cache_dir: Path) -> str:
    """`file_hash`, remembered per (path, size, mtime): hashing 100 MB costs ~0.2 s of a ~0.5 s load.

    The key is still the content hash; the memo only skips recomputing it for an untouched file.
    """
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CACHE_FORMAT.decode()}"
    memo = cache_dir / "hashes" / hashlib.blake2b(stamp.encode(), digest_size=16).hexdigest()
    try:
        return memo.read_text(encoding="ascii").strip()
    except OSError:
        pass
    digest = file_hash(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=memo.parent)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(digest)
        os.replace(tmp, memo)  # atomic: readers see the whole digest or no file
    except OSError:
        pass  # a read-only cache still works, only slower
    return digest


def _read_cache(folder: Path) -> LoadedModel:
    from safetensors.torch import load_file

    info = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    fields = dict(info["config"])
    fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
    fields["layer_windows"] = tuple(fields["layer_windows"])
    return LoadedModel(
        config=ModelConfig(**fields),
        weights=load_file(str(folder / "weights.safetensors")),
        tokenizer_path=str(folder / "tokenizer"),
        chat_template=info["chat_template"],
        name=info["name"],
        context_length=int(info["context_length"]),
    )


def convert_gguf(path: Path, dest: Path) -> None:
    """Convert `path` into the cache folder `dest`, atomically: build aside, then rename."""
    from safetensors.torch import save_file

    from treebatch.models.gguf_loader import config_from_metadata, read_gguf

    print(f"treebatch: converting {path.name} (once; cached in {dest})", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        config, weights, meta = read_gguf(path)
        _, context_length = config_from_metadata(meta, set())
        save_file({k: torch.from_numpy(v) for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        os.chmod(tmp / "weights.safetensors", 0o644)
        del weights
        template = meta.get("tokenizer.chat_template")
        info = {
            "config": dataclasses.asdict(config),
            "name": str(meta.get("general.name") or path.stem),
            "context_length": context_length,
            "chat_template": str(template) if template is not None else None,
            "source": str(path),
        }
        (tmp / "model.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        _convert_tokenizer(path, tmp / "tokenizer")
        _publish(tmp, dest, "model.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, dest: Path, marker: str) -> None:
    """Move a folder built aside into place in one rename. If another process got there first
    (its `marker` file exists), keep theirs: both were built from the same file."""
    try:
        os.rename(tmp, dest)
    except OSError:
        if not (dest / marker).is_file():
            raise


def _convert_tokenizer(path: Path, dest: Path) -> None:
    # The slow step (seconds): transformers builds a fast tokenizer from the GGUF vocabulary.
    import transformers
    from transformers import AutoTokenizer

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # hide its "converting tokenizer" chatter
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    finally:
        transformers.logging.set_verbosity(verbosity)
    tok.save_pretrained(str(dest))


def load_gguf(path: Path, cache_dir: Path) -> LoadedModel:
    folder = cache_dir / "models" / _cached_file_hash(path, cache_dir)
    if not (folder / "model.json").is_file():
        convert_gguf(path, folder)
    loaded = _read_cache(folder)
    # Users name a model by its file ("SmolLM2-135M-Instruct.Q4_1"), not by general.name.
    loaded.name = path.stem
    return loaded


# ---------------------------------------------------------------- tokenizer only


@dataclass
class TokenizerFiles:
    """What tokenizing prompts needs, without the weights (for `treebatch plan`)."""

    tokenizer_path: str  # folder for AutoTokenizer.from_pretrained
    chat_template: str | None
    name: str
    context_length: int


def load_tokenizer_files(path: str | None, cache_dir: str | Path | None = None) -> TokenizerFiles:
    """The tokenizer side of `load_model(path)`: never reads or dequantizes weights.

    A GGUF file already converted is served from its cache folder; otherwise only its tokenizer
    is converted (from the metadata), into `tokenizers/<hash>/` beside the model cache.
    """
    from treebatch.models.named import resolve_model

    path, served_name = resolve_model(path)
    if served_name is not None:
        named = load_tokenizer_files(path, cache_dir)
        named.name = served_name
        return named
    p = Path(path).expanduser()
    if p.is_dir():
        cfg = _read_json(p / "config.json") or {}
        return TokenizerFiles(str(p), _hf_chat_template(p), p.resolve().name, int(cfg.get("max_position_embeddings", 4096)))
    if not (p.is_file() and p.suffix.lower() == ".gguf"):
        raise FileNotFoundError(f"{path}: not a model folder (config.json + *.safetensors) nor a .gguf file")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    digest = _cached_file_hash(p, root)
    model_info = _read_json(root / "models" / digest / "model.json")
    if model_info is not None:
        folder = root / "models" / digest / "tokenizer"
    else:
        folder = root / "tokenizers" / digest / "tokenizer"
        model_info = _read_json(folder.parent / "info.json")
        if model_info is None:
            model_info = _convert_tokenizer_only(p, folder.parent)
    return TokenizerFiles(str(folder), model_info["chat_template"], p.stem, int(model_info["context_length"]))


def _convert_tokenizer_only(path: Path, dest: Path) -> dict[str, Any]:
    from treebatch.models.gguf_loader import open_gguf, read_metadata

    meta = read_metadata(open_gguf(path))  # memory-mapped: touches no tensor data
    arch = meta.get("general.architecture")
    template = meta.get("tokenizer.chat_template")
    info = {
        "context_length": int(meta.get(f"{arch}.context_length", 4096)),
        "chat_template": str(template) if template is not None else None,
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        _convert_tokenizer(path, tmp / "tokenizer")
        (tmp / "info.json").write_text(json.dumps(info), encoding="utf-8")
        _publish(tmp, dest, "info.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info
