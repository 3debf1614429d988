//! Which partition the ESP is, as the firmware names it in a boot entry:
//! number, first LBA and size in the disk's logical blocks, and the GPT
//! partition GUID (or the MBR disk signature).
//!
//! Found from the mount: the file system's device number leads through
//! `/sys/dev/block` to the partition and its disk, whose partition table
//! is read directly (no udev needed).
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use thinhv_efi::boot_option::{Partition, PartitionId};

/// GUID text (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`) to on-disk bytes
/// (first three fields little-endian).
pub fn guid_bytes(s: &str) -> Option<[u8; 16]> {
    let parts: Vec<&str> = s.split('-').collect();
    let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    if lens != [8, 4, 4, 4, 12] || !s.chars().all(|c| c == '-' || c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&u32::from_str_radix(parts[0], 16).ok()?.to_le_bytes());
    out[4..6].copy_from_slice(&u16::from_str_radix(parts[1], 16).ok()?.to_le_bytes());
    out[6..8].copy_from_slice(&u16::from_str_radix(parts[2], 16).ok()?.to_le_bytes());
    let tail = format!("{}{}", parts[3], parts[4]);
    for (i, b) in out[8..].iter_mut().enumerate() {
        *b = u8::from_str_radix(&tail[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// On-disk GUID bytes to text.
pub fn guid_text(b: &[u8; 16]) -> String {
    use std::fmt::Write;
    let mut s = format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-",
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
    );
    for x in &b[10..] {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// For reports: `partition 1, GPT 1234…, LBA 2048 + 1048576`.
pub fn describe(p: &Partition) -> String {
    let id = match p.id {
        PartitionId::Gpt(g) => format!("GPT {}", guid_text(&g)),
        PartitionId::Mbr(s) => format!("MBR signature {s:08x}"),
    };
    format!("partition {}, {id}, LBA {} + {}", p.number, p.start, p.size)
}

/// `gpt:GUID:NUMBER:START:SIZE` or `mbr:SIGNATURE:NUMBER:START:SIZE` (hex
/// signature, decimal numbers): the ESP when it is not a mounted partition
/// of this machine, such as a disk image being prepared.
pub fn parse_partition_spec(s: &str) -> Result<Partition, String> {
    let bad = || {
        format!(
            "--esp-partition {s:?}: expected gpt:GUID:NUMBER:START:SIZE or mbr:SIGNATURE:NUMBER:START:SIZE"
        )
    };
    let f: Vec<&str> = s.split(':').collect();
    let [kind, id, number, start, size] = f.as_slice() else {
        return Err(bad());
    };
    let id = match *kind {
        "gpt" => PartitionId::Gpt(guid_bytes(id).ok_or_else(bad)?),
        "mbr" => PartitionId::Mbr(u32::from_str_radix(id, 16).map_err(|_| bad())?),
        _ => return Err(bad()),
    };
    Ok(Partition {
        number: number.parse().map_err(|_| bad())?,
        start: start.parse().map_err(|_| bad())?,
        size: size.parse().map_err(|_| bad())?,
        id,
    })
}

/// The unique GUID of the GPT partition `number` that starts at `start`
/// (LBAs of `lbs` bytes), read from `disk`.
pub fn gpt_partition_guid(
    disk: &mut (impl Read + Seek),
    lbs: u64,
    number: u32,
    start: u64,
) -> Result<[u8; 16], String> {
    let mut hdr = [0u8; 92];
    disk.seek(SeekFrom::Start(lbs))
        .and_then(|_| disk.read_exact(&mut hdr))
        .map_err(|e| format!("reading the GPT header: {e}"))?;
    if &hdr[..8] != b"EFI PART" {
        return Err("no GPT header".into());
    }
    let u32_at = |o: usize| u32::from_le_bytes([hdr[o], hdr[o + 1], hdr[o + 2], hdr[o + 3]]);
    let entries_lba = u64::from_le_bytes(hdr[72..80].try_into().unwrap_or_default());
    let count = u32_at(80);
    let size = u64::from(u32_at(84));
    if number == 0 || number > count || size < 128 {
        return Err(format!(
            "partition {number} is not in the GPT ({count} entries)"
        ));
    }
    let mut e = [0u8; 128];
    disk.seek(SeekFrom::Start(
        entries_lba * lbs + u64::from(number - 1) * size,
    ))
    .and_then(|_| disk.read_exact(&mut e))
    .map_err(|e| format!("reading GPT entry {number}: {e}"))?;
    let first = u64::from_le_bytes(e[32..40].try_into().unwrap_or_default());
    if first != start {
        return Err(format!(
            "GPT entry {number} starts at LBA {first}, the kernel says {start}"
        ));
    }
    let mut g = [0u8; 16];
    g.copy_from_slice(&e[16..32]);
    Ok(g)
}

/// The MBR disk signature, if the first sector is an MBR.
pub fn mbr_signature(sector0: &[u8]) -> Option<u32> {
    (sector0.len() >= 512 && sector0[510] == 0x55 && sector0[511] == 0xaa).then(|| {
        u32::from_le_bytes([
            sector0[0x1b8],
            sector0[0x1b9],
            sector0[0x1ba],
            sector0[0x1bb],
        ])
    })
}

fn read_num(p: &Path) -> Result<u64, String> {
    fs::read_to_string(p)
        .map_err(|e| format!("{}: {e}", p.display()))?
        .trim()
        .parse()
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// The partition the file system at `esp` lives on.
pub fn esp_partition(esp: &Path) -> Result<Partition, String> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(esp).map_err(|e| format!("{}: {e}", esp.display()))?;
    let dev = md.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = Path::new("/sys/dev/block").join(format!("{major}:{minor}"));
    let hint = "give the partition with --esp-partition, or mount the ESP";
    let part_dir = fs::canonicalize(&sys).map_err(|e| {
        format!(
            "{} is not on a block device partition ({}: {e}); {hint}",
            esp.display(),
            sys.display()
        )
    })?;
    let number = u32::try_from(
        read_num(&part_dir.join("partition"))
            .map_err(|e| format!("{} is not on a partition ({e}); {hint}", esp.display()))?,
    )
    .map_err(|e| e.to_string())?;
    let disk_dir = part_dir.parent().ok_or("no disk for the partition")?;
    let disk_name = disk_dir
        .file_name()
        .ok_or("no disk name")?
        .to_string_lossy()
        .into_owned();
    let lbs = read_num(&disk_dir.join("queue/logical_block_size")).unwrap_or(512);
    let start = read_num(&part_dir.join("start"))? * 512 / lbs;
    let size = read_num(&part_dir.join("size"))? * 512 / lbs;
    let dev_path = Path::new("/dev").join(&disk_name);
    let mut disk = fs::File::open(&dev_path)
        .map_err(|e| format!("{}: {e} (run as root)", dev_path.display()))?;
    let id = match gpt_partition_guid(&mut disk, lbs, number, start) {
        Ok(g) => PartitionId::Gpt(g),
        Err(gpt_err) => {
            let mut s0 = [0u8; 512];
            disk.seek(SeekFrom::Start(0))
                .and_then(|_| disk.read_exact(&mut s0))
                .map_err(|e| format!("{}: {e}", dev_path.display()))?;
            PartitionId::Mbr(mbr_signature(&s0).ok_or_else(|| {
                format!("{}: neither GPT ({gpt_err}) nor MBR", dev_path.display())
            })?)
        }
    };
    Ok(Partition {
        number,
        start,
        size,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn guids_convert_both_ways() {
        let t = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
        let b = guid_bytes(t).unwrap();
        assert_eq!(&b[..4], &[0x28, 0x73, 0x2a, 0xc1]);
        assert_eq!(&b[8..], &[0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b]);
        assert_eq!(guid_text(&b), t);
        assert_eq!(guid_bytes("c12a7328-f81f-11d2-ba4b-00a0c93ec93"), None);
        assert_eq!(guid_bytes("g12a7328-f81f-11d2-ba4b-00a0c93ec93b"), None);
    }

    /// A disk image with a GPT whose entry 2 starts at LBA 4096.
    fn disk(lbs: u64) -> Vec<u8> {
        let lbs_us = usize::try_from(lbs).unwrap();
        let mut d = vec![0u8; lbs_us * 40];
        let h = lbs_us;
        d[h..h + 8].copy_from_slice(b"EFI PART");
        d[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
        d[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
        d[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
        let e = 2 * lbs_us + 128;
        d[e + 16..e + 32].copy_from_slice(&[7; 16]);
        d[e + 32..e + 40].copy_from_slice(&4096u64.to_le_bytes());
        d
    }

    #[test]
    fn reads_the_partition_guid_from_the_gpt() {
        for lbs in [512, 4096] {
            let mut c = Cursor::new(disk(lbs));
            assert_eq!(gpt_partition_guid(&mut c, lbs, 2, 4096), Ok([7; 16]));
            assert!(
                gpt_partition_guid(&mut c, lbs, 2, 2048).is_err(),
                "start mismatch"
            );
            assert!(gpt_partition_guid(&mut c, lbs, 0, 4096).is_err());
            assert!(gpt_partition_guid(&mut c, lbs, 200, 4096).is_err());
        }
        let mut c = Cursor::new(vec![0u8; 4096]);
        assert!(gpt_partition_guid(&mut c, 512, 1, 0).is_err());
    }

    #[test]
    fn mbr_signature_needs_the_boot_signature() {
        let mut s = vec![0u8; 512];
        s[0x1b8..0x1bc].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        assert_eq!(mbr_signature(&s), None);
        s[510] = 0x55;
        s[511] = 0xaa;
        assert_eq!(mbr_signature(&s), Some(0xdead_beef));
    }

    #[test]
    fn partition_specs() {
        let p =
            parse_partition_spec("gpt:c12a7328-f81f-11d2-ba4b-00a0c93ec93b:1:2048:204800").unwrap();
        assert_eq!((p.number, p.start, p.size), (1, 2048, 204_800));
        let m = parse_partition_spec("mbr:1234abcd:1:63:1000").unwrap();
        assert_eq!(m.id, PartitionId::Mbr(0x1234_abcd));
        assert!(parse_partition_spec("gpt:xyz:1:2:3").is_err());
        assert!(parse_partition_spec("gpt:c12a7328-f81f-11d2-ba4b-00a0c93ec93b:1:2048").is_err());
        assert!(describe(&p).contains("GPT c12a7328-f81f-11d2-ba4b-00a0c93ec93b"));
    }
}
