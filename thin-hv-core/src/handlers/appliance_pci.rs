//! The PCI configuration space an appliance sees (`docs/appliances.md`):
//! configuration mechanism 1 (ports 0xCF8 and 0xCFC–0xCFF, a latch per
//! processor) on one bus, 0, where each function it was given sits at the
//! device number the loader chose. Nothing else answers (all ones).
//!
//! Reads and writes reach the real function, except where they would
//! reach beyond the appliance:
//!
//! - the BARs are registers of thinhv's: sizing works (all ones, then the
//!   address back), but the real BAR never moves — its addresses are
//!   what the appliance's second-level tables map and the OS's do not;
//! - I/O space enable stays off (its I/O BARs are not given) and the
//!   expansion ROM BAR reads 0;
//! - the header says single-function, and the interrupt pin 0 (the
//!   appliance has no I/O APIC: MSI or MSI-X, which reach its own
//!   processors in physical destination mode).
//!
//! The capabilities (MSI, MSI-X, PCI Express, power management) are the
//! function's own, except the MSI address and data of a function whose
//! messages are remapped (`msi_remap`). A function whose messages are
//! not remapped (an MSI-X function, or any without an IOMMU that remaps)
//! can be aimed at the OS's processors by a hostile appliance
//! (`docs/security.md`).
use crate::env::Env;
use crate::partition::{BarShadow, PartitionId};
use core::sync::atomic::Ordering;
use thinhv_abi::handoff::PartitionDevice;
use thinhv_passthrough::fixed_bar;
use thinhv_passthrough::mediate::all_ones;
use thinhv_passthrough::reset::{self, FunctionConfig};

/// CONFIG_ADDRESS.
const ADDRESS: u16 = 0xcf8;
/// CONFIG_DATA.
const DATA: u16 = 0xcfc;

/// Handles an appliance's access to `port` (0xCF8 as a dword, or
/// 0xCFC–0xCFF); `None` for any other access, which the caller treats as
/// a port without a device.
pub(super) fn port(
    env: &mut impl Env,
    id: PartitionId,
    port: u16,
    size: u8,
    input: bool,
    value: u32,
) -> Option<u32> {
    let latch = &env.hv().cpus()[env.cpu_index()].cf8_latch;
    if port == ADDRESS && size == 4 {
        if input {
            return Some(latch.load(Ordering::Relaxed));
        }
        latch.store(value, Ordering::Relaxed);
        return Some(0);
    }
    if !(DATA..DATA + 4).contains(&port) || u16::from(size) > DATA + 4 - port {
        return None;
    }
    let address = latch.load(Ordering::Relaxed);
    let reg = (address & 0xfc) as u16 + (port - DATA);
    let vdevfn = ((address >> 8) & 0xff) as u8;
    let found = (address & 1 << 31 != 0 && (address >> 16) & 0xff == 0)
        .then(|| env.hv().appliance(id))
        .flatten()
        .and_then(|p| {
            let i = p.info.devices().iter().position(|d| d.vdevfn == vdevfn)?;
            Some((i, p.info.devices()[i]))
        });
    let Some((i, dev)) = found else {
        return Some(if input { all_ones(size) } else { 0 });
    };
    if input {
        Some(read(env, Viewer::Appliance(id, i), &dev, reg, size))
    } else {
        write(env, Viewer::Appliance(id, i), &dev, reg, size, value);
        Some(0)
    }
}

/// Whose view of a function: an appliance's function `i`, or the
/// function the OS sees in a PF's place (`PciHandoff::presented[k]`).
#[derive(Clone, Copy)]
pub(super) enum Viewer {
    Appliance(PartitionId, usize),
    Os(usize),
}

