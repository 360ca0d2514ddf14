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
# cgroup.conf, state, logs, pid files and fake GPU device files. The script runs as root, so that
# folder must be root's alone: start creates it with mode 0700 (its parent must exist), and start
# and stop refuse one that is a symbolic link, not owned by root, not mode 0700, or below a folder
# that someone other than root could rename things in (a path through a symbolic link is refused
# too). Files are written to a temporary name there and renamed into place; state, spool, log, run
# and dev are recreated at every start. `stop` signals only processes that are the daemons this
# script started: the executable and start time recorded at start must match.
# While the cluster runs, /etc/slurm/{slurm,gres,cgroup}.conf are links to its files (SLURM's
# commands, and srun inside a job, look there; the Snakemake plugin drops SLURM_CONF from a job's
# environment); `stop` removes the links, so that with the cluster down SLURM's commands fail at
# once instead of waiting for a controller. An existing /etc/slurm/slurm.conf (or gres.conf,
# cgroup.conf) not made by this script is never touched: start refuses to run.
# Processes: ProctrackType=proctrack/cgroup as on real clusters: every process a job step starts,
# even a detached (setsid) one, is in the step's cgroup and is killed when the step ends. The
# machine must have the cgroup v1 freezer hierarchy (/sys/fs/cgroup/freezer) or cgroup v2
# (/sys/fs/cgroup/cgroup.controllers); SLURM_LOCAL_PROCTRACK=linuxproc falls back to tracking by
# parent pid (detached processes then escape), for machines where neither works.
# GPUs: the node offers the machine's /dev/nvidia<N> cards if there are any, else
# $SLURM_LOCAL_GPUS (default 2) fake ones (root-only character devices): jobs asking for a GPU get
# CUDA_VISIBLE_DEVICES as on a real cluster, but no GPU. Memory is not enforced (CR_Core, no
# cgroup constraints); the node advertises at least 64 GB so that a profile's real-size requests
# are accepted.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/var/tmp/turbowan-slurm}
FAKE_GPUS=${SLURM_LOCAL_GPUS:-2}
PROCTRACK=${SLURM_LOCAL_PROCTRACK:-cgroup}
PACKAGES=(slurmctld slurmd slurm-client munge)
export PATH=$PATH:/usr/sbin:/sbin  # the daemons, munged and runuser live there
ETC=/etc/slurm
CONFIGS=(slurm.conf gres.conf cgroup.conf)

