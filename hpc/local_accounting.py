"""Accounting for the local cluster (`rlhpc cluster up --accounting`): a MariaDB server and slurmdbd, both
private to the cluster's state folder, so `sacct` works as on sites that keep accounting.

MariaDB listens on loopback only and on its own socket; slurmdbd reaches it over TCP with a password made at
first start, and slurmctld reaches slurmdbd on the bridge address.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from hpc.wait import port_open, until

if TYPE_CHECKING:
    from hpc.local_cluster import LocalCluster, Spec

PACKAGES = "slurmdbd mariadb-server"
COMMANDS = ("slurmdbd", "mariadbd", "mariadb-install-db", "mariadb", "mariadb-admin")
MARIADB_PORT = 16820
READY_TIMEOUT_S = 60.0

SLURMDBD_CONF = jinja2.Template("""\
# Written by `rlhpc cluster up --accounting`.
AuthType=auth/munge
AuthInfo=socket={{ state }}/munge/munge.socket
DbdHost={{ host }}
DbdAddr={{ addr }}
DbdPort={{ dbd_port }}
SlurmUser=root
PidFile={{ state }}/run/slurmdbd.pid
LogFile={{ state }}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={{ db_port }}
StorageUser=slurm
StoragePass={{ password }}
StorageLoc=slurm_acct_db
""")


def start_accounting(cluster: LocalCluster, spec: Spec, dbd_port: int) -> None:
    from hpc.local_cluster import ClusterError, run_command, short_hostname

    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        raise ClusterError(f"--accounting needs {', '.join(missing)}: apt-get install {PACKAGES}")
    state = cluster.state_dir
    db = state / "mysql"
    sock = state / "run" / "mysql.sock"
    password_file = state / "run" / "db-password"
    if not (db / "mysql").exists():
        run_command("mariadb-install-db", "--user=root", f"--datadir={db}", "--auth-root-authentication-method=normal",
             "--skip-test-db")
    log = (state / "log" / "mariadb.log").open("ab")
    subprocess.Popen(["mariadbd", "--user=root", f"--datadir={db}", f"--socket={sock}", f"--port={MARIADB_PORT}",
                      "--bind-address=127.0.0.1", "--skip-name-resolve", f"--pid-file={state}/run/mariadb.pid"],
                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _wait(lambda: run_command("mariadb-admin", f"--socket={sock}", "ping", check=False).returncode == 0,
          "MariaDB", state / "log" / "mariadb.log")
    if not password_file.exists():
        password_file.write_text(secrets.token_hex(16))
        password_file.chmod(0o600)
    password = password_file.read_text().strip()
    run_command("mariadb", f"--socket={sock}", "-e",
         f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';"
         "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
    conf = state / "slurmdbd.conf"
    conf.write_text(SLURMDBD_CONF.render(state=state, host=short_hostname(), addr=spec.ctld_addr,
                                         dbd_port=dbd_port, db_port=MARIADB_PORT, password=password))
    conf.chmod(0o600)  # slurmdbd refuses a config that others can read: it holds the password
    # slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF.
    subprocess.run(["slurmdbd"], env={**os.environ, "SLURM_CONF": str(cluster.conf)}, check=True,
                   capture_output=True)
    _wait(lambda: port_open(spec.ctld_addr, dbd_port, timeout_s=0.5), "slurmdbd", state / "log" / "slurmdbd.log")


def stop_accounting(cluster: LocalCluster) -> None:
    from hpc.local_cluster import kill_all, pid_from

    kill_all(pid_from(cluster.state_dir / "run" / "mariadb.pid"), timeout_s=30)


def _wait(ready: Callable[[], bool], what: str, log: Path) -> None:
    from hpc.local_cluster import ClusterError

    if not until(ready, READY_TIMEOUT_S, poll_s=0.2):
        raise ClusterError(f"{what} did not start within {READY_TIMEOUT_S:.0f}s; see {log}")