/// Runs `f` on the BAR registers `who` sees.
fn with_bars<T>(env: &impl Env, who: Viewer, f: impl FnOnce(&mut BarShadow) -> T) -> Option<T> {
    match who {
        Viewer::Appliance(id, i) => {
            let p = env.hv().appliance(id)?;
            let mut shadow = p.bar_shadow.lock();
            shadow.get_mut(i).map(f)
        }
        Viewer::Os(k) => env.hv().presented_bars.lock().get_mut(k).map(f),
    }
}

fn real_address(dev: &PartitionDevice, reg: u16) -> u32 {
    1 << 31 | u32::from(dev.rid) << 8 | u32::from(reg & 0xfc)
}

/// A function (routing ID `rid`, segment 0) through the configuration
/// ports, for [`thinhv_passthrough::reset`] and `msi_remap`; waits count
/// time-stamp ticks at `tsc_khz`.
pub(super) struct Function<'a, E: Env> {
    pub(super) env: &'a mut E,
    pub(super) rid: u16,
    pub(super) tsc_khz: u64,
}

impl<E: Env> Function<'_, E> {
    fn address(&self, reg: u16) -> u32 {
        1 << 31 | u32::from(self.rid) << 8 | u32::from(reg & 0xfc)
    }

    /// `size` bytes at `reg` (within one dword).
    pub(super) fn read(&mut self, reg: u16, size: u8) -> u32 {
        let a = self.address(reg);
        self.env
            .legacy_config_access(a, DATA + (reg & 3), size, None)
    }

    /// Writes `size` bytes of `value` at `reg` (within one dword).
    pub(super) fn write(&mut self, reg: u16, size: u8, value: u32) {
        let a = self.address(reg);
        self.env
            .legacy_config_access(a, DATA + (reg & 3), size, Some(value));
    }
}

impl<E: Env> FunctionConfig for Function<'_, E> {
    fn read32(&mut self, reg: u16) -> u32 {
        self.read(reg, 4)
    }
    fn write32(&mut self, reg: u16, value: u32) {
        self.write(reg, 4, value);
    }
    fn write16(&mut self, reg: u16, value: u16) {
        self.write(reg, 2, u32::from(value));
    }
    fn wait_us(&mut self, us: u32) {
        let ticks = u64::from(us) * self.tsc_khz / 1000;
        let start = self.env.tsc();
        while self.env.tsc().wrapping_sub(start) < ticks {
            core::hint::spin_loop();
        }
    }
}

/// An unknown TSC rate is taken as 5 GHz: waits then last at least as
/// long as asked on any processor.
pub(super) const TSC_KHZ_UNKNOWN: u64 = 5_000_000;

/// Bus mastering and INTx off, MSI and MSI-X disabled on `dev`: it neither
/// writes memory nor signals an interrupt from here (`None`: nothing
/// answers there). No waiting: an OS processor may run this.
pub(super) fn quiesce(env: &mut impl Env, dev: &PartitionDevice) -> Option<reset::Quiesced> {
    let mut f = Function {
        env,
        rid: dev.rid,
        tsc_khz: TSC_KHZ_UNKNOWN,
    };
    reset::quiesce(&mut f)
}

/// Quiesces and resets `dev` and puts its BARs back
/// ([`thinhv_passthrough::reset::reset`]): before an appliance boots
/// again. Waits up to about 1.2 s (on the appliance's own processor).
pub(super) fn reset(
    env: &mut impl Env,
    dev: &PartitionDevice,
    tsc_khz: u64,
) -> Option<reset::Report> {
    let (bars, n) = bars_of(dev);
    let mut f = Function {
        env,
        rid: dev.rid,
        tsc_khz: if tsc_khz == 0 {
            TSC_KHZ_UNKNOWN
        } else {
            tsc_khz
        },
    };
    reset::reset(&mut f, &bars[..n])
}

