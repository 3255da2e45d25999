//! The doorbell queue hosts use between SPDK threads (`src/spdk/doorbell.rs`) is plain std
//! code: its unit tests run here too, so they run without the `spdk` feature and without SPDK.
#[path = "../src/spdk/doorbell.rs"]
mod doorbell;
