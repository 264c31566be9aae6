#!/usr/bin/env bash
# Record `squeue --json` of another Slurm release for the status parser's tests (tests/data/squeue/): that
# release's Debian packages in a debootstrapped chroot, one node on loopback, a finished job, a failed one, a
# running one and a pending one. As root; the chroot's daemons use their own ports, so a local cluster may be
# up beside it. Run it on a fresh chroot: the jobs it records are then 1 to 4. No accounting: trixie's slurmdbd 24.11 stops at start-up against its MariaDB 11.8
# ("_check_mysql_concat_is_sane: null result"). Example, Slurm 24.11 from Debian trixie:
#   debootstrap --variant=minbase --include=slurmctld,slurmd,slurm-client,munge trixie /tmp/trixie \
#     http://deb.debian.org/debian
#   tools/record_slurm_json.sh /tmp/trixie tests/data/squeue
set -euo pipefail
root=$(realpath "$1"); out=$(realpath "$2")
jail() { chroot "$root" "$@"; }
# slurmd probes the cgroup file system under /sys: bind it recursively.
for fs in proc sys dev; do mountpoint -q "$root/$fs" || mount --rbind "/$fs" "$root/$fs"; done
trap 'jail pkill -x slurmd; jail pkill -x slurmctld; jail pkill -x munged; sleep 2
      for fs in proc sys dev; do umount -R "$root/$fs"; done' EXIT
trap 'exit 1' INT TERM

mkdir -p "$root"/etc/slurm "$root"/var/spool/{slurmctld,slurmd} "$root"/run/munge "$root"/var/log/slurm
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
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=node1 NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=node1 Default=YES MaxTime=INFINITE State=UP
CONF

[ -s "$root/etc/munge/munge.key" ] || jail mungekey --create --force
jail munged --force
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
# As rlhpc asks (hpc/slurm.py: queue): by job id, finished jobs included.
jail squeue --json --states=all --jobs "$(IFS=,; echo "${ids[*]}")" > "$out/$version.json"
jail scancel -u root
echo "recorded Slurm $version: $out/$version.json"