/// `dev`'s memory BARs as the reset puts them back (none for a VF: its
/// BARs are its PF's VF BARs, which the reset does not touch).
fn bars_of(dev: &PartitionDevice) -> ([reset::Bar; thinhv_abi::handoff::MAX_DEVICE_BARS], usize) {
    let mut bars = [reset::Bar {
        index: 0,
        wide: false,
        base: 0,
    }; thinhv_abi::handoff::MAX_DEVICE_BARS];
    let mut n = 0;
    for (regs, range) in dev.bars().filter(|_| !dev.is_vf()) {
        bars[n] = reset::Bar {
            index: regs & 7,
            wide: regs & thinhv_abi::handoff::BAR_REG_64 != 0,
            base: range.base,
        };
        n += 1;
    }
    (bars, n)
}

/// The byte a write of `size` bytes of `value` at `reg` puts at `at`, if
/// it covers it.
pub(super) fn byte_at(reg: u16, size: u8, value: u32, at: u16) -> Option<u8> {
    (at >= reg && at < reg + u16::from(size)).then(|| value.to_le_bytes()[usize::from(at - reg)])
}

/// A write into the capabilities (or past them), as written, except the
/// function's own resets: Initiate FLR in Device Control is thinhv's
/// sequence instead (which puts the BARs back: the reset clears them, and
/// the appliance's BAR writes never reach the function), and after a
/// change to D0 in PMCSR (a reset where No_Soft_Reset is clear) the BARs
/// are put back.
fn own_reset(
    env: &mut impl Env,
    who: Viewer,
    dev: &PartitionDevice,
    reg: u16,
    size: u8,
    value: u32,
) {
    let mut f = Function {
        env,
        rid: dev.rid,
        tsc_khz: TSC_KHZ_UNKNOWN,
    };
    let devctl = reset::find_capability(&mut f, reset::CAP_PCIE).map(|c| c + 8);
    let pmcsr = reset::find_capability(&mut f, reset::CAP_PM).map(|c| c + 4);
    let dword = reg & !3;
    if let Some(d) = devctl
        && byte_at(reg, size, value, d + 1).is_some_and(|b| b & 0x80 != 0)
    {
        let without = value & !(0x80u32 << (8 * (d + 1 - reg)));
        env.legacy_config_access(
            real_address(dev, dword),
            DATA + (reg & 3),
            size,
            Some(without),
        );
        let khz = match who {
            Viewer::Appliance(id, _) => env.hv().appliance(id).map_or(0, |p| p.info.tsc_khz),
            Viewer::Os(_) => 0,
        };
        let r = reset(env, dev, khz);
        let bdf = thinhv_passthrough::pci::Bdf::from_rid(0, dev.rid);
        if let Some(r) = r {
            log::info!("an appliance's FLR of PCI {bdf}, done by thinhv: {r}");
        }
        return;
    }
    env.legacy_config_access(
        real_address(dev, dword),
        DATA + (reg & 3),
        size,
        Some(value),
    );
    if let Some(p) = pmcsr
        && byte_at(reg, size, value, p).is_some_and(|b| b & 3 == 0)
    {
        let (bars, n) = bars_of(dev);
        let mut f = Function {
            env,
            rid: dev.rid,
            tsc_khz: TSC_KHZ_UNKNOWN,
        };
        let _ = reset::put_bars(&mut f, &bars[..n]);
    }
}

