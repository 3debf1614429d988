//! Just enough instruction decoding for a thin hypervisor, on top of
//! `iced-x86`: the length of the instruction that caused an exit (when the
//! processor does not report the next RIP, as QEMU's SVM does not), and the
//! value a trapped MMIO write stores.
use crate::guest::{CpuMode, Gpr, SegReg};
use iced_x86::{CodeSize, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// A decoded instruction.
#[derive(Clone, Copy, Debug)]
pub struct Decoded {
    insn: Instruction,
}

/// What a store to memory writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreSource {
    /// An immediate value.
    Immediate(u64),
    /// A register (its low `size` bytes).
    Register(Gpr),
}

/// A decoded store to memory: `mov [mem], src` or `xchg [mem], reg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Store {
    /// Source of the value.
    pub source: StoreSource,
    /// Access size in bytes.
    pub size: u8,
    /// `xchg`: the register receives the old memory value.
    pub exchange: bool,
}

/// A decoded load from memory into a register: `mov reg, [mem]` or
/// `movzx reg, [mem]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// Destination register.
    pub dest: Gpr,
    /// Width of the destination in bytes (what the write to it replaces).
    pub dest_size: u8,
    /// Bytes read from memory.
    pub size: u8,
}

impl Load {
    /// The destination's new full value after loading `value` (zero-extended
    /// from `size` bytes) into it, given its old value: 32-bit destinations
    /// clear the upper half, 8- and 16-bit ones keep the rest.
    pub const fn merge(&self, old: u64, value: u64) -> u64 {
        match self.dest_size {
            8 => value,
            4 => value & 0xffff_ffff,
            2 => (old & !0xffff) | (value & 0xffff),
            _ => (old & !0xff) | (value & 0xff),
        }
    }
}

/// The length of the instructions that cause exits when they come without
/// prefixes (the first byte is their 0x0F escape, which is never a
/// prefix): CPUID, RDMSR, WRMSR, INVD, WBINVD (2 bytes); VMMCALL, VMCALL,
/// XSETBV (3). The same in every mode. `None`: decode it.
pub fn exit_insn_len(bytes: &[u8]) -> Option<usize> {
    match bytes {
        [0x0f, 0xa2 | 0x30 | 0x32 | 0x08 | 0x09, ..] => Some(2),
        [0x0f, 0x01, 0xd9 | 0xc1 | 0xd1, ..] => Some(3),
        _ => None,
    }
}

/// Decodes the instruction in `bytes` in `mode`.
pub fn decode(bytes: &[u8], mode: CpuMode, rip: u64) -> Option<Decoded> {
    let mut d = Decoder::with_ip(mode.bitness(), bytes, rip, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() {
        return None;
    }
    Some(Decoded { insn })
}

impl Decoded {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.insn.len()
    }

    /// Whether the instruction is empty (never for a valid decode).
    pub fn is_empty(&self) -> bool {
        self.insn.len() == 0
    }

    /// Address of the next instruction.
    pub fn next_ip(&self) -> u64 {
        self.insn.next_ip()
    }

    /// The mnemonic, for logs.
    pub fn mnemonic(&self) -> Mnemonic {
        self.insn.mnemonic()
    }

    /// If this is a plain load (`mov reg, [mem]`, `movzx reg, [mem]`),
    /// where it goes.
    pub fn load(&self) -> Option<Load> {
        let i = &self.insn;
        if !matches!(i.mnemonic(), Mnemonic::Mov | Mnemonic::Movzx)
            || i.op_count() != 2
            || i.op0_kind() != OpKind::Register
            || i.op1_kind() != OpKind::Memory
        {
            return None;
        }
        let r = i.op0_register();
        let dest = gpr_of(r)?;
        Some(Load {
            dest,
            dest_size: u8::try_from(r.size()).ok()?,
            size: u8::try_from(i.memory_size().size()).ok()?,
        })
    }

    /// If this is a plain store (`mov` to memory or `xchg` with memory),
    /// what it stores.
    pub fn store(&self) -> Option<Store> {
        let i = &self.insn;
        let exchange = match i.mnemonic() {
            Mnemonic::Mov => false,
            Mnemonic::Xchg => true,
            _ => return None,
        };
        if i.op_count() != 2 {
            return None;
        }
        let (mem_op, src_op) = if i.op0_kind() == OpKind::Memory {
            (0, 1)
        } else if exchange && i.op1_kind() == OpKind::Memory {
            (1, 0)
        } else {
            return None;
        };
        let _ = mem_op;
        let size = u8::try_from(i.memory_size().size()).ok()?;
        let source = match i.op_kind(src_op) {
            OpKind::Register => StoreSource::Register(gpr_of(i.op_register(src_op))?),
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
            | OpKind::Immediate64 => StoreSource::Immediate(i.immediate(src_op)),
            _ => return None,
        };
        Some(Store {
            source,
            size,
            exchange,
        })
    }
}

