"""Build and load the C++/CUDA extension (the sources in ``csrc/``), registering ``torch.ops.ptv2_fast.*``.

The extension is JIT-built with ninja on first use (``torch.utils.cpp_extension.load``) into a cache folder
keyed by a hash of the sources x torch version x CUDA version x GPU archs x compiler flags, under a file
lock so that concurrent processes build it once; later processes load the cached library in milliseconds.
``PTV2_FAST_BUILD_EXT=1 pip install .`` builds it ahead of time (setup.py), and that prebuilt copy is used
when present. A failed build never breaks an import: it gives one warning naming the log and the fallback.

Environment:
    PTV2_FAST_DISABLE_EXT=1      never build or load the extension (backend "auto" uses the reference on CPU)
    PTV2_FAST_EXT_CACHE=DIR      cache folder (default ``$XDG_CACHE_HOME/ptv2_fast/ext`` or ``~/.cache/...``)
    PTV2_FAST_EXT_CUDA=0         leave the CUDA sources out even where torch has CUDA and nvcc is found
    PTV2_FAST_CUDA_ARCHS="8.0;9.0"  GPU archs to compile for (default 8.0 and 9.0, plus the visible GPUs')
    PTV2_FAST_EXT_LOCK_TIMEOUT=S  seconds to wait for another process's build before giving up (default 1800)

Crash safety: the library is linked under a temporary name and renamed into place only when complete,
with its size and SHA-256 recorded beside it; a cached library that does not match its record (a kill
mid-copy, a full disk, a damaged file) is never loaded but rebuilt. Waits on the build lock time out with
a message naming the holder, and a lock left by a killed build never blocks a later one.

Command line: ``python -m ptv2_fast._ext [--cuda|--no-cuda] [--verbose]`` builds (or finds) the library and
prints its path and build info; CI uses it to compile and link the CUDA sources on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

EXT_NAME = "ptv2_fast_ext"
_ABI_TAG = 2  # bump when the build recipe changes in a way the sources do not show

_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None, "path": None}


class ExtensionBuildError(RuntimeError):
    """The extension could not be built or loaded; ``log`` names the file with the compiler output."""

    def __init__(self, msg: str, log: Path | None = None):
        super().__init__(msg)
        self.log = log


def disabled() -> bool:
    return os.environ.get("PTV2_FAST_DISABLE_EXT", "0").strip().lower() not in ("", "0", "false", "no", "off")


def source_dir() -> Path:
    """``csrc/``: inside the installed package (wheel), else beside it (editable install, source tree)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "registration.cpp").is_file():
            return cand
    raise ExtensionBuildError(f"the extension sources (csrc/) are not found beside {here}")


def sources(with_cuda: bool) -> list[Path]:
    root = source_dir()
    files = sorted(root.glob("*.cpp")) + sorted((root / "cpu").glob("*.cpp"))
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return files


