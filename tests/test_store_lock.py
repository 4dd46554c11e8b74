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
        await manager.cleanup()
    finally:
        await first.stop()
