#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try `snakemake --profile profiles/slurm` without a
# real cluster (the test suite uses it too). Debian/Ubuntu, as root, no systemd needed.
#
#   tools/slurm-local.sh install   apt-get install slurmctld slurmd slurm-client munge (if missing)
#   tools/slurm-local.sh start     install if needed, start munged, slurmctld, slurmd; wait for "idle"
#   tools/slurm-local.sh status    the daemons, the node, the queue
#   tools/slurm-local.sh stop      cancel all jobs, stop the daemons this script started
#
# Its files live in $SLURM_LOCAL_DIR (default /var/tmp/turbowan-slurm): slurm.conf, gres.conf,
# state, logs and fake GPU device files. While the cluster runs, /etc/slurm/slurm.conf and
# gres.conf are links to them (SLURM's commands, and srun inside a job, look there; the Snakemake
# plugin drops SLURM_CONF from a job's environment); `stop` removes the links, so that with the
# cluster down SLURM's commands fail at once instead of waiting for a controller. An existing
# /etc/slurm/slurm.conf is never touched: start refuses to run.
# GPUs: the node offers the machine's /dev/nvidia<N> cards if there are any, else
# $SLURM_LOCAL_GPUS (default 2) fake ones: jobs asking for a GPU get CUDA_VISIBLE_DEVICES as on
# a real cluster, but no GPU. Memory is not enforced (CR_Core); the node advertises at least
# 64 GB so that a profile's real-size requests are accepted.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/var/tmp/turbowan-slurm}
FAKE_GPUS=${SLURM_LOCAL_GPUS:-2}
PACKAGES=(slurmctld slurmd slurm-client munge)
export SLURM_CONF=$DIR/slurm.conf
export PATH=$PATH:/usr/sbin:/sbin  # the daemons, munged and runuser live there

say() { echo "slurm-local: $*" >&2; }
die() { say "error: $*"; exit 1; }
need_root() { [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts slurmd)"; }
ETC=/etc/slurm
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    need_root
    local missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [[ ${#missing[@]} == 0 ]] && return 0
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munged already runs; using it"
        return 0
    fi
    [[ -f /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            cp /run/munge/munged.pid "$DIR/munged.pid"  # ours to stop
            return 0
        fi
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

gpu_files() {
    # Real cards if the machine has them, else fake character devices (major 195, as NVIDIA's).
    local real=(/dev/nvidia[0-9]*)
    if [[ -e ${real[0]} ]]; then
        echo "/dev/nvidia[0-$((${#real[@]} - 1))]" "${#real[@]}"
        return
    fi
    mkdir -p "$DIR/dev"
    for ((i = 0; i < FAKE_GPUS; i++)); do
        [[ -e $DIR/dev/nvidia$i ]] || mknod -m 666 "$DIR/dev/nvidia$i" c 195 "$i"
    done
    echo "$DIR/dev/nvidia[0-$((FAKE_GPUS - 1))]" "$FAKE_GPUS"
}

write_config() {
    local host node files count mem
    host=$(hostname -s)
    read -r files count < <(gpu_files)
    # slurmd -C prints this machine's node line; keep its CPU layout, raise the memory.
    node=$(slurmd -C | head -1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    ((mem < 65536)) && node=${node/RealMemory=$mem/RealMemory=65536}
    cat >"$DIR/slurm.conf" <<EOF
# Written by tools/slurm-local.sh: a one-node try-out cluster.
ClusterName=turbowan-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Finished jobs stay visible to squeue (the Snakemake plugin's status mode) for an hour.
MinJobAge=3600
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
$node Gres=gpu:$count
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    printf '# Written by tools/slurm-local.sh\nNodeName=%s Name=gpu File=%s\n' "$host" "$files" >"$DIR/gres.conf"
}

wait_idle() {
    local state
    for _ in $(seq 60); do
        state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
        [[ $state == idle ]] && return 0
        alive "$DIR/slurmctld.pid" || break
        sleep 1
    done
    say "node state: '${state:-none}'; last log lines:"
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "the cluster did not come up"
}

link_config() {
    # Replaces only links this script made (a dangling one, or one to a file it wrote) whose
    # cluster is not running, e.g. left by a test session that was killed.
    local name target
    mkdir -p "$ETC"
    for name in slurm.conf gres.conf; do
        target=$(readlink "$ETC/$name" || true)
        if [[ -e $ETC/$name || -L $ETC/$name ]] && [[ $target != "$DIR/$name" ]]; then
            if [[ ! -L $ETC/$name ]] || { [[ -e $target ]] && ! grep -q "tools/slurm-local.sh" "$target"; }; then
                die "$ETC/$name exists and is not this script's; not touching a SLURM set-up"
            fi
            if alive "$(dirname "$target")/slurmctld.pid"; then
                die "another cluster of this script runs from $(dirname "$target"); stop it first"
            fi
        fi
        ln -sfn "$DIR/$name" "$ETC/$name"
    done
}

unlink_config() {
    local name
    for name in slurm.conf gres.conf; do
        if [[ -L $ETC/$name && $(readlink "$ETC/$name") == "$DIR/$name" ]]; then rm -f "$ETC/$name"; fi
    done
}

start() {
    need_root
    install_packages
    if alive "$DIR/slurmctld.pid" || alive "$DIR/slurmd.pid"; then
        die "already running ($DIR); run '$0 stop' first"
    fi
    trap 'say "start failed; stopping what it started"; stop' EXIT
    rm -rf "$DIR/state" "$DIR/spool"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    write_config
    link_config
    start_munge
    slurmctld -c
    slurmd
    wait_idle
    trap - EXIT
    say "up: $(sinfo -h -o '%N %c CPUs, %G, partition %P'); stop it with: $0 stop"
}

stop_pid() {  # stop_pid <pidfile>: SIGTERM, then SIGKILL after 15 s
    local pidfile=$1 pid
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    say "pid $pid ignored SIGTERM; killing it"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

stop() {
    if alive "$DIR/slurmctld.pid"; then
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
        timeout 10 scontrol shutdown >/dev/null 2>&1 || true
    fi
    stop_pid "$DIR/slurmctld.pid"
    stop_pid "$DIR/slurmd.pid"
    stop_pid "$DIR/munged.pid"
    unlink_config
    rm -rf "$DIR/dev"
    say "stopped"
}

status() {
    local name
    for name in slurmctld slurmd munged; do
        if alive "$DIR/$name.pid"; then echo "$name: running (pid $(cat "$DIR/$name.pid"))"; else echo "$name: not started by this script"; fi
    done
    if alive "$DIR/slurmctld.pid"; then
        sinfo
        squeue
    fi
}

case ${1:-} in
    install) install_packages ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status   (state in \$SLURM_LOCAL_DIR, default /var/tmp/turbowan-slurm)" >&2; exit 2 ;;
esac
