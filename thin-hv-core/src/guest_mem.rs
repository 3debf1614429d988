//! Guest memory as the hypervisor may touch it: hypercall buffers checked
//! against the RAM map and the hypervisor's own ranges, and guest linear
//! addresses translated through the guest's page tables (to fetch the
//! instruction that caused an exit).
//!
//! The page walker follows Intel SDM Vol. 3A §4.3–4.5 and AMD APM Vol. 2
//! §5.2–5.3: 32-bit paging (with PSE and PSE-36), PAE, 4-level and 5-level.
//! It only translates (no permission checks): it is used for instructions
//! the guest has already fetched.
use crate::env::Env;
use crate::guest::{GuestCpu, PagingRegs};
use thinhv_abi::PhysRange;
use thinhv_abi::hypercall::Status;

/// Largest buffer a hypercall may name.
pub const MAX_BUFFER: u64 = 1 << 20;

/// Checks a hypercall buffer: it must not wrap, must lie in RAM the guest
/// owns (see [`ram_covers`]) and must not touch the hypervisor's memory.
///
/// The RAM ranges are the firmware's exact ones (the loader drops ranges it
/// cannot pass, it never merges across a gap), so a buffer in a hole of the
/// memory map — an IOMMU register window, an ECAM page, the local APIC —
/// is refused: the hypervisor would otherwise write device registers for
/// the guest.
pub fn check_buffer(hv: &crate::hv::Hv, gpa: u64, len: u64) -> Result<(), Status> {
    if len == 0 || len > MAX_BUFFER {
        return Err(Status::INVALID_ARGUMENT);
    }
    if gpa.checked_add(len).is_none() {
        return Err(Status::BAD_ADDRESS);
    }
    if hv.touches_hypervisor(gpa, len) {
        return Err(Status::BAD_ADDRESS);
    }
    if !ram_covers(hv.ram(), gpa, len) {
        return Err(Status::BAD_ADDRESS);
    }
    Ok(())
}

/// Whether every byte of `[gpa, gpa + len)` lies in `ram`: inside one
/// range, or across ranges that follow one another without a gap (in any
/// order in `ram`). A range that wraps is never covered.
pub fn ram_covers(ram: &[PhysRange], gpa: u64, len: u64) -> bool {
    let Some(end) = gpa.checked_add(len) else {
        return false;
    };
    let mut at = gpa;
    // Each step moves `at` to the end of the range that holds it, strictly
    // forward, so no range is used twice.
    for _ in 0..ram.len() {
        let Some(r) = ram.iter().find(|r| r.contains(at)) else {
            return false;
        };
        at = r.end();
        if at >= end {
            return true;
        }
    }
    false
}

/// Reads guest-physical memory the way the guest would see it: bytes of
/// the hypervisor's protected region and another partition's RAM read as
/// zero (the guest sees a blank page there), and addresses beyond the physical address width fail.
pub fn read_guest_phys(env: &impl Env, gpa: u64, buf: &mut [u8]) -> bool {
    let hv = env.hv();
    let len = buf.len() as u64;
    let Some(end) = gpa.checked_add(len) else {
        return false;
    };
    if hv.phys_addr_bits < 64 && end > (1u64 << hv.phys_addr_bits) {
        return false;
    }
    let part = hv.space_of(env.cpu_index());
    // An appliance's addresses are its own (`Env::read_phys` translates
    // and bounds them); the OS's are host addresses.
    if part.is_os() && (hv.protected.overlaps(gpa, len) || hv.foreign_ram(part, gpa, len)) {
        // Byte by byte so that partly protected reads stay exact.
        for (i, b) in buf.iter_mut().enumerate() {
            let a = gpa + i as u64;
            if hv.protected.contains(a) || hv.foreign_ram(part, a, 1) {
                *b = 0;
            } else {
                env.read_phys(a, core::slice::from_mut(b));
            }
        }
        return true;
    }
    env.read_phys(gpa, buf);
    true
}

fn read_u64(env: &impl Env, gpa: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    read_guest_phys(env, gpa, &mut b).then(|| u64::from_le_bytes(b))
}

