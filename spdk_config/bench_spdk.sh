#!/usr/bin/env bash
# Benchmarks of the chronicle bdev against SPDK's own bdevs doing comparable work, on one core,
# malloc bases, 4 KiB I/O at queue depth 32 (BENCHMARKS.md, "SPDK module"):
#
#   1. bdevperf randwrite: chronicle C0 (bdevperf_chronicle.json) vs raid1 over two malloc
#      bdevs (bdevperf_raid1.json); both write every block twice
#   2. bdevperf randread: chronicle C0 vs passthru over a malloc bdev (bdevperf_passthru.json)
#   3. the same two comparisons through fio's spdk_bdev plugin (same JSON configs)
#   4. the same over NVMe/TCP on 127.0.0.1: spdk_tgt (core 0, module preloaded) exports the bdev,
#      bdevperf (core 1) attaches with bdev_nvme_attach_controller and runs the workload
#
# Items 1 and 2 run with hugepages (-s 1024) and without (--no-huge -s 2048, what the tests
# use); items 3 and 4 with hugepages. Every measurement is repeated (default 3 times), the
# chronicle run and its reference alternating (order swapped every repetition); the table shows
# the median, the range and the ratio chronicle/reference.
#
#   spdk_config/bench_spdk.sh                  # everything, 10 s per run (about 15 minutes)
#   spdk_config/bench_spdk.sh --quick          # 3 s per run (about 6 minutes)
#
# Options:
#   --quick             3 s runs (fio: 1 s ramp) instead of 10 s (fio: 2 s ramp)
#   --seconds N         N s per run
#   --repeat N          repetitions of every measurement (default 3)
#   --only LIST         comma-separated subset of: bdevperf,fio,nvmf (default all three)
#   --mem LIST          memory modes for the bdevperf items: huge,nohuge (default both)
#   --results FILE      also write every run (tab-separated) to FILE
#
# Before every measurement the script waits until no other SPDK application or fio runs and
# the machine is quiet (other processes below 0.3 cores over a second); every result line says
# how much CPU other processes used while it ran ("other processes", in cores) and the
# hypervisor's steal time; a run during which other processes used more than 0.25 cores is
# measured again (up to 3 attempts; the last one counts).
#
# Environment: SPDK_DIR, CHRONICLE_MODULE (see common.sh); CHRONICLE_BENCH_WAIT (seconds to
# wait for the machine to be free before a measurement, default 600; then another SPDK
# application is an error, mere load is measured through). Needs hugepages for the hugepage
# runs: 2 MiB pages, at least 768 free (1.5 GiB: the NVMe/TCP runs hold a target with -s 1024
# and an initiator with -s 512 at once) and a hugetlbfs mount; fio at $FIO (default: fio in
# PATH) and SPDK's plugin $SPDK_DIR/fio/spdk_bdev.
#
# Every application runs with --disable-cpumask-locks, a unique -i shared memory id, -m 0x1
# (the NVMe/TCP initiator -m 0x2), --no-pci; fio runs under taskset -c 0, which pins fio's job
# thread, but the plugin's own SPDK thread (where the chronicle volume lives, as the app
# thread) calls spdk_unaffinitize_thread() and may run on any core. The module is
# preloaded into every application (also for raid1/passthru, so that every run has the same
# process set-up), except the NVMe/TCP initiator, which does not need it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_SECONDS=10
FIO_RAMP=2
REPEAT=3
ONLY=bdevperf,fio,nvmf
MEM_MODES=huge,nohuge
RESULTS_FILE=
FIO=${FIO:-fio}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) RUN_SECONDS=3; FIO_RAMP=1 ;;
        --seconds) RUN_SECONDS=$2; shift ;;
        --repeat) REPEAT=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --mem) MEM_MODES=$2; shift ;;
        --results) RESULTS_FILE=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done
