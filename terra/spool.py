"""The offline spool: every fragment as a WAV on disk, written atomically. Blocking I/O.

Layout, enough for a minutes compiler to rebuild a meeting from disk alone::

    {spool}/{conference_id}/{participant_id}/participant.json   id, name, language
    {spool}/{conference_id}/{participant_id}/{start_us:017d}_{post_key}.wav
    {spool}/{conference_id}/{participant_id}/index.jsonl        one line per fragment

The WAV name carries the fragment's start (unix microseconds) and its post id, so the
index is a convenience: a torn last line after a crash loses nothing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from terra.params import LANGUAGES, clean_name, is_safe_id


@dataclass(frozen=True, slots=True)
class SpooledFragment:
    conference_id: str
    participant_id: str
    participant_name: str
    start_time: float
    duration_ms: int
    post_id: str | None
    language: str | None
    file: str


def post_key(post_id: str | None) -> str:
    """A file-name-safe key for a post id (hashed when it has other characters)."""
    if post_id is None:
        return "nopost-" + uuid.uuid4().hex
    if is_safe_id(post_id):
        return post_id
    return "h-" + hashlib.sha1(post_id.encode("utf-8")).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Folders this process has made durable by name (their parents fsync'd, up to their file
# system's root), each with its parent's ctime then (read before the fsync). A parent whose
# entries changed since has another ctime: one of its folders may have been removed and
# made again by another writer (who may die before its fsync), so the parent is fsync'd
# again. The inode number alone would not tell: ext4 gives a folder made again its old one.
# What it records is a fact about the file system, so one process-wide cache serves every
# Spool and JobStore of the process. Bounded: when full it starts again (costs only fsyncs).
_DURABLE_DIRS: dict[str, int] = {}
_DURABLE_DIRS_MAX = 100_000


def _parent_ctime(folder: Path) -> int:
    return os.stat(folder.parent).st_ctime_ns


def make_dirs(path: Path, fsync: bool = True) -> None:
    """``mkdir -p``; with ``fsync``, ``path`` is durable by name: a new folder's entry lives
    in its parent, so the parent of each folder it creates is fsync'd, and so is that of
    each folder above that this process has not made durable yet (or whose parent changed
    since): one found there may have been made by a writer killed before its parent's fsync,
    or be another writer's being made at the same time."""
    missing = []
    folder = path
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    if fsync:
        _make_durable(Path(os.path.abspath(folder)))
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise
        if fsync:
            made = Path(os.path.abspath(folder))
            ctime = _parent_ctime(made)
            fsync_dir(folder.parent)
            _DURABLE_DIRS[str(made)] = ctime


def _make_durable(path: Path) -> None:
    """fsync the parent of ``path`` and of each folder above it, up to the file system's
    root (or a folder this process may not read, which it did not make), until one this
    process has made durable already, in a parent unchanged since."""
    if len(_DURABLE_DIRS) >= _DURABLE_DIRS_MAX:
        _DURABLE_DIRS.clear()
    folder = path
    while folder != folder.parent:
        ctime = _parent_ctime(folder)
        if _DURABLE_DIRS.get(str(folder)) == ctime:
            break
        if os.path.ismount(folder):
            break  # its entry is on another file system
        try:
            fsync_dir(folder.parent)
        except PermissionError:
            _DURABLE_DIRS[str(folder)] = ctime  # not tried again while the parent stays
            break
        _DURABLE_DIRS[str(folder)] = ctime
        folder = folder.parent


TEMP_PREFIX = ".tmp-"  # the temp files of writes in progress (and of writers killed)
# A temp file last written this long ago is no write in progress (a write takes well under a
# second; an upload's temp file is written at each chunk): its writer was killed.
STALE_TEMP_S = 600.0


def remove_stale_temps(folder: Path, now: float, older_than_s: float = STALE_TEMP_S) -> int:
    """Remove the temp files in ``folder`` (not below) last written over ``older_than_s``
    before ``now``: left by a writer killed between its write and its rename. A younger one
    may be another front end's write in progress and is kept. Returns how many. Blocking."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < now - older_than_s:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def write_atomic(
    path: Path,
    data: bytes,
    fsync: bool = True,
    exclusive: bool = False,
    before_publish: Callable[[], None] | None = None,
) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, rename; the
    folders it creates are durable too. ``exclusive``: publish by a hard link instead of
    the rename, so that of two writers of one path only the first succeeds (the other gets
    FileExistsError, with nothing changed). ``before_publish`` runs once the data is on
    disk, just before the rename: what it raises leaves ``path`` as it was."""
    make_dirs(path.parent, fsync)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if before_publish is not None:
            before_publish()
        linked = exclusive and _link(tmp, path)
        if not linked:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if linked:
        os.unlink(tmp)
    if fsync:
        fsync_dir(path.parent)


# What link(2) answers on a file system that has no hard links (some network and FUSE mounts).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def _link(tmp: str, path: Path) -> bool:
    """Publish ``tmp`` as ``path`` by a hard link (FileExistsError when ``path`` is there);
    False when the file system has no hard links, where the caller renames instead (two
    writers of one path at the same instant may then both succeed, the last one's file
    staying: the exclusivity is lost, never the write)."""
    try:
        os.link(tmp, path)
    except OSError as e:
        if e.errno in _NO_HARD_LINKS:  # never EEXIST: that one is raised
            return False
        raise
    return True


