//! Loading the core's ELF (a static position-independent executable) into
//! the reserved region: copy the `PT_LOAD` segments, zero the rest, apply
//! `R_X86_64_RELATIVE` relocations for the load address, and report the
//! entry point and the read-only ranges the integrity check covers.
//!
//! Anything else (another machine, dynamic dependencies, other relocation
//! types, segments outside the file) is refused: the core is built to need
//! nothing more, and the build validates that with this same code.
use alloc::vec::Vec;
use goblin::elf::Elf;
use goblin::elf::header::{EM_X86_64, ET_DYN};
use goblin::elf::program_header::{PF_W, PF_X, PT_DYNAMIC, PT_GNU_RELRO, PT_INTERP, PT_LOAD};
use goblin::elf::reloc::R_X86_64_RELATIVE;

/// Why an ELF cannot be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// goblin could not parse it.
    Parse,
    /// Not a 64-bit x86-64 position-independent executable.
    NotPie,
    /// It wants an interpreter or libraries.
    Dynamic,
    /// A segment lies outside the file or the image.
    BadSegment,
    /// No loadable segment.
    Empty,
    /// A relocation type other than `R_X86_64_RELATIVE`.
    UnsupportedRelocation(u32),
    /// A relocation outside the image.
    BadRelocation(u64),
    /// The entry point is not in an executable segment.
    BadEntry,
    /// The destination is smaller than the image.
    TooSmall,
}

impl core::fmt::Display for ElfError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Parse => write!(f, "not a valid ELF file"),
            Self::NotPie => write!(f, "not an x86-64 position-independent executable"),
            Self::Dynamic => write!(f, "needs an interpreter or shared libraries"),
            Self::BadSegment => write!(f, "a segment lies outside the file or image"),
            Self::Empty => write!(f, "no loadable segment"),
            Self::UnsupportedRelocation(t) => write!(f, "unsupported relocation type {t}"),
            Self::BadRelocation(o) => write!(f, "relocation at {o:#x} outside the image"),
            Self::BadEntry => write!(f, "entry point outside executable code"),
            Self::TooSmall => write!(f, "destination smaller than the image"),
        }
    }
}

/// What the image needs, before loading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes from the lowest to the highest loaded address (page-rounded).
    pub span: u64,
    /// Entry point, as an offset from the load base.
    pub entry: u64,
    /// Read-only ranges (offset, length) after relocation: segments without
    /// write permission and the RELRO range.
    pub ro: Vec<(u64, u64)>,
    /// Number of relocations.
    pub relocations: usize,
}

fn parse(bytes: &[u8]) -> Result<Elf<'_>, ElfError> {
    let elf = Elf::parse(bytes).map_err(|_| ElfError::Parse)?;
    if !elf.is_64 || elf.header.e_machine != EM_X86_64 || elf.header.e_type != ET_DYN {
        return Err(ElfError::NotPie);
    }
    if elf.interpreter.is_some()
        || !elf.libraries.is_empty()
        || elf.program_headers.iter().any(|p| p.p_type == PT_INTERP)
    {
        return Err(ElfError::Dynamic);
    }
    Ok(elf)
}

/// Examines an ELF without loading it.
pub fn layout(bytes: &[u8]) -> Result<Layout, ElfError> {
    let elf = parse(bytes)?;
    let loads: Vec<_> = elf
        .program_headers
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .collect();
    if loads.is_empty() {
        return Err(ElfError::Empty);
    }
    let mut end = 0u64;
    for p in &loads {
        let seg_end = p
            .p_vaddr
            .checked_add(p.p_memsz)
            .ok_or(ElfError::BadSegment)?;
        let file_end = p
            .p_offset
            .checked_add(p.p_filesz)
            .ok_or(ElfError::BadSegment)?;
        if p.p_filesz > p.p_memsz || file_end > bytes.len() as u64 {
            return Err(ElfError::BadSegment);
        }
        end = end.max(seg_end);
    }
    let span = end.div_ceil(4096) * 4096;
    if span > 64 << 20 {
        return Err(ElfError::BadSegment);
    }
    let entry = elf.header.e_entry;
    let in_exec = loads
        .iter()
        .any(|p| p.p_flags & PF_X != 0 && entry >= p.p_vaddr && entry < p.p_vaddr + p.p_memsz);
    if !in_exec {
        return Err(ElfError::BadEntry);
    }
    let mut ro: Vec<(u64, u64)> = loads
        .iter()
        .filter(|p| p.p_flags & PF_W == 0)
        .map(|p| (p.p_vaddr, p.p_memsz))
        .collect();
    for p in elf
        .program_headers
        .iter()
        .filter(|p| p.p_type == PT_GNU_RELRO)
    {
        ro.push((p.p_vaddr, p.p_memsz));
    }
    let _ = PT_DYNAMIC;
    if !elf.dynrels.is_empty() || !elf.pltrelocs.is_empty() {
        let t = elf
            .dynrels
            .iter()
            .chain(elf.pltrelocs.iter())
            .next()
            .map_or(0, |r| r.r_type);
        return Err(ElfError::UnsupportedRelocation(t));
    }
    for r in &elf.dynrelas {
        if r.r_type != R_X86_64_RELATIVE {
            return Err(ElfError::UnsupportedRelocation(r.r_type));
        }
        if r.r_offset.checked_add(8).is_none_or(|e| e > end) {
            return Err(ElfError::BadRelocation(r.r_offset));
        }
    }
    Ok(Layout {
        span,
        entry,
        ro,
        relocations: elf.dynrelas.len(),
    })
}