pub(super) fn read(
    env: &mut impl Env,
    who: Viewer,
    dev: &PartitionDevice,
    reg: u16,
    size: u8,
) -> u32 {
    let dword = reg & !3;
    let ea = ea_of(who, dev);
    let v = match dword {
        // The OS's view of a VF in a PF's place: an Enhanced Allocation
        // capability fixing its BAR 0, at the head of the list.
        d if ea != 0 && (ea..ea + fixed_bar::EA_BYTES).contains(&d) => {
            let first = env.legacy_config_access(real_address(dev, 0x34), DATA, 1, None);
            let next = u8::try_from(first & 0xfc).unwrap_or(0);
            let bar = dev.bars[0];
            fixed_bar::ea_dword(ea, next, bar.base, bar.size, d)
        }
        0x34 if ea != 0 => u32::from(dev.vdevfn),
        0x10..=0x27 => {
            with_bars(env, who, |b| b.read(usize::from((dword - 0x10) / 4))).unwrap_or(0)
        }
        0x30 => 0,
        // A VF's vendor and device ID read all ones: the PF's vendor and
        // the VF device ID of its SR-IOV capability instead.
        0x00 if dev.is_vf() => dev.vf_ids,
        // A remapped function's MSI address and data: as the appliance
        // wrote them.
        d if d >= 0x40
            && let Viewer::Appliance(id, i) = who
            && let Some(v) = super::msi_remap::read(
                env,
                super::msi_remap::Owner::Appliance(id, i),
                dev.rid,
                d,
            ) =>
        {
            v
        }
        _ => {
            let v = env.legacy_config_access(real_address(dev, dword), DATA, 4, None);
            match dword {
                // Header type: single-function.
                0x0c => v & !(0x80 << 16),
                // Interrupt pin: none.
                0x3c => v & !(0xff << 8),
                _ => v,
            }
        }
    };
    (v >> (8 * (reg & 3))) & all_ones(size)
}

/// Where the OS's view of a VF in a PF's place shows its Enhanced
/// Allocation capability (0: none, and never in an appliance's view).
fn ea_of(who: Viewer, dev: &PartitionDevice) -> u16 {
    match who {
        Viewer::Os(_) if dev.vdevfn >= 0x40 && dev.bar_count > 0 => u16::from(dev.vdevfn),
        _ => 0,
    }
}

pub(super) fn write(
    env: &mut impl Env,
    who: Viewer,
    dev: &PartitionDevice,
    reg: u16,
    size: u8,
    value: u32,
) {
    let dword = reg & !3;
    let shift = 8 * u32::from(reg & 3);
    let ea = ea_of(who, dev);
    match dword {
        // The Enhanced Allocation capability is thinhv's (read-only, as
        // its fixed entry is).
        d if ea != 0 && (ea..ea + fixed_bar::EA_BYTES).contains(&d) => {}
        0x10..=0x27 => {
            let r = usize::from((dword - 0x10) / 4);
            let mask = all_ones(size) << shift;
            with_bars(env, who, |b| {
                let old = b.read(r);
                b.write(r, (old & !mask) | ((value << shift) & mask));
            });
        }
        // Command: I/O space enable stays off and INTx disable on (a
        // function's INTx pin is wired to the platform's I/O APIC, which
        // is the OS's: an appliance that enabled it would raise the OS's
        // interrupt line); the rest (memory space, bus mastering: DMA its
        // IOMMU domain confines) is the appliance's.
        0x04 => {
            if reg < 0x06 {
                // The command word, whatever width wrote it: the written
                // bytes over what it holds, I/O space off, INTx Disable on.
                let mut word = env.legacy_config_access(real_address(dev, 0x04), DATA, 2, None);
                for at in 0x04..0x06 {
                    if let Some(b) = byte_at(reg, size, value, at) {
                        let shift = 8 * u32::from(at - 0x04);
                        word = (word & !(0xff << shift)) | u32::from(b) << shift;
                    }
                }
                let word = (word & !1) | 1 << 10;
                env.legacy_config_access(real_address(dev, 0x04), DATA, 2, Some(word));
            }
            // The status half as written (its bits clear where written one).
            let end = reg + u16::from(size);
            if end > 0x06 {
                let at = reg.max(0x06);
                let v = value >> (8 * (at - reg));
                env.legacy_config_access(
                    real_address(dev, 0x04),
                    DATA + (at & 3),
                    u8::try_from(end - at).unwrap_or(2),
                    Some(v),
                );
            }
        }
        // Cache line size and latency timer only; the header type, BIST,
        // CardBus pointer, subsystem IDs, ROM BAR, capability pointer
        // and interrupt pin are not written.
        0x0c => {
            if reg < 0x0e {
                let n = size.min(if reg & 3 == 0 { 2 } else { 1 });
                env.legacy_config_access(
                    real_address(dev, dword),
                    DATA + (reg & 3),
                    n,
                    Some(value),
                );
            }
        }
        0x28..=0x3b => {}
        // Interrupt line (a scratch register); not the pin or the rest.
        0x3c => {
            if reg == 0x3c {
                env.legacy_config_access(real_address(dev, dword), DATA, 1, Some(value & 0xff));
            }
        }
        // A remapped function's MSI capability: `msi_remap`.
        _ if let Viewer::Appliance(id, i) = who
            && super::msi_remap::write(
                env,
                super::msi_remap::Owner::Appliance(id, i),
                dev.rid,
                reg,
                size,
                value,
            ) => {}
        // Capabilities and the rest: as written, except the function's
        // own resets.
        _ => {
            own_reset(env, who, dev, reg, size, value);
        }
    }
}

