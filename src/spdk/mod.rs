//! The SPDK bdev module (feature `spdk`).
