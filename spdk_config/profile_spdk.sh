#!/usr/bin/env bash
# Where the cycles of one core go in a bdevperf run: chronicle C0 against raid1 (randwrite) or
# passthru (randread), sampled with perf's cpu-clock event (hardware counters are often missing in
# virtual machines; cpu-clock sampling works everywhere), one core, 4 KiB, QD32, hugepages.
#
#   spdk_config/profile_spdk.sh                      # randwrite: C0 and Raid1, 3 runs each
#   spdk_config/profile_spdk.sh --workload randread  # randread: C0 and Passthru0
#
# Each run: bdevperf -t 12 on core 0 (module preloaded), after 5 s
# `perf record -e cpu-clock -F 4000 -g -p <bdevperf pid> -- sleep 3`, then
# `perf report --no-children --sort dso,symbol` is folded into categories (memmove, crc32c, the
# engine, the module, messages, malloc/free, the SPDK layers, bdevperf, kernel) and converted
# into nanoseconds per I/O with the run's own IOPS (one fully busy core: 1e9 / IOPS ns per I/O).
# Prints each run and the median per category; the perf data stay in the kept directory.
#
# Options: --workload randwrite|randread, --repeat N (default 3), --keep DIR (perf data and
# reports; default: a temporary directory, removed). Environment: SPDK_DIR, CHRONICLE_MODULE
# (see common.sh); PERF (default perf). Needs root or kernel.perf_event_paranoid <= 1, and
# hugepages (as bench_spdk.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKLOAD=randwrite
REPEAT=3
KEEP=
PERF=${PERF:-perf}
while [[ $# -gt 0 ]]; do
    case $1 in
        --workload) WORKLOAD=$2; shift ;;
        --repeat) REPEAT=$2; shift ;;
        --keep) KEEP=$2; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1" ;;
    esac
    shift
done
case $WORKLOAD in
    randwrite) REFERENCE=raid1 ;;
    randread) REFERENCE=passthru ;;
    *) die "--workload: randwrite or randread" ;;
esac
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "--repeat takes a positive integer"
OUT=${KEEP:-$WORK}
mkdir -p "$OUT"

say "Prerequisites"
check_prerequisites
command -v "$PERF" >/dev/null || die "no perf ($PERF; set PERF)"
[[ $(awk '/^HugePages_Free/ { print $2 }' /proc/meminfo) -ge 512 ]] || die "needs 512 free 2 MiB hugepages"

# Before each run: wait_idle (common.sh) waits for no other SPDK application or fio and a quiet
# machine.
ID_BASE=$(($$ % 20000 + 10000))
run=0
for ((rep = 1; rep <= REPEAT; rep++)); do
    for config in chronicle "$REFERENCE"; do
        run=$((run + 1))
        name=$config-$WORKLOAD-$rep
        sock=/tmp/chronicle-profile.$$.$run.sock
        CLEANUP_FILES+=("$sock" "$sock.lock")
        wait_idle
        say "$name: bdevperf -t 12, perf record for 3 s from second 5"
        echo "+ env LD_PRELOAD=$CHRONICLE_MODULE $SPDK_DIR/bin/bdevperf --no-pci -s 1024 -m 0x1 --disable-cpumask-locks -i $((ID_BASE + run)) -r $sock --json $REPO/spdk_config/bdevperf_$config.json -q 32 -o 4096 -w $WORKLOAD -t 12 &" >&2
        env LD_PRELOAD="$CHRONICLE_MODULE" "$SPDK_DIR/bin/bdevperf" --no-pci -s 1024 -m 0x1 --disable-cpumask-locks \
            -i $((ID_BASE + run)) -r "$sock" --json "$REPO/spdk_config/bdevperf_$config.json" \
            -q 32 -o 4096 -w "$WORKLOAD" -t 12 >"$OUT/$name.log" 2>&1 &
        pid=$!
        APP_PIDS+=("$pid")
        sleep 5
        echo "+ $PERF record -e cpu-clock -F 4000 -g -p $pid -o $OUT/$name.data -- sleep 3" >&2
        "$PERF" record -q -e cpu-clock -F 4000 -g -p "$pid" -o "$OUT/$name.data" -- sleep 3 >/dev/null 2>&1 ||
            die "perf record failed (root or kernel.perf_event_paranoid <= 1 needed)"
        wait "$pid" || { cat "$OUT/$name.log" >&2; die "bdevperf failed (log above)"; }
        "$PERF" report -i "$OUT/$name.data" --no-children --sort dso,symbol --stdio -g none --percent-limit 0 \
            >"$OUT/$name.report" 2>/dev/null
        echo "$config $rep $OUT/$name.log $OUT/$name.report" >>"$OUT/runs.txt"
    done
done

say "Self time per category in ns per I/O (share x 1e9 / IOPS outside the perf window), median of $REPEAT runs [min-max]"
python3 - "$OUT/runs.txt" <<'EOF'
import collections, re, statistics, sys

