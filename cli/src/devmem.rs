//! Physical memory through `/dev/mem` (root; the kernel allows it for
//! regions that are not RAM, such as thinhv's reserved memory).
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

/// Reads `len` bytes at physical address `pa`.
pub fn read(pa: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = File::open("/dev/mem")?;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut buf[done..], pa + done as u64)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "short read from /dev/mem",
            ));
        }
        done += n;
    }
    Ok(buf)
}

/// Writes `data` at physical address `pa`; returns bytes the kernel
/// reported written (an error is a result too: the caller reports it).
pub fn write(pa: u64, data: &[u8]) -> std::io::Result<usize> {
    let f = OpenOptions::new().write(true).open("/dev/mem")?;
    f.write_at(data, pa)
}

/// Stores `value` at physical address `pa` (8-byte aligned) as one 8-byte
/// store through a shared mapping of `/dev/mem` (root: the kernel allows
/// it for regions that are not RAM). A `write()` would leave the kernel's
/// copy routine to choose the width of its stores; a doorbell needs one
/// aligned 8-byte store.
pub fn store_u64(pa: u64, value: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if !pa.is_multiple_of(8) {
        return Err(std::io::Error::other("unaligned doorbell"));
    }
    let f = OpenOptions::new().read(true).write(true).open("/dev/mem")?;
    let page = pa & !0xfff;
    let offset = libc::off_t::try_from(page).map_err(std::io::Error::other)?;
    // SAFETY: a new shared mapping of one page of /dev/mem, which aliases
    // no memory of this process.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let words = p.cast::<u64>();
    let index = usize::try_from((pa - page) / 8).map_err(std::io::Error::other)?;
    // SAFETY: the mapping is page-aligned, so `words` is aligned for u64;
    // `index` < 512 keeps the word in the page just mapped; a volatile
    // store of a u64 is one 8-byte store. The page is unmapped after.
    unsafe {
        words.add(index).write_volatile(value);
        libc::munmap(p, 4096);
    }
    Ok(())
}
