#!/usr/bin/env bash
# Instructions per host write in bdevperf, counted by callgrind: the same for every run of the
# same code (unlike time on a shared machine, where the write path's IOPS move ±10 % between
# runs), so an A/B of two builds of the module resolves changes of a few per cent. On this
# path the IOPS ratio follows the instruction ratio closely (0.72 both, session "instructions"
# in BENCHMARKS.md); cache misses are not counted (profile_spdk.sh shows time).
#
#   spdk_config/count_spdk.sh                       # chronicle C0, randwrite, 30 s
#   spdk_config/count_spdk.sh --config raid1        # the reference, same counts
#   CHRONICLE_MODULE=/tmp/old.so spdk_config/count_spdk.sh --keep /tmp/old
#
# One bdevperf run (one core, 4 KiB, QD32, no hugepages: valgrind cannot map them) under
# `valgrind --tool=callgrind`, about 50x slower than native: 30 s give about 500,000 writes,
# enough that start-up (the malloc bdevs' memset, the format) is a small share. Prints
# instructions per I/O by group (chronicle, its crc32c, SPDK, libc malloc/free, memcpy) and
# chronicle's 40 largest functions (self cost).
#
# Options: --config chronicle|raid1|passthru (spdk_config/bdevperf_CONFIG.json), --workload
# randwrite|randread, --seconds N (default 30), --keep DIR (callgrind output and the bdevperf
# log). Environment: SPDK_DIR, CHRONICLE_MODULE (see common.sh). Needs valgrind.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=chronicle
WORKLOAD=randwrite
SECONDS_RUN=30
KEEP=
while [[ $# -gt 0 ]]; do
    case $1 in
        --config) CONFIG=$2; shift ;;
        --workload) WORKLOAD=$2; shift ;;
        --seconds) SECONDS_RUN=$2; shift ;;
        --keep) KEEP=$2; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1" ;;
    esac
    shift
done
[[ -f $REPO/spdk_config/bdevperf_$CONFIG.json ]] || die "--config: no spdk_config/bdevperf_$CONFIG.json"
[[ $WORKLOAD =~ ^(randwrite|randread)$ ]] || die "--workload: randwrite or randread"
[[ $SECONDS_RUN =~ ^[1-9][0-9]*$ ]] || die "--seconds takes a positive integer"
command -v valgrind >/dev/null || die "no valgrind (apt-get install valgrind)"
command -v callgrind_annotate >/dev/null || die "no callgrind_annotate (part of valgrind)"
OUT=${KEEP:-$WORK}
mkdir -p "$OUT"

say "Prerequisites"
check_prerequisites

say "bdevperf $WORKLOAD on $CONFIG under callgrind, $SECONDS_RUN s"
sock=$WORK/count.sock
CLEANUP_FILES+=("$sock" "$sock.lock")
# --trace-children: `env` runs bdevperf with the module preloaded; its child is counted.
valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$OUT/callgrind.%p" \
    env LD_PRELOAD="$CHRONICLE_MODULE" "$SPDK_DIR/bin/bdevperf" --no-pci --no-huge -s 2048 -m 0x1 \
    --disable-cpumask-locks -i $(($$ % 20000 + 30000)) -r "$sock" \
    --json "$REPO/spdk_config/bdevperf_$CONFIG.json" -q 32 -o 4096 -w "$WORKLOAD" -t "$SECONDS_RUN" \
    >"$OUT/bdevperf.log" 2>&1 || { cat "$OUT/bdevperf.log" >&2; die "bdevperf under valgrind failed (log above)"; }
# The largest output is bdevperf's (env's is tiny).
data=$(ls -S "$OUT"/callgrind.* | head -1)
# bdevperf rewrites its progress line with \r: the last "Total" line has the run's IOPS.
ios=$(tr '\r' '\n' <"$OUT/bdevperf.log" | awk -v s="$SECONDS_RUN" '$1 == "Total" && $2 == ":" { n = $3 * s } END { printf "%d", n }')
[[ $ios -gt 0 ]] || die "no Total line in $OUT/bdevperf.log"
callgrind_annotate --threshold=100 "$data" >"$OUT/functions.txt" 2>/dev/null

say "Instructions per I/O ($ios I/Os)"
python3 - "$OUT/functions.txt" "$ios" <<'EOF'
import collections, re, sys

ios = int(sys.argv[2])
groups = collections.Counter()
chronicle = []
for line in open(sys.argv[1]):
    m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*?):(.*) \[(.*)\]$", line)
    if not m:
        continue
    count, source, function, dso = int(m.group(1).replace(",", "")), m.group(2), m.group(3), m.group(4)
    if "libchronicle" in dso:
        group = "chronicle crc32c" if "crc32c" in function or "crc32c" in source else "chronicle"
        if group == "chronicle":
            chronicle.append((count, function))
    elif "libspdk" in dso:
        group = "SPDK (bdev, accel, thread, malloc/raid bdevs)"
    elif "/malloc/" in source:
        group = "libc malloc/free"
    elif "memmove" in source or "memcpy" in function:
        group = "memcpy (data copies and moves)"
    else:
        continue
    groups[group] += count
for group in ("chronicle", "chronicle crc32c", "SPDK (bdev, accel, thread, malloc/raid bdevs)",
              "libc malloc/free", "memcpy (data copies and moves)"):
    print(f"{groups[group] / ios:9.1f}  {group}")
if chronicle:
    print("\nchronicle's largest functions (self instructions per I/O):")
    for count, function in sorted(chronicle, reverse=True)[:40]:
        print(f"{count / ios:9.1f}  {function[:110]}")
EOF
[[ -n $KEEP ]] && echo && echo "callgrind data, function list and bdevperf log in $KEEP"
say "OK: count_spdk.sh finished"