impl BarShadow {
    /// The registers of `dev` as the firmware assigned them.
    #[allow(clippy::cast_possible_truncation)] // the halves of 64-bit values
    pub fn new(dev: &PartitionDevice) -> Self {
        let mut s = Self::default();
        for (flags, r) in dev.bars() {
            let i = usize::from(flags & 7);
            let wide = flags & thinhv_abi::handoff::BAR_REG_64 != 0;
            let low_flags = if wide { 4 } else { 0 }
                | if flags & thinhv_abi::handoff::BAR_REG_PREFETCH != 0 {
                    8
                } else {
                    0
                };
            if i >= 6 || (wide && i >= 5) {
                continue;
            }
            let size_mask = !(r.size - 1);
            s.mask[i] = (size_mask as u32) & !0xf;
            s.flags[i] = low_flags;
            s.value[i] = (r.base as u32 & !0xf) | low_flags;
            if wide {
                s.mask[i + 1] = (size_mask >> 32) as u32;
                s.value[i + 1] = (r.base >> 32) as u32;
            }
        }
        s
    }

    /// Register `r` (0..6).
    pub fn read(&self, r: usize) -> u32 {
        self.value.get(r).copied().unwrap_or(0)
    }

    /// A write to register `r`: the address bits the BAR's size leaves
    /// writable, its flag bits fixed. (All ones reads back the size.)
    pub fn write(&mut self, r: usize, v: u32) {
        if r < 6 {
            self.value[r] = (v & self.mask[r]) | self.flags[r];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinhv_abi::PhysRange;
    use thinhv_abi::handoff::BAR_REG_64;

    fn dev() -> PartitionDevice {
        let mut d = PartitionDevice {
            rid: 0x0100,
            vdevfn: 0x08,
            bar_count: 2,
            ..Default::default()
        };
        d.bars[0] = PhysRange::new(0xc000_0000, 0x2_0000);
        d.bar_regs[0] = 0;
        d.bars[1] = PhysRange::new(0x8_0000_4000, 0x4000);
        d.bar_regs[1] = 3 | BAR_REG_64;
        d
    }

    #[test]
    fn bars_size_like_hardware_and_never_move() {
        let mut s = BarShadow::new(&dev());
        assert_eq!(s.read(0), 0xc000_0000);
        assert_eq!(s.read(3), 0x4 | 0x4000);
        assert_eq!(s.read(4), 8);
        // Sizing: all ones, read the mask, write the address back.
        s.write(0, !0);
        assert_eq!(s.read(0), 0xfffe_0000);
        s.write(0, 0xc000_0000);
        assert_eq!(s.read(0), 0xc000_0000);
        s.write(3, !0);
        s.write(4, !0);
        assert_eq!((s.read(3), s.read(4)), (0xffff_c004, 0xffff_ffff));
        // The I/O BAR (register 2) and the unused ones are not there.
        s.write(2, !0);
        assert_eq!((s.read(1), s.read(2), s.read(5)), (0, 0, 0));
    }
}
