//! An EFI system partition as a directory (QEMU serves it as a FAT disk).
//!
//! ```text
//! \EFI\BOOT\BOOTX64.EFI     thinhv.efi (removable-media path: what OVMF boots)
//! \EFI\BOOT\thinhv.toml     its configuration
//! \EFI\Linux\vmlinuz.efi    the kernel (EFI stub)
//! \EFI\Linux\initrd.img     the initramfs
//! \EFI\thinhv\probe.efi     the EFI probe (tests)
//! \startup.nsh              for the UEFI shell (BootOrder fallback)
//! ```
use std::fmt::Write;
use std::fs;
use std::path::{Path, PathBuf};

/// ESP path of the kernel, as thinhv.toml names it.
pub const KERNEL: &str = r"\EFI\Linux\vmlinuz.efi";
/// ESP path of the initramfs, as the kernel command line names it.
pub const INITRD: &str = r"\EFI\Linux\initrd.img";
/// ESP path of the EFI probe.
pub const PROBE: &str = r"\EFI\thinhv\probe.efi";

/// An ESP under construction.
#[derive(Debug)]
pub struct Esp {
    root: PathBuf,
}

impl Esp {
    /// A fresh, empty ESP at `root` (removed first if present).
    pub fn create(root: &Path) -> std::io::Result<Self> {
        if root.exists() {
            fs::remove_dir_all(root)?;
        }
        fs::create_dir_all(root)?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// Its directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn host_path(&self, esp_path: &str) -> PathBuf {
        let mut p = self.root.clone();
        for part in esp_path.split(['\\', '/']).filter(|s| !s.is_empty()) {
            p.push(part);
        }
        p
    }

    /// Copies a host file to an ESP path.
    pub fn put_file(&self, esp_path: &str, from: &Path) -> std::io::Result<()> {
        let to = self.host_path(esp_path);
        fs::create_dir_all(to.parent().expect("ESP path has a parent"))?;
        fs::copy(from, &to).map(|_| ())
    }

    /// Writes bytes to an ESP path.
    pub fn put_bytes(&self, esp_path: &str, bytes: &[u8]) -> std::io::Result<()> {
        let to = self.host_path(esp_path);
        fs::create_dir_all(to.parent().expect("ESP path has a parent"))?;
        fs::write(to, bytes)
    }

    /// Installs thinhv as the removable-media boot loader with `config`
    /// (None: no configuration file).
    pub fn install_thinhv(&self, efi: &Path, config: Option<&str>) -> std::io::Result<()> {
        self.put_file(r"\EFI\BOOT\BOOTX64.EFI", efi)?;
        if let Some(c) = config {
            self.put_bytes(r"\EFI\BOOT\thinhv.toml", c.as_bytes())?;
        }
        Ok(())
    }
}

/// The appliance the tests and the bench run beside the OS
/// (`docs/appliances.md`): the Debian kernel and the test initramfs (the
/// same files on the ESP as the OS's; the initramfs's init, given
/// `thinhv_appliance=1`, reports and then prints its uptime every 5 s) on
/// 2 processors with 256 MiB. `tsc=reliable`: QEMU's TCG CPU does not
/// report an invariant TSC, so Linux on an AMD CPU with two processors
/// would fall back to counting timer ticks, which lose time when the
/// emulator is busy; a server CPU reports it and needs no such option.
pub const TEST_APPLIANCE: &str = "
[[appliance]]
name = \"store\"
cpus = 2
memory = 256
kernel = '\\EFI\\Linux\\vmlinuz.efi'
initrd = '\\EFI\\Linux\\initrd.img'
cmdline = \"console=ttyS0 quiet thinhv_appliance=1 panic=-1 tsc=reliable\"
";

/// The kernel command line thinhv passes (initrd from the ESP).
pub fn kernel_options(extra: &str) -> String {
    format!("initrd={INITRD} console=ttyS0,115200 panic=-1 {extra}")
        .trim_end()
        .to_string()
}

/// A `thinhv.toml` that boots `next` with `options`.
pub fn config_booting(next: &str, options: Option<&str>, extra_sections: &str) -> String {
    let mut s = String::from("[hypervisor]\nlog_level = \"info\"\n\n[boot]\n");
    let _ = writeln!(s, "next = '{next}'");
    if let Some(o) = options {
        let _ = writeln!(s, "options = '{o}'");
    }
    s.push_str(extra_sections);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_on_disk() {
        let dir = std::env::temp_dir().join(format!("thinhv-esp-test-{}", std::process::id()));
        let esp = Esp::create(&dir).unwrap();
        esp.put_bytes(KERNEL, b"k").unwrap();
        assert!(dir.join("EFI/Linux/vmlinuz.efi").exists());
        let c = config_booting(KERNEL, Some(&kernel_options("quiet")), "");
        assert!(c.contains(r"next = '\EFI\Linux\vmlinuz.efi'"));
        assert!(c.contains(r"initrd=\EFI\Linux\initrd.img console=ttyS0,115200 panic=-1 quiet"));
        fs::remove_dir_all(dir).unwrap();
    }
}