say() { echo "slurm-local: $*" >&2; }
die() { say "error: $*"; exit 1; }
need_root() { [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts slurmd)"; }

# --- the state folder -----------------------------------------------------------------------

check_path() {
    # An absolute path without symbolic links, "." or "..", in characters slurm.conf takes as is.
    while [[ $DIR == */ && $DIR != / ]]; do DIR=${DIR%/}; done
    [[ $DIR == /?* ]] || die "SLURM_LOCAL_DIR must be an absolute path other than / (got '$DIR')"
    [[ $DIR =~ ^[A-Za-z0-9._/+-]+$ ]] || die "SLURM_LOCAL_DIR may hold only letters, digits and ._+-/ (got '$DIR')"
    [[ /$DIR/ != */./* && /$DIR/ != */../* && $DIR != *//* ]] || die "SLURM_LOCAL_DIR must not contain '.', '..' or '//' (got '$DIR')"
    local parent=${DIR%/*} real
    parent=${parent:-/}
    [[ -d $parent ]] || die "$parent (the parent of SLURM_LOCAL_DIR $DIR) does not exist"
    real=$(realpath -e -- "$parent")
    [[ $real == "$parent" ]] || die "$parent leads through a symbolic link (to $real); set SLURM_LOCAL_DIR to a path without links"
    # Every folder above must be root's, and only root may rename or delete entries in it
    # (a folder others may write to is fine if it has the sticky bit, as /tmp and /var/tmp).
    local path=$parent owner mode
    while :; do
        read -r owner mode < <(stat -c '%u %a' -- "$path")
        if [[ $owner != 0 ]] || { ((8#$mode & 8#022)) && ! ((8#$mode & 8#1000)); }; then
            die "$path (above SLURM_LOCAL_DIR $DIR) is owned by uid $owner, mode $mode: others could replace the state folder; use a folder under one only root can change (default /var/tmp/turbowan-slurm)"
        fi
        [[ $path == / ]] && break
        path=${path%/*}
        path=${path:-/}
    done
}

dir_ok() {  # the folder exists, is no link, and is a root-owned 0700 directory
    [[ -d $DIR && ! -L $DIR && $(stat -c '%u %a' -- "$DIR") == "0 700" ]]
}

refuse_dir() {
    if [[ -L $DIR ]]; then
        die "$DIR is a symbolic link (to $(readlink -- "$DIR")); refusing to use it as the state folder. Remove it, or set SLURM_LOCAL_DIR"
    elif [[ ! -d $DIR ]]; then
        die "$DIR exists and is not a folder; remove it, or set SLURM_LOCAL_DIR"
    fi
    die "$DIR is owned by uid $(stat -c %u -- "$DIR") with mode $(stat -c %a -- "$DIR"); the state folder must be root's with mode 0700. Remove it (it is recreated), or set SLURM_LOCAL_DIR"
}

make_dir() {  # start: create the folder (mode 0700 from the start), or verify an existing one
    check_path
    if [[ ! -e $DIR && ! -L $DIR ]]; then
        mkdir -m 0700 -- "$DIR" || die "cannot create $DIR"
    fi
    dir_ok || refuse_dir
}

fresh_subdir() {  # fresh_subdir <name>: an empty root-only folder $DIR/<name>
    rm -rf -- "${DIR:?}/$1"
    mkdir -m 0700 -- "$DIR/$1"
}

write_file() {  # write_file <path in $DIR> <mode> < content: written beside, renamed over (no link followed)
    local tmp
    tmp=$(mktemp -- "$(dirname -- "$DIR/$1")/.$(basename -- "$1").XXXXXX")
    cat >"$tmp"
    chmod "$2" -- "$tmp"
    mv -f -T -- "$tmp" "$DIR/$1"
}

# --- daemons: started, recorded, and recognised again by executable and start time ------------

proc_start() {  # proc_start <pid>: the process's start time (clock ticks since boot), field 22 of stat
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }  # the fields after "(comm) ", comm may hold spaces or ")"
    read -ra fields <<<"$stat"
    echo "${fields[19]}"
}

is_daemon() {  # is_daemon <pid> <name>: the pid runs the installed <name> (Debian: slurmd -> slurmd-wlm)
    local exe
    [[ $1 =~ ^[1-9][0-9]*$ ]] || return 1
    exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
    exe=${exe% (deleted)}  # the package was upgraded while it ran
    [[ $exe == "$(readlink -f -- "$(command -v "$2")")" && $(cat "/proc/$1/comm" 2>/dev/null) == "$2" ]]
}

record() {  # record <name> <pidfile the daemon wrote>: keep "<pid> <start time>" in run/<name>.id
    local pid
    for _ in $(seq 100); do
        pid=$(head -c 32 -- "$2" 2>/dev/null | tr -dc 0-9 || true)
        if [[ -n $pid ]] && is_daemon "$pid" "$1"; then
            echo "$pid $(proc_start "$pid")" | write_file "run/$1.id" 0600
            return 0
        fi
        sleep 0.1
    done
    return 1
}

daemon_pid() {  # daemon_pid <name>: prints the pid of the <name> this script started, if it still runs
    local file=$DIR/run/$1.id pid start
    [[ -f $file && ! -L $file ]] || return 1
    read -r pid start <"$file" || return 1
    is_daemon "$pid" "$1" && [[ $(proc_start "$pid") == "$start" ]] || return 1
    echo "$pid"
}

stop_daemon() {  # stop_daemon <name>: SIGTERM, then SIGKILL after 15 s; only the recorded process
    local name=$1 pid
    if ! pid=$(daemon_pid "$name"); then
        if [[ -f $DIR/run/$name.id ]] && read -r pid _ <"$DIR/run/$name.id" && [[ $pid =~ ^[1-9][0-9]*$ && -r /proc/$pid/exe ]]; then
            say "pid $pid is not the $name this script started; not signalling it"
        fi
        rm -f -- "$DIR/run/$name.id"
        return 0
    fi
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 150); do
        daemon_pid "$name" >/dev/null || { rm -f -- "$DIR/run/$name.id"; return 0; }
        sleep 0.1
    done
    if pid=$(daemon_pid "$name"); then
        say "$name (pid $pid) ignored SIGTERM; killing it"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f -- "$DIR/run/$name.id"
}

# --- install, configure, start --------------------------------------------------------------

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
        say "munged already runs; using it (stop leaves it running)"
        return 0
    fi
    [[ -f /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            record munged /run/munge/munged.pid || die "munged runs, but /run/munge/munged.pid does not name it"
            return 0
        fi
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

gpu_files() {
    # Real cards if the machine has them, else fake character devices (major 195, as NVIDIA's),
    # root's only (jobs run as root here), in the fresh root-only folder $DIR/dev.
    local real=(/dev/nvidia[0-9]*)
    if [[ -e ${real[0]} ]]; then
        echo "/dev/nvidia[0-$((${#real[@]} - 1))]" "${#real[@]}"
        return
    fi
    [[ $FAKE_GPUS =~ ^[1-9][0-9]?$ ]] || die "SLURM_LOCAL_GPUS must be a number from 1 to 99 (got '$FAKE_GPUS')"
    for ((i = 0; i < FAKE_GPUS; i++)); do
        mknod -m 0660 "$DIR/dev/nvidia$i" c 195 "$i"
    done
    echo "$DIR/dev/nvidia[0-$((FAKE_GPUS - 1))]" "$FAKE_GPUS"
}

cgroup_plugin() {
    # Which cgroup interface this machine mounts: v2 alone at /sys/fs/cgroup ("unified"), or v1
    # controllers below a tmpfs (possibly with a v2 tree beside them, "hybrid": SLURM then uses v1).
    if [[ $(stat -f -c %T /sys/fs/cgroup 2>/dev/null) == cgroup2fs ]]; then
        echo cgroup/v2
    elif [[ $(stat -f -c %T /sys/fs/cgroup/freezer 2>/dev/null) == cgroupfs ]]; then
        echo cgroup/v1
    else
        die "proctrack/cgroup needs cgroups, and /sys/fs/cgroup has neither cgroup v2 nor the v1 freezer controller ($(mount | grep -c cgroup || true) cgroup mounts); SLURM_LOCAL_PROCTRACK=linuxproc tracks jobs by parent pid instead"
    fi
}

write_config() {
    local host node files count mem proctrack task cgroup
    host=$(hostname -s)
    read -r files count < <(gpu_files)
    # slurmd -C prints this machine's node line; keep its CPU layout, raise the memory.
    node=$(SLURM_CONF=/dev/null slurmd -C | head -1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    ((mem < 65536)) && node=${node/RealMemory=$mem/RealMemory=65536}
    case $PROCTRACK in
        cgroup)
            cgroup=$(cgroup_plugin)
            proctrack=proctrack/cgroup
            task=task/cgroup,task/affinity
            ;;
        linuxproc)
            cgroup=disabled
            proctrack=proctrack/linuxproc
            task=task/none
            ;;
        *) die "SLURM_LOCAL_PROCTRACK must be cgroup or linuxproc (got '$PROCTRACK')" ;;
    esac
    write_file slurm.conf 0644 <<EOF
# Written by tools/slurm-local.sh: a one-node try-out cluster.
ClusterName=turbowan-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# As on real clusters: a job step's processes, detached ones too, live in its cgroup and end with it.
ProctrackType=$proctrack
TaskPlugin=$task
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
    printf '# Written by tools/slurm-local.sh\nNodeName=%s Name=gpu File=%s\n' "$host" "$files" |
        write_file gres.conf 0644
    # Track processes only: no limits on cores, memory or devices (the fake GPUs are no devices).
    # IgnoreSystemd: with cgroup v2 and no systemd, slurmd makes its own slurmstepd scope.
    {
        echo "# Written by tools/slurm-local.sh"
        if [[ $cgroup != disabled ]]; then
            echo "CgroupPlugin=$cgroup"
            echo "CgroupMountpoint=/sys/fs/cgroup"
            [[ $cgroup == cgroup/v2 ]] && echo "IgnoreSystemd=yes"
        fi
        echo "ConstrainCores=no"
        echo "ConstrainRAMSpace=no"
        echo "ConstrainSwapSpace=no"
        echo "ConstrainDevices=no"
    } | write_file cgroup.conf 0644
}

wait_idle() {
    local state
    for _ in $(seq 60); do
        state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
        [[ $state == idle ]] && return 0
        daemon_pid slurmctld >/dev/null || break
        sleep 1
    done
    say "node state: '${state:-none}'; last log lines:"
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "the cluster did not come up"
}

ours() {  # ours <config file>: one this script wrote
    [[ -f $1 ]] && head -1 -- "$1" | grep -q "Written by tools/slurm-local.sh"
}

link_config() {
    # Replaces only links this script made (a dangling one, or one to a file it wrote) whose
    # cluster is not running, e.g. left by a test session that was killed.
    local name target other
    mkdir -p "$ETC"
    for name in "${CONFIGS[@]}"; do
        target=$(readlink -- "$ETC/$name" || true)
        if [[ -e $ETC/$name || -L $ETC/$name ]] && [[ $target != "$DIR/$name" ]]; then
            if [[ ! -L $ETC/$name ]] || { [[ -e $target ]] && ! ours "$target"; }; then
                die "$ETC/$name exists and is not this script's; not touching a SLURM set-up"
            fi
            other=$(dirname -- "$target")
            if [[ -n $(DIR=$other daemon_pid slurmctld) ]]; then
                die "another cluster of this script runs from $other; stop it first"
            fi
        fi
        ln -sfn -- "$DIR/$name" "$ETC/$name"
    done
}

unlink_config() {
    local name
    for name in "${CONFIGS[@]}"; do
        if [[ -L $ETC/$name && $(readlink -- "$ETC/$name") == "$DIR/$name" ]]; then rm -f -- "$ETC/$name"; fi
    done
}

start() {
    need_root
    install_packages
    make_dir
    if daemon_pid slurmctld >/dev/null || daemon_pid slurmd >/dev/null; then
        die "already running ($DIR); run '$0 stop' first"
    fi
    export SLURM_CONF=$DIR/slurm.conf
    trap 'say "start failed; stopping what it started"; stop' EXIT
    local sub
    for sub in state spool log run dev; do fresh_subdir "$sub"; done
    rm -f -- "$DIR"/.*.conf.* "$DIR"/*.pid  # temporary files of an interrupted start; older pid files
    write_config
    link_config
    start_munge
    slurmctld -c
    record slurmctld "$DIR/run/slurmctld.pid" || die "slurmctld did not start; $(tail -n 5 "$DIR/log/slurmctld.log" 2>/dev/null)"
    slurmd
    record slurmd "$DIR/run/slurmd.pid" || die "slurmd did not start; $(tail -n 5 "$DIR/log/slurmd.log" 2>/dev/null)"
    wait_idle
    trap - EXIT
    say "up: $(sinfo -h -o '%N %c CPUs, %G, partition %P'), $(grep -h '^ProctrackType\|^CgroupPlugin' "$DIR/slurm.conf" "$DIR/cgroup.conf" | tr '\n' ' '); stop it with: $0 stop"
}

stop() {
    need_root
    check_path
    if [[ ! -e $DIR && ! -L $DIR ]]; then
        unlink_config
        say "$DIR does not exist: nothing to stop"
        return 0
    fi
    dir_ok || refuse_dir
    export SLURM_CONF=$DIR/slurm.conf
    if daemon_pid slurmctld >/dev/null; then
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
        # Let the steps end (their processes are killed through their cgroups) before slurmd does.
        for _ in $(seq 30); do
            [[ -z $(squeue -h -t pending,running,suspended,completing,configuring -o %i 2>/dev/null) ]] && break
            sleep 1
        done
        timeout 10 scontrol shutdown >/dev/null 2>&1 || true
    fi
    stop_daemon slurmctld
    stop_daemon slurmd
    stop_daemon munged
    unlink_config
    rm -rf -- "${DIR:?}/dev"
    say "stopped"
}

status() {
    local name pid
    check_path
    if [[ -e $DIR || -L $DIR ]]; then dir_ok || refuse_dir; fi
    export SLURM_CONF=$DIR/slurm.conf
    for name in slurmctld slurmd munged; do
        if pid=$(daemon_pid "$name"); then echo "$name: running (pid $pid)"; else echo "$name: not started by this script"; fi
    done
    if daemon_pid slurmctld >/dev/null; then
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