class Spool:
    """Per-conference, per-participant fragment store."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync

    def participant_dir(self, conference_id: str, participant_id: str) -> Path:
        return self.root / conference_id / participant_id

    def remove_stale_temps(self, now: float) -> int:
        """Remove the temp files killed writers left in the participant folders (see
        :func:`remove_stale_temps`); at start-up. Returns how many. Blocking."""
        removed = 0
        for conference in _folders(self.root):
            for participant in _folders(conference):
                removed += remove_stale_temps(participant, now)
        return removed

    def known_post_keys(self, conference_id: str, participant_id: str) -> set[str]:
        folder = self.participant_dir(conference_id, participant_id)
        if not folder.is_dir():
            return set()
        # These posts will count as stored: their names are made durable first.
        self._make_names_durable(folder)
        # By the fragments' own name rule: a temp file a kill left (".tmp-ab_7.wav") is no post.
        names = (_FRAGMENT_NAME.fullmatch(p.name) for p in folder.iterdir())
        return {match["key"] for match in names if match is not None}

    def write(
        self,
        conference_id: str,
        participant_id: str,
        participant_name: str,
        start_time: float,
        duration_ms: int,
        post_id: str | None,
        language: str | None,
        wav: bytes,
    ) -> SpooledFragment | None:
        """Store one fragment durably; returns once it is on disk (fsync'd when enabled).

        None when this post (same start, same post id) is on disk already: stored by an
        earlier request, possibly on another front end sharing the spool.
        """
        folder = self.participant_dir(conference_id, participant_id)
        name = f"{int(round(start_time * 1_000_000)):017d}_{post_key(post_id)}.wav"
        if post_id is not None and (folder / name).exists():
            self._make_names_durable(folder)
            return None
        make_dirs(folder, self.fsync)
        self._write_participant(folder, participant_id, participant_name, language)
        try:
            # Exclusive: the same post reaching two front ends at once is stored by one.
            write_atomic(folder / name, wav, self.fsync, exclusive=post_id is not None)
        except FileExistsError:
            self._make_names_durable(folder)
            return None
        record = SpooledFragment(
            conference_id,
            participant_id,
            participant_name,
            start_time,
            duration_ms,
            post_id,
            language,
            name,
        )
        line = (json.dumps(asdict(record), ensure_ascii=False) + "\n").encode("utf-8")
        with open(folder / "index.jsonl", "a+b") as index:
            # A line torn by a crash or a full disk is ended first, so it takes only itself.
            first = index.seek(0, os.SEEK_END) == 0
            if not first:
                index.seek(-1, os.SEEK_END)
                if index.read(1) != b"\n":
                    line = b"\n" + line
            index.write(line)
            index.flush()
            if self.fsync:
                os.fsync(index.fileno())
        if first and self.fsync:  # the append made the index: its name is durable too
            fsync_dir(folder)
        return record

    def _make_names_durable(self, folder: Path) -> None:
        """Before posts found in ``folder`` count as stored: their writer may have died, or
        be, between its rename (or mkdir) and the fsync, so their names are made durable."""
        if self.fsync:
            make_dirs(folder)
            fsync_dir(folder)

    def _write_participant(
        self, folder: Path, participant_id: str, name: str, language: str | None
    ) -> None:
        path = folder / "participant.json"
        info = {"participant_id": participant_id, "participant_name": name, "language": language}
        if path.exists():
            try:
                if json.loads(path.read_text(encoding="utf-8")) == info:
                    return
            except (OSError, ValueError):
                pass
        write_atomic(path, json.dumps(info, ensure_ascii=False).encode("utf-8"), self.fsync)


def _folders(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


# -- reading a conference back (the minutes compiler) ------------------------------------

_FRAGMENT_NAME = re.compile(r"^(?P<start>\d{17})_(?P<key>[A-Za-z0-9_-]+)\.wav$")


@dataclass(frozen=True, slots=True)
class StoredFragment:
    start_us: int  # unix microseconds of its first sample
    path: Path
    size: int  # bytes on disk


@dataclass(frozen=True, slots=True)
class StoredParticipant:
    participant_id: str
    name: str
    language: str | None
    fragments: tuple[StoredFragment, ...]  # in time order


def read_conference(root: Path, conference_id: str) -> list[StoredParticipant]:
    """Every participant of a spooled conference with its fragments, from the file names.

    Temporary files of writes in progress are skipped; a participant without fragments is
    left out. The index is not needed: a WAV's name carries its start and post key.
    """
    folder = root / conference_id
    if not is_safe_id(conference_id) or not folder.is_dir():
        return []
    participants = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.is_dir() or not is_safe_id(entry.name):
            continue
        fragments = []
        with os.scandir(entry) as files:
            for file in files:
                match = _FRAGMENT_NAME.fullmatch(file.name)
                if match is None or not file.is_file():
                    continue
                fragments.append(
                    StoredFragment(int(match["start"]), Path(file.path), file.stat().st_size)
                )
        if not fragments:
            continue
        fragments.sort(key=lambda f: (f.start_us, f.path.name))
        name, language = entry.name, None
        try:
            info = json.loads((entry / "participant.json").read_text(encoding="utf-8"))
            name = clean_name(str(info.get("participant_name") or ""), entry.name)
            language = info.get("language")
            if language not in LANGUAGES:  # a spool from before lang1 was checked: detect
                language = None
        except (OSError, ValueError, AttributeError):
            pass
        participants.append(StoredParticipant(entry.name, name, language, tuple(fragments)))
    return participants


def conference_digest(participants: list[StoredParticipant]) -> str:
    """Changes whenever a fragment is added, removed or rewritten, or a name changes."""
    digest = hashlib.sha1()
    for participant in participants:
        digest.update(f"{participant.participant_id}\0{participant.name}\0".encode())
        for fragment in participant.fragments:
            digest.update(f"{fragment.path.name}\0{fragment.size}\0".encode())
    return digest.hexdigest()