fn read_u32(env: &impl Env, gpa: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    read_guest_phys(env, gpa, &mut b).then(|| u32::from_le_bytes(b))
}

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PTE_P: u64 = 1;
const PTE_PS: u64 = 1 << 7;
const ADDR_52: u64 = 0x000f_ffff_ffff_f000;

/// Translates a guest linear address to guest-physical, or `None` when a
/// level is not present (or lies outside what may be read).
pub fn translate(env: &impl Env, regs: &PagingRegs, linear: u64) -> Option<u64> {
    if regs.cr0 & CR0_PG == 0 {
        return Some(linear & 0xffff_ffff);
    }
    if regs.efer & EFER_LMA != 0 {
        let levels = if regs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        let mut table = regs.cr3 & ADDR_52;
        for level in (0..levels).rev() {
            let idx = (linear >> (12 + 9 * level)) & 0x1ff;
            let e = read_u64(env, table + idx * 8)?;
            if e & PTE_P == 0 {
                return None;
            }
            if (level == 1 || level == 2) && e & PTE_PS != 0 {
                let size = 1u64 << (12 + 9 * level);
                return Some((e & ADDR_52 & !(size - 1)) | (linear & (size - 1)));
            }
            table = e & ADDR_52;
        }
        return Some(table | (linear & 0xfff));
    }
    let linear = linear & 0xffff_ffff;
    if regs.cr4 & CR4_PAE != 0 {
        let pdpt = regs.cr3 & 0xffff_ffe0;
        let pdpte = read_u64(env, pdpt + ((linear >> 30) & 3) * 8)?;
        if pdpte & PTE_P == 0 {
            return None;
        }
        let pde = read_u64(env, (pdpte & ADDR_52) + ((linear >> 21) & 0x1ff) * 8)?;
        if pde & PTE_P == 0 {
            return None;
        }
        if pde & PTE_PS != 0 {
            return Some((pde & ADDR_52 & !0x1f_ffff) | (linear & 0x1f_ffff));
        }
        let pte = read_u64(env, (pde & ADDR_52) + ((linear >> 12) & 0x1ff) * 8)?;
        if pte & PTE_P == 0 {
            return None;
        }
        return Some((pte & ADDR_52) | (linear & 0xfff));
    }
    let pde = u64::from(read_u32(
        env,
        (regs.cr3 & 0xffff_f000) + ((linear >> 22) & 0x3ff) * 4,
    )?);
    if pde & PTE_P == 0 {
        return None;
    }
    if pde & PTE_PS != 0 && regs.cr4 & CR4_PSE != 0 {
        // PSE-36: bits 13..20 of the PDE are bits 32..39 of the address.
        let high = ((pde >> 13) & 0xff) << 32;
        return Some(high | (pde & 0xffc0_0000) | (linear & 0x3f_ffff));
    }
    let pte = u64::from(read_u32(
        env,
        (pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4,
    )?);
    if pte & PTE_P == 0 {
        return None;
    }
    Some((pte & 0xffff_f000) | (linear & 0xfff))
}

/// Fetches up to 15 instruction bytes at the guest's RIP. Returns how many
/// could be read (a fetch stops at the first untranslatable page).
pub fn fetch_instruction(env: &impl Env, cpu: &impl GuestCpu, out: &mut [u8; 15]) -> usize {
    let regs = cpu.paging();
    let mode = cpu.mode();
    let mut linear = match mode {
        crate::guest::CpuMode::Bits64 => cpu.rip(),
        _ => cpu.cs_base().wrapping_add(cpu.rip() & 0xffff_ffff) & 0xffff_ffff,
    };
    let mut done = 0;
    while done < out.len() {
        let Some(gpa) = translate(env, &regs, linear) else {
            break;
        };
        let in_page = 0x1000 - usize::from(u16::try_from(gpa & 0xfff).unwrap_or(0));
        let n = in_page.min(out.len() - done);
        if !read_guest_phys(env, gpa, &mut out[done..done + n]) {
            break;
        }
        done += n;
        linear = linear.wrapping_add(n as u64);
    }
    done
}
