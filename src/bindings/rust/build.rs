//! Links liblora. Where it is found, first match wins:
//! 1. `LORA_LIB_DIR`: a directory holding liblora.so;
//! 2. the build tree: `lib/` of the checkout this crate sits in (`../../../lib`), when
//!    `make` has built liblora.so there;
//! 3. `pkg-config --variable=libdir lora` (the `pkg-config` program, no crate);
//! 4. the linker's default search path.
//!
//! For 1-3 the directory is also put in the rpath of this crate's own test, example
//! and binary targets, so `cargo test` runs without LD_LIBRARY_PATH.
use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LORA_LIB_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let build_tree = manifest.join("../../../lib");
    println!(
        "cargo:rerun-if-changed={}",
        build_tree.join("liblora.so").display()
    );

    let dir = if let Ok(d) = env::var("LORA_LIB_DIR") {
        Some(PathBuf::from(d))
    } else if build_tree.join("liblora.so").exists() {
        Some(build_tree.canonicalize().unwrap_or(build_tree))
    } else {
        pkg_config_libdir()
    };
    if let Some(d) = dir {
        println!("cargo:rustc-link-search=native={}", d.display());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", d.display());
        println!("cargo:libdir={}", d.display());
    }
    println!("cargo:rustc-link-lib=dylib=lora");
    // The header, for tests that compare struct layouts with a C compiler.
    let include = manifest.join("../../../include");
    if include.join("lora.h").exists() {
        let inc = include.canonicalize().unwrap_or(include);
        println!("cargo:rustc-env=LORA_INCLUDE_DIR={}", inc.display());
    } else {
        println!("cargo:rustc-env=LORA_INCLUDE_DIR=");
    }
}

fn pkg_config_libdir() -> Option<PathBuf> {
    let out = Command::new("pkg-config")
        .args(["--variable=libdir", "lora"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    let s = s.trim();
    if s.is_empty() {
        None
    } else {
        Some(PathBuf::from(s))
    }
}