/// A decoded string move (`movs`, with or without `rep`): `size` bytes
/// from `seg`:RSI to ES:RDI, RCX times with `rep`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StringMove {
    /// Bytes per element.
    pub size: u8,
    /// `rep` prefix.
    pub rep: bool,
    /// The source's segment (DS unless overridden).
    pub seg: SegReg,
    /// The address size is 64 bits (RSI, RDI, RCX; else their low 32).
    pub wide: bool,
}

impl Decoded {
    /// If this is `movs` (Linux's `memcpy_toio` writes device registers
    /// with `rep movsl`), what it moves.
    pub fn string_move(&self) -> Option<StringMove> {
        let i = &self.insn;
        // (`movsd` is also SSE's scalar double move, with registers.)
        if !matches!(i.op0_kind(), OpKind::MemoryESRDI | OpKind::MemoryESEDI) {
            return None;
        }
        let size = match i.mnemonic() {
            Mnemonic::Movsb => 1,
            Mnemonic::Movsw => 2,
            Mnemonic::Movsd => 4,
            Mnemonic::Movsq => 8,
            _ => return None,
        };
        let seg = match i.memory_segment() {
            Register::FS => SegReg::Fs,
            Register::GS => SegReg::Gs,
            Register::ES => SegReg::Es,
            Register::CS => SegReg::Cs,
            Register::SS => SegReg::Ss,
            _ => SegReg::Ds,
        };
        Some(StringMove {
            size,
            rep: i.has_rep_prefix(),
            seg,
            wide: i.op0_kind() == OpKind::MemoryESRDI,
        })
    }
}

/// A memory access an instruction makes, as data breakpoints see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemAccess {
    /// Linear address of the first byte.
    pub linear: u64,
    /// Bytes accessed.
    pub size: u8,
    /// Whether it writes (a store, or the write half of XCHG).
    pub write: bool,
}

impl Decoded {
    /// The memory access of a plain load or store ([`Decoded::load`],
    /// [`Decoded::store`]: what thinhv emulates), its linear address from
    /// the guest's registers and segment bases (in 64-bit mode only FS and
    /// GS have a base, SDM Vol. 3A §3.4.4). `None` for anything else.
    pub fn mem_access(
        &self,
        gpr: impl Fn(Gpr) -> u64,
        base: impl Fn(SegReg) -> u64,
    ) -> Option<MemAccess> {
        let (size, write) = if let Some(st) = self.store() {
            (st.size, true)
        } else {
            (self.load()?.size, false)
        };
        let i = &self.insn;
        let op = (0..i.op_count()).find(|&k| i.op_kind(k) == OpKind::Memory)?;
        let long = i.code_size() == CodeSize::Code64;
        let linear = i.try_virtual_address(op, 0, |r, _, _| {
            let seg = match r {
                Register::ES => Some(SegReg::Es),
                Register::CS => Some(SegReg::Cs),
                Register::SS => Some(SegReg::Ss),
                Register::DS => Some(SegReg::Ds),
                Register::FS => Some(SegReg::Fs),
                Register::GS => Some(SegReg::Gs),
                _ => None,
            };
            match seg {
                Some(SegReg::Fs | SegReg::Gs) => Some(base(seg?)),
                Some(_) if long => Some(0),
                Some(s) => Some(base(s)),
                None => gpr_of(r).map(&gpr),
            }
        })?;
        // Outside 64-bit mode linear addresses are 32 bits wide.
        let linear = if long { linear } else { linear & 0xffff_ffff };
        Some(MemAccess {
            linear,
            size,
            write,
        })
    }
}

