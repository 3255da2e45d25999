# shellcheck shell=bash
# Shared by run_one_node.sh and run_nvmf_tcp.sh (sourced, not run): where SPDK and the module
# are, starting an SPDK application with the module preloaded, calling RPCs, cleaning up.
#
#   SPDK_DIR            installed SPDK (default /opt/spdk): bin/spdk_tgt, bin/bdevperf, scripts/rpc.py
#   CHRONICLE_MODULE    the module (default: target/release/libchronicle.so of this repository,
#                       built with `cargo build --release --features spdk --lib`)
#   CHRONICLE_SPDK_MEM  MiB of memory per application (default 2048; no hugepages are used)
#
# Applications run with --no-pci --no-huge (nothing on the machine is touched but memory and
# 127.0.0.1) and --disable-cpumask-locks (another SPDK application on the same core would
# otherwise make start-up fail; a 2-core machine has only cores 0 and 1 to give).

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SPDK_DIR=${SPDK_DIR:-/opt/spdk}
CHRONICLE_MODULE=${CHRONICLE_MODULE:-$REPO/target/release/libchronicle.so}
CHRONICLE_SPDK_MEM=${CHRONICLE_SPDK_MEM:-2048}
RPC_PY=$SPDK_DIR/scripts/rpc.py
export PYTHONPATH=$REPO/spdk_config${PYTHONPATH:+:$PYTHONPATH}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/chronicle-example.XXXXXX")
APP_PIDS=()

say() { printf '\n==> %s\n' "$*"; }
die() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

check_prerequisites() {
    [[ -x $SPDK_DIR/bin/spdk_tgt ]] || die "no SPDK at $SPDK_DIR (set SPDK_DIR): $SPDK_DIR/bin/spdk_tgt missing"
    [[ -f $RPC_PY ]] || die "$RPC_PY missing"
    [[ -f $CHRONICLE_MODULE ]] || die "no module at $CHRONICLE_MODULE: build it with 'cargo build --release --features spdk --lib' or set CHRONICLE_MODULE"
    echo "SPDK:   $SPDK_DIR ($("$SPDK_DIR/bin/spdk_tgt" --version 2>/dev/null | tail -1))"
    echo "module: $CHRONICLE_MODULE"
    echo "work:   $WORK"
}

# rpc SOCKET METHOD [ARGS...]: rpc.py with the chronicle plugin, echoed first.
rpc() {
    local socket=$1
    shift
    echo "+ rpc.py -s $socket $*" >&2
    "$RPC_PY" -s "$socket" --plugin chronicle_rpc "$@"
}

# rpc_quiet SOCKET METHOD [ARGS...]: the same, not echoed.
rpc_quiet() {
    local socket=$1
    shift
    "$RPC_PY" -s "$socket" --plugin chronicle_rpc "$@"
}

# start_app NAME LOG SOCKET COMMAND...: starts an SPDK application in the background (its
# output to LOG) and waits until its RPC socket answers. Sets APP_PID.
start_app() {
    local name=$1 log=$2 socket=$3
    shift 3
    echo "+ $*  >$log 2>&1 &" >&2
    "$@" >"$log" 2>&1 &
    APP_PID=$!
    APP_PIDS+=("$APP_PID")
    local i
    for ((i = 0; i < 300; i++)); do
        if ! kill -0 "$APP_PID" 2>/dev/null; then
            cat "$log" >&2
            die "$name exited during start-up (log above)"
        fi
        if [[ -S $socket ]] && "$RPC_PY" -s "$socket" -t 1 spdk_get_version >/dev/null 2>&1; then
            echo "$name is up (pid $APP_PID, socket $socket)"
            return 0
        fi
        sleep 0.1
    done
    cat "$log" >&2
    die "$name did not answer on $socket within 30 s"
}

# stop_app SOCKET PID NAME: SIGTERM through RPC, wait for the exit status.
stop_app() {
    local socket=$1 pid=$2 name=$3
    kill -0 "$pid" 2>/dev/null || return 0
    "$RPC_PY" -s "$socket" -t 5 spdk_kill_instance SIGTERM >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    local status=0
    wait "$pid" || status=$?
    echo "$name (pid $pid) stopped, exit status $status"
    return "$status"
}

# Cleanup on any exit: every application still running is killed (by its pid), the socket
# and scratch files removed. The logs are kept when the script failed.
cleanup() {
    local status=$?
    local pid
    for pid in "${APP_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    if [[ $status -ne 0 ]]; then
        echo "exit status $status; logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    rm -f "${CLEANUP_FILES[@]}"
}
CLEANUP_FILES=()
trap cleanup EXIT
# A signal ends the script through exit, so that the EXIT trap cleans up.
trap 'exit 130' INT
trap 'exit 143' TERM

# require_module SOCKET: the module must be in the application (a libchronicle.so built
# without --features spdk loads silently and registers nothing).
require_module() {
    local version
    version=$(rpc_quiet "$1" bdev_chronicle_get_version 2>/dev/null) ||
        die "the application has no bdev_chronicle_* methods: is $CHRONICLE_MODULE built with --features spdk?"
    echo "chronicle module: $(echo "$version" | tr -d '\n ' )"
}

# errors_in LOG: the *ERROR* lines of an application log.
errors_in() {
    grep -F '*ERROR*' "$1" || true
}

# --- Waiting for a quiet machine before a measurement (bench_spdk.sh, profile_spdk.sh) ---
WAIT_MAX=${CHRONICLE_BENCH_WAIT:-600}
# The machine's user + nice + system ticks and its steal ticks (/proc/stat).
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4, $9; exit }' /proc/stat; }

# busy_over_a_second: percent of a core the machine's processes used over the next second.
busy_over_a_second() {
    local b0 b1 steal
    read -r b0 steal < <(machine_ticks)
    sleep 1
    read -r b1 steal < <(machine_ticks)
    echo $(((b1 - b0) * 100 / $(getconf CLK_TCK)))
}

# Another SPDK application or fio on the machine (not ours: ours are all gone between runs).
foreign_apps() { pgrep -af '^([^ ]*/)?(spdk_tgt|bdevperf|fio|spdk_dd|nvmf_tgt)( |$)' || true; }

# wait_idle: before a measurement, waits until no other SPDK application or fio runs (up to
# WAIT_MAX s, then fails) and until other processes use less than 0.3 cores over a second (up
# to WAIT_MAX s, then measures anyway: the OTHER column shows it).
wait_idle() {
    local waited=0 apps busy
    while apps=$(foreign_apps) && [[ -n $apps ]]; do
        if ((waited % 30 == 0)); then
            printf 'waiting for other SPDK applications or fio to finish (%d s so far):\n%s\n' "$waited" "$apps" >&2
        fi
        ((waited < WAIT_MAX)) || die "other SPDK applications or fio still run after $WAIT_MAX s"
        sleep 1
        waited=$((waited + 1))
    done
    waited=0
    while busy=$(busy_over_a_second) && ((busy >= 30)); do
        if ((waited % 30 == 0)); then
            printf 'waiting for the machine to be quiet: other processes use %d%% of a core (%d s so far)\n' "$busy" "$waited" >&2
            # `head` closes the pipe early: under pipefail the SIGPIPE of ps or awk (status 141)
            # would end the calling script.
            ps -eo pcpu,args --sort=-pcpu | awk 'NR > 1 && $2 != "ps"' | head -2 | cut -c1-120 >&2 || true
        fi
        if ((waited >= WAIT_MAX)); then
            echo "still busy after $WAIT_MAX s; measuring anyway" >&2
            break
        fi
        waited=$((waited + 1))
    done
}
