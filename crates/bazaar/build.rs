//! Release builds lay the binary's code out in the order of
//! `link-order.txt`: the functions `bazaar serve` processes run, side by
//! side at the start of the code, so that each process maps a few MiB of
//! the binary instead of most of it (tools/link-order.sh writes the file,
//! and says why). Only the layout changes, not the code.
//!
//! The order goes to LLD (`--symbol-ordering-file`), Rust's linker on
//! x86_64 Linux; names the binary does not have are skipped. Left out
//! for other targets, for a linker of one's own (`-C linker…` in
//! RUSTFLAGS), and with `BAZAAR_LINK_ORDER=off`.

fn main() {
    println!("cargo::rerun-if-changed=link-order.txt");
    println!("cargo::rerun-if-env-changed=BAZAAR_LINK_ORDER");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let lld_target = var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu";
    let own_linker = var("CARGO_ENCODED_RUSTFLAGS").contains("link");
    if var("PROFILE") != "release" || !lld_target || own_linker || var("BAZAAR_LINK_ORDER") == "off"
    {
        return;
    }
    let order = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("link-order.txt");
    println!(
        "cargo::rustc-link-arg-bin=bazaar=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    println!("cargo::rustc-link-arg-bin=bazaar=-Wl,--no-warn-symbol-ordering");
}
