#!/usr/bin/env bash
# Record `squeue --json` and `sacct --json -X` of another Slurm release for the status parser's tests
# (tests/data/squeue/): that release's Debian packages in a debootstrapped chroot, one node on loopback, a
# finished job, a running one and a pending one. As root; the chroot's daemons use their own ports, so a local
# cluster may be up beside it. Example, Slurm 24.11 from Debian trixie:
#   debootstrap --variant=minbase --include=slurmctld,slurmd,slurm-client,munge,slurmdbd,mariadb-server \
#     trixie /tmp/trixie http://deb.debian.org/debian
#   tools/record_slurm_json.sh /tmp/trixie tests/data/squeue
set -euo pipefail
root=$(realpath "$1"); out=$(realpath "$2")
in() { chroot "$root" "$@"; }
for fs in proc sys dev; do mountpoint -q "$root/$fs" || mount --bind "/$fs" "$root/$fs"; done
trap 'in pkill -x slurmd; in pkill -x slurmctld; in pkill -x slurmdbd; in pkill -x mariadbd; in pkill -x munged;
      sleep 2; for fs in proc sys dev; do umount "$root/$fs"; done' EXIT

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
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=7819
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=node1 NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=node1 Default=YES MaxTime=INFINITE State=UP
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

[ -s "$root/etc/munge/munge.key" ] || in mungekey --create --force
in munged --force
[ -d "$root/var/lib/mysql/mysql" ] || in mariadb-install-db --user=root --datadir=/var/lib/mysql >/dev/null
in bash -c 'mariadbd --user=root --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock --skip-networking \
  >/var/log/slurm/mariadb.log 2>&1 &'
until in mariadb-admin --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1; do sleep 0.5; done
in slurmdbd
sleep 3
in sacctmgr -i add cluster recorded >/dev/null || true
in slurmctld
in slurmd -N node1
until in sinfo -h -o %T 2>/dev/null | grep -q idle; do sleep 1; done

in sbatch -J rlhpc-done -N1 -c1 --wrap 'sleep 1' >/dev/null
in sbatch -J rlhpc-failed -N1 -c1 --wrap 'exit 3' >/dev/null
sleep 8
in sbatch -J rlhpc-running -N1 -c2 --time=10 --wrap 'sleep 300' >/dev/null
in sbatch -J rlhpc-pending -N1 -c2 --time=10 --requeue --wrap 'sleep 300' >/dev/null
sleep 5
version=$(in sinfo -V | awk '{print $2}' | cut -d. -f1,2)
in squeue --json > "$out/$version.json"
in sacct --json -X -S now-1hour > "$out/sacct-$version.json"
in scancel -u root
echo "recorded Slurm $version: $out/$version.json $out/sacct-$version.json"
