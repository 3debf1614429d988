//! The SVR4 "newc" cpio format the Linux initramfs uses
//! (`Documentation/driver-api/early-userspace/buffer-format.rst`).

/// One archive member.
#[derive(Clone, Debug)]
pub enum Entry {
    /// A directory.
    Dir(String),
    /// A regular file with its mode bits (e.g. 0o755).
    File(String, u32, Vec<u8>),
    /// A symbolic link: (path, target).
    Symlink(String, String),
    /// A character device: (path, major, minor).
    CharDev(String, u32, u32),
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, size: usize, rdev: (u32, u32), name: &str) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        u32::try_from(size).expect("cpio member larger than 4 GiB"),
        0,
        0,
        rdev.0,
        rdev.1,
        u32::try_from(name.len() + 1).expect("name length"),
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

/// Builds an archive.
pub fn archive(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = u32::try_from(i + 1).unwrap_or(u32::MAX);
        match e {
            Entry::Dir(p) => header(&mut out, ino, 0o040_755, 0, (0, 0), p),
            Entry::File(p, mode, data) => {
                header(&mut out, ino, 0o100_000 | mode, data.len(), (0, 0), p);
                out.extend_from_slice(data);
                pad4(&mut out);
            }
            Entry::Symlink(p, target) => {
                header(&mut out, ino, 0o120_777, target.len(), (0, 0), p);
                out.extend_from_slice(target.as_bytes());
                pad4(&mut out);
            }
            Entry::CharDev(p, major, minor) => {
                header(&mut out, ino, 0o020_600, 0, (*major, *minor), p);
            }
        }
    }
    header(&mut out, 0, 0, 0, (0, 0), "TRAILER!!!");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let a = archive(&[
            Entry::Dir("bin".into()),
            Entry::File("init".into(), 0o755, b"#!/bin/sh\n".to_vec()),
        ]);
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 4, 0);
        // Header is 110 bytes, then "bin\0", padded to 4.
        assert_eq!(&a[110..114], b"bin\0");
        let s = String::from_utf8_lossy(&a);
        assert!(s.contains("init\0"));
        assert!(s.contains("#!/bin/sh\n"));
        assert!(s.ends_with("TRAILER!!!\0\0\0\0") || s.contains("TRAILER!!!"));
        // Mode of the file: 0100755.
        let file_hdr = s
            .find("070701")
            .and_then(|_| s[114..].find("070701"))
            .unwrap()
            + 114;
        assert_eq!(&s[file_hdr + 14..file_hdr + 22], "000081ed");
    }
}
