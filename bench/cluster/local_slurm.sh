#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, to prove the suite's cluster path against a real
# scheduler (make cluster-up / make cluster-down / make test-cluster).
#
#   bench/cluster/local_slurm.sh up       install slurm-wlm + munge if missing (apt-get), write
#                                         /etc/slurm/slurm.conf for this machine's cores and
#                                         memory, start munged, slurmdbd (+ MariaDB, for sacct),
#                                         slurmctld and slurmd; wait until sinfo shows the node idle
#   bench/cluster/local_slurm.sh down     stop them (jobs still queued are cancelled first)
#   bench/cluster/local_slurm.sh status   one line: up (sinfo's node state) or down
#
# Idempotent: `up` on a running cluster only checks it; `down` on a stopped one does nothing.
# Needs root and apt-get (Debian/Ubuntu); no systemd and no cgroups (proctrack/linuxproc,
# task/none). DVBENCH_SLURM_ACCOUNTING=0 skips slurmdbd/MariaDB (then no sacct; submitit
# then sees job states only through its result files). Everything else stays on this machine.
# Files: /etc/slurm/{slurm,slurmdbd}.conf (only ever overwritten when they carry the dvbench
# marker), state under /var/lib/dvbench-slurm, logs under /var/log/dvbench-slurm, pids under
# /run/dvbench-slurm. The packages and the state stay installed after `down`.
set -euo pipefail

ACCOUNTING="${DVBENCH_SLURM_ACCOUNTING:-1}"
CLUSTER=dvbench
PARTITION=debug
CTLD_PORT=6817
SLURMD_PORT=6818
DBD_PORT=6819
MARKER="# written by dvbench bench/cluster/local_slurm.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
DBD_CONF="$CONF_DIR/slurmdbd.conf"
STATE=/var/lib/dvbench-slurm
LOGS=/var/log/dvbench-slurm
RUN=/run/dvbench-slurm
WAIT_S="${DVBENCH_SLURM_WAIT_S:-60}"
export SLURM_CONF="$CONF"

die() { echo "cluster: $*" >&2; exit 1; }
say() { echo "cluster: $*"; }

