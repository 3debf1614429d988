//! The log ring: the last N bytes of the log, with a monotonically growing
//! head (bytes ever written). See `thinhv_abi::status` for the reader's side.

/// Position `pos` in a ring of `len` bytes (`len` > 0; the result is < `len`,
/// which is a slice length, so it fits a `usize`).
fn index(pos: u64, len: u64) -> usize {
    usize::try_from(pos % len).unwrap_or(0)
}

/// Appends `data` to `ring` whose head is `head`; returns the new head.
pub fn write(ring: &mut [u8], head: u64, data: &[u8]) -> u64 {
    let len = ring.len() as u64;
    if len == 0 {
        return head + data.len() as u64;
    }
    // Only the last `len` bytes of `data` can survive.
    let skip = data.len().saturating_sub(ring.len());
    let mut h = head + skip as u64;
    for &b in &data[skip..] {
        ring[index(h, len)] = b;
        h += 1;
    }
    h
}

/// Reads from position `pos` (clamped to what the ring still holds) into
/// `out`. Returns (bytes copied, position after them, head).
pub fn read(ring: &[u8], head: u64, pos: u64, out: &mut [u8]) -> (usize, u64, u64) {
    let len = ring.len() as u64;
    let oldest = head.saturating_sub(len);
    let pos = pos.clamp(oldest, head);
    let n = usize::try_from(head - pos)
        .unwrap_or(usize::MAX)
        .min(out.len());
    for (i, o) in out.iter_mut().take(n).enumerate() {
        *o = ring[index(pos + i as u64, len)];
    }
    (n, pos + n as u64, head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_and_keeps_the_newest_bytes() {
        let mut ring = [0u8; 8];
        let mut h = write(&mut ring, 0, b"hello");
        assert_eq!(h, 5);
        h = write(&mut ring, h, b" world");
        assert_eq!(h, 11);
        let mut out = [0u8; 16];
        let (n, next, head) = read(&ring, h, 0, &mut out);
        assert_eq!((n, next, head), (8, 11, 11));
        assert_eq!(&out[..n], b"lo world");
        let (n, next, _) = read(&ring, h, 9, &mut out);
        assert_eq!(&out[..n], b"ld");
        assert_eq!(next, 11);
        let (n, _, _) = read(&ring, h, 11, &mut out);
        assert_eq!(n, 0);
        // A write larger than the ring keeps its tail.
        let h2 = write(&mut ring, h, b"0123456789abcdef");
        assert_eq!(h2, h + 16);
        let (n, _, _) = read(&ring, h2, 0, &mut out);
        assert_eq!(&out[..n], b"89abcdef");
    }

    #[test]
    fn short_reads_resume() {
        let mut ring = [0u8; 64];
        let h = write(&mut ring, 0, b"abcdefghij");
        let mut out = [0u8; 4];
        let (n, next, _) = read(&ring, h, 0, &mut out);
        assert_eq!((&out[..n], next), (&b"abcd"[..], 4));
        let (n, next, _) = read(&ring, h, next, &mut out);
        assert_eq!((&out[..n], next), (&b"efgh"[..], 8));
    }
}
