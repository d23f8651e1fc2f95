//! The `lora` crate declares `links = "lora"` and prints `cargo:libdir=<dir>`, so cargo
//! gives this build script the directory liblora was linked from as DEP_LORA_LIBDIR.
//! An rpath to it lets `cargo run` (and the installed binary) find liblora.so.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_LORA_LIBDIR");
    if let Ok(dir) = std::env::var("DEP_LORA_LIBDIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir);
    }
}
