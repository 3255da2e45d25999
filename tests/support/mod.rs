pub mod spdk;
