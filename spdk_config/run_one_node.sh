#!/usr/bin/env bash
# One chronicle node, end to end, in a stock spdk_tgt with the module preloaded:
# four malloc bdevs → bdev_chronicle_create → two markers → get_generations / get_status →
# save_config → bdev_chronicle_delete (the volume stays on its bdevs: inspect shows it) →
# the same create again opens it → stop.
#
#   spdk_config/run_one_node.sh
#
# Environment: SPDK_DIR, CHRONICLE_MODULE, CHRONICLE_SPDK_MEM (see common.sh),
# CHRONICLE_CORE_MASK (default 0x1). Needs an installed SPDK and the built module, nothing else.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CORE_MASK=${CHRONICLE_CORE_MASK:-0x1}
SOCK=/tmp/chronicle-one-node.$$.sock
CLEANUP_FILES+=("$SOCK" "$SOCK.lock")
LOG=$WORK/spdk_tgt.log

say "Prerequisites"
check_prerequisites

say "Starting spdk_tgt with the chronicle module preloaded"
start_app spdk_tgt "$LOG" "$SOCK" \
    env LD_PRELOAD="$CHRONICLE_MODULE" "$SPDK_DIR/bin/spdk_tgt" --no-pci --no-huge -s "$CHRONICLE_SPDK_MEM" \
    -m "$CORE_MASK" --disable-cpumask-locks -i $(($$ % 60000 + 1000)) -r "$SOCK"
TGT_PID=$APP_PID
require_module "$SOCK"

say "Four malloc bdevs (4 KiB blocks): base 64 MiB, journal 96 MiB, backup 64 MiB, history 128 MiB"
rpc "$SOCK" bdev_malloc_create -b Base0 64 4096
rpc "$SOCK" bdev_malloc_create -b Journal0 96 4096
rpc "$SOCK" bdev_malloc_create -b Backup0 64 4096
rpc "$SOCK" bdev_malloc_create -b History0 128 4096

say "Creating the chronicle bdev C0 (blank journal and history: formatted)"
rpc "$SOCK" bdev_chronicle_create -b C0 --base-bdev Base0 --journal-bdev Journal0 \
    --backup-bdev Backup0 --history-bdev History0 --no-copy-base-to-backup
rpc "$SOCK" bdev_get_bdevs -b C0 | python3 -c '
import json, sys
bdev = json.load(sys.stdin)[0]
print("C0: %d blocks of %d bytes, uuid %s, driver_specific %s" % (bdev["num_blocks"], bdev["block_size"],
      bdev["uuid"], json.dumps(bdev["driver_specific"]["chronicle"], sort_keys=True)))'

say "Cutting two generations (nothing writes meanwhile)"
first=$(rpc "$SOCK" bdev_chronicle_mark C0 --comment "first marker")
echo "sealed generation $first"
second=$(rpc "$SOCK" bdev_chronicle_mark C0 --comment "second marker")
echo "sealed generation $second"
[[ $second -eq $((first + 1)) ]] || die "generations $first then $second"

say "Generations"
rpc "$SOCK" bdev_chronicle_get_generations C0 | tee "$WORK/generations.json"

say "Status (summary)"
rpc "$SOCK" bdev_chronicle_get_status C0 | python3 -c '
import json, sys
s = json.load(sys.stdin)
v = s["volume"]
print("state %s, uuid %s" % (s["state"], s["volume_uuid"]))
print("open generation %d, backup generation %d, sealed waiting %d" % (v["open_generation"], v["backup_generation"], v["sealed_waiting"]))
print("journal %d/%d elements, history %d/%d units, markers %d, generations sorted %d" % (
    v["journal_used_elements"], v["journal_capacity_elements"], v["history_used_units"], v["history_capacity_units"],
    v["control"]["markers"], v["control"]["generations_sorted"]))
print("failed: %s, sort error: %s, I/O with errors: %d" % (v["failed"], v["sort_error"], s["io"]["completed_with_error"]))'

say "save_config (the bdev_chronicle_create it replays)"
rpc "$SOCK" save_config >"$WORK/config.json"
python3 - "$WORK/config.json" <<'EOF'
import json, sys
config = json.load(open(sys.argv[1]))
calls = [c for s in config["subsystems"] if s["subsystem"] == "bdev" for c in s["config"] or []]
chronicle = [c for c in calls if c["method"] == "bdev_chronicle_create"]
assert len(chronicle) == 1, chronicle
print(json.dumps(chronicle[0], indent=2, sort_keys=True))
order = [c["method"] for c in calls]
assert order.index("bdev_chronicle_create") > max(i for i, m in enumerate(order) if m == "bdev_malloc_create"), order
EOF

say "Deleting C0: the volume closes, its data stays on the four bdevs"
rpc "$SOCK" bdev_chronicle_delete C0
rpc "$SOCK" bdev_chronicle_inspect Journal0 | python3 -c '
import json, sys
i = json.load(sys.stdin)
c = i["chronicle"]
print("Journal0 still holds the %s device of volume %s (superblock sequence %d, peers %s)" % (
    c["role"], c["volume_uuid"], c["sequence"], ", ".join(p["role"] + "=" + p["name"] for p in c["peers"])))'

say "The same create again opens the volume (recovery), with its generations"
rpc "$SOCK" bdev_chronicle_create -b C0 --base-bdev Base0 --journal-bdev Journal0 \
    --backup-bdev Backup0 --history-bdev History0
rpc "$SOCK" bdev_chronicle_get_generations C0 >"$WORK/generations-reopened.json"
python3 - "$WORK/generations.json" "$WORK/generations-reopened.json" <<'EOF'
import json, sys
before, after = (json.load(open(p)) for p in sys.argv[1:3])
key = lambda g: (g["generation"], g["time_ns"], g["comment"], g["blocks"])
sealed = [key(g) for g in before if g["state"] != "open"]
again = [key(g) for g in after if g["state"] != "open"]
assert sealed == again, (sealed, again)
print("reopened: %d sealed generations, the same as before the delete; open generation %d" % (
    len(again), [g for g in after if g["state"] == "open"][0]["generation"]))
EOF
rpc "$SOCK" bdev_chronicle_delete C0

say "Stopping spdk_tgt"
stop_app "$SOCK" "$TGT_PID" spdk_tgt
errors=$(errors_in "$LOG")
[[ -z $errors ]] || die "the target logged errors: $errors"
echo "chronicle lines of the target's log:"
grep -F 'chronicle' "$LOG" | sed 's/^/  /'

say "OK: run_one_node.sh finished"