def category(dso, symbol):
    s = symbol
    if re.search(r"memmove|memcpy", s):
        return "memmove (data copies)"
    if "crc32c" in s or "crc_u64" in s:
        return "crc32c of elements"
    if s in ("malloc", "_int_malloc", "_int_free", "cfree@GLIBC_2.2.5", "free", "__libc_malloc", "__libc_free",
             "malloc_consolidate", "_int_free_merge_chunk", "_int_free_create_chunk", "tcache_init", "realloc",
             "_int_realloc", "__rust_alloc", "__rust_dealloc") or s.startswith("_int_free"):
        return "malloc/free"
    if re.match(r"(msg_queue_run_batch|spdk_thread_send_msg|spdk_ring_(en|de)queue|rte_ring|_rte_ring)", s):
        return "messages between threads"
    engine = s.find("chronicle::engine::")
    module = s.find("chronicle::spdk::")
    if engine >= 0 or module >= 0:
        if module < 0 or (0 <= engine < module):
            return "chronicle::engine"
        return "chronicle::spdk (module, device adapter)"
    if "libchronicle" in dso:
        return "chronicle, other (core, std, hashbrown, slab)"
    if "bdev_malloc" in dso:
        return "malloc bdev"
    if "bdev_raid" in dso or "vbdev_passthru" in dso or "passthru" in s:
        return "raid1 / passthru module"
    if "libspdk_accel" in dso:
        return "SPDK accel"
    if "libspdk_bdev.so" in dso:
        return "SPDK bdev layer"
    if "libspdk_thread" in dso or s == "spdk_get_ticks" or "libspdk_event" in dso:
        return "SPDK thread/reactor polling"
    if dso.startswith("bdevperf"):
        return "bdevperf"
    if "kernel" in dso:
        return "kernel"
    return "other (util, env, libc, ld.so)"

def iops_of(log_path):
    """(IOPS outside the perf window, IOPS inside it, Total IOPS) of one bdevperf run. bdevperf
    prints, every second, the average since the start: per-second rates are differences. perf
    records from second 5 to 8 of the 12 s run (about 0.5 s go to start-up before the first
    I/O); the first second (every block written for the first time) is left out too."""
    log = open(log_path).read()
    total = float(re.search(r"^\s*Total\s*:\s*([\d.]+)", log, re.M).group(1))
    avg = [float(x) for x in re.findall(r"([\d.]+) IOPS,", log)]
    per = [avg[0]] + [(i + 1) * avg[i] - i * avg[i - 1] for i in range(1, len(avg))]
    window = [per[i] for i in range(len(per)) if 4 <= i <= 7]
    outside = [per[i] for i in range(len(per)) if 1 <= i <= 3 or i >= 8]
    return statistics.mean(outside), statistics.mean(window), total

runs = collections.defaultdict(list)   # config -> [(iops, {category: share})]
window_iops = collections.defaultdict(list)
for line in open(sys.argv[1]):
    config, rep, log_path, report = line.split()
    iops, in_window, total = iops_of(log_path)
    window_iops[config].append(in_window)
    print("%s run %s: %.0f IOPS outside the perf window, %.0f inside it (perf's cost), %.0f in bdevperf's Total"
          % (config, rep, iops, in_window, total))
    shares = collections.Counter()
    for row in open(report):
        m = re.match(r"^\s+([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*?)\s*(?:-\s+-\s*)?$", row)
        if m:
            shares[category(m.group(2), m.group(3))] += float(m.group(1)) / 100
    runs[config].append((float(iops), shares))

configs = list(runs)
cats = sorted({c for v in runs.values() for _, s in v for c in s},
              key=lambda c: -max(statistics.median([s[c] * 1e9 / i for i, s in runs[k]]) for k in configs))
print()
header = "%-46s" % "category" + "".join("  %-24s" % (k + " ns [range] (share)") for k in configs)
print(header)
totals = {k: [] for k in configs}
for c in cats:
    cells = []
    for k in configs:
        ns = [s[c] * 1e9 / i for i, s in runs[k]]
        share = statistics.median([s[c] for _, s in runs[k]])
        cells.append("  %-24s" % ("%.0f [%.0f-%.0f] (%.1f%%)" % (statistics.median(ns), min(ns), max(ns), share * 100)))
    print("%-46s" % c + "".join(cells))
print("%-46s" % "total = 1e9 / IOPS outside the perf window" + "".join(
    "  %-24s" % ("%.0f" % statistics.median([1e9 / i for i, _ in runs[k]])) for k in configs))
print("%-46s" % "(1e9 / IOPS while perf records)" + "".join(
    "  %-24s" % ("%.0f" % statistics.median([1e9 / i for i in window_iops[k]])) for k in configs))
EOF
[[ -z $KEEP ]] || echo "perf data, reports and logs in $KEEP"
say "OK: profile_spdk.sh finished"
