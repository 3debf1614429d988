//! What the test beds need, checked (and installed when we are root on
//! Debian, through `scripts/setup-debian.sh`).
use crate::{root, sh};
use std::process::Command;

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd} >/dev/null 2>&1"))
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Missing pieces, as messages.
fn missing() -> Vec<String> {
    let mut m = Vec::new();
    if let Err(e) = thinhv_ovmf::qemu::check() {
        m.push(e);
    }
    if let Err(e) = thinhv_ovmf::firmware::find() {
        m.push(e);
    }
    if let Err(e) = thinhv_ovmf::linux::busybox() {
        m.push(e);
    }
    if let Err(e) = thinhv_ovmf::bochs::check() {
        m.push(e);
    }
    if let Err(e) = thinhv_ovmf::firmware::find_combined() {
        m.push(e);
    }
    for tool in ["apt-get", "dpkg-deb"] {
        if !have(tool) {
            m.push(format!("{tool} not found (a Debian system is expected)"));
        }
    }
    // The attack suite's kernel module is built against the guest
    // kernel's headers (`thinhv_ovmf::linux::attack_module`).
    for tool in ["make", "gcc-12"] {
        if !have(tool) {
            m.push(format!(
                "{tool} not found (`sudo apt-get install {tool}`; builds the attack module)"
            ));
        }
    }
    let installed = |pkg: &str| {
        Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
    };
    if !installed("libelf1") {
        m.push(
            "libelf1 not installed (`sudo apt-get install libelf1`; the kernel's objtool needs it)"
                .into(),
        );
    }
    // A newer Bochs is built from Debian's source where the packaged one
    // is older than 2.8 (`scripts/build-bochs.sh`).
    if needs_newer_bochs() && !(have("g++") && installed("libncurses-dev")) {
        m.push(
            "g++ or libncurses-dev not installed (`sudo apt-get install g++ libncurses-dev`; \
             they build Bochs 3.0 for the VMX tests)"
                .into(),
        );
    }
    m
}

/// Whether the tests would run Bochs older than 2.8 (Debian 12's 2.7).
fn needs_newer_bochs() -> bool {
    thinhv_ovmf::bochs::built().is_none()
        && thinhv_ovmf::bochs::version().is_some_and(|v| v < (2, 8))
}

/// Builds Bochs from Debian's source where the packaged one is older
/// than 2.8. A failure is reported and leaves the packaged one, whose
/// tests that need 2.8 then say SKIPPED.
fn newer_bochs() {
    if !needs_newer_bochs() {
        return;
    }
    println!("xtask: building Bochs from Debian's source (Debian 12's 2.7 has VMX faults)");
    let r = sh(Command::new("bash")
        .arg(root().join("scripts/build-bochs.sh"))
        .arg(thinhv_ovmf::build_dir())
        .current_dir(root()));
    if let Err(e) = r {
        println!("xtask: warning: Bochs was not built ({e}); the tests use Bochs 2.7");
    }
}

/// Makes sure the emulators and tools are there.
pub fn ensure() -> Result<(), String> {
    rust_targets()?;
    let m = missing();
    if m.is_empty() {
        newer_bochs();
        return Ok(());
    }
    if is_root() {
        println!("xtask: installing test-bed packages ({})", m.join("; "));
        setup()?;
        let m = missing();
        if m.is_empty() {
            newer_bochs();
            Ok(())
        } else {
            Err(m.join("\n"))
        }
    } else {
        Err(format!(
            "{}\n\nInstall what is missing with:\n  sudo bash {}/scripts/setup-debian.sh",
            m.join("\n"),
            root().display()
        ))
    }
}

/// Runs the setup script.
pub fn setup() -> Result<(), String> {
    sh(Command::new("bash").arg(root().join("scripts/setup-debian.sh")))
}

/// The two bare-metal targets (the toolchain file lists them; older rustup
/// versions do not install them on their own).
pub fn rust_targets() -> Result<(), String> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(root())
        .output();
    let Ok(out) = out else {
        // No rustup: trust the toolchain to have them, cargo will say if not.
        return Ok(());
    };
    let have = String::from_utf8_lossy(&out.stdout);
    for t in ["x86_64-unknown-uefi", "x86_64-unknown-none"] {
        if !have.lines().any(|l| l.trim() == t) {
            sh(Command::new("rustup")
                .args(["target", "add", t])
                .current_dir(root()))?;
        }
    }
    Ok(())
}
