pub mod memory;
pub mod spdk;
