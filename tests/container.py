"""Builds the project's Dockerfile with Podman, offline from Docker Hub.

`python:3.11-slim` cannot be pulled where only Debian's and PyPI's mirrors are reachable, so the
Dockerfile's `BASE` argument gets a stand-in made the same way that image's own base is: a
Debian bookworm root file system from `debootstrap` (Python 3.11 and pip as `python` and `pip`),
imported once and kept. Every step of the Dockerfile then runs as written, `pip install` from
PyPI included.
"""
from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path

BASE_IMAGE = "localhost/lmstudio-proxy-test-base:bookworm"
IMAGE = "localhost/lmstudio-proxy:test"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = "python3,python3-pip,python-is-python3,ca-certificates"


def missing_tools() -> list[str]:
    return [t for t in ("podman", "debootstrap") if shutil.which(t) is None]


class Podman:
    def __init__(self) -> None:
        # crun refuses hosts with hybrid cgroups (v1 controllers plus a v2 mount); runc runs there.
        self.prefix = ["podman"] + (["--runtime", "runc"] if shutil.which("runc") else [])

    def __call__(self, *args: str, check: bool = True, timeout_s: float = 60
                 ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.prefix, *args], capture_output=True, text=True,
                              timeout=timeout_s)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        return done

    def ensure_base(self) -> None:
        if self("image", "exists", BASE_IMAGE, check=False).returncode == 0:
            return
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}",
                            "bookworm", str(rootfs), DEBIAN_MIRROR],
                           check=True, capture_output=True, timeout=600)
            # python:3.11-slim's pip installs system-wide; Debian's refuses that (PEP 668).
            for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
                marker.unlink()
            shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run([*self.prefix, "import", "--change", "ENV LANG=C.UTF-8",
                                       "--change", 'CMD ["python3"]', "-", BASE_IMAGE],
                                      stdin=tar.stdout, capture_output=True, timeout=300)
            tar.stdout.close()
            tar.wait()
            assert imported.returncode == 0, imported.stderr

    def build(self, context: Path, workdir: Path) -> None:
        """The Dockerfile as written, on the stand-in base. The build sees this host's CA bundle
        (an HTTPS-intercepting egress proxy's CA, where there is one) for pip, and nothing else
        of it: the image itself is not changed by either mount."""
        mounts: list[str] = []
        cafile = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
        if os.path.isfile(cafile):
            pip_conf = workdir / "pip.conf"
            pip_conf.write_text("[global]\ncert = /etc/ssl/certs/host-ca.crt\n")
            mounts = ["-v", f"{cafile}:/etc/ssl/certs/host-ca.crt:ro",
                      "-v", f"{pip_conf}:/etc/pip.conf:ro"]
        previous = self("image", "inspect", IMAGE, "--format", "{{.Id}}", check=False)
        # docker format: OCI images drop HEALTHCHECK.
        self("build", "--format", "docker", "--network", "host", "--build-arg",
             f"BASE={BASE_IMAGE}", *mounts, "-t", IMAGE, str(context), timeout_s=600)
        old_id = previous.stdout.strip()
        if previous.returncode == 0 and old_id != self("image", "inspect", IMAGE, "--format",
                                                       "{{.Id}}").stdout.strip():
            self("rmi", old_id, check=False)     # the last run's image, now untagged

    def run(self, name: str, *args: str) -> None:
        # Explicit, modest limits: Podman's defaults for root raise them, which needs
        # CAP_SYS_RESOURCE (absent inside some sandboxes).
        self("run", "-d", "--name", name, "--ulimit", "nofile=4096:4096",
             "--ulimit", "nproc=4096:4096", *args)

    def host_port(self, name: str, port: int) -> int:
        out = self("port", name, str(port)).stdout.split()[0]    # 127.0.0.1:NNNNN
        return int(out.rsplit(":", 1)[1])
