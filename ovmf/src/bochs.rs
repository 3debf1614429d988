//! Bochs (Intel VMX + EPT in software): an ATA disk image holding the ESP,
//! a configuration, and the command that runs it headless.
//!
//! Debian's Bochs has no "nogui" display: the `term` display (package
//! `bochs-term`) runs under `script` so that it has a terminal, with a
//! fixed size (ncurses needs one). Sound is switched to dummy drivers (the
//! mixer thread crashes without a sound card). The build starts in its
//! debugger, so a `c` (continue) command file is passed.
use std::path::Path;
use std::process::Command;

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

/// Checks that Bochs and the disk tools are installed.
pub fn check() -> Result<(), String> {
    let mut missing = Vec::new();
    for (cmd, pkg) in [
        ("bochs", "bochs"),
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("script", "bsdutils"),
    ] {
        if !have(cmd) {
            missing.push(pkg);
        }
    }
    let term = Path::new("/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_term_gui.so");
    if !term.exists() {
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

/// The `bochsrc`.
pub fn config(ovmf_fd: &Path, disk: &Path, serial: &Path, log: &Path, p: Profile) -> String {
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
         sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n\
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
    )
}

/// Bochs's (major, minor) version as Debian's package records it, if
/// Bochs came from a Debian package.
pub fn version() -> Option<(u32, u32)> {
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
            "stty rows 30 cols 100; TERM=xterm exec bochs -q -f {} -rc {}",
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
        let c = config(
            Path::new("/o.fd"),
            Path::new("/d.img"),
            Path::new("/s.txt"),
            Path::new("/l"),
            Profile::default(),
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
