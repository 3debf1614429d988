//! A real Linux guest: Debian's kernel package, downloaded with `apt-get
//! download` and unpacked with `dpkg-deb -x` (never installed), and a small
//! initramfs with busybox and the `thinhv` tool.
use crate::cpio::{Entry, archive};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest's `/init`.
pub const INIT: &str = include_str!("../guest/init");
/// The guest-side test reporter.
pub const GUEST_TEST: &str = include_str!("../guest/thinhv-guest-test");

/// The attack suite's kernel module (CPL 0 attacks of a hostile kernel).
pub const ATTACK_MODULE_SRC: &str = include_str!("../guest/kmod/thinhv_attack.c");

/// Marker the guest prints when userspace starts.
pub const USERSPACE_MARKER: &str = "THINHV-GUEST: userspace up";

fn run(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("{shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    let boot = dir.join("boot");
    std::fs::read_dir(boot)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// The kernel (EFI stub image), fetched into `cache` on first use.
pub fn kernel(cache: &Path) -> Result<PathBuf, String> {
    let unpacked = cache.join("linux");
    if let Some(k) = find_vmlinuz(&unpacked) {
        return Ok(k);
    }
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| e.to_string())?;
    let hint = "needs Debian's apt sources; the command is \
                `apt-get download linux-image-amd64` (run `sudo apt-get update` first if it fails)";
    let meta = fetch_deb(&debs, "linux-image-amd64").map_err(|e| format!("{e}\n{hint}"))?;
    let depends = depends(&meta)?;
    let pkg = depends
        .iter()
        .find(|d| d.starts_with("linux-image-") && !d.ends_with("-amd64-unsigned"))
        .ok_or_else(|| format!("no kernel package in {depends:?}"))?;
    let deb = fetch_deb(&debs, pkg).map_err(|e| format!("{e}\n{hint}"))?;
    std::fs::create_dir_all(&unpacked).map_err(|e| e.to_string())?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    find_vmlinuz(&unpacked).ok_or_else(|| format!("no boot/vmlinuz-* in {}", deb.display()))
}

/// `apt-get download PKG` into `dir`; when that fails and we are root, the
/// package lists may be stale: `apt-get update` once and retry.
fn apt_download(dir: &Path, pkg: &str) -> Result<String, String> {
    let first = run(Command::new("apt-get")
        .args(["download", "-q", pkg])
        .current_dir(dir));
    if first.is_ok() || !is_root() {
        return first;
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["download", "-q", pkg])
        .current_dir(dir))
}

/// `apt-get download PKG` into `dir`, and the `.deb` it left there.
fn fetch_deb(dir: &Path, pkg: &str) -> Result<PathBuf, String> {
    apt_download(dir, pkg)?;
    newest(dir, &format!("{pkg}_"))
}

/// The package names a `.deb` depends on (alternatives included, versions
/// left out).
fn depends(deb: &Path) -> Result<Vec<String>, String> {
    let text = run(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Depends"))?;
    Ok(text
        .split([',', '|'])
        .filter_map(|d| d.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn newest(dir: &Path, prefix: &str) -> Result<PathBuf, String> {
    std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(prefix)
                    && Path::new(n)
                        .extension()
                        .is_some_and(|e| e.eq_ignore_ascii_case("deb"))
            })
        })
        .max()
        .ok_or_else(|| format!("no {prefix}*.deb in {}", dir.display()))
}

/// A statically linked busybox (Debian's `busybox-static` puts it at
/// `/bin/busybox`).
pub fn busybox() -> Result<PathBuf, String> {
    let p = std::env::var_os("THINHV_BUSYBOX")
        .map_or_else(|| PathBuf::from("/bin/busybox"), PathBuf::from);
    let bytes = std::fs::read(&p).map_err(|_| {
        format!(
            "{} not found: install it with `sudo apt-get install busybox-static`",
            p.display()
        )
    })?;
    if bytes.windows(b"ld-linux".len()).any(|w| w == b"ld-linux") && bytes.len() < 1_500_000 {
        return Err(format!(
            "{} is dynamically linked; install the static one with `sudo apt-get install busybox-static`",
            p.display()
        ));
    }
    Ok(p)
}