alive() {  # alive <pidfile>: the pid in it runs
    local pid
    [[ -s "$1" ]] || return 1
    pid=$(<"$1")
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

listening() {  # listening <port>: something accepts TCP connections on 127.0.0.1:<port>
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

port_free_or_ours() {  # <port> <pidfile> <daemon>
    if ! alive "$2" && listening "$1"; then
        die "port $1 (for $3) is in use by another process; stop it first (ss -ltnp | grep :$1)"
    fi
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "needs root (it installs packages and starts daemons in /etc, /run); run it as root, or use a real cluster"
}

install_packages() {
    local pkgs=()
    command -v munged >/dev/null || pkgs+=(munge)
    command -v slurmctld >/dev/null || pkgs+=(slurmctld)
    command -v slurmd >/dev/null || pkgs+=(slurmd)
    command -v sbatch >/dev/null || pkgs+=(slurm-client)
    if [[ "$ACCOUNTING" == 1 ]]; then
        command -v slurmdbd >/dev/null || pkgs+=(slurmdbd)
        command -v mariadbd >/dev/null || command -v mysqld >/dev/null || pkgs+=(mariadb-server)
    fi
    ((${#pkgs[@]})) || return 0
    [[ ${#pkgs[@]} -ge 3 ]] && pkgs+=(slurm-wlm)
    command -v apt-get >/dev/null || die "slurm/munge are not installed and there is no apt-get to install them (${pkgs[*]})"
    say "installing ${pkgs[*]} (apt-get)"
    # no service starts from the packages' scripts: this script starts the daemons itself
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"/tmp/dvbench-slurm-apt.log" 2>&1 ||
            { apt-get update -q >>"/tmp/dvbench-slurm-apt.log" 2>&1 &&
              DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
                  >>"/tmp/dvbench-slurm-apt.log" 2>&1; }
    } || rc=$?
    ((own_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${pkgs[*]} failed (exit $rc); see /tmp/dvbench-slurm-apt.log"
}

start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if alive /run/munge/munged.pid && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    runuser -u munge -- /usr/sbin/munged \
        || die "munged did not start: $(tail -n 1 /var/log/munge/munged.log 2>/dev/null)"
    for _ in $(seq 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged started but munge -n | unmunge fails: $(tail -n 1 /var/log/munge/munged.log 2>/dev/null)"
}

write_conf() {  # write_conf <file> <content>: only over a file of ours
    if [[ -e "$1" ]] && ! grep -qF "$MARKER" "$1"; then
        die "$1 exists and was not written by this script; move it away to use the local cluster"
    fi
    printf '%s\n' "$2" >"$1.tmp"
    mv "$1.tmp" "$1"
}

start_mariadb() {
    local sock=/run/mysqld/mysqld.sock
    if [[ -S $sock ]] && mysqladmin --socket=$sock ping >/dev/null 2>&1; then
        return 0
    fi
    listening 3306 && die "port 3306 is in use by another database server; set DVBENCH_SLURM_ACCOUNTING=0 or stop it"
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOGS/mariadb-install.log" 2>&1 \
        || die "mariadb-install-db failed; see $LOGS/mariadb-install.log"
    local bin
    bin=$(command -v mariadbd || command -v mysqld || echo /usr/sbin/mariadbd)
    touch "$LOGS/mariadb.log" && chown mysql:mysql "$LOGS/mariadb.log"     # it writes as mysql
    setsid "$bin" --user=mysql --datadir=/var/lib/mysql --socket=$sock --bind-address=127.0.0.1 \
        --pid-file=/run/mysqld/mysqld.pid --log-error="$LOGS/mariadb.log" </dev/null >/dev/null 2>&1 &
    for _ in $(seq 150); do
        mysqladmin --socket=$sock ping >/dev/null 2>&1 && { touch "$RUN/mariadb.ours"; return 0; }
        sleep 0.2
    done
    die "MariaDB did not come up in 30 s; see $LOGS/mariadb.log"
}

start_dbd() {
    start_mariadb
    local pass_file="$STATE/dbd.pass" pass
    [[ -s $pass_file ]] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$pass_file")
    pass=$(<"$pass_file")
    mysql --socket=/run/mysqld/mysqld.sock -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
        ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
        CREATE DATABASE IF NOT EXISTS slurm_acct_db; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" \
        || die "could not create the slurm database user in MariaDB"
    write_conf "$DBD_CONF" "$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log"
    chmod 600 "$DBD_CONF"
    if ! alive "$RUN/slurmdbd.pid"; then
        port_free_or_ours $DBD_PORT "$RUN/slurmdbd.pid" slurmdbd
        slurmdbd || die "slurmdbd did not start; see $LOGS/slurmdbd.log"
    fi
    for _ in $(seq 100); do
        listening $DBD_PORT && break
        sleep 0.2
    done
    listening $DBD_PORT || die "slurmdbd is not listening on $DBD_PORT; see $LOGS/slurmdbd.log"
    sacctmgr -i list cluster -n format=cluster 2>/dev/null | grep -qw "$CLUSTER" \
        || sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
}

slurm_conf() {
    local host node mem
    host=$(hostname -s)
    # this machine's cores and memory as slurmd itself sees them; 90 % of the memory is schedulable
    node=$(slurmd -C | head -n 1) || die "slurmd -C failed"
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    node=$(sed -e "s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/" -e "s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10))/" <<<"$node")
    local acct="AccountingStorageType=accounting_storage/none"
    [[ "$ACCOUNTING" == 1 ]] && acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT"
    write_conf "$CONF" "$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
$acct
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
GresTypes=gpu
ReturnToService=2
SlurmdTimeout=30
KillWait=5
MinJobAge=3600
InactiveLimit=0
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
$node State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP"
}

node_state() { timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -n 1; }

up() {
    need_root
    if alive "$RUN/slurmctld.pid" && alive "$RUN/slurmd.pid" && [[ "$(node_state)" =~ ^(idle|mixed|allocated) ]]; then
        say "already up: $(sinfo -h -N -o '%N %T cpus=%c mem=%mMB partition=%P')"
        return 0
    fi
    install_packages
    mkdir -p "$STATE/ctld" "$STATE/slurmd" "$LOGS" "$RUN" "$CONF_DIR"
    port_free_or_ours $CTLD_PORT "$RUN/slurmctld.pid" slurmctld
    port_free_or_ours $SLURMD_PORT "$RUN/slurmd.pid" slurmd
    start_munge
    slurm_conf                            # sacctmgr (start_dbd) reads it too
    [[ "$ACCOUNTING" == 1 ]] && start_dbd
    alive "$RUN/slurmctld.pid" || slurmctld || die "slurmctld did not start; see $LOGS/slurmctld.log"
    alive "$RUN/slurmd.pid" || slurmd || die "slurmd did not start; see $LOGS/slurmd.log"
    local state="" t0=$SECONDS resumed=0
    while ((SECONDS - t0 < WAIT_S)); do
        state=$(node_state)
        [[ "$state" =~ ^(idle|mixed|allocated)$ ]] && break
        if [[ "$state" =~ ^(down|drain|drained) ]] && ((!resumed && SECONDS - t0 > 3)); then
            scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
            resumed=1
        fi
        sleep 1
    done
    [[ "$state" =~ ^(idle|mixed|allocated)$ ]] ||
        die "the node is '${state:-unknown}' after ${WAIT_S} s, not idle ($(sinfo -h -R 2>/dev/null | head -n 1)); see $LOGS/slurmctld.log and slurmd.log"
    say "up: $(sinfo -h -N -o '%N %T cpus=%c mem=%mMB partition=%P')$([[ $ACCOUNTING == 1 ]] && echo ', accounting (sacct) on')"
}

stop_pid() {  # stop_pid <pidfile> <name>
    alive "$1" || { rm -f "$1"; return 0; }
    local pid
    pid=$(<"$1")
    kill -TERM "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$1"; say "stopped $2 ($pid)"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$1"
    say "killed $2 ($pid)"
}

down() {
    need_root
    if alive "$RUN/slurmctld.pid"; then
        local left
        left=$(timeout 10 squeue -h -o %i 2>/dev/null | wc -l || echo 0)
        if ((left > 0)); then
            say "cancelling $left queued/running job(s)"
            timeout 10 scancel --full $(squeue -h -o %i) 2>/dev/null || true
            for _ in $(seq 30); do
                [[ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ]] && break
                sleep 1
            done
        fi
    fi
    stop_pid "$RUN/slurmd.pid" slurmd
    stop_pid "$RUN/slurmctld.pid" slurmctld
    stop_pid "$RUN/slurmdbd.pid" slurmdbd
    if [[ -e "$RUN/mariadb.ours" ]]; then
        stop_pid /run/mysqld/mysqld.pid mariadb
        rm -f "$RUN/mariadb.ours"
    fi
    stop_pid /run/munge/munged.pid munged
    say "down"
}

status() {
    if alive "$RUN/slurmctld.pid" && alive "$RUN/slurmd.pid"; then
        say "up: $(timeout 10 sinfo -h -N -o '%N %T cpus=%c mem=%mMB partition=%P' 2>&1 | head -n 1)"
    else
        say "down"
        return 3
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