def _all_source_files() -> list[Path]:
    root = source_dir()
    return sorted(p for p in root.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh"))


def cuda_home() -> str | None:
    """The CUDA toolkit root: the first of $CUDA_HOME, $CUDA_PATH, torch's guess, the folder above nvcc on
    PATH, /usr/local/cuda(-*) that has both bin/nvcc and include/cuda_runtime.h (nvcc on PATH may be a
    wrapper script in a folder without the headers)."""
    import glob

    from torch.utils import cpp_extension

    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
    cands += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return c
    return None


def cuda_wanted() -> bool:
    """CUDA sources are compiled when torch has CUDA, nvcc is found, and PTV2_FAST_EXT_CUDA is not 0."""
    if os.environ.get("PTV2_FAST_EXT_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and cuda_home() is not None


def cuda_archs() -> list[str]:
    env = os.environ.get("PTV2_FAST_CUDA_ARCHS")
    archs = [a.strip() for a in env.replace(",", ";").split(";") if a.strip()] if env else ["8.0", "9.0"]
    if not env and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            archs.append(f"{major}.{minor}")
    return sorted(set(archs), key=lambda a: tuple(int(x) for x in a.split(".")))


def _cpu_flags_line() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")


def cxx_flags() -> list[str]:
    """-march=native for a JIT build (it runs where it is built; the cache key includes this CPU's feature
    flags so a shared cache never hands the library to another CPU); portable flags ahead of time."""
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if os.environ.get("PTV2_FAST_PORTABLE_BUILD", "0") == "1":
        if platform.machine() in ("x86_64", "AMD64"):
            flags += ["-mavx2", "-mfma"]
    else:
        flags += ["-march=native"]
    return flags


def build_key(with_cuda: bool) -> str:
    h = hashlib.sha256()
    for p in _all_source_files():
        h.update(p.relative_to(source_dir()).as_posix().encode())
        h.update(p.read_bytes())
    parts = [str(_ABI_TAG), torch.__version__, str(torch.version.cuda), sys.version.split()[0], platform.machine(),
             " ".join(cxx_flags()), _cpu_flags_line(), ("cuda " + ";".join(cuda_archs())) if with_cuda else "cpu-only"]
    h.update("\n".join(parts).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("PTV2_FAST_EXT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ptv2_fast" / "ext"


def _prebuilt() -> Path | None:
    """A library built ahead of time by ``PTV2_FAST_BUILD_EXT=1 pip install .`` for this torch."""
    here = Path(__file__).resolve().parent
    for p in sorted(here.glob(f"{EXT_NAME}*.so")):
        tag = p.with_suffix(".torch")
        if tag.is_file() and tag.read_text().strip() == torch.__version__:
            return p
    return None


def lock_timeout() -> float:
    return float(os.environ.get("PTV2_FAST_EXT_LOCK_TIMEOUT", "1800"))


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float | None = None):
    """An exclusive ``flock`` on ``path``, waited for at most ``timeout`` seconds (ExtensionBuildError then).

    The kernel drops a flock when its holder dies, so a killed build never leaves this lock held; the
    holder's pid is written into the file so that a wait can say whom it waits for."""
    import time

    timeout = lock_timeout() if timeout is None else timeout
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: torch's own build baton still serialises ninja
            yield
            return
        deadline, told = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    fh.seek(0)
                    holder = fh.read().strip() or "another process"
                    print(f"ptv2_fast: waiting for the extension build of {holder} (lock {path}; gives up after "
                          f"{timeout:.0f} s, PTV2_FAST_EXT_LOCK_TIMEOUT)", file=sys.stderr, flush=True)
                    told = True
                if time.monotonic() >= deadline:
                    raise ExtensionBuildError(
                        f"timed out after {timeout:.0f} s waiting for the extension build lock {path}, held by "
                        f"{holder}; if no build is running, delete that file") from None
                time.sleep(0.2)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {platform.node()}")
            fh.flush()
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def verify(lib: Path) -> str | None:
    """None when ``lib`` matches the size and SHA-256 recorded when it was built, else why not."""
    rec = _record(lib)
    try:
        size, digest = rec.read_text().split()
    except (OSError, ValueError):
        return f"no valid build record {rec.name} beside it"
    try:
        have = lib.stat().st_size
    except OSError as e:
        return f"it cannot be read ({e})"
    if have != int(size):
        return f"it has {have} bytes, {size} were built (truncated or damaged)"
    if _sha256(lib) != digest:
        return "its SHA-256 differs from the one recorded at build time (damaged)"
    return None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _install(built: Path, lib: Path) -> None:
    """Copy the linked library to ``lib`` through a temporary name (fsync, then rename), then record it."""
    tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
    shutil.copyfile(built, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    digest, size = _sha256(tmp), tmp.stat().st_size
    _record(lib).unlink(missing_ok=True)  # no record points at a half-replaced library
    os.replace(tmp, lib)
    _atomic_write_text(_record(lib), f"{size} {digest}\n")


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build(with_cuda: bool | None = None, verbose: bool = False, build_dir: Path | None = None) -> Path:
    """Compile the extension if its cached library is missing; return the library's path (not loaded).

    Raises ExtensionBuildError (with the log's path) when the build fails."""
    from torch.utils import cpp_extension

    with_cuda = cuda_wanted() if with_cuda is None else with_cuda
    if with_cuda and cuda_home() is None:
        raise ExtensionBuildError("a CUDA build needs nvcc (set CUDA_HOME to the CUDA toolkit root)")
    key = build_key(with_cuda)
    out_dir = Path(build_dir) if build_dir is not None else cache_root() / key
    lib = out_dir / f"{EXT_NAME}_{key}.so"
    log = out_dir / "build.log"
    with _file_lock(out_dir / ".ptv2_fast.lock"):
        if lib.is_file():
            problem = verify(lib)
            if problem is None:
                return lib
            print(f"ptv2_fast: the cached extension {lib} is not usable ({problem}); rebuilding it",
                  file=sys.stderr, flush=True)
            lib.unlink(missing_ok=True)
        name = f"{EXT_NAME}_{key}"
        # ninja links into work/ and the finished library is renamed into place, so a kill mid-link never
        # leaves a partial file under the name that is loaded
        work = out_dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        # torch's own build baton (work/lock) is waited on forever by torch when a build was killed; we hold
        # the flock, so no other ptv2_fast build is running here and any baton left is stale
        (work / "lock").unlink(missing_ok=True)
        cuda_flags = ["-O3", "--use_fast_math", "-DPTV2_FAST_WITH_CUDA", "-lineinfo"]
        inc = [str(source_dir())]
        home = cuda_home() if with_cuda else None
        if home:
            # pip's CUDA wheels keep headers (e.g. cusparse.h, which torch's headers include) under nvidia/cu*/include
            for site in map(Path, sys.path):
                inc += [str(p) for p in sorted(site.glob("nvidia/cu*/include")) if p.is_dir()]
        try:
            with _env(CUDA_HOME=home, TORCH_CUDA_ARCH_LIST=";".join(cuda_archs()) if with_cuda else None,
                      MAX_JOBS=os.environ.get("MAX_JOBS", str(max(1, os.cpu_count() or 1)))):
                if home:
                    cpp_extension.CUDA_HOME = home
                cpp_extension.load(
                    name=name, sources=[str(s) for s in sources(with_cuda)], build_directory=str(work),
                    extra_cflags=cxx_flags() + (["-DPTV2_FAST_WITH_CUDA"] if with_cuda else []),
                    extra_cuda_cflags=cuda_flags, extra_ldflags=["-fopenmp"], extra_include_paths=inc,
                    with_cuda=with_cuda, is_python_module=False, is_standalone=False, verbose=verbose)
        except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError with the output
            out_dir.mkdir(parents=True, exist_ok=True)
            log.write_text(f"{type(e).__name__}: {e}\n")
            raise ExtensionBuildError(f"building the ptv2_fast extension failed ({type(e).__name__}); "
                                      f"compiler output in {log}", log) from e
        built = work / f"{name}.so"
        if not built.is_file():
            raise ExtensionBuildError(f"the build finished but {built} is missing", log)
        _install(built, lib)
        log.write_text(f"built {lib.name} from {len(sources(with_cuda))} sources, cuda={with_cuda}\n")
        return lib


def _registered() -> bool:
    try:
        torch.ops.ptv2_fast.build_info  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _load_library(path: Path) -> None:
    # A build in this process has already loaded its linked copy (cpp_extension.load does); loading the
    # installed copy too would register the ops twice.
    if not _registered():
        torch.ops.load_library(str(path))


def load(quiet: bool = False) -> bool:
    """Build (first use) and load the extension; True when ``torch.ops.ptv2_fast.prefix_attention_fwd`` exists.

    Never raises: a failure gives one warning (naming the log and the fallback) and returns False."""
    if _state["loaded"] is not None:  # lock-free once decided (and traceable by torch.compile)
        return _state["loaded"]
    if torch.compiler.is_compiling():  # never build while tracing; eager use decides first
        return False
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        if disabled():
            _state.update(loaded=False, error="disabled by PTV2_FAST_DISABLE_EXT")
            return False
        try:
            path = _prebuilt()
            if path is None:
                key_dir = cache_root() / build_key(cuda_wanted())
                if not quiet and not any(key_dir.glob(f"{EXT_NAME}_*.so")):
                    print("ptv2_fast: building the C++ extension for this torch (first use only, about a minute)...",
                          file=sys.stderr, flush=True)
                path = build()
            _load_library(path)
            from .ops import extension  # noqa: F401  (fake implementations of the C++ ops)
            _state.update(loaded=True, path=path)
        except Exception as e:
            log = getattr(e, "log", None)
            _state.update(loaded=False, error=str(e))
            warnings.warn(f"ptv2_fast: the C++ extension is unavailable ({e}). "
                          f"{'See ' + str(log) + '. ' if log else ''}Falling back: backend='auto' uses the "
                          "concatenating reference on CPU tensors and Triton on CUDA tensors. Set "
                          "PTV2_FAST_DISABLE_EXT=1 to skip the build.", RuntimeWarning, stacklevel=3)
        return _state["loaded"]


def available() -> bool:
    """Whether the extension is loaded (building it on first call)."""
    return load()


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was built with its CUDA kernels (asked once, then remembered)."""
    if "cuda" not in _state:
        _state["cuda"] = load() and "cuda" in torch.ops.ptv2_fast.build_info()
    return _state["cuda"]


def status() -> dict:
    return {"loaded": _state["loaded"], "path": str(_state["path"]) if _state["path"] else None,
            "error": _state["error"]}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ptv2_fast._ext", description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--cuda", dest="cuda", action="store_true", default=None, help="require the CUDA sources")
    g.add_argument("--no-cuda", dest="cuda", action="store_false", help="CPU sources only")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--no-load", action="store_true", help="build and link only (do not load the library)")
    args = ap.parse_args(argv)
    try:
        path = build(with_cuda=args.cuda, verbose=args.verbose)
    except ExtensionBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        if e.log and e.log.is_file():
            print(e.log.read_text()[-20000:], file=sys.stderr)
        return 1
    print(f"library: {path}")
    if not args.no_load:
        _load_library(path)
        print(f"build info: {torch.ops.ptv2_fast.build_info()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
