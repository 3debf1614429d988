//! QEMU command lines.
use crate::firmware::Ovmf;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Lowest QEMU thinhv's test beds need (the `igb` SR-IOV NIC arrived in 8.0).
pub const MIN_QEMU: (u32, u32) = (8, 0);

/// An igb NIC (SR-IOV PF, 8 VFs) behind a PCIe root port, on QEMU's user
/// network: the SR-IOV device of the tests and the bench.
pub const IGB_BEHIND_ROOT_PORT: [&str; 6] = [
    "-device",
    "pcie-root-port,id=rp1,chassis=1,slot=1",
    "-netdev",
    "user,id=n0",
    "-device",
    "igb,netdev=n0,bus=rp1",
];

/// An NVMe PF with SR-IOV (id `nvpf`, in subsystem `nvsub`, on bus
/// `rp1`): two secondary controllers, each given at most 4 queues (the
/// admin queue and 3 I/O queues) and 3 interrupts of the 8 and 6 flexible
/// ones (Linux's nvme gives the admin queue a vector of its own when it
/// can, so 3 let a 2-processor guest complete on each processor). Its
/// namespaces are `nvme-ns` devices on bus `nvpf`.
pub const NVME_SRIOV_PF: &str = "nvme,id=nvpf,serial=nvmepf,subsys=nvsub,bus=rp1,sriov_max_vfs=2,sriov_vq_flexible=8,sriov_vi_flexible=6";

/// The QEMU arguments of [`NVME_SRIOV_PF`] behind root port `rp1` at
/// 00:07.0, with namespace 1 on the raw image `os_image` and namespace 2
/// on `appliance_image`, both attached to no controller at start (thinhv
/// attaches them: `docs/appliances.md`, "NVMe VFs").
pub fn nvme_sriov_machine(os_image: &str, appliance_image: &str) -> Vec<String> {
    [
        "-device",
        "pcie-root-port,id=rp1,chassis=1,addr=0x7",
        "-device",
        "nvme-subsys,id=nvsub",
        "-device",
        NVME_SRIOV_PF,
        "-drive",
        &format!("file={os_image},if=none,id=osns,format=raw"),
        "-device",
        "nvme-ns,drive=osns,bus=nvpf,nsid=1,detached=true",
        "-drive",
        &format!("file={appliance_image},if=none,id=appns,format=raw"),
        "-device",
        "nvme-ns,drive=appns,bus=nvpf,nsid=2,detached=true",
    ]
    .map(String::from)
    .to_vec()
}

/// A machine to boot.
#[derive(Clone, Debug)]
pub struct Profile {
    /// `-machine`.
    pub machine: String,
    /// `-cpu`.
    pub cpu: String,
    /// `-smp`.
    pub smp: u32,
    /// `-m` in MiB.
    pub mem_mb: u32,
    /// Further arguments (devices).
    pub extra: Vec<String>,
    /// A reset of the guest restarts the machine, firmware first, as on a
    /// server (default: QEMU ends, `-no-reboot`).
    pub reboot: bool,
}

impl Profile {
    /// q35 with an AMD CPU that has SVM and NPT (`-cpu max` under TCG).
    /// QEMU's own "hypervisor" CPUID bit is turned off so that what Linux
    /// reports is thinhv's doing.
    pub fn svm(smp: u32) -> Self {
        Self {
            machine: "q35".into(),
            cpu: "max,hypervisor=off".into(),
            smp,
            mem_mb: 1024,
            extra: Vec::new(),
            reboot: false,
        }
    }

    /// The same machine with a CPU model without SVM.
    pub fn no_svm(smp: u32) -> Self {
        Self {
            cpu: "max,hypervisor=off,svm=off".into(),
            ..Self::svm(smp)
        }
    }
}