/// Kernel modules the guest loads at start, in dependency order (paths
/// under `lib/modules/VERSION/kernel`): the NVMe driver and its CRC
/// helpers, the e1000e NIC driver — devices whose DMA the IOMMU tests
/// exercise — and igb with its VF driver igbvf (SR-IOV tests).
pub const MODULES: &[&str] = &[
    "lib/crc64.ko",
    "crypto/crct10dif_common.ko",
    "crypto/crct10dif_generic.ko",
    "lib/crc-t10dif.ko",
    "crypto/crc64_rocksoft_generic.ko",
    "lib/crc64-rocksoft.ko",
    "block/t10-pi.ko",
    "drivers/nvme/host/nvme-core.ko",
    "drivers/nvme/host/nvme.ko",
    "drivers/net/ethernet/intel/e1000e/e1000e.ko",
    "drivers/dca/dca.ko",
    "drivers/i2c/algos/i2c-algo-bit.ko",
    "drivers/net/ethernet/intel/igb/igb.ko",
    "drivers/net/ethernet/intel/igbvf/igbvf.ko",
    // /dev/cpu/N/msr, for the attack suite's MSR writes from the kernel.
    "arch/x86/kernel/msr.ko",
    // A function's INTx pin from user space: loaded by the I/O APIC test
    // only (`/init` skips them).
    "drivers/uio/uio.ko",
    "drivers/uio/uio_pci_generic.ko",
    // VFIO, for the OS's own IOMMU's test (issue 14): loaded by that
    // test only, in this order.
    "virt/lib/irqbypass.ko",
    "drivers/vfio/vfio.ko",
    "drivers/vfio/vfio_iommu_type1.ko",
    "drivers/vfio/vfio_virqfd.ko",
    "drivers/vfio/pci/vfio-pci-core.ko",
    "drivers/vfio/pci/vfio-pci.ko",
];

/// The modules directory (`.../lib/modules/VERSION/kernel`) of the unpacked
/// kernel package `vmlinuz` came from.
pub fn modules_dir(vmlinuz: &Path) -> Option<PathBuf> {
    let ver = vmlinuz.file_name()?.to_str()?.strip_prefix("vmlinuz-")?;
    Some(
        vmlinuz
            .parent()?
            .parent()?
            .join("lib/modules")
            .join(ver)
            .join("kernel"),
    )
}

/// udhcpc's script: configure the address and default route it got.
const UDHCPC_SCRIPT: &str = "#!/bin/sh
case \"$1\" in
  bound|renew)
    ip addr flush dev \"$interface\"
    ip addr add \"$ip/${mask:-24}\" dev \"$interface\"
    [ -n \"$router\" ] && ip route add default via ${router%% *} dev \"$interface\"
    ;;
esac
exit 0
";

/// Builds the initramfs: busybox, `/init`, the `thinhv` tool (also as
/// `thinhv-status`), the test reporter, and the [`MODULES`] found in
/// `modules` (with `modules.order` listing what is there).
pub fn initramfs(
    busybox: &Path,
    tool: &Path,
    modules: Option<&Path>,
    attack_module: Option<&Path>,
) -> Result<Vec<u8>, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut entries = vec![
        Entry::Dir("bin".into()),
        Entry::Dir("dev".into()),
        Entry::CharDev("dev/console".into(), 5, 1),
        Entry::Dir("proc".into()),
        Entry::Dir("sys".into()),
        Entry::Dir("tmp".into()),
        Entry::File("bin/busybox".into(), 0o755, read(busybox)?),
        Entry::Symlink("bin/sh".into(), "busybox".into()),
        Entry::File("init".into(), 0o755, INIT.as_bytes().to_vec()),
        Entry::File("bin/thinhv".into(), 0o755, read(tool)?),
        Entry::Symlink("bin/thinhv-status".into(), "thinhv".into()),
        Entry::File(
            "bin/thinhv-guest-test".into(),
            0o755,
            GUEST_TEST.as_bytes().to_vec(),
        ),
        Entry::Dir("usr".into()),
        Entry::Dir("usr/share".into()),
        Entry::Dir("usr/share/udhcpc".into()),
        Entry::File(
            "usr/share/udhcpc/default.script".into(),
            0o755,
            UDHCPC_SCRIPT.as_bytes().to_vec(),
        ),
        Entry::Dir("lib".into()),
        Entry::Dir("lib/modules".into()),
    ];
    let mut order = String::new();
    if let Some(dir) = modules {
        for m in MODULES {
            let p = dir.join(m);
            if let Ok(bytes) = std::fs::read(&p) {
                let name = m.rsplit('/').next().unwrap_or(m);
                entries.push(Entry::File(format!("lib/modules/{name}"), 0o644, bytes));
                order.push_str(name);
                order.push('\n');
            }
        }
    }
    if let Some(ko) = attack_module {
        // Loaded only by the attack suite (not in `modules.order`).
        entries.push(Entry::File(
            "lib/modules/thinhv_attack.ko".into(),
            0o644,
            read(ko)?,
        ));
    }
    entries.push(Entry::File(
        "lib/modules/modules.order".into(),
        0o644,
        order.into_bytes(),
    ));
    Ok(archive(&entries))
}