/// Loads `bytes` into `dest`, which will live at physical address `base`.
/// Returns the layout (entry and read-only ranges are offsets from `base`).
pub fn load(bytes: &[u8], dest: &mut [u8], base: u64) -> Result<Layout, ElfError> {
    let lay = layout(bytes)?;
    if (dest.len() as u64) < lay.span {
        return Err(ElfError::TooSmall);
    }
    let elf = parse(bytes)?;
    // `layout` bounded every offset below by the image span (at most
    // 64 MiB) and the file length, so the conversions cannot fail.
    let idx = |v: u64| usize::try_from(v).map_err(|_| ElfError::BadSegment);
    dest[..idx(lay.span)?].fill(0);
    for p in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD) {
        let src = &bytes[idx(p.p_offset)?..idx(p.p_offset + p.p_filesz)?];
        let at = idx(p.p_vaddr)?;
        dest[at..at + src.len()].copy_from_slice(src);
    }
    for r in &elf.dynrelas {
        let value = base.wrapping_add_signed(r.r_addend.unwrap_or(0));
        let at = idx(r.r_offset)?;
        dest[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
    Ok(lay)
}

/// CRC-32 over the read-only ranges of a loaded image, in order.
pub fn ro_crc(image: &[u8], ro: &[(u64, u64)]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for &(off, len) in ro {
        let end = usize::try_from(off.saturating_add(len))
            .unwrap_or(usize::MAX)
            .min(image.len());
        let start = usize::try_from(off).unwrap_or(usize::MAX).min(end);
        h.update(&image[start..end]);
    }
    h.finalize()
}

/// Builds small ELF images for tests (here and in other crates' tests).
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub mod testelf {
    use alloc::vec::Vec;

    /// A PIE with a text segment at 0 (file offset 0), a data segment at
    /// 0x2000 (with `data` bytes and `bss` more zero bytes), a dynamic
    /// section and the given relocations (offset, type, addend).
    pub fn build(data: &[u8], bss: u64, relocs: &[(u64, u32, i64)], entry: u64) -> Vec<u8> {
        let ehdr = 64usize;
        let phnum = 3usize;
        let ph_off = ehdr;
        let text_off = 0x1000usize;
        let text = [0xc3u8; 16];
        let data_off = 0x2000usize;
        let dyn_off = data_off + data.len();
        let dyn_entries: [(u64, u64); 4] = [
            (7, (dyn_off + 4 * 16) as u64),  // DT_RELA
            (8, (relocs.len() * 24) as u64), // DT_RELASZ
            (9, 24),                         // DT_RELAENT
            (0, 0),                          // DT_NULL
        ];
        let rela_off = dyn_off + 4 * 16;
        let file_len = rela_off + relocs.len() * 24;
        let mut f = vec![0u8; file_len];
        // ELF header.
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little-endian
        f[6] = 1;
        f[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&(ph_off as u64).to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
        f[58..60].copy_from_slice(&64u16.to_le_bytes());
        let mut ph =
            |i: usize, ty: u32, flags: u32, off: usize, vaddr: u64, filesz: u64, memsz: u64| {
                let b = ph_off + i * 56;
                f[b..b + 4].copy_from_slice(&ty.to_le_bytes());
                f[b + 4..b + 8].copy_from_slice(&flags.to_le_bytes());
                f[b + 8..b + 16].copy_from_slice(&(off as u64).to_le_bytes());
                f[b + 16..b + 24].copy_from_slice(&vaddr.to_le_bytes());
                f[b + 24..b + 32].copy_from_slice(&vaddr.to_le_bytes());
                f[b + 32..b + 40].copy_from_slice(&filesz.to_le_bytes());
                f[b + 40..b + 48].copy_from_slice(&memsz.to_le_bytes());
                f[b + 48..b + 56].copy_from_slice(&0x1000u64.to_le_bytes());
            };
        let data_file = (file_len - data_off) as u64;
        ph(
            0,
            1,
            5,
            0,
            0,
            (text_off + text.len()) as u64,
            (text_off + text.len()) as u64,
        );
        ph(
            1,
            1,
            6,
            data_off,
            data_off as u64,
            data_file,
            data_file + bss,
        );
        ph(2, 2, 6, dyn_off, dyn_off as u64, 64, 64);
        f[text_off..text_off + text.len()].copy_from_slice(&text);
        f[data_off..data_off + data.len()].copy_from_slice(data);
        for (i, (tag, val)) in dyn_entries.iter().enumerate() {
            let b = dyn_off + i * 16;
            f[b..b + 8].copy_from_slice(&tag.to_le_bytes());
            f[b + 8..b + 16].copy_from_slice(&val.to_le_bytes());
        }
        for (i, &(off, ty, addend)) in relocs.iter().enumerate() {
            let b = rela_off + i * 24;
            f[b..b + 8].copy_from_slice(&off.to_le_bytes());
            f[b + 8..b + 16].copy_from_slice(&u64::from(ty).to_le_bytes());
            f[b + 16..b + 24].copy_from_slice(&addend.to_le_bytes());
        }
        f
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::testelf::build;
    use super::*;

    #[test]
    fn loads_and_relocates() {
        let elf = build(
            &[0xaa; 32],
            0x3000,
            &[(0x2000, 8, 0x1004), (0x2008, 8, 0x2000)],
            0x1000,
        );
        let lay = layout(&elf).unwrap();
        assert_eq!(lay.entry, 0x1000);
        assert_eq!(lay.relocations, 2);
        assert_eq!(lay.span % 4096, 0);
        assert!(lay.span >= 0x2000 + 0x3000);
        let mut dest = vec![0x55u8; lay.span as usize + 4096];
        let base = 0x7e00_0000u64;
        load(&elf, &mut dest, base).unwrap();
        assert_eq!(&dest[0x1000..0x1010], &[0xc3; 16]);
        assert_eq!(
            u64::from_le_bytes(dest[0x2000..0x2008].try_into().unwrap()),
            base + 0x1004
        );
        assert_eq!(
            u64::from_le_bytes(dest[0x2008..0x2010].try_into().unwrap()),
            base + 0x2000
        );
        assert_eq!(&dest[0x2010..0x2018], &[0xaa; 8], "data copied");
        // BSS zeroed (the buffer was filled with 0x55).
        assert!(
            dest[lay.span as usize - 16..lay.span as usize]
                .iter()
                .all(|&b| b == 0)
        );
        assert_eq!(
            dest[lay.span as usize], 0x55,
            "nothing written past the image"
        );
        // The read-only range is the text segment; its CRC is stable.
        assert_eq!(lay.ro, vec![(0, 0x1010)]);
        let crc = ro_crc(&dest, &lay.ro);
        dest[0x2000] ^= 1; // writable data does not count
        assert_eq!(ro_crc(&dest, &lay.ro), crc);
        dest[0x1000] ^= 1;
        assert_ne!(ro_crc(&dest, &lay.ro), crc);
    }

    #[test]
    fn refuses_what_the_core_never_needs() {
        let elf = build(&[0; 16], 0, &[(0x2000, 1, 0)], 0x1000); // R_X86_64_64
        assert_eq!(layout(&elf), Err(ElfError::UnsupportedRelocation(1)));
        let elf = build(&[0; 16], 0, &[(0x10_0000, 8, 0)], 0x1000);
        assert_eq!(layout(&elf), Err(ElfError::BadRelocation(0x10_0000)));
        let elf = build(&[0; 16], 0, &[], 0x2004); // entry in data
        assert_eq!(layout(&elf), Err(ElfError::BadEntry));
        let mut elf = build(&[0; 16], 0, &[], 0x1000);
        elf[18] = 3; // EM_386
        assert_eq!(layout(&elf), Err(ElfError::NotPie));
        let mut elf = build(&[0; 16], 0, &[], 0x1000);
        elf[16] = 2; // ET_EXEC
        assert_eq!(layout(&elf), Err(ElfError::NotPie));
        assert_eq!(layout(b"\x7fELF garbage"), Err(ElfError::Parse));
        let elf = build(&[0; 16], 0, &[], 0x1000);
        assert!(layout(&elf[..0x1800]).is_err());
        let elf = build(&[0; 16], 0, &[], 0x1000);
        let mut small = vec![0u8; 0x1000];
        assert_eq!(load(&elf, &mut small, 0), Err(ElfError::TooSmall));
    }

    #[test]
    fn truncated_files_never_panic() {
        let elf = build(&[1; 64], 0x100, &[(0x2000, 8, 0x10)], 0x1000);
        for n in 0..elf.len() {
            let _ = layout(&elf[..n]);
        }
    }
}
