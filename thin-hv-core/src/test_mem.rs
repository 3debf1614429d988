//! Memory for the OS IOMMU tests: the OS's RAM as a byte vector, and
//! thinhv's table memory as a map of frames.
use std::collections::HashMap;
use thinhv_paging::PhysMem;
use thinhv_passthrough::vvtd::{Denied, OsMemory};

/// The OS's RAM: `Vec::len()` bytes at 0; anything past it is refused.
pub struct OsRam(pub Vec<u8>);

impl OsMemory for OsRam {
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), Denied> {
        let at = usize::try_from(gpa).map_err(|_| Denied)?;
        let src = self.0.get(at..at + out.len()).ok_or(Denied)?;
        out.copy_from_slice(src);
        Ok(())
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), Denied> {
        let at = usize::try_from(gpa).map_err(|_| Denied)?;
        self.0
            .get_mut(at..at + data.len())
            .ok_or(Denied)?
            .copy_from_slice(data);
        Ok(())
    }
}

impl OsRam {
    /// Stores the quadword `v` at `gpa`.
    pub fn put(&mut self, gpa: u64, v: u64) {
        let at = usize::try_from(gpa).unwrap();
        self.0[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
}

/// thinhv's memory for shadow tables.
#[derive(Default)]
pub struct Tables(pub HashMap<u64, Box<[u64; 512]>>);

impl PhysMem for Tables {
    fn read_entry(&self, table: u64, index: usize) -> u64 {
        self.0.get(&table).map_or(0, |t| t[index])
    }
    fn write_entry(&mut self, table: u64, index: usize, value: u64) {
        self.0.entry(table).or_insert_with(|| Box::new([0; 512]))[index] = value;
    }
    fn zero_frame(&mut self, frame: u64) {
        self.0.insert(frame, Box::new([0; 512]));
    }
}