/// The attack suite's kernel module (`guest/kmod/thinhv_attack.c`), built
/// against the guest kernel's own headers: Debian's `linux-headers-*` and
/// `linux-kbuild-*` packages for that kernel, downloaded like the kernel
/// and unpacked under `cache` (never installed). Rebuilt when the source
/// changes. Needs `make`, `gcc-12` and `libelf1` on the host
/// (`scripts/setup-debian.sh` installs them).
pub fn attack_module(cache: &Path, vmlinuz: &Path) -> Result<PathBuf, String> {
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .ok_or_else(|| format!("{}: not a vmlinuz-RELEASE", vmlinuz.display()))?
        .to_string();
    let headers = cache.join("headers").join(&release);
    let tree = headers.join(format!("usr/src/linux-headers-{release}"));
    if !tree.join("Makefile").is_file() {
        let debs = cache.join("debs");
        std::fs::create_dir_all(&debs).map_err(|e| e.to_string())?;
        let deb = fetch_deb(&debs, &format!("linux-headers-{release}"))?;
        let mut all = vec![deb.clone()];
        for dep in depends(&deb)? {
            if dep.starts_with("linux-headers-") || dep.starts_with("linux-kbuild-") {
                all.push(fetch_deb(&debs, &dep)?);
            }
        }
        let _ = std::fs::remove_dir_all(&headers);
        std::fs::create_dir_all(&headers).map_err(|e| e.to_string())?;
        for d in &all {
            run(Command::new("dpkg-deb").arg("-x").arg(d).arg(&headers))?;
        }
        // The per-flavour Makefile includes the common one by its
        // installed path: point it at the unpacked tree.
        let mk = tree.join("Makefile");
        let text = std::fs::read_to_string(&mk).map_err(|e| format!("{}: {e}", mk.display()))?;
        let abs = std::fs::canonicalize(&headers).map_err(|e| e.to_string())?;
        let fixed = text.replace(
            "include /usr/src/",
            &format!("include {}/usr/src/", abs.display()),
        );
        std::fs::write(&mk, fixed).map_err(|e| format!("{}: {e}", mk.display()))?;
    }
    let dir = cache.join("kmod").join(&release);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let dir = std::fs::canonicalize(&dir).map_err(|e| e.to_string())?;
    let src = dir.join("thinhv_attack.c");
    let ko = dir.join("thinhv_attack.ko");
    let same = std::fs::read_to_string(&src).is_ok_and(|t| t == ATTACK_MODULE_SRC);
    if same && ko.is_file() {
        return Ok(ko);
    }
    std::fs::write(&src, ATTACK_MODULE_SRC).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("Kbuild"), "obj-m := thinhv_attack.o\n").map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&ko);
    run(Command::new("make")
        .arg("-C")
        .arg(&tree)
        .arg(format!("M={}", dir.display()))
        .arg("modules"))
    .map_err(|e| {
        format!("{e}\nbuilding the attack module needs make, gcc-12 and libelf1: sudo apt-get install make gcc-12 libelf1")
    })?;
    if ko.is_file() {
        Ok(ko)
    } else {
        Err(format!("make produced no {}", ko.display()))
    }
}

/// Kernel and initramfs on the host, ready to copy to an ESP.
#[derive(Clone, Debug)]
pub struct LinuxImage {
    /// `vmlinuz` (EFI stub).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// Fetches the kernel (once) and builds the initramfs with `tool` into `cache`.
pub fn prepare(cache: &Path, tool: &Path) -> Result<LinuxImage, String> {
    let kernel = kernel(cache)?;
    let bb = busybox()?;
    let initrd = cache.join("initrd.img");
    let modules = modules_dir(&kernel);
    // The guest boots without it when it cannot be built (the attack
    // suite's test then fails, saying so); `cargo xtask run` never does.
    let kmod = attack_module(cache, &kernel)
        .map_err(|e| eprintln!("warning: no attack module in the guest: {e}"))
        .ok();
    std::fs::write(
        &initrd,
        initramfs(&bb, tool, modules.as_deref(), kmod.as_deref())?,
    )
    .map_err(|e| format!("{}: {e}", initrd.display()))?;
    Ok(LinuxImage { kernel, initrd })
}

impl crate::esp::Esp {
    /// Copies kernel and initramfs to their ESP paths.
    pub fn install_linux(&self, img: &LinuxImage) -> std::io::Result<()> {
        self.put_file(crate::esp::KERNEL, &img.kernel)?;
        self.put_file(crate::esp::INITRD, &img.initrd)
    }
}