[[ $RUN_SECONDS =~ ^[1-9][0-9]*$ && $REPEAT =~ ^[1-9][0-9]*$ ]] || die "--seconds and --repeat take positive integers"
wants() { [[ ,$1, == *,$2,* ]]; }
for item in ${ONLY//,/ }; do
    [[ $item =~ ^(bdevperf|fio|nvmf)$ ]] || die "--only: unknown item $item (bdevperf, fio, nvmf)"
done
for mode in ${MEM_MODES//,/ }; do
    [[ $mode =~ ^(huge|nohuge)$ ]] || die "--mem: unknown mode $mode (huge, nohuge)"
done

CONFIG_DIR=$REPO/spdk_config
RESULTS=$WORK/results.tsv
ID_BASE=$(($$ % 20000 + 30000))
RUN_NO=0
NQN=nqn.2016-06.io.spdk:chronicle-bench

# mem_args MODE: the memory options of a single-core application.
mem_args() {
    case $1 in
        huge) echo "--no-pci -s 1024" ;;
        nohuge) echo "--no-pci --no-huge -s 2048" ;;
    esac
}

# CPU accounting, to see whether anything else ran during a measurement: the machine's user,
# nice and system time (/proc/stat) minus the time of our own processes (those this script
# waited for: cutime/cstime of the script; for the NVMe/TCP target, which started before the
# window, minus what it had used by then). OTHER is in cores (0 = nothing else ran), STEAL is
# the hypervisor's steal time, also in cores (machine_ticks is in common.sh).
# proc_ticks PID FIELD: utime+stime (FIELD 14) or cutime+cstime (FIELD 16) of a live process.
proc_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk -v f="$2" '{ print $(f - 2) + $(f - 1) }'; }

# window_begin [PID...]: starts a CPU accounting window; PIDs are our processes already running.
window_begin() {
    local pid
    W_PRE=0
    for pid in "$@"; do W_PRE=$((W_PRE + $(proc_ticks "$pid" 14))); done
    read -r W_BUSY W_STEAL < <(machine_ticks)
    W_CHILDREN=$(proc_ticks $$ 16)
    W_T0=$(date +%s.%N)
}

# window_end: sets OTHER and STEAL (cores, averaged over the window).
window_end() {
    local busy steal children
    read -r busy steal < <(machine_ticks)
    children=$(proc_ticks $$ 16)
    read -r OTHER STEAL < <(python3 -c '
import os, sys
busy, w_busy, steal, w_steal, children, w_children, pre, t0 = map(float, sys.argv[1:9])
hz, elapsed = os.sysconf("SC_CLK_TCK"), float(sys.argv[9]) - t0
ours = children - w_children - pre
print("%.2f %.2f" % (max(0.0, (busy - w_busy - ours) / hz / elapsed), (steal - w_steal) / hz / elapsed))' \
        "$busy" "$W_BUSY" "$steal" "$W_STEAL" "$children" "$W_CHILDREN" "$W_PRE" "$W_T0" "$(date +%s.%N)")
}

# measure COMMAND...: runs one measurement in the background (so that the cleanup trap can
# kill it) and accounts the CPU time of everything else meanwhile (OTHER, STEAL).
measure() {
    local status=0
    echo "+ $*" >&2
    window_begin
    "$@" &
    local pid=$!
    APP_PIDS+=("$pid")
    wait "$pid" || status=$?
    window_end
    return "$status"
}

# bdevperf_total LOG: "IOPS average-latency-us" from bdevperf's Total line.
bdevperf_total() {
    python3 - "$1" <<'EOF'
import re, sys
log = open(sys.argv[1]).read()
m = re.search(r"^\s*Total\s*:\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", log, re.M)
if not m or float(m.group(3)) != 0:
    sys.exit("no clean Total line in " + sys.argv[1])
print(m.group(1), m.group(5))
EOF
}

# record PATH MEM WORKLOAD BDEV REP "IOPS LATENCY": one result line (with OTHER and STEAL).
record() {
    local iops lat
    read -r iops lat <<<"$6"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$iops" "$lat" "$OTHER" "$STEAL" >>"$RESULTS"
    printf '  %-9s %-7s %-10s %-10s rep %s: %10.0f IOPS  %8.2f us  (other processes %s cores, steal %s)\n' \
        "$1" "$2" "$3" "$4" "$5" "$iops" "$lat" "$OTHER" "$STEAL"
}

# Which config holds which bdev, and what it is compared with.
config_of() {
    case $1 in
        C0) echo "$CONFIG_DIR/bdevperf_chronicle.json" ;;
        Raid1) echo "$CONFIG_DIR/bdevperf_raid1.json" ;;
        Passthru0) echo "$CONFIG_DIR/bdevperf_passthru.json" ;;
    esac
}
reference_of() {
    case $1 in
        randwrite) echo Raid1 ;;
        randread) echo Passthru0 ;;
    esac
}

