"""`slurm_cluster`: one real one-node SLURM cluster per test session (tests/slurm/cluster.py).

Availability: when the SLURM/munge binaries are missing and we are root with apt-get, the
fixture installs them (`apt-get install --no-install-recommends slurmctld slurmd slurm-client
munge`, ~10 s). Still missing, or not root: the tests are skipped with the reason, unless
MEGATRON_LONGCTX_REQUIRE_SLURM=1 (set by .ci/run), which turns that into a failure. A cluster
that has its binaries but does not come up always fails, with the daemon logs.

After the session the daemon logs and slurm.conf are copied to pytest's temporary directory
(`slurm-logs*`) and the cluster's own directory is removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator

import pytest

from tests.slurm.cluster import (
    ClusterError,
    SlurmCluster,
    missing_binaries,
    start_cluster,
    try_apt_install,
)

REQUIRE_ENV = "MEGATRON_LONGCTX_REQUIRE_SLURM"


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but SLURM is unavailable: {reason}", pytrace=False)
    pytest.skip(f"SLURM unavailable: {reason}")


def _ensure_binaries() -> None:
    missing = missing_binaries()
    if not missing:
        return
    notes = [try_apt_install()]
    if missing_binaries() and os.geteuid() == 0 and shutil.which("apt-get"):
        # A fresh machine may have empty package lists.
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300)
        notes.append(try_apt_install())
    missing = missing_binaries()
    if missing:
        _unavailable(f"missing {', '.join(missing)} ({'; '.join(notes)})")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    _ensure_binaries()
    if os.geteuid() != 0:
        _unavailable("the test cluster needs root (munged runs as user munge, SlurmUser=root)")
    try:
        cluster = start_cluster()
    except ClusterError as err:
        pytest.fail(f"the one-node SLURM cluster did not start: {err}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
        keep = tmp_path_factory.mktemp("slurm-logs")
        for path in [cluster.conf, *sorted((cluster.root / "log").glob("*"))]:
            shutil.copy(path, keep / path.name)
        zombies = cluster.new_zombies()
        if zombies:
            warnings.warn(f"SLURM test cluster left zombie processes: {zombies}", stacklevel=1)
        shutil.rmtree(cluster.root, ignore_errors=True)
