//! Polled state machines over devices: write path, marker, sort, recovery.
