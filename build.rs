//! Build script. Without the `spdk` feature it does nothing SPDK-related.
//!
//! With `--features spdk` it finds an installed SPDK (shared libraries + pkg-config files) under
//! `SPDK_DIR` (default `/opt/spdk`), checks that it is at least [`spdk::MINIMUM`], generates
//! bindings from the public headers listed in `src/spdk/wrapper.h` into `OUT_DIR`, compiles C
//! wrappers for the `static inline` helpers bindgen cannot link to, and links the SPDK shared
//! libraries the module calls. Nothing generated is written into the source tree.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "spdk")]
    spdk::build();
}

#[cfg(feature = "spdk")]
mod spdk {
    use std::env;
    use std::fs;
    use std::path::{Path, PathBuf};

    /// Oldest SPDK release the bindings are written against (major, minor).
    pub const MINIMUM: (u32, u32) = (26, 1);

    const DEFAULT_SPDK_DIR: &str = "/opt/spdk";

    /// SPDK shared libraries whose functions the module calls. Their own SPDK dependencies are
    /// in their DT_NEEDED, but SPDK's shared build leaves the environment layer's symbols
    /// (`spdk_env_*` in libspdk_thread & co., DPDK's `rte_*` in libspdk_env_dpdk) to the
    /// application: see [`ENVIRONMENT`].
    const LIBRARIES: &[&str] = &[
        "spdk_bdev",
        "spdk_thread",
        "spdk_json",
        "spdk_jsonrpc",
        "spdk_rpc",
        "spdk_log",
        "spdk_util",
        "spdk_dma",
        "spdk_env_dpdk",
    ];

    /// pkg-config modules whose libraries an executable must link so that every symbol of the
    /// libraries above resolves (the test binaries link the module too). Inside spdk_tgt they
    /// are already loaded; `--as-needed` drops the ones a binary does not reference.
    const ENVIRONMENT: &[&str] = &["spdk_env_dpdk", "spdk_dpdklibs", "spdk_syslibs"];

    /// Function, type and constant names the bindings keep (regexes, anchored by bindgen).
    const FUNCTIONS: &str = "spdk_(bdev|io_channel|io_device|get_io_channel|put_io_channel|for_each_channel|\
        thread|get_thread|set_thread|cpuset_get_cpu|poller|json|jsonrpc|rpc|dma|zmalloc|malloc|realloc|free|log|strerror|\
        env_get_current_core|env_get_core_count|env_get_first_core|env_get_next_core|get_ticks)\\w*";
    const TYPES: &str = "spdk_(bdev|io_channel|thread|poller|json|jsonrpc|rpc|log|dma|msg_fn|memory_domain)\\w*";
    const VARIABLES: &str = "SPDK_(VERSION|RPC|LOG|MALLOC|ENV|JSONRPC|JSON|BDEV|POLLER|THREAD|DMA)_\\w*";

    fn fail(message: &str) -> ! {
        // A panic in a build script prints its message as the build error.
        panic!("\n\nchronicle (feature `spdk`): {message}\n\n");
    }

    pub fn build() {
        println!("cargo:rerun-if-env-changed=SPDK_DIR");
        println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
        println!("cargo:rerun-if-changed=src/spdk/wrapper.h");

        let spdk_dir = PathBuf::from(env::var("SPDK_DIR").unwrap_or_else(|_| DEFAULT_SPDK_DIR.into()));
        let pkgconfig_dir = spdk_dir.join("lib/pkgconfig");
        if !pkgconfig_dir.join("spdk_bdev.pc").is_file() {
            fail(&format!(
                "SPDK not found: {} does not exist. Install SPDK >= {}.{:02} with shared libraries \
                 (./configure --with-shared && make && make install) and set SPDK_DIR to its prefix \
                 (default {DEFAULT_SPDK_DIR}). See docs/SPDK.md.",
                pkgconfig_dir.join("spdk_bdev.pc").display(),
                MINIMUM.0,
                MINIMUM.1
            ));
        }
        // SPDK's own pkg-config files come first; keep whatever the user had after them.
        let search_path = match env::var_os("PKG_CONFIG_PATH") {
            Some(existing) if !existing.is_empty() => {
                let mut paths = vec![pkgconfig_dir.clone()];
                paths.extend(env::split_paths(&existing));
                env::join_paths(paths).expect("PKG_CONFIG_PATH")
            }
            _ => pkgconfig_dir.clone().into_os_string(),
        };
        // The pkg-config crate reads this variable (build scripts are single-threaded).
        env::set_var("PKG_CONFIG_PATH", &search_path);

        let mut include_paths: Vec<PathBuf> = Vec::new();
        let mut link_paths: Vec<PathBuf> = Vec::new();
        for library in LIBRARIES {
            let found = probe(library);
            for path in found.include_paths.into_iter().chain([spdk_dir.join("include")]) {
                if !include_paths.contains(&path) {
                    include_paths.push(path);
                }
            }
            for path in found.link_paths {
                if !link_paths.contains(&path) {
                    link_paths.push(path);
                }
            }
        }

        let version = read_version(&include_paths);
        if version < MINIMUM {
            fail(&format!(
                "SPDK {}.{:02} found under {}, chronicle needs SPDK >= {}.{:02}",
                version.0,
                version.1,
                spdk_dir.display(),
                MINIMUM.0,
                MINIMUM.1
            ));
        }
        println!("cargo:rustc-env=CHRONICLE_SPDK_VERSION={}.{:02}", version.0, version.1);

        link(&link_paths);
        link_environment();
        generate_bindings(&include_paths);
    }

