#!/usr/bin/env bash
# Record `squeue --json` (its plain format before 21.08; with `--accounting`, `sacct --json`) of another
# Slurm release for the status parser's tests (tests/data/squeue/): that release's packages in a
# debootstrapped chroot, one node on loopback, a finished job, a failed one, a running one and a pending one.
# As root; the chroot's daemons use their own ports, so a local cluster may be up beside it.
#   Slurm 24.11 (Debian trixie; its slurmdbd stops against its MariaDB 11.8, so no --accounting):
#     debootstrap --variant=minbase --include=slurmctld,slurmd,slurm-client,munge trixie /tmp/trixie \
#       http://deb.debian.org/debian
#     tools/record_slurm_json.sh /tmp/trixie tests/data/squeue
#   Slurm 20.11 (Debian bullseye): as trixie, with bullseye.
#   Slurm 23.11 (Ubuntu noble, debootstrap's jammy script):
#     debootstrap --no-check-gpg --variant=minbase --components=main,universe \
#       --include=slurmctld,slurmd,slurm-client,munge,slurmdbd,mariadb-server noble /tmp/noble \
#       http://archive.ubuntu.com/ubuntu /usr/share/debootstrap/scripts/jammy
#     tools/record_slurm_json.sh /tmp/noble tests/data/squeue --accounting
set -euo pipefail
root=$(realpath "$1"); out=$(realpath "$2"); accounting=${3:-}
jail() { chroot "$root" "$@"; }
# slurmd probes the cgroup file system under /sys: bind it recursively.
for fs in proc sys dev; do mountpoint -q "$root/$fs" || mount --rbind "/$fs" "$root/$fs"; done
# Every process whose root is the chroot (the chroot may have no pkill).
stop_all() { for p in /proc/[0-9]*; do [ "$(readlink "$p/root")" = "$root" ] && kill "${p#/proc/}"; done 2>/dev/null; }
trap 'stop_all || true; sleep 2; for fs in proc sys dev; do umount -R -l "$root/$fs"; done' EXIT
trap 'exit 1' INT TERM

mkdir -p "$root"/etc/slurm "$root"/var/spool/{slurmctld,slurmd} "$root"/run/{munge,mysqld} "$root"/var/log/slurm
cat > "$root/etc/slurm/slurm.conf" <<CONF
ClusterName=recorded
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=7817
SlurmdPort=7818
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=node1 NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=node1 Default=YES MaxTime=INFINITE State=UP
CONF
[ -s "$root/etc/munge/munge.key" ] || jail mungekey --create --force 2>/dev/null \
  || jail bash -c 'dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null &&
                   chmod 400 /etc/munge/munge.key'
jail munged --force

if [ "$accounting" = --accounting ]; then
  cat >> "$root/etc/slurm/slurm.conf" <<CONF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=7819
CONF
  cat > "$root/etc/slurm/slurmdbd.conf" <<CONF
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=7819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
CONF
  chmod 600 "$root/etc/slurm/slurmdbd.conf"
  [ -d "$root/var/lib/mysql/mysql" ] || jail mariadb-install-db --user=root --datadir=/var/lib/mysql >/dev/null
  jail bash -c 'mariadbd --user=root --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
    --skip-networking >/var/log/slurm/mariadb.log 2>&1 &'
  until jail mariadb-admin --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1; do sleep 0.5; done
  jail slurmdbd
  until jail sacctmgr -i add cluster recorded >/dev/null 2>&1; do sleep 1; done
fi
jail slurmctld
jail slurmd -N node1
until jail sinfo -h -o %T 2>/dev/null | grep -q idle; do sleep 1; done

ids=()
submit() { ids+=("$(jail sbatch --parsable "$@")"); }
submit -J rlhpc-done -N1 -c1 --wrap 'sleep 1'
submit -J rlhpc-failed -N1 -c1 --wrap 'exit 3'
sleep 8
submit -J rlhpc-running -N1 -c2 --time=10 --wrap 'sleep 300'
submit -J rlhpc-pending -N1 -c2 --time=10 --requeue --wrap 'sleep 300'
sleep 5
version=$(jail sinfo -V | awk '{print $2}' | cut -d. -f1,2)
jobs=$(IFS=,; echo "${ids[*]}")
# As rlhpc asks (hpc/slurm.py: queue, accounting): by job id, finished jobs included.
if ! jail squeue --json --states=all --jobs "$jobs" > "$out/$version.json" 2>/dev/null; then
  # No --json before 21.08: what rlhpc reads then is the plain format it asks for.
  rm "$out/$version.json"
  format=$(cd "$(dirname "$0")/.." && python3 -c 'from hpc.slurm import _FORMAT; print(_FORMAT)')
  jail squeue -h -o "$format" --states=all --jobs "$jobs" > "$out/$version.txt"
fi
[ "$accounting" = --accounting ] && jail sacct --json -X --jobs "$jobs" > "$out/sacct-$version.json"
jail scancel -u root
echo "recorded Slurm $version in $out"
