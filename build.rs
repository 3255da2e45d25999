//! Build script. Without the `spdk` feature it does nothing SPDK-related.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