    /// A pkg-config module of the SPDK install; the caller prints what cargo needs.
    fn probe(module: &str) -> pkg_config::Library {
        let search_path = env::var("PKG_CONFIG_PATH").unwrap_or_default();
        pkg_config::Config::new().cargo_metadata(false).env_metadata(false).probe(module).unwrap_or_else(|error| {
            fail(&format!("pkg-config (PKG_CONFIG_PATH={search_path}) could not find {module}: {error}"))
        })
    }

    /// `(SPDK_VERSION_MAJOR, SPDK_VERSION_MINOR)` from the installed `spdk/version.h`.
    /// pkg-config's `--modversion` is the shared-library ABI version (e.g. 20.0), not the release.
    fn read_version(include_paths: &[PathBuf]) -> (u32, u32) {
        let header = include_paths
            .iter()
            .map(|dir| dir.join("spdk/version.h"))
            .find(|path| path.is_file())
            .unwrap_or_else(|| fail(&format!("spdk/version.h not found in {include_paths:?}")));
        println!("cargo:rerun-if-changed={}", header.display());
        let text = fs::read_to_string(&header).unwrap_or_else(|error| fail(&format!("{}: {error}", header.display())));
        let define = |name: &str| -> u32 {
            text.lines()
                .filter_map(|line| line.trim().strip_prefix("#define"))
                .filter_map(|rest| rest.trim().strip_prefix(name))
                .find_map(|value| value.trim().parse().ok())
                .unwrap_or_else(|| fail(&format!("{}: no numeric {name}", header.display())))
        };
        (define("SPDK_VERSION_MAJOR"), define("SPDK_VERSION_MINOR"))
    }

    fn link(link_paths: &[PathBuf]) {
        for path in link_paths {
            println!("cargo:rustc-link-search=native={}", path.display());
        }
        for library in LIBRARIES {
            let file = format!("lib{library}.so");
            if !link_paths.iter().any(|dir| dir.join(&file).exists()) {
                fail(&format!(
                    "{file} not found in {link_paths:?}: chronicle loads into a shared-library SPDK \
                     build (./configure --with-shared); static-only installs are not supported"
                ));
            }
            println!("cargo:rustc-link-lib=dylib={library}");
        }
        // Find the libraries at run time even when the loader is not configured for them
        // (binaries and tests; inside spdk_tgt they are already loaded).
        for path in link_paths {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", path.display());
        }
    }

    /// Links the environment libraries into every executable and into the cdylib *without*
    /// `--as-needed`: nothing of ours calls most of them, yet the SPDK libraries do (lazily, so a
    /// dropped libcrypto only shows as "undefined symbol" at run time). `rustc-link-lib` has no
    /// stable way to turn `as-needed` off, hence plain linker arguments, kept in order.
    fn link_environment() {
        let mut arguments = vec!["-Wl,--push-state,--no-as-needed".to_string()];
        for module in ENVIRONMENT {
            let found = probe(module);
            for path in &found.link_paths {
                println!("cargo:rustc-link-search=native={}", path.display());
            }
            arguments.extend(found.libs.iter().map(|library| format!("-l{library}")));
        }
        arguments.extend(LIBRARIES.iter().map(|library| format!("-l{library}")));
        arguments.push("-Wl,--pop-state".to_string());
        for argument in arguments {
            println!("cargo:rustc-link-arg={argument}");
        }
    }

    fn generate_bindings(include_paths: &[PathBuf]) {
        let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
        let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
        let header = manifest_dir.join("src/spdk/wrapper.h");
        let static_fns = out_dir.join("spdk_static_fns");
        let clang_args: Vec<String> = include_paths.iter().map(|dir| format!("-I{}", dir.display())).collect();

        let bindings = bindgen::Builder::default()
            .header(header.to_str().expect("utf-8 path"))
            .clang_args(&clang_args)
            .allowlist_function(FUNCTIONS)
            .allowlist_type(TYPES)
            .allowlist_var(VARIABLES)
            // Packed/aligned NVMe structures (reached through bdev.h) do not translate (E0588);
            // the module never looks inside them.
            .opaque_type("spdk_nvme_.*")
            .opaque_type("spdk_nvmf_.*")
            // Bit-field unions of one u32 inside the packed `spdk_bdev_ext_io_opts`: even opaque,
            // bindgen marks them `repr(align(4))` (E0588 again). They are plain u32 to us.
            .blocklist_type("spdk_bdev_nvme_cdw1[0-9]")
            .raw_line("pub type spdk_bdev_nvme_cdw12 = u32;")
            .raw_line("pub type spdk_bdev_nvme_cdw13 = u32;")
            // One iovec type for the whole crate (the device layer uses libc's).
            .blocklist_type("iovec")
            .raw_line("pub use libc::iovec;")
            .layout_tests(false)
            .derive_default(true)
            .derive_debug(false)
            .prepend_enum_name(false)
            .default_enum_style(bindgen::EnumVariation::Consts)
            .wrap_unsafe_ops(true)
            .generate_cstr(true)
            .merge_extern_blocks(true)
            .wrap_static_fns(true)
            .wrap_static_fns_path(&static_fns)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
            .generate()
            .unwrap_or_else(|error| fail(&format!("bindgen failed on {}: {error}", header.display())));
        bindings.write_to_file(out_dir.join("spdk_bindings.rs")).expect("write bindings");

        // bindgen wrote C wrappers (`<name>__extern`) for the static inline functions it kept.
        let c_file = static_fns.with_extension("c");
        cc::Build::new()
            .file(&c_file)
            .include(Path::new(&manifest_dir).join("src/spdk"))
            .includes(include_paths)
            .warnings(false)
            .compile("chronicle_spdk_static_fns");
    }
}
