//! Bochs (Intel VMX + EPT in software): an ATA disk image holding the ESP,
//! a configuration, and the command that runs it headless.
//!
//! Debian's Bochs has no "nogui" display: the `term` display (package
//! `bochs-term`) runs under `script` so that it has a terminal, with a
//! fixed size (ncurses needs one). Sound is switched to dummy drivers (the
//! mixer thread crashes without a sound card). The build starts in its
//! debugger, so a `c` (continue) command file is passed.
//!
//! Debian 12's Bochs is 2.7, whose VMX has faults the tests trip over
//! (`docs/emulator-faults.md`). Where `scripts/build-bochs.sh` has built a
//! newer one from Debian's source package into the build directory's
//! cache (`cache/bochs/bochs`, its version in `cache/bochs/VERSION`), the
//! tests use that one, with the same configuration.
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Bochs `scripts/build-bochs.sh` built, and its (major, minor)
/// version, if there is one.
pub fn built() -> Option<(PathBuf, (u32, u32))> {
    let dir = crate::build_dir().join("cache/bochs");
    let bin = dir.join("bochs");
    let v = std::fs::read_to_string(dir.join("VERSION")).ok()?;
    bin.exists().then_some(())?;
    Some((bin, parse_version(v.trim())?))
}

/// The Bochs the tests run: the built one, else Debian's.
pub fn program() -> PathBuf {
    built().map_or_else(|| PathBuf::from("bochs"), |(bin, _)| bin)
}

/// The machine.
#[derive(Clone, Copy, Debug)]
pub struct Profile {
    /// Processors.
    pub cpus: u32,
    /// Memory in MiB.
    pub mem_mb: u32,
}

impl Default for Profile {
    fn default() -> Self {
        Self {
            cpus: 2,
            mem_mb: 512,
        }
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd} >/dev/null 2>&1"))
        .status()
        .is_ok_and(|s| s.success())
}

/// Checks that Bochs and the disk tools are installed (a built Bochs has
/// its `term` display compiled in).
pub fn check() -> Result<(), String> {
    let mut missing = Vec::new();
    let own = built().is_some();
    for (cmd, pkg) in [
        ("bochs", "bochs"),
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("script", "bsdutils"),
    ] {
        let built_in = own && cmd == "bochs";
        if !built_in && !have(cmd) {
            missing.push(pkg);
        }
    }
    let term = Path::new("/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_term_gui.so");
    if !own && !term.exists() {
        missing.push("bochs-term");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "Bochs test bed incomplete: install with `sudo apt-get install {} bochsbios vgabios` \
             (or `sudo bash scripts/setup-debian.sh`)",
            missing.join(" ")
        ))
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("{shown}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{shown}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A 64 MiB FAT32 disk image with the contents of `esp_dir`.
pub fn disk_image(esp_dir: &Path, img: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(img);
    // Bochs locks images with a side file; a killed run leaves it behind.
    let _ = std::fs::remove_file(img.with_extension("img.lock"));
    run(Command::new("mkfs.vfat")
        .args(["-C", "-F", "32"])
        .arg(img)
        .arg("65536"))?;
    let mut entries: Vec<_> = std::fs::read_dir(esp_dir)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    let mut cmd = Command::new("mcopy");
    cmd.arg("-s").arg("-i").arg(img).args(&entries).arg("::/");
    run(&mut cmd)
}

/// The `bochsrc`. Debian's build gets dummy sound drivers; a built one
/// has no sound support and takes no `sound` line.
pub fn config(ovmf_fd: &Path, disk: &Path, serial: &Path, log: &Path, p: Profile) -> String {
    config_for(ovmf_fd, disk, serial, log, p, built().is_none())
}

fn config_for(
    ovmf_fd: &Path,
    disk: &Path,
    serial: &Path,
    log: &Path,
    p: Profile,
    sound: bool,
) -> String {
    format!(
        "megs: {mem}\n\
         romimage: file={ovmf}, address=0xffe00000\n\
         vgaromimage: file=/usr/share/vgabios/vgabios-stdvga.bin\n\
         cpu: model=tigerlake, count={cpus}\n\
         ata0-master: type=disk, path={disk}, mode=flat\n\
         boot: disk\n\
         com1: enabled=true, mode=file, dev={serial}\n\
         display_library: term\n\
         speaker: enabled=0\n\
         {sound}\
         log: {log}\n\
         panic: action=fatal\n\
         error: action=report\n\
         info: action=ignore\n",
        mem = p.mem_mb,
        ovmf = ovmf_fd.display(),
        cpus = p.cpus,
        disk = disk.display(),
        serial = serial.display(),
        log = log.display(),
        sound = if sound {
            "sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n"
        } else {
            ""
        },
    )
}

/// The (major, minor) version of the Bochs the tests run: the built one's,
/// else as Debian's package records it.
pub fn version() -> Option<(u32, u32)> {
    if let Some((_, v)) = built() {
        return Some(v);
    }
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "bochs"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

/// "2.7+dfsg-4+deb12u1" → (2, 7); an epoch ("1:2.8-1") is skipped.
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let v = v.split_once(':').map_or(v, |(_, rest)| rest);
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The command: Bochs under `script` (a terminal for the `term` display),
/// continuing past its debugger prompt with the command file `rc`.
pub fn command(bochsrc: &Path, rc: &Path) -> Command {
    let mut c = Command::new("script");
    c.arg("-qfec")
        .arg(format!(
            "stty rows 30 cols 100; TERM=xterm exec {} -q -f {} -rc {}",
            program().display(),
            bochsrc.display(),
            rc.display()
        ))
        .arg("/dev/null");
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_what_debians_bochs_needs() {
        let c = config_for(
            Path::new("/o.fd"),
            Path::new("/d.img"),
            Path::new("/s.txt"),
            Path::new("/l"),
            Profile::default(),
            true,
        );
        assert!(c.contains("romimage: file=/o.fd, address=0xffe00000"));
        assert!(c.contains("cpu: model=tigerlake, count=2"));
        assert!(c.contains("display_library: term"));
        assert!(c.contains("sound: waveoutdrv=dummy"));
        assert!(c.contains("com1: enabled=true, mode=file, dev=/s.txt"));
        let cmd = command(Path::new("/b"), Path::new("/r"));
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[0], "-qfec");
        assert!(args[1].contains("bochs -q -f /b -rc /r"));
    }

    #[test]
    fn debian_versions_parse() {
        assert_eq!(parse_version("2.7+dfsg-4+deb12u1"), Some((2, 7)));
        assert_eq!(parse_version("1:2.8-1"), Some((2, 8)));
        assert_eq!(parse_version("3.0"), Some((3, 0)));
        assert_eq!(parse_version(""), None);
    }
}