# The pair of bdevs of a repetition, alternating which one runs first.
pair_order() {
    local workload=$1 rep=$2
    if ((rep % 2)); then echo "C0 $(reference_of "$workload")"; else echo "$(reference_of "$workload") C0"; fi
}

# next_id: a new shared memory id in ID (unique within this run of the script).
next_id() {
    RUN_NO=$((RUN_NO + 1))
    ID=$((ID_BASE + RUN_NO))
}

# attempt PATH MEM WORKLOAD BDEV REP FUNCTION ARGS...: runs one measurement (FUNCTION sets
# RESULT, OTHER, STEAL) and records it; measures again, up to ATTEMPTS times in all, when other
# processes used more than DISTURBED cores meanwhile (builds and tests of other people on a
# shared machine), keeping the last attempt.
ATTEMPTS=3
DISTURBED=0.25
attempt() {
    local path=$1 mem=$2 workload=$3 bdev=$4 rep=$5 try
    shift 5
    for ((try = 1; ; try++)); do
        "$@"
        if ((try < ATTEMPTS)) && awk -v o="$OTHER" -v m="$DISTURBED" 'BEGIN { exit !(o > m) }'; then
            printf '  %-9s %-7s %-10s %-10s rep %s: disturbed (other processes used %s cores): measuring again\n' \
                "$path" "$mem" "$workload" "$bdev" "$rep" "$OTHER"
            continue
        fi
        break
    done
    record "$path" "$mem" "$workload" "$bdev" "$rep" "$RESULT"
}

# --- item 1 and 2: bdevperf, one core ---------------------------------------------------------

run_bdevperf() {
    local mem=$1 workload=$2 bdev=$3 rep=$4 id log
    next_id
    id=$ID
    log=$WORK/bdevperf-$mem-$workload-$bdev-$rep.log
    wait_idle
    # shellcheck disable=SC2046
    measure timeout -k 10 $((RUN_SECONDS + 120)) env LD_PRELOAD="$CHRONICLE_MODULE" \
        "$SPDK_DIR/bin/bdevperf" $(mem_args "$mem") -m 0x1 --disable-cpumask-locks -i "$id" \
        -r "/tmp/chronicle-bench.$$.$id.sock" --json "$(config_of "$bdev")" \
        -q 32 -o 4096 -w "$workload" -t "$RUN_SECONDS" >"$log" 2>&1 ||
        { cat "$log" >&2; die "bdevperf failed (log above)"; }
    CLEANUP_FILES+=("/tmp/chronicle-bench.$$.$id.sock" "/tmp/chronicle-bench.$$.$id.sock.lock")
    grep -q "Job: $bdev " "$log" || { cat "$log" >&2; die "bdevperf did not run on $bdev (log above)"; }
    RESULT=$(bdevperf_total "$log") || { cat "$log" >&2; die "no result (log above)"; }
}

# --- item 3: fio's spdk_bdev plugin -----------------------------------------------------------