/// Where the serial port goes.
#[derive(Clone, Debug)]
pub enum Serial {
    /// Into a file (tests).
    File(PathBuf),
    /// The terminal, with QEMU's monitor multiplexed (`cargo xtask run`).
    Terminal,
}

/// The QEMU binary: `THINHV_QEMU` or `qemu-system-x86_64` on PATH.
pub fn binary() -> PathBuf {
    std::env::var_os("THINHV_QEMU")
        .map_or_else(|| PathBuf::from("qemu-system-x86_64"), PathBuf::from)
}

/// Parses `QEMU emulator version X.Y.Z`.
pub fn parse_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut it = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Checks that QEMU is there and new enough.
pub fn check() -> Result<(u32, u32), String> {
    let out = Command::new(binary())
        .arg("--version")
        .output()
        .map_err(|e| {
            format!(
                "{}: {e}; install QEMU >= 8 with `sudo bash scripts/setup-debian.sh`",
                binary().display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = parse_version(&text)
        .ok_or_else(|| format!("cannot read the QEMU version from {text:?}"))?;
    if v < MIN_QEMU {
        return Err(format!(
            "QEMU {}.{} is too old (need {}.{}+); Debian 12: `sudo bash scripts/setup-debian.sh` adds bookworm-backports",
            v.0, v.1, MIN_QEMU.0, MIN_QEMU.1
        ));
    }
    Ok(v)
}

/// Builds the command. `vars` is this run's writable copy of the variable store.
pub fn command(ovmf: &Ovmf, vars: &Path, esp: &Path, p: &Profile, serial: &Serial) -> Command {
    let mut c = Command::new(binary());
    c.args(["-machine", &p.machine, "-accel", "tcg", "-cpu", &p.cpu]);
    c.args(["-smp", &p.smp.to_string(), "-m", &p.mem_mb.to_string()]);
    c.arg("-drive").arg(format!(
        "if=pflash,format=raw,unit=0,readonly=on,file={}",
        ovmf.code.display()
    ));
    c.arg("-drive").arg(format!(
        "if=pflash,format=raw,unit=1,file={}",
        vars.display()
    ));
    c.arg("-drive")
        .arg(format!("format=raw,file=fat:rw:{}", esp.display()));
    c.args(["-nic", "none"]);
    if !p.reboot {
        c.arg("-no-reboot");
    }
    match serial {
        Serial::File(path) => {
            // A monitor socket beside the serial log, so a run that hangs
            // can report where each CPU was (`Run::hang_report`).
            let monitor = crate::runner::monitor_socket(path).map_or_else(
                || "none".to_string(),
                |m| format!("unix:{},server=on,wait=off", m.display()),
            );
            c.args(["-display", "none", "-monitor", &monitor, "-serial"]);
            c.arg(format!("file:{}", path.display()));
        }
        Serial::Terminal => {
            c.arg("-nographic");
        }
    }
    c.args(&p.extra);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parsing() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)"),
            Some((10, 0))
        );
        assert_eq!(parse_version("QEMU emulator version 7.2.15"), Some((7, 2)));
        assert_eq!(parse_version("nonsense"), None);
    }

    #[test]
    fn command_line_has_the_essentials() {
        let ovmf = Ovmf {
            code: "/c.fd".into(),
            vars: "/v.fd".into(),
        };
        let c = command(
            &ovmf,
            Path::new("/tmp/v"),
            Path::new("/tmp/esp"),
            &Profile::svm(4),
            &Serial::File("/tmp/s".into()),
        );
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-machine q35"));
        assert!(joined.contains("-cpu max,hypervisor=off"));
        assert!(joined.contains("-smp 4"));
        assert!(joined.contains("readonly=on,file=/c.fd"));
        assert!(joined.contains("file=fat:rw:/tmp/esp"));
        assert!(joined.contains("-serial file:/tmp/s"));
        assert!(joined.contains("-no-reboot"));
        assert!(Profile::no_svm(1).cpu.contains("svm=off"));
    }
}
