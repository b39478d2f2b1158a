"""The spool on real files: what is durable when a write returns, and what a crash can leave
behind for the next write or the minutes to read."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from terra import keys
from terra import spool as spool_module
from terra.audio import encode_wav
from terra.files.upload import in_memory, save_stream
from terra.jobs.store import JobStore
from terra.spool import Spool, read_conference, write_atomic

from .conftest import ServerFactory, post_fragment

WAV = encode_wav(np.zeros(1600, dtype=np.float32))


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths os.fsync was called on, in order (the real fsync still runs)."""
    paths: list[Path] = []
    real = os.fsync

    def record(fd: int) -> None:
        paths.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return paths


def test_a_first_fragment_makes_every_new_folder_durable(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    """A new conference and participant are new folders: the entry of each lives in its
    parent, so the parent is fsync'd too, or a power cut after the 200 can lose the folder
    and every fragment in it."""
    root = tmp_path / "spool"
    root.mkdir()
    stored = Spool(root).write("conf", "anna", "Anna", 1_700_000_000.0, 100, "p1", "en", WAV)
    assert stored is not None
    conference = root / "conf"
    participant = conference / "anna"
    assert (participant / stored.file).is_file()
    # Each folder that holds an entry this write created: the root (conf/), the
    # conference (anna/), the participant (the WAV, participant.json).
    for folder in (root, conference, participant):
        assert folder in fsynced, f"{folder} was not fsync'd"


def test_write_atomic_makes_the_folders_it_creates_durable(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    path = tmp_path / "jobs" / "minutes" / "c.json"
    write_atomic(path, b"{}")
    for folder in (tmp_path, tmp_path / "jobs", tmp_path / "jobs" / "minutes"):
        assert folder in fsynced, f"{folder} was not fsync'd"


async def test_an_upload_makes_the_folders_it_creates_durable(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    """An uploaded file (SaluteSpeech, connecte) is acknowledged with its id: the first
    upload of a kind creates its folders, which must outlive a power cut as well."""
    path = tmp_path / "salute" / "uploads" / "f"
    assert await save_stream(in_memory(b"abc"), path, limit=10) == 3
    for folder in (tmp_path, tmp_path / "salute", tmp_path / "salute" / "uploads"):
        assert folder in fsynced, f"{folder} was not fsync'd"


async def test_a_post_sent_again_with_offline_on_is_spooled(
    make_fast_server: ServerFactory, tmp_path: Path
) -> None:
    """A post first sent live only (offline=false), then again with offline=true: the
    second 200 says it is stored, so it must be on disk, though its post_id was seen.
    FakeEngine: the text is beside the point."""
    client = await make_fast_server()
    status, _ = await post_fragment(client, post_id="p-7", offline=False)
    assert status == 200
    status, _ = await post_fragment(client, post_id="p-7", offline=True)
    assert status == 200
    folder = tmp_path / "spool" / "conf-1" / "p-1"
    assert [p.name.split("_", 1)[1] for p in folder.glob("*.wav")] == ["p-7.wav"]
    # and a third time is a duplicate: still one file
    status, _ = await post_fragment(client, post_id="p-7", offline=True)
    assert status == 200
    assert len(list(folder.glob("*.wav"))) == 1


def test_a_torn_index_line_does_not_take_the_next_record_with_it(tmp_path: Path) -> None:
    """A crash or a full disk in the middle of an index append leaves a line without its
    end: the next fragment's record starts on a line of its own, readable."""
    spool = Spool(tmp_path)
    spool.write("conf", "anna", "Anna", 1_700_000_000.0, 100, "p1", "en", WAV)
    index = tmp_path / "conf" / "anna" / "index.jsonl"
    with open(index, "ab") as f:
        f.write(b'{"conference_id": "conf", "partic')  # the torn append
    spool.write("conf", "anna", "Anna", 1_700_000_002.0, 100, "p2", "en", WAV)
    lines = index.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["post_id"] == "p1"
    assert json.loads(lines[-1])["post_id"] == "p2"
    assert len(lines) == 3


def test_a_post_found_on_disk_is_durable_before_it_counts_as_stored(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    """A writer killed after its rename but before the folder's fsync leaves a WAV whose
    name is not durable yet (the spool is also shared by front ends, one may be between the
    two). Whoever answers a retry of that post as "stored" (a duplicate) makes the name
    durable first: when the write finds the file, and when a new session loads the post
    keys it will answer duplicates from."""
    Spool(tmp_path, fsync=False).write("conf", "anna", "Anna", 1e9, 100, "p1", "en", WAV)
    assert fsynced == []
    folder = tmp_path / "conf" / "anna"
    spool = Spool(tmp_path)
    assert spool.write("conf", "anna", "Anna", 1e9, 100, "p1", "en", WAV) is None
    assert folder in fsynced
    fsynced.clear()
    assert spool.known_post_keys("conf", "anna") == {"p1"}
    assert folder in fsynced


async def test_a_temp_file_left_by_a_kill_is_no_post(
    make_fast_server: ServerFactory, tmp_path: Path
) -> None:
    """kill -9 during a write leaves its temp file (``.tmp-`` + random letters, digits and
    ``_`` + ``.wav``). Its name is no post: a post whose key matches the part after its
    ``_`` is stored like any other, not answered as a duplicate. FakeEngine: the text is
    beside the point."""
    folder = tmp_path / "spool" / "conf-1" / "p-1"
    folder.mkdir(parents=True)
    (folder / ".tmp-x4k_7.wav").write_bytes(WAV[:100])  # torn, as the kill left it
    assert Spool(tmp_path / "spool").known_post_keys("conf-1", "p-1") == set()
    client = await make_fast_server()
    status, _ = await post_fragment(client, post_id="7")
    assert status == 200
    assert [p.name.split("_", 1)[1] for p in folder.glob("[0-9]*.wav")] == ["7.wav"]


def test_a_spooled_language_the_model_does_not_know_is_read_as_none(tmp_path: Path) -> None:
    """A spool outlives releases: one written before lang1 was checked can say "zz" (or
    "auto"). The minutes would ask the recognizer for that language, which fails the
    request and so the compile, for good; read as unknown, it is detected instead."""
    spool = Spool(tmp_path)
    spool.write("conf", "anna", "Anna", 1e9, 100, "p1", "zz", WAV)
    spool.write("conf", "boris", "Boris", 1e9, 100, "p1", "ru", WAV)
    spool.write("conf", "clara", "", 1e9, 100, "p1", None, WAV)
    (tmp_path / "conf" / "clara" / "participant.json").write_text('{"language": 5}')
    languages = {p.participant_id: p.language for p in read_conference(tmp_path, "conf")}
    assert languages == {"anna": None, "boris": "ru", "clara": None}


async def test_an_empty_post_id_is_no_post_id(
    make_fast_server: ServerFactory, tmp_path: Path
) -> None:
    """``post_id=`` (empty, as a client without ids may send it) is no id: each fragment is
    its own. It was one id shared by all of them, so every fragment after the first was
    answered 200 as a duplicate and neither stored nor recognized. FakeEngine: the text is
    beside the point."""
    client = await make_fast_server()
    for second in (0, 1, 2):
        status, _ = await post_fragment(
            client, start_time=1_719_512_467.0 + second, extra={"post_id": ""}
        )
        assert status == 200
    folder = tmp_path / "spool" / "conf-1" / "p-1"
    assert len(list(folder.glob("[0-9]*.wav"))) == 3


def test_a_claimed_lease_is_durable(tmp_path: Path, fsynced: list[Path]) -> None:
    """A lease decides who runs a job on shared storage: its file's content was fsync'd,
    its name (and its new folders) not, so storage that lost power could lose a lease its
    holder still uses, and another front end claim the same generation."""
    store = JobStore(tmp_path)
    lease = store.claim("minutes", "conf", "A", 1000.0, 30.0)
    assert lease is not None
    folder = tmp_path / "minutes" / ".leases" / "conf"
    for path in (tmp_path, tmp_path / "minutes", tmp_path / "minutes" / ".leases", folder):
        assert path in fsynced, f"{path} was not fsync'd"


async def test_temp_files_a_kill_left_are_removed_at_the_next_start(
    make_fast_server: ServerFactory, tmp_path: Path
) -> None:
    """kill -9 between a write and its rename leaves the temp file for good: a disk leak per
    crash in the spool, the job folders (job files and leases) and the minutes results. The
    next start removes those older than a few minutes; a younger one may be a write in
    progress on another front end sharing the folder, and is kept, as is every real file.
    FakeEngine: nothing is recognized."""
    old = time.time() - 3600
    participant = tmp_path / "spool" / "conf-1" / "p-1"
    minutes_jobs = tmp_path / "jobs" / "minutes"
    salute_jobs = tmp_path / "file-jobs" / "salute"
    lease = minutes_jobs / ".leases" / "conf-1"
    results = tmp_path / "minutes"
    stale = [
        participant / ".tmp-x4k_7.wav",
        participant / ".tmp-q2.json",
        minutes_jobs / ".tmp-a1.json",
        lease / ".tmp-b2",
        salute_jobs / ".tmp-c3.json",
        results / ".tmp-d4.xml",
    ]
    kept = [
        participant / "01719512467000000_7.wav",
        participant / "participant.json",
        minutes_jobs / ".tmp-being-written.json",  # fresh: another front end's write
        results / "conf-1.json",
    ]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{}")
    for path in stale + kept[:2] + kept[3:]:
        os.utime(path, (old, old))
    client = await make_fast_server(
        files={"dir": str(tmp_path / "files"), "jobs_dir": str(tmp_path / "file-jobs")}
    )
    assert await client.app[keys.SPOOL_TEMPS] == 2  # the spool's, in the background
    assert [p for p in stale if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []


def test_the_first_index_append_is_durable_by_name(tmp_path: Path, fsynced: list[Path]) -> None:
    """The first fragment's append creates index.jsonl, after the folder was fsync'd for the
    WAV: the folder is fsync'd again once the index is there, or a power cut can lose the
    index's name (and with it every record appended to it)."""
    Spool(tmp_path).write("conf", "anna", "Anna", 1e9, 100, "p1", "en", WAV)
    folder = tmp_path / "conf" / "anna"
    appended = fsynced.index(folder / "index.jsonl")
    assert folder in fsynced[appended:], "the folder was not fsync'd after the index was made"


def test_folders_a_killed_writer_made_are_made_durable_by_the_next(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    """A writer killed between its mkdir and its parent's fsync leaves a folder whose entry
    is not durable; the next writer finds the folder there. A fragment in it, new or found
    on disk, counts as stored only once the folders holding it are durable by name too."""
    Spool(tmp_path, fsync=False).write("conf", "anna", "Anna", 1e9, 100, "p1", "en", WAV)
    Spool(tmp_path, fsync=False).write("conf", "boris", "Boris", 1e9, 100, "p1", "en", WAV)
    Spool(tmp_path, fsync=False).write("conf", "clara", "Clara", 1e9, 100, "p1", "en", WAV)
    assert fsynced == []
    conference = tmp_path / "conf"
    spool = Spool(tmp_path)
    assert spool.write("conf", "anna", "Anna", 1e9 + 2, 100, "p2", "en", WAV) is not None
    for folder in (tmp_path, conference):  # hold conf/ and anna/
        assert folder in fsynced, f"{folder} was not fsync'd"
    fsynced.clear()
    assert spool.write("conf", "boris", "Boris", 1e9, 100, "p1", "en", WAV) is None  # duplicate
    assert conference in fsynced, "boris/ is not durable by name"
    fsynced.clear()
    assert spool.known_post_keys("conf", "clara") == {"p1"}
    assert conference in fsynced, "clara/ is not durable by name"


def test_a_folder_removed_and_made_again_is_made_durable_again(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    """A conference's folder made durable here, then removed (an operator's clean-up; the
    same room meets again) and made again by another front end killed before its parent's
    fsync: the next write here must not take the new folder for the one it made durable."""
    spool = Spool(tmp_path)
    assert spool.write("conf", "anna", "Anna", 1e9, 100, "p1", "en", WAV) is not None
    conference = tmp_path / "conf"
    made = conference.stat().st_ctime_ns
    shutil.rmtree(conference)
    clock = tmp_path / "clock"
    clock.touch()
    while clock.stat().st_ctime_ns <= made:  # the file system's clock moves on (within a tick)
        clock.touch()
    Spool(tmp_path, fsync=False).write("conf", "anna", "Anna", 1e9 + 1, 100, "p2", "en", WAV)
    fsynced.clear()
    assert spool.write("conf", "anna", "Anna", 1e9 + 2, 100, "p3", "en", WAV) is not None
    for folder in (tmp_path, conference):  # hold conf/ and anna/
        assert folder in fsynced, f"{folder} was not fsync'd"


def test_the_same_post_written_by_two_front_ends_at_once_is_stored_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two front ends sharing the spool (two Spool objects on one folder) get the same post
    at the same moment: both find no file, then both write. One must count it as stored now,
    the other as a duplicate (one index line, one live feed). A barrier in front of the
    write makes both pass the check first, every time."""
    barrier = threading.Barrier(2, timeout=10)
    real = spool_module.write_atomic

    def after_both_checked(path: Path, data: bytes, fsync: bool = True, **kwargs: Any) -> None:
        if path.suffix == ".wav":
            barrier.wait()
        real(path, data, fsync, **kwargs)

    monkeypatch.setattr(spool_module, "write_atomic", after_both_checked)
    wav = encode_wav(np.zeros(1600, dtype=np.float32))
    front_ends = [Spool(tmp_path), Spool(tmp_path)]
    with ThreadPoolExecutor(2) as pool:
        written = list(
            pool.map(
                lambda spool: spool.write("c", "p", "P", 1.0, 100, "post-1", "en", wav), front_ends
            )
        )
    assert sum(record is not None for record in written) == 1, written
    folder = tmp_path / "c" / "p"
    assert [p.name for p in folder.glob("*.wav")] == ["00000000001000000_post-1.wav"]
    assert len((folder / "index.jsonl").read_text().splitlines()) == 1
    assert not list(folder.glob(".tmp-*"))  # the loser's temp file is gone


def test_a_file_system_without_hard_links_still_stores_each_post(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Posts are published by a hard link (so two front ends never both store one); some
    network and FUSE mounts have none and answer link(2) with EPERM or EOPNOTSUPP. A fake
    os.link that answers so (this machine's file systems all have hard links) stands in for
    such a mount: the post is stored by a rename instead, once, with no temp file left, and
    sent again it is a duplicate."""

    def no_hard_links(source: str, target: object) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported", source)

    monkeypatch.setattr(os, "link", no_hard_links)
    wav = encode_wav(np.zeros(1600, dtype=np.float32))
    spool = Spool(tmp_path)
    assert spool.write("c", "p", "P", 1.0, 100, "post-1", "en", wav) is not None
    assert spool.write("c", "p", "P", 1.0, 100, "post-1", "en", wav) is None  # a duplicate
    folder = tmp_path / "c" / "p"
    assert [p.name for p in folder.glob("*.wav")] == ["00000000001000000_post-1.wav"]
    assert len((folder / "index.jsonl").read_text().splitlines()) == 1
    assert not list(folder.glob(".tmp-*"))
