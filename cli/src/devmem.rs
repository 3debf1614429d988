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
