"""One proxy process per history file: a second one on a file a live proxy uses is refused
with what to do (two would overwrite each other's statistics); the lock goes with the process,
a kill -9 too. Engines of one process may share a file."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.configload import load_config
from proxy.library import ModelMemoryManager
from proxy.store import UsageStore
from proxy.storelock import StorageInUse

from .test_signals import MODEL, ROOT, ProxyProcess
from .test_store_damage import chat, config_for, requests_in


async def test_a_second_proxy_on_a_history_file_in_use_is_refused_and_says_what_to_do(
        emulator, tmp_path, http):
    path = tmp_path / "history.sqlite3"
    first = await ProxyProcess.start(config_for(tmp_path, emulator.url, path))
    try:
        await first.ready()
        second = await ProxyProcess.start(config_for(tmp_path, emulator.url, path))
        with pytest.raises(AssertionError, match="never logged"):
            await second.wait_for_line("proxy listening on ")   # it ends instead
        assert await second.proc.wait() == 1
        await second.stop()
        (said,) = [ln for ln in second.lines if ln.startswith("cannot start")]
        assert str(path) in said and "in use by another proxy process" in said
        assert f"pid {first.proc.pid} on " in said
        assert "own storage.path" in said
        assert not any("Traceback" in ln for ln in second.lines)
        await chat(http, first.url)                # the first goes on, and keeps its count
        first.proc.send_signal(signal.SIGTERM)
        assert await first.proc.wait() == 0
    finally:
        await first.stop()
    assert requests_in(path) == {MODEL: 1}


async def test_a_killed_proxys_lock_goes_with_it(emulator, tmp_path, http):
    path = tmp_path / "history.sqlite3"
    config = config_for(tmp_path, emulator.url, path)
    first = await ProxyProcess.start(config)
    await first.ready()
    first.proc.send_signal(signal.SIGKILL)
    await first.stop()
    assert (tmp_path / "history.sqlite3.lock").exists()   # left behind, and meaningless
    second = await ProxyProcess.start(config)
    try:
        await second.ready()
        await chat(http, second.url)
    finally:
        await second.stop()


def opens_in_another_process(path: Path) -> bool:
    code = ("import sys\nfrom proxy.store import StorageInUse, UsageStore\n"
            "try:\n    UsageStore(sys.argv[1]).open()\n"
            "except StorageInUse:\n    sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, timeout=30)
    assert done.returncode in (0, 3)
    return done.returncode == 0


def test_engines_of_one_process_share_a_file_and_the_last_one_out_releases_it(tmp_path):
    path = tmp_path / "history.sqlite3"
    first, second = UsageStore(path), UsageStore(path)
    assert first.open() and second.open()
    first.close()
    assert not opens_in_another_process(path)      # the second engine still holds it
    assert second.write({(MODEL, 1): [1, 0, 1, 1, 0.1]}, {}, {}, 1)
    second.close()
    assert opens_in_another_process(path)


async def test_a_library_manager_on_a_proxys_history_file_is_refused(emulator, tmp_path):
    path = tmp_path / "history.sqlite3"
    first = await ProxyProcess.start(config_for(tmp_path, emulator.url, path))
    try:
        await first.ready()
        manager = ModelMemoryManager(config=load_config({
            "upstream": {"url": emulator.url}, "storage": {"path": str(path)}}))
        with pytest.raises(StorageInUse, match="in use by another proxy process"):
            await manager.start()
        assert not manager.core.backend.started    # refused before a connection was made
        await manager.cleanup()
    finally:
        await first.stop()


def test_a_lock_whose_holder_line_cannot_be_written_is_held_all_the_same(tmp_path):
    """Writing "pid N on host" into the lock file fails (here: a file size limit of 0, as a
    full disk would): the lock is held all the same, and released, and the start goes on."""
    script = f"""
import resource, signal
from pathlib import Path
from proxy import storelock
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
db = Path({str(tmp_path / "history.sqlite3")!r})
key = storelock.claim(db)
assert key is not None and storelock.claim(db) == key      # held, and shared in-process
storelock.release(key); storelock.release(key)
assert storelock.claim(db) == key                          # released: claimed again
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


async def test_a_library_manager_on_its_default_file_held_elsewhere_keeps_memory_only(
        emulator, private_home):
    """Another worker of the same app holds the library's default history: this manager
    starts all the same and keeps its statistics in memory, and says so."""
    from proxy.storage import LIBRARY_FILE
    from proxy.store import default_path
    db = default_path().with_name(LIBRARY_FILE)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from proxy import storelock; storelock.claim(Path(sys.argv[1])); print('held', "
         "flush=True); sys.stdin.read()", str(db)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        async with ModelMemoryManager(min_free_memory_gb=1, upstream=emulator.url) as manager:
            persistence = manager.get_memory_stats()["persistence"]
            assert persistence["path"] == str(db) and not persistence["ok"]
            assert "in use by another proxy process" in persistence["error"]
            manager.record_model_usage("qwen/qwen3-4b", latency=0.5, tokens_used=10)
            assert manager.usage("qwen/qwen3-4b").requests == 1     # kept, in memory
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
