"""A training run's folder, written as a unit: a kill at any instant leaves the last committed state whole.

Layout of ``--out``::

    ptv2_train.json     the manifest and the run's record (settings, tasks, history, best): the commit point
    best-000003/        the best epoch: prefix.safetensors, head.safetensors, peft/<task>/ (PEFT adapters)
    last-000004/        the last epoch: prefix.safetensors, head.safetensors, resume.pt (for --resume)
    best -> best-000003 a link for people and PEFT (``PeftModel.from_pretrained(base, "out/best/peft/<task>")``)

Each epoch's checkpoints are written into hidden staging folders, every file fsynced, the folders renamed into
place, and then the manifest (which names the folders and every file's size and SHA-256) is replaced
atomically (temporary name, fsync, rename). So the manifest always names a best and a last checkpoint of the
same committed epoch; a kill before the rename leaves the previous epoch's, a kill after it the new one's.
Folders the manifest no longer names are removed after the commit. ``--resume`` and ``predict`` verify
every file against the manifest before loading it, and nothing is ever unpickled as code (``resume.pt`` is
read with ``weights_only=True``).

One process writes a folder at a time (an ``flock`` held while the run lasts); a folder that holds another
run is refused unless ``--resume`` (continue it) or ``--overwrite`` (replace it: the old run's checkpoints
stay until the new run commits its first epoch).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

MANIFEST = "ptv2_train.json"
FORMAT = "ptv2_fast.run/1"
SLOTS = ("best", "last")
_GENERATION = re.compile(r"^(best|last)-\d{6}$")
_STAGING = ".staging-"
# the flat layout of earlier versions (no manifest format): replaced by --overwrite, never resumed
LEGACY_FILES = ("prefix.safetensors", "head.safetensors", "resume.pt", "last_prefix.safetensors",
                "last_head.safetensors", "peft")


class RunFolderError(ValueError):
    """The folder cannot be used as asked (it holds another run, is damaged, or is in use)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder: its rename is then as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _seal(folder: Path) -> dict:
    """fsync every file under ``folder`` (and the folders) and return {relative path: {bytes, sha256}}."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in sorted(names):
            p = Path(dirpath) / name
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
            files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        _fsync_dir(Path(dirpath))
    return files


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as JSON under a temporary name, fsync, rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class RunFolder:
    """The checkpoints of one run under ``root`` (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock_fd = None
        self._replace_legacy = False

    # -- reading ---------------------------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        """The manifest, or None when the folder holds no run. A manifest of the flat layout of earlier
        versions comes back with ``"legacy": True``. Raises RunFolderError for an unreadable one."""
        path = self.root / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunFolderError(f"{path} is damaged ({type(e).__name__}: {e}); the run's record cannot be read. "
                                 "Start again with --overwrite, or into another --out") from None
        if not isinstance(data, dict):
            raise RunFolderError(f"{path} is not a ptv2_fast run record")
        if data.get("format") is None:
            return {**data, "legacy": True}
        if data.get("format") != FORMAT:
            raise RunFolderError(f"{path} has format {data.get('format')!r}; this version reads {FORMAT!r}")
        return data

    def checkpoint(self, slot: str, manifest: dict | None = None) -> Path:
        """The folder of the committed ``slot`` ("best" or "last"), after checking every file it lists
        against its recorded size and SHA-256. Raises RunFolderError naming the first file that differs."""
        manifest = self.read_manifest() if manifest is None else manifest
        if manifest is None:
            raise RunFolderError(f"{self.root} holds no ptv2_fast run ({MANIFEST} is missing)")
        entry = manifest.get("checkpoints", {}).get(slot)
        if entry is None:
            raise RunFolderError(f"{self.root} has no {slot!r} checkpoint")
        folder = self.root / entry["dir"]
        for rel, want in entry["files"].items():
            p = folder / rel
            if not p.is_file():
                raise RunFolderError(f"checkpoint {folder} is damaged: {rel} is missing")
            if p.stat().st_size != want["bytes"] or _sha256(p) != want["sha256"]:
                raise RunFolderError(f"checkpoint {folder} is damaged: {rel} does not match the manifest "
                                     f"(size or SHA-256 differ); it was changed after the run wrote it")
        return folder

    # -- claiming --------------------------------------------------------------------------------------
    def check_claim(self, *, resume: bool, overwrite: bool) -> dict | None:
        """Refuse a folder that holds another run unless resuming or overwriting; return its manifest (None
        when it holds none, or when it will be overwritten). Read-only: safe in every process of a job."""
        try:
            manifest = self.read_manifest()
        except RunFolderError:
            if overwrite:
                return None
            raise
        if manifest is None:
            return None
        what = _describe(manifest)
        if resume and not overwrite:
            if manifest.get("legacy"):
                raise RunFolderError(f"--out {self.root} holds a run written by an earlier ptv2_fast ({what}) "
                                     "without a manifest: it cannot be resumed safely. Use --overwrite to start "
                                     "again there, or another --out")
            return manifest
        if overwrite:
            self._replace_legacy = bool(manifest.get("legacy"))
            return None
        raise RunFolderError(f"--out {self.root} holds another run ({what}); pass --resume to continue it, "
                             "--overwrite to replace it, or choose another --out")

    def lock(self) -> None:
        """Hold an exclusive lock on the folder for this process's lifetime of the run (released by
        ``unlock`` or when the process dies). Raises RunFolderError when another process holds it."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".ptv2_fast.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"--out {self.root} is in use by a running training ({holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writing ---------------------------------------------------------------------------------------
    def stage(self, slot: str) -> Path:
        """An empty hidden folder to write ``slot``'s files into before ``commit``."""
        if slot not in SLOTS:
            raise ValueError(f"slot must be one of {SLOTS}, got {slot!r}")
        path = self.root / f"{_STAGING}{slot}-{os.getpid()}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def commit(self, staged: dict[str, Path], record: dict) -> dict:
        """Make ``staged`` ({slot: staging folder}) and ``record`` the committed state in one step; slots
        not in ``staged`` keep their committed folder. Returns the new manifest."""
        try:
            old = self.read_manifest()
        except RunFolderError:
            old = None
        keep = {} if old is None or old.get("legacy") else dict(old.get("checkpoints", {}))
        serial = (0 if old is None or old.get("legacy") else int(old.get("serial", 0))) + 1
        for slot, folder in staged.items():
            files = _seal(folder)
            name = f"{slot}-{serial:06d}"
            target = self.root / name
            if target.exists():  # left by a run killed after its rename but before its manifest
                shutil.rmtree(target)
            os.rename(folder, target)
            keep[slot] = {"dir": name, "files": files}
        _fsync_dir(self.root)
        manifest = {**{k: v for k, v in record.items() if k not in ("format", "serial", "checkpoints")},
                    "format": FORMAT, "serial": serial, "checkpoints": keep}
        write_json_atomic(self.root / MANIFEST, manifest)  # the commit point
        self._link_best(manifest)
        self._clean(manifest)
        return manifest

    def update_record(self, record: dict) -> dict:
        """Replace the record (history, timings) and keep the committed checkpoints."""
        old = self.read_manifest() or {}
        manifest = {**{k: v for k, v in record.items() if k not in ("format", "serial", "checkpoints")},
                    "format": FORMAT, "serial": old.get("serial", 0), "checkpoints": old.get("checkpoints", {})}
        write_json_atomic(self.root / MANIFEST, manifest)
        return manifest

    def _link_best(self, manifest: dict) -> None:
        best = manifest["checkpoints"].get("best")
        link = self.root / "best"
        if best is None or (link.exists() and not link.is_symlink()):
            return  # a user's own folder named "best" is never touched
        tmp = self.root / f".best.{os.getpid()}.link"
        try:
            if tmp.is_symlink():
                tmp.unlink()
            os.symlink(best["dir"], tmp)
            os.replace(tmp, link)
        except OSError:  # no symlinks on this filesystem: the manifest names the folder
            pass

    def _clean(self, manifest: dict) -> None:
        named = {e["dir"] for e in manifest["checkpoints"].values()}
        for p in self.root.iterdir():
            stale = (_GENERATION.match(p.name) and p.name not in named) or p.name.startswith(_STAGING)
            if stale and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
        if self._replace_legacy:
            for name in LEGACY_FILES:
                p = self.root / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.exists():
                    p.unlink()
            self._replace_legacy = False


def _describe(manifest: dict) -> str:
    tasks = [t.get("name") for t in manifest.get("tasks", []) if isinstance(t, dict)]
    best = manifest.get("best") or {}
    parts = [f"tasks {tasks}"] if tasks else []
    if isinstance(best, dict) and best.get("epoch"):
        parts.append(f"best epoch {best['epoch']}")
    return ", ".join(parts) or "a ptv2_fast run"