run_fio() {
    local workload=$1 bdev=$2 rep=$3 job out log
    job=$WORK/fio-$workload-$bdev.fio
    out=$WORK/fio-$workload-$bdev-$rep.json
    log=$WORK/fio-$workload-$bdev-$rep.log
    cat >"$job" <<EOF
[global]
ioengine=spdk_bdev
spdk_json_conf=$(config_of "$bdev")
env_context=--no-pci
spdk_mem=1024
thread=1
direct=1
time_based=1
ramp_time=$FIO_RAMP
runtime=$RUN_SECONDS
norandommap=1

[$workload-$bdev]
filename=$bdev
rw=$workload
bs=4k
iodepth=32
EOF
    wait_idle
    measure timeout -k 10 $((RUN_SECONDS + 120)) taskset -c 0 env LD_PRELOAD="$SPDK_DIR/fio/spdk_bdev $CHRONICLE_MODULE" \
        "$FIO" --output-format=json --output="$out" "$job" >"$log" 2>&1 ||
        { cat "$log" >&2; die "fio failed (log above)"; }
    RESULT=$(python3 - "$out" "$workload" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
side = job["write" if sys.argv[2] == "randwrite" else "read"]
if job["error"] or side["iops"] <= 0:
    sys.exit("fio reported error %s, %s IOPS" % (job["error"], side["iops"]))
print(side["iops"], side["lat_ns"]["mean"] / 1000)
EOF
    ) || { cat "$log" >&2; die "no result from fio (log above)"; }
}

# --- item 4: NVMe/TCP on 127.0.0.1 ------------------------------------------------------------

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

run_nvmf() {
    local workload=$1 bdev=$2 rep=$3 id port tgt_sock tgt_log perf_log attach
    next_id
    id=$ID
    port=$(free_port)
    tgt_sock=/tmp/chronicle-bench-tgt.$$.$id.sock
    tgt_log=$WORK/nvmf-tgt-$workload-$bdev-$rep.log
    perf_log=$WORK/nvmf-bdevperf-$workload-$bdev-$rep.log
    attach=$WORK/nvmf-attach-$id.json
    CLEANUP_FILES+=("$tgt_sock" "$tgt_sock.lock" "/tmp/chronicle-bench-ini.$$.$id.sock" "/tmp/chronicle-bench-ini.$$.$id.sock.lock")
    wait_idle
    start_app spdk_tgt "$tgt_log" "$tgt_sock" \
        env LD_PRELOAD="$CHRONICLE_MODULE" "$SPDK_DIR/bin/spdk_tgt" --no-pci -s 1024 -m 0x1 --disable-cpumask-locks \
        -i "$id" -r "$tgt_sock" --json "$(config_of "$bdev")" >/dev/null
    local tgt_pid=$APP_PID
    [[ $bdev != C0 ]] || require_module "$tgt_sock" >/dev/null
    {
        rpc_quiet "$tgt_sock" framework_wait_init
        rpc_quiet "$tgt_sock" bdev_wait_for_examine
        rpc_quiet "$tgt_sock" nvmf_create_transport -t TCP
        rpc_quiet "$tgt_sock" nvmf_create_subsystem "$NQN" -a -s SPDK00000000000001 -d "bench_$bdev"
        rpc_quiet "$tgt_sock" nvmf_subsystem_add_ns "$NQN" "$bdev"
        rpc_quiet "$tgt_sock" nvmf_subsystem_add_listener "$NQN" -t tcp -f ipv4 -a 127.0.0.1 -s "$port"
    } >/dev/null || die "exporting $bdev over NVMe/TCP failed (target log: $tgt_log)"
    cat >"$attach" <<EOF
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_nvme_attach_controller",
   "params": {"name": "Nvme0", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
              "trsvcid": "$port", "subnqn": "$NQN"}},
  {"method": "bdev_wait_for_examine"}]}]}
