//! Finding OVMF. Debian's `ovmf` package provides the split 4 MiB images
//! (code read-only, variables writable) for QEMU and the combined 2 MiB
//! image for Bochs. `THINHV_OVMF_CODE`, `THINHV_OVMF_VARS` and
//! `THINHV_OVMF_FD` override the paths.
use std::path::PathBuf;

/// The OVMF images.
#[derive(Clone, Debug)]
pub struct Ovmf {
    /// Code (read-only pflash).
    pub code: PathBuf,
    /// Variable store template (copied per run).
    pub vars: PathBuf,
}

fn pick(var: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(var) {
        let p = PathBuf::from(p);
        return p.exists().then_some(p);
    }
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// Locates the split images for QEMU.
pub fn find() -> Result<Ovmf, String> {
    let code = pick(
        "THINHV_OVMF_CODE",
        &[
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/OVMF/OVMF_CODE.fd",
        ],
    );
    let vars = pick(
        "THINHV_OVMF_VARS",
        &[
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
            "/usr/share/OVMF/OVMF_VARS.fd",
        ],
    );
    match (code, vars) {
        (Some(code), Some(vars)) => Ok(Ovmf { code, vars }),
        _ => Err(
            "OVMF not found: install it with `sudo apt-get install ovmf` \
                  (or set THINHV_OVMF_CODE and THINHV_OVMF_VARS)"
                .into(),
        ),
    }
}

/// Locates the combined image (for Bochs).
pub fn find_combined() -> Result<PathBuf, String> {
    pick(
        "THINHV_OVMF_FD",
        &["/usr/share/ovmf/OVMF.fd", "/usr/share/qemu/OVMF.fd"],
    )
    .ok_or_else(|| "OVMF.fd not found: install it with `sudo apt-get install ovmf`".into())
}
