#!/usr/bin/env bash
# The chronicle bdev exported over NVMe/TCP on 127.0.0.1 and driven by a second SPDK app:
#
#   spdk_tgt (core 0, module preloaded): malloc bdevs → chronicle bdev C0 → TCP transport,
#       subsystem, namespace C0, listener on 127.0.0.1:PORT
#   bdevperf (core 1, no module needed): bdev_nvme_attach_controller to 127.0.0.1:PORT → the
#       namespace as bdev Nvme0n1 → verify workload (write, read back, compare)
#   meanwhile markers on the target cut generations under load; then the bdevperf result,
#   the generations and the volume's status.
#
#   spdk_config/run_nvmf_tcp.sh
#
# Environment: SPDK_DIR, CHRONICLE_MODULE, CHRONICLE_SPDK_MEM (see common.sh);
# CHRONICLE_NVMF_PORT (default: a free port), CHRONICLE_BDEVPERF_SECONDS (default 10),
# CHRONICLE_MARKERS (default 4: one about every second while bdevperf runs; fewer if it ends first).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SECONDS_RUN=${CHRONICLE_BDEVPERF_SECONDS:-10}
MARKERS=${CHRONICLE_MARKERS:-4}
PORT=${CHRONICLE_NVMF_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
NQN=nqn.2016-06.io.spdk:chronicle0
TGT_SOCK=/tmp/chronicle-nvmf-tgt.$$.sock
PERF_SOCK=/tmp/chronicle-nvmf-perf.$$.sock
CLEANUP_FILES+=("$TGT_SOCK" "$TGT_SOCK.lock" "$PERF_SOCK" "$PERF_SOCK.lock")
TGT_LOG=$WORK/spdk_tgt.log
PERF_LOG=$WORK/bdevperf.log
[[ $MARKERS -lt $SECONDS_RUN ]] || die "CHRONICLE_MARKERS ($MARKERS) must be fewer than CHRONICLE_BDEVPERF_SECONDS ($SECONDS_RUN)"

say "Prerequisites"
check_prerequisites
[[ -x $SPDK_DIR/bin/bdevperf ]] || die "$SPDK_DIR/bin/bdevperf missing"

say "Target: spdk_tgt on core 0 with the chronicle module"
start_app spdk_tgt "$TGT_LOG" "$TGT_SOCK" \
    env LD_PRELOAD="$CHRONICLE_MODULE" "$SPDK_DIR/bin/spdk_tgt" --no-pci --no-huge -s "$CHRONICLE_SPDK_MEM" \
    -m 0x1 --disable-cpumask-locks -i $(($$ % 60000 + 1000)) -r "$TGT_SOCK"
TGT_PID=$APP_PID
require_module "$TGT_SOCK"

# Sizes: every generation can cover the whole volume (bdevperf's verify sweeps it in about a
# second), so the journal holds three volumes' worth of elements (the open generation and the
# sealed ones the sort has not reached) and the history six (each sorted generation saves the
# blocks it overwrites there, and nothing is deleted yet).
say "Chronicle bdev C0 over four malloc bdevs (32 MiB volume, 96 MiB journal, 192 MiB history)"
rpc "$TGT_SOCK" bdev_malloc_create -b Base0 32 4096
rpc "$TGT_SOCK" bdev_malloc_create -b Journal0 96 4096
rpc "$TGT_SOCK" bdev_malloc_create -b Backup0 32 4096
rpc "$TGT_SOCK" bdev_malloc_create -b History0 192 4096
rpc "$TGT_SOCK" bdev_chronicle_create -b C0 --base-bdev Base0 --journal-bdev Journal0 \
    --backup-bdev Backup0 --history-bdev History0 --no-copy-base-to-backup

say "NVMe/TCP export of C0 on 127.0.0.1:$PORT"
rpc "$TGT_SOCK" nvmf_create_transport -t TCP
rpc "$TGT_SOCK" nvmf_create_subsystem "$NQN" -a -s SPDK00000000000001 -d chronicle_C0
rpc "$TGT_SOCK" nvmf_subsystem_add_ns "$NQN" C0
rpc "$TGT_SOCK" nvmf_subsystem_add_listener "$NQN" -t tcp -f ipv4 -a 127.0.0.1 -s "$PORT"

say "Initiator: bdevperf on core 1, verify workload for $SECONDS_RUN s over NVMe/TCP"
cat >"$WORK/bdevperf.json" <<EOF
{
  "subsystems": [
    {
      "subsystem": "bdev",
      "config": [
        {
          "method": "bdev_nvme_attach_controller",
          "params": {
            "name": "Nvme0",
            "trtype": "tcp",
            "adrfam": "ipv4",
            "traddr": "127.0.0.1",
            "trsvcid": "$PORT",
            "subnqn": "$NQN"
          }
        },
        { "method": "bdev_wait_for_examine" }
      ]
    }
  ]
}
EOF
echo "+ bdevperf --json $WORK/bdevperf.json -q 32 -o 4096 -w verify -t $SECONDS_RUN  >$PERF_LOG 2>&1 &" >&2
"$SPDK_DIR/bin/bdevperf" --no-pci --no-huge -s 1024 -m 0x2 --disable-cpumask-locks -i $(($$ % 60000 + 2000)) \
    -r "$PERF_SOCK" --json "$WORK/bdevperf.json" -q 32 -o 4096 -w verify -t "$SECONDS_RUN" >"$PERF_LOG" 2>&1 &
PERF_PID=$!
APP_PIDS+=("$PERF_PID")

# Markers only once bdevperf is writing: wait for the namespace's first writes on the target.
for ((i = 0; i < 300; i++)); do
    kill -0 "$PERF_PID" 2>/dev/null || { cat "$PERF_LOG" >&2; die "bdevperf exited early (log above)"; }
    written=$(rpc_quiet "$TGT_SOCK" bdev_chronicle_get_status C0 |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["volume"]["host"]["host_writes"])')
    [[ $written -gt 0 ]] && break
    sleep 0.1
done
[[ $written -gt 0 ]] || die "no write reached C0 within 30 s"
echo "bdevperf is writing to C0 ($written writes so far)"

say "Cutting up to $MARKERS generations on the target while bdevperf runs"
under_load=0
for ((m = 1; m <= MARKERS; m++)); do
    sleep 1
    kill -0 "$PERF_PID" 2>/dev/null || { echo "bdevperf has finished: no more markers"; break; }
    generation=$(rpc "$TGT_SOCK" bdev_chronicle_mark C0 --comment "under load $m")
    if kill -0 "$PERF_PID" 2>/dev/null; then
        under_load=$((under_load + 1))
        echo "sealed generation $generation (bdevperf still running)"
    else
        echo "sealed generation $generation (bdevperf finished meanwhile)"
    fi
done
[[ $under_load -gt 0 ]] || die "no marker was cut while bdevperf ran (a slow machine? raise CHRONICLE_BDEVPERF_SECONDS)"

say "bdevperf result ($under_load markers cut while it ran)"
status=0
wait "$PERF_PID" || status=$?
sed -n '/Latency(us)/,$p' "$PERF_LOG" | grep -v '^\s*$' || true
[[ $status -eq 0 ]] || { cat "$PERF_LOG" >&2; die "bdevperf failed with status $status (log above)"; }
python3 - "$PERF_LOG" <<'EOF'
import re, sys
log = open(sys.argv[1]).read()
total = re.search(r"^\s*Total\s*:\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", log, re.M)
assert total, "no Total line in the bdevperf log"
iops, mibs, fails = float(total.group(1)), float(total.group(2)), float(total.group(3))
print("verify over NVMe/TCP: %.0f IOPS, %.1f MiB/s, %.0f failed I/O per second" % (iops, mibs, fails))
assert iops > 0 and fails == 0, "bdevperf reported failures or no I/O"
EOF

say "Waiting for the background sort to bring the backup up to the last sealed generation"
for ((i = 0; i < 600; i++)); do
    waiting=$(rpc_quiet "$TGT_SOCK" bdev_chronicle_get_status C0 |
        python3 -c 'import json, sys; v = json.load(sys.stdin)["volume"]; print(v["sealed_waiting"] if v["sort_error"] is None else "error: " + v["sort_error"])')
    [[ $waiting == 0 ]] && break
    [[ $waiting == error* ]] && die "the sort stopped: $waiting"
    sleep 0.1
done
[[ $waiting == 0 ]] || die "$waiting sealed generations still unsorted after 60 s"
echo "every sealed generation is sorted"

say "Generations of C0"
rpc "$TGT_SOCK" bdev_chronicle_get_generations C0 | python3 -c '
import json, sys
for g in json.load(sys.stdin):
    print("%3d  %-8s %s  %7d blocks  %s" % (g["generation"], g["state"], g["time"], g["blocks"], g["comment"]))'

say "Status of C0"
rpc "$TGT_SOCK" bdev_chronicle_get_status C0 | python3 -c '
import json, sys
s = json.load(sys.stdin)
v, h = s["volume"], s["volume"]["host"]
print("state %s; open generation %d, backup generation %d, sealed waiting %d" % (
    s["state"], v["open_generation"], v["backup_generation"], v["sealed_waiting"]))
print("host: %d writes, %d reads, %d flushes; journal %d/%d elements; history %d/%d units" % (
    h["host_writes"], h["host_reads"], h["host_flushes"], v["journal_used_elements"], v["journal_capacity_elements"],
    v["history_used_units"], v["history_capacity_units"]))
print("module: %d I/Os by message from other threads, %d directly from threads on the volume thread\x27s reactor, %d on the volume thread, %d completed with error; failed: %s, sort error: %s" % (
    s["io"]["remote_submissions"], s["io"]["direct_submissions"], s["io"]["local_submissions"], s["io"]["completed_with_error"], v["failed"], v["sort_error"]))
assert s["io"]["completed_with_error"] == 0 and v["failed"] is None and v["sort_error"] is None'

say "Stopping the target"
stop_app "$TGT_SOCK" "$TGT_PID" spdk_tgt
errors=$(errors_in "$TGT_LOG")
[[ -z $errors ]] || die "the target logged errors: $errors"

say "OK: run_nvmf_tcp.sh finished"
