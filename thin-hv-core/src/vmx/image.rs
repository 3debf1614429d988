//! A VMCS as data: the fields thinhv writes, built and checked on the host
//! before any `VMWRITE`.
use super::fields::Field;
use alloc::collections::BTreeMap;

/// Field values, by encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmcsImage {
    fields: BTreeMap<u32, u64>,
}

impl VmcsImage {
    /// An empty image.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a field (truncated to its width).
    pub fn set(&mut self, f: Field, v: u64) {
        let v = match f.width_bits() {
            16 => v & 0xffff,
            32 => v & 0xffff_ffff,
            _ => v,
        };
        self.fields.insert(f.0, v);
    }

    /// A field's value (0 when never set, as after VMCLEAR).
    pub fn get(&self, f: Field) -> u64 {
        self.fields.get(&f.0).copied().unwrap_or(0)
    }

    /// Whether a field was set.
    pub fn has(&self, f: Field) -> bool {
        self.fields.contains_key(&f.0)
    }

    /// All fields, in encoding order.
    pub fn iter(&self) -> impl Iterator<Item = (Field, u64)> + '_ {
        self.fields.iter().map(|(&k, &v)| (Field(k), v))
    }
}