EOF
    local status=0 initiator=(timeout -k 10 $((RUN_SECONDS + 120)) "$SPDK_DIR/bin/bdevperf" --no-pci -s 512 -m 0x2
        --disable-cpumask-locks -i $((id + 10000)) -r "/tmp/chronicle-bench-ini.$$.$id.sock" --json "$attach"
        -q 32 -o 4096 -w "$workload" -t "$RUN_SECONDS")
    echo "+ ${initiator[*]}" >&2
    # The accounting window covers the initiator's run and the target's stop (its CPU time is
    # counted once it has exited).
    window_begin "$tgt_pid"
    "${initiator[@]}" >"$perf_log" 2>&1 &
    local pid=$!
    APP_PIDS+=("$pid")
    wait "$pid" || status=$?
    [[ $status -eq 0 ]] || { cat "$perf_log" >&2; die "bdevperf over NVMe/TCP failed (log above)"; }
    RESULT=$(bdevperf_total "$perf_log") || { cat "$perf_log" >&2; die "no result (log above)"; }
    stop_app "$tgt_sock" "$tgt_pid" spdk_tgt >/dev/null || die "spdk_tgt exited with an error (log: $tgt_log)"
    window_end
    [[ -z $(errors_in "$tgt_log") ]] || die "spdk_tgt logged errors: $(errors_in "$tgt_log")"
}

# --- checks -----------------------------------------------------------------------------------

say "Prerequisites"
check_prerequisites
[[ -x $SPDK_DIR/bin/bdevperf ]] || die "$SPDK_DIR/bin/bdevperf missing"
for bdev in C0 Raid1 Passthru0; do [[ -f $(config_of $bdev) ]] || die "$(config_of $bdev) missing"; done
needs_huge=false
if wants "$ONLY" fio || wants "$ONLY" nvmf || { wants "$ONLY" bdevperf && wants "$MEM_MODES" huge; }; then
    needs_huge=true
fi
if $needs_huge; then
    free_pages=$(awk '/^HugePages_Free/ { print $2 }' /proc/meminfo)
    page_kb=$(awk '/^Hugepagesize/ { print $2 }' /proc/meminfo)
    [[ $page_kb == 2048 && $free_pages -ge 768 ]] ||
        die "hugepage runs need at least 768 free 2 MiB hugepages, found $free_pages of $page_kb kB
  (as root: echo 1024 > /proc/sys/vm/nr_hugepages; mount -t hugetlbfs nodev /dev/hugepages),
  or run only the runs without hugepages: --only bdevperf --mem nohuge"
    grep -q hugetlbfs /proc/mounts || die "no hugetlbfs mounted (as root: mount -t hugetlbfs nodev /dev/hugepages)"
    echo "hugepages: $free_pages free of $(awk '/^HugePages_Total/ { print $2 }' /proc/meminfo) (2 MiB)"
fi
if wants "$ONLY" fio; then
    command -v "$FIO" >/dev/null || die "no fio ($FIO; set FIO)"
    [[ -f $SPDK_DIR/fio/spdk_bdev ]] || die "no fio plugin at $SPDK_DIR/fio/spdk_bdev"
    command -v taskset >/dev/null || die "taskset missing (util-linux)"
    echo "fio:    $("$FIO" --version)"
fi
echo "machine: $(nproc) cores, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo); load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "runs:   $RUN_SECONDS s each, $REPEAT repetitions; items: $ONLY; bdevperf memory: $MEM_MODES"

say "The module has the chronicle RPCs (spdk_tgt with the module preloaded)"
wait_idle
next_id
CHECK_SOCK=/tmp/chronicle-bench-check.$$.sock
CLEANUP_FILES+=("$CHECK_SOCK" "$CHECK_SOCK.lock")
start_app spdk_tgt "$WORK/check.log" "$CHECK_SOCK" \
    env LD_PRELOAD="$CHRONICLE_MODULE" "$SPDK_DIR/bin/spdk_tgt" --no-pci --no-huge -s 1024 -m 0x1 \
    --disable-cpumask-locks -i "$ID" -r "$CHECK_SOCK"
require_module "$CHECK_SOCK"
stop_app "$CHECK_SOCK" "$APP_PID" spdk_tgt

# --- the runs ---------------------------------------------------------------------------------

