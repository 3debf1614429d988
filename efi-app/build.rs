//! Embeds the core. `cargo xtask build` sets `THINHV_CORE_ELF` to the
//! freshly built `thin-hv` ELF; this script wraps it in a small header
//! (magic, length, CRC-32) that the loader checks before it trusts a byte.
//! Without the variable (a plain `cargo build`/`clippy`), an empty core is
//! embedded and the loader reports "no core embedded" at boot.
use std::io::Write;

const MAGIC: &[u8; 16] = b"THINHV-CORE-BLOB";

fn main() {
    println!("cargo:rerun-if-env-changed=THINHV_CORE_ELF");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let elf = match std::env::var("THINHV_CORE_ELF") {
        Ok(path) if !path.is_empty() => {
            println!("cargo:rerun-if-changed={path}");
            std::fs::read(&path).unwrap_or_else(|e| panic!("THINHV_CORE_ELF={path}: {e}"))
        }
        _ => Vec::new(),
    };
    let mut blob = Vec::with_capacity(32 + elf.len());
    blob.extend_from_slice(MAGIC);
    blob.extend_from_slice(&(elf.len() as u64).to_le_bytes());
    blob.extend_from_slice(&crc32fast::hash(&elf).to_le_bytes());
    blob.extend_from_slice(&0u32.to_le_bytes());
    blob.extend_from_slice(&elf);
    let mut f = std::fs::File::create(out.join("core.blob")).expect("create core.blob");
    f.write_all(&blob).expect("write core.blob");
}
