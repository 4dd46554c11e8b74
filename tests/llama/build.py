"""Builds llama.cpp's `llama-server` from the tree that the llama-cpp-python sdist on PyPI vendors.

Only registry packages are used: pip fetches the sdist, CMake builds the one target. The binary
is cached outside the repository, so only the first run pays the few minutes of compiling:

    python -m tests.llama.build          # prints the binary's path

`LLAMA_SERVER` names a ready binary instead (nothing is built); `LLAMA_SERVER_CACHE` moves the
cache directory (default `~/.cache/lmstudio-memory-proxy`, under `XDG_CACHE_HOME` if set).
"""
from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SDIST_VERSION = "0.3.36"  # vendors llama.cpp commit 0c1e570 (router mode in tools/server)
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

CMAKE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",  # one binary needing only libc, libstdc++ and libgomp
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",  # ON downloads the web UI at configure time
    "LLAMA_OPENSSL": "OFF",
    "GGML_NATIVE": "OFF",  # portable across CPUs of the machine kind, not tuned to this one
}


class BuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    if os.environ.get("LLAMA_SERVER_CACHE"):
        return Path(os.environ["LLAMA_SERVER_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lmstudio-memory-proxy"


def binary_path() -> Path:
    """Where the binary is (or would be) — no building."""
    if os.environ.get("LLAMA_SERVER"):
        return Path(os.environ["LLAMA_SERVER"]).expanduser()
    return cache_dir() / f"llama-server-{SDIST_VERSION}" / "llama-server"


def missing_tools() -> list[str]:
    return [t for t in ("cmake", "make", "c++", "cc") if shutil.which(t) is None]


def build(*, jobs: int | None = None, log=sys.stderr) -> Path:
    """Returns the path of a working llama-server, building and caching it first if needed."""
    target = binary_path()
    if target.exists() or os.environ.get("LLAMA_SERVER"):
        if not target.exists():
            raise BuildError(f"LLAMA_SERVER={target} does not exist")
        return target
    if missing := missing_tools():
        raise BuildError(f"cannot build llama-server: {', '.join(missing)} not found")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent runs (two sessions, two CI steps) build once: the second waits, then finds it.
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
            built = _build_in(Path(tmp), jobs or os.cpu_count() or 1, log)
            staged = target.with_name(target.name + ".new")
            shutil.copy2(built, staged)
            os.replace(staged, target)  # never a half-written binary at the cached path
    return target


def _run(cmd: list[str], log, **kwargs) -> None:
    print("+ " + " ".join(cmd), file=log, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **kwargs)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-40:])
        raise BuildError(f"{cmd[0]} {cmd[1]} failed ({done.returncode}):\n{tail}")


def _build_in(tmp: Path, jobs: int, log) -> Path:
    started_s = time.monotonic()
    spec = f"llama-cpp-python=={SDIST_VERSION} --hash=sha256:{SDIST_SHA256}\n"
    (tmp / "requirements.txt").write_text(spec)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
          "--require-hashes", "-r", str(tmp / "requirements.txt"), "-d", str(tmp)], log)
    (sdist,) = tmp.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as tar:
        # Only the vendored tree; the sdist also carries the submodule's .git directory.
        members = [m for m in tar.getmembers()
                   if m.name.partition("/")[2].startswith("vendor/llama.cpp/")]
        tar.extractall(tmp, members=members, filter="data")
    (source,) = tmp.glob("llama_cpp_python-*/vendor/llama.cpp")
    build_dir = tmp / "build"
    _run(["cmake", "-S", str(source), "-B", str(build_dir)]
         + [f"-D{k}={v}" for k, v in CMAKE_OPTIONS.items()], log)
    _run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)], log)
    binary = build_dir / "bin" / "llama-server"
    _run([str(binary), "--version"], log)  # a binary that does not start is not cached
    print(f"built llama-server in {time.monotonic() - started_s:.0f} s", file=log, flush=True)
    return binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.llama.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs")
    args = parser.parse_args(argv)
    try:
        print(build(jobs=args.jobs))
    except BuildError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