: >"$RESULTS"
if wants "$ONLY" bdevperf; then
    for mem in ${MEM_MODES//,/ }; do
        for workload in randwrite randread; do
            say "bdevperf $workload, $mem ($(mem_args "$mem")), 4 KiB QD32 ${RUN_SECONDS} s, core 0"
            for ((rep = 1; rep <= REPEAT; rep++)); do
                for bdev in $(pair_order "$workload" "$rep"); do
                    attempt bdevperf "$mem" "$workload" "$bdev" "$rep" run_bdevperf "$mem" "$workload" "$bdev" "$rep"
                done
            done
        done
    done
fi
if wants "$ONLY" fio; then
    for workload in randwrite randread; do
        say "fio spdk_bdev $workload, hugepages (spdk_mem=1024), 4 KiB iodepth 32, ${RUN_SECONDS} s (+${FIO_RAMP} s ramp), taskset -c 0"
        for ((rep = 1; rep <= REPEAT; rep++)); do
            for bdev in $(pair_order "$workload" "$rep"); do
                attempt fio huge "$workload" "$bdev" "$rep" run_fio "$workload" "$bdev" "$rep"
            done
        done
    done
fi
if wants "$ONLY" nvmf; then
    for workload in randwrite randread; do
        say "NVMe/TCP $workload: spdk_tgt -s 1024 on core 0 exports the bdev, bdevperf -s 512 on core 1, 4 KiB QD32 ${RUN_SECONDS} s"
        for ((rep = 1; rep <= REPEAT; rep++)); do
            for bdev in $(pair_order "$workload" "$rep"); do
                attempt nvmf-tcp huge "$workload" "$bdev" "$rep" run_nvmf "$workload" "$bdev" "$rep"
            done
        done
    done
fi

[[ -z $RESULTS_FILE ]] || cp "$RESULTS" "$RESULTS_FILE"

say "Results: median [min-max] of $REPEAT runs of $RUN_SECONDS s; ratio = chronicle / reference (median of the per-repetition ratios [min-max])"
python3 - "$RESULTS" <<'EOF'
import collections, statistics, sys
runs = collections.defaultdict(dict)
other, steal = [], []
for line in open(sys.argv[1]):
    path, mem, workload, bdev, rep, iops, lat, other_cores, steal_cores = line.split()
    runs[(path, mem, workload)][(bdev, int(rep))] = (float(iops), float(lat))
    other.append(float(other_cores))
    steal.append(float(steal_cores))
target = {"randwrite": (0.8, "0.8 (goal 1.0)"), "randread": (0.9, "0.9 (goal 0.95)")}
rows = [("path", "memory", "workload", "chronicle IOPS", "reference", "reference IOPS", "chronicle lat",
         "reference lat", "ratio", "target")]
for (path, mem, workload), by in runs.items():
    ref = "Raid1" if workload == "randwrite" else "Passthru0"
    reps = sorted({rep for (_, rep) in by})
    def col(bdev, i, fmt):
        values = [by[(bdev, r)][i] for r in reps if (bdev, r) in by]
        return (fmt + " [" + fmt + "-" + fmt + "]") % (statistics.median(values), min(values), max(values))
    ratios = [by[("C0", r)][0] / by[(ref, r)][0] for r in reps if ("C0", r) in by and (ref, r) in by]
    ratio = statistics.median(ratios)
    minimum, text = target[workload]
    rows.append((path, mem, workload, col("C0", 0, "%.0f"), ref, col(ref, 0, "%.0f"), col("C0", 1, "%.1f"),
                 col(ref, 1, "%.1f"), "%.2f [%.2f-%.2f]" % (ratio, min(ratios), max(ratios)),
                 ">= %s: %s" % (text, "met" if ratio >= minimum else "NOT met")))
widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
for row in rows:
    print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
print("\nIOPS and average latency in us (bdevperf's Total line, fio's lat mean).")
print("CPU used by other processes during the runs: %.2f-%.2f cores (median %.2f); steal %.2f-%.2f cores"
      % (min(other), max(other), statistics.median(other), min(steal), max(steal)))
EOF

say "OK: bench_spdk.sh finished"