/// The general-purpose register an operand register belongs to.
fn gpr_of(r: Register) -> Option<Gpr> {
    if !r.is_gpr()
        || r.is_gpr8() && matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
    {
        return None;
    }
    let full = r.full_register();
    let idx = match full {
        Register::RAX => 0,
        Register::RCX => 1,
        Register::RDX => 2,
        Register::RBX => 3,
        Register::RSP => 4,
        Register::RBP => 5,
        Register::RSI => 6,
        Register::RDI => 7,
        Register::R8 => 8,
        Register::R9 => 9,
        Register::R10 => 10,
        Register::R11 => 11,
        Register::R12 => 12,
        Register::R13 => 13,
        Register::R14 => 14,
        Register::R15 => 15,
        _ => return None,
    };
    Some(Gpr::ALL[idx])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_moves_decode_and_sse_movsd_does_not() {
        let d = |b: &[u8]| decode(b, CpuMode::Bits64, 0).unwrap().string_move();
        let m = |size, rep, seg, wide| {
            Some(StringMove {
                size,
                rep,
                seg,
                wide,
            })
        };
        // Linux's memcpy_toio: rep movsl.
        assert_eq!(d(&[0xf3, 0xa5]), m(4, true, SegReg::Ds, true));
        assert_eq!(d(&[0xa5]), m(4, false, SegReg::Ds, true));
        assert_eq!(d(&[0x48, 0xa5]), m(8, false, SegReg::Ds, true));
        assert_eq!(d(&[0xa4]), m(1, false, SegReg::Ds, true));
        assert_eq!(d(&[0x66, 0xa5]), m(2, false, SegReg::Ds, true));
        assert_eq!(d(&[0x67, 0xf3, 0xa5]), m(4, true, SegReg::Ds, false));
        assert_eq!(d(&[0x64, 0xa5]), m(4, false, SegReg::Fs, true));
        // movsd xmm0, [rax]; mov [rax], eax.
        assert_eq!(d(&[0xf2, 0x0f, 0x10, 0x00]), None);
        assert_eq!(d(&[0x89, 0x00]), None);
    }

    #[test]
    fn lengths_of_exit_instructions() {
        let cases: [(&[u8], CpuMode, usize); 6] = [
            (&[0x0f, 0xa2], CpuMode::Bits64, 2),       // cpuid
            (&[0x0f, 0x01, 0xd9], CpuMode::Bits64, 3), // vmmcall
            (&[0x0f, 0x01, 0xc1], CpuMode::Bits32, 3), // vmcall
            (&[0x0f, 0x30], CpuMode::Bits16, 2),       // wrmsr
            (&[0x66, 0x0f, 0x32], CpuMode::Bits16, 3), // rdmsr with prefix
            (&[0xf3, 0xa4], CpuMode::Bits64, 2),       // rep movsb
        ];
        for (b, m, n) in cases {
            assert_eq!(decode(b, m, 0x1000).unwrap().len(), n, "{b:x?}");
        }
        assert!(decode(&[0x0f, 0xff], CpuMode::Bits64, 0).is_none());
        // The fast path agrees with the decoder on what it recognizes, and
        // leaves prefixed forms to it.
        for (b, m, n) in cases {
            if let Some(fast) = exit_insn_len(b) {
                assert_eq!(fast, n, "{b:x?} in {m:?}");
            }
        }
        for b in [
            &[0x0f, 0xa2][..],
            &[0x0f, 0x01, 0xd9],
            &[0x0f, 0x01, 0xc1],
            &[0x0f, 0x01, 0xd1],
            &[0x0f, 0x30],
            &[0x0f, 0x08],
        ] {
            for m in [CpuMode::Bits16, CpuMode::Bits32, CpuMode::Bits64] {
                assert_eq!(exit_insn_len(b), Some(decode(b, m, 0).unwrap().len()));
            }
        }
        assert_eq!(exit_insn_len(&[0x66, 0x0f, 0x32]), None);
        assert_eq!(exit_insn_len(&[0x0f, 0x01, 0xf8]), None);
        assert!(decode(&[0x0f], CpuMode::Bits64, 0).is_none());
    }

    #[test]
    fn loads_as_linux_reads_ecam() {
        // mov eax, [rdx] (8b 02): Linux's mmio_config_readl.
        let l = decode(&[0x8b, 0x02], CpuMode::Bits64, 0).unwrap().load();
        assert_eq!(
            l,
            Some(Load {
                dest: Gpr::Rax,
                dest_size: 4,
                size: 4
            })
        );
        assert_eq!(l.unwrap().merge(u64::MAX, 0x1234_5678), 0x1234_5678);
        // mov ax, [rdi] (66 8b 07) keeps the upper bits.
        let l = decode(&[0x66, 0x8b, 0x07], CpuMode::Bits64, 0)
            .unwrap()
            .load()
            .unwrap();
        assert_eq!((l.dest, l.dest_size, l.size), (Gpr::Rax, 2, 2));
        assert_eq!(
            l.merge(0xaaaa_bbbb_cccc_dddd, 0xffff),
            0xaaaa_bbbb_cccc_ffff
        );
        // mov al, [rdi] (8a 07).
        let l = decode(&[0x8a, 0x07], CpuMode::Bits64, 0)
            .unwrap()
            .load()
            .unwrap();
        assert_eq!((l.dest_size, l.size), (1, 1));
        assert_eq!(l.merge(0x1100, 0x22), 0x1122);
        // movzx r9d, word [rsi+0xe] (44 0f b7 4e 0e).
        let l = decode(&[0x44, 0x0f, 0xb7, 0x4e, 0x0e], CpuMode::Bits64, 0)
            .unwrap()
            .load()
            .unwrap();
        assert_eq!((l.dest, l.dest_size, l.size), (Gpr::R9, 4, 2));
        // mov rax, [rdx] (48 8b 02).
        let l = decode(&[0x48, 0x8b, 0x02], CpuMode::Bits64, 0)
            .unwrap()
            .load()
            .unwrap();
        assert_eq!((l.dest_size, l.size), (8, 8));
        // Stores and read-modify-writes are not loads.
        assert!(
            decode(&[0x89, 0x02], CpuMode::Bits64, 0)
                .unwrap()
                .load()
                .is_none()
        );
        assert!(
            decode(&[0x03, 0x02], CpuMode::Bits64, 0)
                .unwrap()
                .load()
                .is_none()
        );
        // mov ah, [rdi]: a high-byte register.
        assert!(
            decode(&[0x8a, 0x27], CpuMode::Bits64, 0)
                .unwrap()
                .load()
                .is_none()
        );
    }

    #[test]
    fn stores_to_apic_registers() {
        // mov dword [rdx+0x300], eax  (89 82 00 03 00 00)
        let d = decode(&[0x89, 0x82, 0x00, 0x03, 0x00, 0x00], CpuMode::Bits64, 0).unwrap();
        assert_eq!(
            d.store(),
            Some(Store {
                source: StoreSource::Register(Gpr::Rax),
                size: 4,
                exchange: false
            })
        );
        // mov dword [rip+x], r13d (44 89 2d xx xx xx xx)
        let d = decode(&[0x44, 0x89, 0x2d, 0, 0, 0, 0], CpuMode::Bits64, 0).unwrap();
        assert_eq!(d.store().unwrap().source, StoreSource::Register(Gpr::R13));
        // mov dword [rax], 0xc4500  (c7 00 00 45 0c 00)
        let d = decode(&[0xc7, 0x00, 0x00, 0x45, 0x0c, 0x00], CpuMode::Bits64, 0).unwrap();
        assert_eq!(d.store().unwrap().source, StoreSource::Immediate(0xc4500));
        // xchg [rdi], esi  (87 37)
        let d = decode(&[0x87, 0x37], CpuMode::Bits64, 0).unwrap();
        assert_eq!(
            d.store(),
            Some(Store {
                source: StoreSource::Register(Gpr::Rsi),
                size: 4,
                exchange: true
            })
        );
        // mov eax, [rdx] is a load, not a store.
        assert!(
            decode(&[0x8b, 0x02], CpuMode::Bits64, 0)
                .unwrap()
                .store()
                .is_none()
        );
        // or dword [rax], 1 is a read-modify-write we do not emulate.
        assert!(
            decode(&[0x83, 0x08, 0x01], CpuMode::Bits64, 0)
                .unwrap()
                .store()
                .is_none()
        );
        // 32-bit mode: mov [ebx+0x300], ecx (89 8b 00 03 00 00)
        let d = decode(&[0x89, 0x8b, 0x00, 0x03, 0x00, 0x00], CpuMode::Bits32, 0).unwrap();
        assert_eq!(d.store().unwrap().source, StoreSource::Register(Gpr::Rcx));
        // mov [rax], ah: a high-byte register is not a GPR we can name.
        assert!(
            decode(&[0x88, 0x20], CpuMode::Bits64, 0)
                .unwrap()
                .store()
                .is_none()
        );
    }
}
