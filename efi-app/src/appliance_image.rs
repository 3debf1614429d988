//! What an appliance's RAM holds when its first processor starts: a stock
//! Linux bzImage loaded by the 64-bit boot protocol
//! (`Documentation/arch/x86/boot.rst`, `zero-page.rst`), its initrd and
//! command line, and the platform description the kernel finds its
//! processors and console with — generated ACPI tables (RSDP, XSDT, a
//! hardware-reduced FADT, a MADT with the appliance's processors only, a
//! DSDT describing one 16550 without an interrupt) rather than a guest ABI
//! a stock kernel lacks (`docs/appliances.md`).
//!
//! Guest-physical addresses start at 0 and cover the appliance's RAM
//! (thinhv's second-level tables for the appliance put them at its host
//! RAM):
//!
//! | GPA | what |
//! |---|---|
//! | 0 – 0x7ffff | RAM (the kernel's real-mode trampoline lives here) |
//! | 0x80000 – 0x8ffff | reserved: page tables, GDT, zero page, command line, ACPI tables |
//! | 0x90000 – 0xfffff | reserved (legacy holes); at 0xffff0 the reset vector: a reset through port 0xCF9 |
//! | 0x100000 – 2 GiB (or its end) | RAM: the kernel at its preferred address, the initrd at the top |
//! | 2 GiB – 4 GiB | its MMIO hole: its local APIC, its functions' BARs below 4 GiB |
//! | 4 GiB – | the rest of its RAM (`thinhv_abi::handoff::appliance_ram_ranges`) |
// Every address written into 32-bit fields of the boot structures here
// lies below its MMIO hole (the kernel, the initrd, the tables), and table
// lengths are a few hundred bytes: the narrowing casts cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use thinhv_abi::handoff::appliance_ram_ranges;

/// Page tables (PML4, PDPT, four page directories: 4 GiB in 2 MiB pages).
pub const PML4: u64 = 0x8_0000;
const PDPT: u64 = 0x8_1000;
const PD: u64 = 0x8_2000;
/// GDT: null, null, 64-bit code (0x10), data (0x18).
pub const GDT: u64 = 0x8_6000;
/// The zero page.
pub const BOOT_PARAMS: u64 = 0x8_7000;
const CMDLINE: u64 = 0x8_8000;
/// ACPI tables.
pub const RSDP: u64 = 0x8_9000;
const XSDT: u64 = 0x8_9100;
const FADT: u64 = 0x8_9200;
const MADT: u64 = 0x8_9400;
const DSDT: u64 = 0x8_9800;
const RESERVED_START: u64 = 0x8_0000;
/// The real-mode reset vector (F000:FFF0). A kernel that restarts
/// "through the BIOS" (Linux's `machine_real_restart`) jumps here; the
/// platform answers with a reset request through port 0xCF9, which thinhv
/// takes as the appliance's reset.
const RESET_VECTOR: u64 = 0xf_fff0;
/// `mov dx, 0xcf9; mov al, 0x0e; out dx, al; hlt; jmp $-1`.
const RESET_STUB: [u8; 9] = [0xba, 0xf9, 0x0c, 0xb0, 0x0e, 0xee, 0xf4, 0xeb, 0xfd];
const HIGH_RAM: u64 = 0x10_0000;
/// The legacy BIOS area, 0xF0000–0xFFFFF: the SMBIOS entry point (where
/// Linux looks for it without EFI) and tables, and the reset vector.
const BIOS_AREA: u64 = 0xf_0000;
/// The SMBIOS structure table, after its 3.0 entry point.
const SMBIOS_TABLE: u64 = 0xf_0100;
/// The BIOS release date in SMBIOS (Linux's `dmi_get_bios_year`: from
/// 2001 on it trusts PCI configuration mechanism 1 without probing for a
/// host bridge, which the appliance has none of; from 2008 on it uses
/// the root bridge's `_CRS` windows).
const BIOS_DATE: &str = "01/01/2026";
/// The port of the 16550 the DSDT describes when thinhv emulates the
/// appliance's console (`console = "log"`).
pub const CONSOLE_PORT: u16 = 0x3f8;
/// Selectors of the GDT.
pub const CODE_SELECTOR: u16 = 0x10;
/// Data selector.
pub const DATA_SELECTOR: u16 = 0x18;

/// What thinhv loads the processor with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// 64-bit entry: protected-mode kernel + 0x200.
    pub rip: u64,
    /// The zero page.
    pub rsi: u64,
    /// Page tables.
    pub cr3: u64,
    /// GDT base and limit.
    pub gdt: (u64, u16),
}

/// The image: bytes to place at guest-physical addresses, and the entry.
#[derive(Clone, Debug)]
pub struct Image {
    /// (GPA, bytes), non-overlapping.
    pub pieces: Vec<(u64, Vec<u8>)>,
    /// How to start it.
    pub entry: Entry,
    /// Where the kernel and initrd went (for the log).
    pub kernel_at: u64,
    /// Initrd GPA and length (0 if none).
    pub initrd_at: (u64, u64),
}

/// The facts of a bzImage's setup header thinhv needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupHeader {
    /// Sectors of real-mode setup code (the protected-mode kernel starts at
    /// `(setup_sects + 1) * 512`).
    pub setup_sects: u8,
    /// Boot protocol version.
    pub version: u16,
    /// Alignment the kernel needs.
    pub kernel_alignment: u32,
    /// Preferred load address.
    pub pref_address: u64,
    /// Memory the kernel needs from its load address on.
    pub init_size: u32,
    /// Highest initrd address (inclusive).
    pub initrd_addr_max: u32,
    /// Longest command line.
    pub cmdline_size: u32,
    /// The header's length (from 0x1F1 to `0x202 + byte[0x201]`).
    pub end: usize,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | u64::from(u32_at(b, o + 4)) << 32
}

/// Reads and checks the setup header: a bzImage of boot protocol 2.12 or
/// later with the 64-bit entry (`XLF_KERNEL_64`), relocatable.
pub fn setup_header(kernel: &[u8]) -> Result<SetupHeader, String> {
    if kernel.len() < 0x1000 {
        return Err(String::from("too short for a bzImage"));
    }
    if u16_at(kernel, 0x1fe) != 0xaa55 || &kernel[0x202..0x206] != b"HdrS" {
        return Err(String::from(
            "not a Linux bzImage (no boot signature or HdrS)",
        ));
    }
    let version = u16_at(kernel, 0x206);
    if version < 0x020c {
        return Err(format!(
            "boot protocol {}.{} is older than 2.12 (no 64-bit entry)",
            version >> 8,
            version & 0xff
        ));
    }
    if u16_at(kernel, 0x236) & 1 == 0 {
        return Err(String::from(
            "the kernel has no 64-bit entry (XLF_KERNEL_64)",
        ));
    }
    if kernel[0x234] == 0 {
        return Err(String::from("the kernel is not relocatable"));
    }
    let setup_sects = match kernel[0x1f1] {
        0 => 4,
        n => n,
    };
    let end = 0x202 + usize::from(kernel[0x201]);
    let h = SetupHeader {
        setup_sects,
        version,
        kernel_alignment: u32_at(kernel, 0x230),
        pref_address: u64_at(kernel, 0x258),
        init_size: u32_at(kernel, 0x260),
        initrd_addr_max: u32_at(kernel, 0x22c),
        cmdline_size: u32_at(kernel, 0x238),
        end,
    };
    if end > 0x268 + 0x100 || (usize::from(setup_sects) + 1) * 512 >= kernel.len() {
        return Err(String::from("malformed setup header"));
    }
    if !h.kernel_alignment.is_power_of_two() {
        return Err(String::from("kernel_alignment is not a power of two"));
    }
    Ok(h)
}

/// What the appliance is given.
pub struct Spec<'a> {
    /// The bzImage.
    pub kernel: &'a [u8],
    /// The initrd, if any.
    pub initrd: Option<&'a [u8]>,
    /// The command line.
    pub cmdline: &'a str,
    /// RAM bytes (2 MiB multiple).
    pub ram: u64,
    /// Its processors' APIC IDs; the first starts the kernel.
    pub apic_ids: &'a [u32],
    /// The I/O port of its console UART: [`CONSOLE_PORT`] (emulated), or
    /// the COM port given to it (`console = "com2"`), which its DSDT then
    /// describes instead.
    pub console_port: u16,
    /// Memory ranges of the PCI functions it is given (their BARs, at the
    /// addresses the firmware assigned): the windows of the PCI root
    /// bridge in its DSDT. Empty: no PCI root bridge.
    pub pci_windows: &'a [(u64, u64)],
}

/// Lays the appliance's RAM out.
pub fn build(s: &Spec<'_>) -> Result<Image, String> {
    let h = setup_header(s.kernel)?;
    if s.cmdline.len() + 1 > (h.cmdline_size as usize).min(4096) {
        return Err(format!(
            "the command line is {} bytes; this kernel takes {}",
            s.cmdline.len(),
            h.cmdline_size
        ));
    }
    let ranges = appliance_ram_ranges(s.ram);
    // Its MMIO hole holds its functions' BARs: none may fall on its RAM.
    if let Some(&(base, size)) = s.pci_windows.iter().find(|&&(base, size)| {
        ranges
            .iter()
            .any(|&(at, _, n)| base < at + n && at < base.saturating_add(size))
    }) {
        return Err(format!(
            "a BAR of one of its functions, {base:#x}+{size:#x}, falls on its RAM, which it \
             sees at 0-{:#x} and from 4 GiB",
            ranges[0].2
        ));
    }
    let low_ram = ranges[0].2;
    let pm = &s.kernel[(usize::from(h.setup_sects) + 1) * 512..];
    let align = u64::from(h.kernel_alignment.max(4096));
    let kernel_at = h.pref_address.max(HIGH_RAM).div_ceil(align) * align;
    let kernel_end = kernel_at + u64::from(h.init_size).max(pm.len() as u64);
    if kernel_end > low_ram {
        return Err(format!(
            "the kernel needs {} MiB from {:#x}; the appliance has {} MiB",
            (kernel_end - kernel_at) >> 20,
            kernel_at,
            s.ram >> 20
        ));
    }
    let initrd_at = match s.initrd {
        None => (0, 0),
        Some(i) => {
            let len = i.len() as u64;
            let top = low_ram.min(u64::from(h.initrd_addr_max) + 1);
            let at = top.checked_sub(len).map(|a| a & !0xfff);
            match at {
                Some(a) if a >= kernel_end => (a, len),
                _ => {
                    return Err(format!(
                        "the initrd ({} MiB) does not fit above the kernel in {} MiB",
                        len >> 20,
                        s.ram >> 20
                    ));
                }
            }
        }
    };
    let mut pieces = Vec::new();
    pieces.push((PML4, page_tables()));
    pieces.push((GDT, gdt()));
    pieces.push((BOOT_PARAMS, zero_page(s, &h, kernel_at, initrd_at)));
    let mut cmd = s.cmdline.as_bytes().to_vec();
    cmd.push(0);
    pieces.push((CMDLINE, cmd));
    for (at, t) in acpi_tables(s.apic_ids, s.console_port, s.pci_windows) {
        pieces.push((at, t));
    }
    pieces.push((BIOS_AREA, bios_area()));
    pieces.push((kernel_at, pm.to_vec()));
    if let Some(i) = s.initrd {
        pieces.push((initrd_at.0, i.to_vec()));
    }
    Ok(Image {
        pieces,
        entry: Entry {
            rip: kernel_at + 0x200,
            rsi: BOOT_PARAMS,
            cr3: PML4,
            gdt: (GDT, 0x1f),
        },
        kernel_at,
        initrd_at,
    })
}

/// Identity map of the first 4 GiB, 2 MiB pages, writable.
fn page_tables() -> Vec<u8> {
    let mut t = vec![0u8; 6 * 4096];
    let put = |t: &mut Vec<u8>, at: usize, v: u64| t[at..at + 8].copy_from_slice(&v.to_le_bytes());
    // PML4[0] → PDPT; PDPT[i] → PD i.
    put(&mut t, 0, PDPT | 3);
    for i in 0..4u64 {
        put(&mut t, 0x1000 + 8 * i as usize, (PD + i * 0x1000) | 3);
    }
    for i in 0..2048u64 {
        put(&mut t, 0x2000 + 8 * i as usize, (i << 21) | 0x83);
    }
    t
}

fn gdt() -> Vec<u8> {
    let mut g = vec![0u8; 32];
    // 0x10: 64-bit code, present, DPL 0, L = 1. 0x18: data, present.
    g[16..24].copy_from_slice(&0x00af_9b00_0000_ffffu64.to_le_bytes());
    g[24..32].copy_from_slice(&0x00cf_9300_0000_ffffu64.to_le_bytes());
    g
}

/// E820 types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The appliance's memory map: its RAM only, below its MMIO hole and from
/// 4 GiB (`appliance_ram_ranges`).
pub fn e820(ram: u64) -> Vec<(u64, u64, u32)> {
    let [low, high] = appliance_ram_ranges(ram);
    let mut map = vec![
        (0, RESERVED_START, E820_RAM),
        (RESERVED_START, HIGH_RAM - RESERVED_START, E820_RESERVED),
        (HIGH_RAM, low.2 - HIGH_RAM, E820_RAM),
    ];
    if high.2 != 0 {
        map.push((high.0, high.2, E820_RAM));
    }
    map
}

fn zero_page(s: &Spec<'_>, h: &SetupHeader, kernel_at: u64, initrd: (u64, u64)) -> Vec<u8> {
    let mut z = vec![0u8; 4096];
    z[0x1f1..h.end].copy_from_slice(&s.kernel[0x1f1..h.end]);
    let put32 =
        |z: &mut Vec<u8>, at: usize, v: u32| z[at..at + 4].copy_from_slice(&v.to_le_bytes());
    z[0x70..0x78].copy_from_slice(&RSDP.to_le_bytes());
    let map = e820(s.ram);
    z[0x1e8] = map.len() as u8;
    for (i, (a, l, t)) in map.iter().enumerate() {
        let o = 0x2d0 + 20 * i;
        z[o..o + 8].copy_from_slice(&a.to_le_bytes());
        z[o + 8..o + 16].copy_from_slice(&l.to_le_bytes());
        put32(&mut z, o + 16, *t);
    }
    z[0x210] = 0xff; // type_of_loader: undefined
    z[0x211] |= 0x01; // LOADED_HIGH
    put32(&mut z, 0x214, kernel_at as u32); // code32_start
    put32(&mut z, 0x218, initrd.0 as u32);
    put32(&mut z, 0x21c, initrd.1 as u32);
    put32(&mut z, 0x228, CMDLINE as u32);
    z
}

fn checksum_fix(t: &mut [u8], at: usize) {
    t[at] = 0;
    let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    t[at] = 0u8.wrapping_sub(sum);
}

fn sdt(sig: [u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 36];
    t[..4].copy_from_slice(&sig);
    t[4..8].copy_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t[8] = revision;
    t[10..16].copy_from_slice(b"THINHV");
    t[16..24].copy_from_slice(b"APPLIANC");
    t[24..28].copy_from_slice(&1u32.to_le_bytes());
    t[28..32].copy_from_slice(b"THHV");
    t[32..36].copy_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    checksum_fix(&mut t, 9);
    t
}

/// 0xF0000–0xFFFFF: an SMBIOS 3.0 entry point and table (BIOS
/// information with [`BIOS_DATE`], system information naming thinhv, the
/// end-of-table structure; DMTF DSP0134 3.0 §5.2.2, §7.1, §7.2, §7.45),
/// and at the reset vector the stub that asks for a reset.
fn bios_area() -> Vec<u8> {
    let mut a = vec![0u8; 0x1_0000];
    let mut t = Vec::new();
    let strings = |t: &mut Vec<u8>, list: &[&str]| {
        for s in list {
            t.extend_from_slice(s.as_bytes());
            t.push(0);
        }
        t.push(0);
    };
    // Type 0, BIOS information (length 0x18): vendor 1, version 2,
    // segment 0xF000, date 3, ROM size 0, characteristics "not
    // supported" (bit 3), extension bytes, release 0.1.
    t.extend_from_slice(&[0, 0x18, 0, 0, 1, 2, 0x00, 0xf0, 3, 0]);
    t.extend_from_slice(&(1u64 << 3).to_le_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0xff, 0xff]);
    strings(&mut t, &["thinhv", "0.1.0", BIOS_DATE]);
    // Type 1, system information (length 0x1B): manufacturer 1, product
    // 2, no version or serial, no UUID, woken by the power switch (6).
    t.extend_from_slice(&[1, 0x1b, 1, 0, 1, 2, 0, 0]);
    t.extend_from_slice(&[0; 16]);
    t.extend_from_slice(&[6, 0, 0]);
    strings(&mut t, &["thinhv", "appliance partition"]);
    // Type 127, end of table.
    t.extend_from_slice(&[127, 4, 2, 0, 0, 0]);
    let off = (SMBIOS_TABLE - BIOS_AREA) as usize;
    a[off..off + t.len()].copy_from_slice(&t);
    // The 3.0 entry point ("_SM3_", 24 bytes).
    let mut e = [0u8; 24];
    e[..5].copy_from_slice(b"_SM3_");
    e[6] = 24;
    e[7] = 3;
    e[10] = 1;
    e[12..16].copy_from_slice(&(t.len() as u32).to_le_bytes());
    e[16..24].copy_from_slice(&SMBIOS_TABLE.to_le_bytes());
    checksum_fix(&mut e, 5);
    a[..24].copy_from_slice(&e);
    let stub = (RESET_VECTOR - BIOS_AREA) as usize;
    a[stub..stub + RESET_STUB.len()].copy_from_slice(&RESET_STUB);
    a
}

/// RSDP, XSDT, FADT, MADT, DSDT at their addresses.
fn acpi_tables(apic_ids: &[u32], console: u16, pci_windows: &[(u64, u64)]) -> Vec<(u64, Vec<u8>)> {
    // FADT (ACPI 6.5 §5.2.9), revision 6.5, 276 bytes: hardware-reduced
    // (no PM timer, no SCI, no legacy devices), X_DSDT only.
    let mut f = vec![0u8; 276 - 36];
    let at = |o: usize| o - 36;
    f[at(40)..at(44)].copy_from_slice(&(DSDT as u32).to_le_bytes());
    // Flags: HW_REDUCED_ACPI (bit 20), FORCE_APIC_PHYSICAL_DESTINATION_MODE
    // (bit 19: its IPIs and its devices' MSIs name APIC IDs, never the
    // logical IDs it has none of in hardware), PWR_BUTTON / SLP_BUTTON
    // absent (bits 4, 5 set mean "no such button").
    let flags: u32 = 1 << 20 | 1 << 19 | 1 << 4 | 1 << 5;
    f[at(112)..at(116)].copy_from_slice(&flags.to_le_bytes());
    // IA-PC boot architecture flags: no legacy devices, no 8042, no VGA,
    // no MSI disable, no CMOS RTC (bits 0..5 as they apply).
    let iapc: u16 = 1 << 2 | 1 << 5;
    f[at(109)..at(111)].copy_from_slice(&iapc.to_le_bytes());
    f[at(131)] = 5; // FADT minor version
    f[at(140)..at(148)].copy_from_slice(&DSDT.to_le_bytes());
    let fadt = sdt(*b"FACP", 6, &f);
    // MADT: local APIC address, no PCAT_COMPAT (no 8259), one Processor
    // Local APIC (or x2APIC) entry per processor, enabled.
    let mut m = Vec::new();
    m.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    for (uid, &id) in apic_ids.iter().enumerate() {
        if id < 255 {
            m.extend_from_slice(&[0, 8, uid as u8, id as u8, 1, 0, 0, 0]);
        } else {
            m.extend_from_slice(&[9, 16, 0, 0]);
            m.extend_from_slice(&id.to_le_bytes());
            m.extend_from_slice(&1u32.to_le_bytes());
            m.extend_from_slice(&(uid as u32).to_le_bytes());
        }
    }
    let madt = sdt(*b"APIC", 5, &m);
    let dsdt = sdt(*b"DSDT", 2, &dsdt_body(console, pci_windows));
    let mut x = Vec::new();
    for a in [FADT, MADT] {
        x.extend_from_slice(&a.to_le_bytes());
    }
    let xsdt = sdt(*b"XSDT", 1, &x);
    let mut r = vec![0u8; 36];
    r[..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(b"THINHV");
    r[15] = 2;
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&XSDT.to_le_bytes());
    checksum_fix(&mut r[..20], 8);
    checksum_fix(&mut r, 32);
    vec![
        (RSDP, r),
        (XSDT, xsdt),
        (FADT, fadt),
        (MADT, madt),
        (DSDT, dsdt),
    ]
}

/// The DSDT's AML, in `\_SB`: `Device (COM1)` (`PNP0501`, `IO (Decode16,
/// console, console, 1, 8)`), a 16550 with no interrupt, which Linux's 8250
/// driver then polls (ACPI 6.5 §19.6, §6.4.2.5); and with PCI functions,
/// `Device (PCI0)` ([`pci_root_bridge`]).
fn dsdt_body(console: u16, pci_windows: &[(u64, u64)]) -> Vec<u8> {
    // The IO resource descriptor; EisaId ("PNP0501") = 0x0105D041.
    let port = console.to_le_bytes();
    let io = [0x47, 0x01, port[0], port[1], port[0], port[1], 0x01, 0x08];
    // Scope (\_SB) { devices }
    let mut scope_body = vec![b'\\', b'_', b'S', b'B', b'_'];
    scope_body.extend_from_slice(&aml_device(*b"COM1", 0x0105_d041, &io));
    if !pci_windows.is_empty() {
        scope_body.extend_from_slice(&pci_root_bridge(pci_windows));
    }
    let mut scope = vec![0x10];
    push_pkglen(&mut scope, scope_body.len());
    scope.extend_from_slice(&scope_body);
    scope
}

/// AML for `Device (name) { Name (_HID, hid) Name (_UID, 0) Name (_CRS,
/// ResourceTemplate () { resources }) }` (`hid` a compressed EISA ID;
/// the end tag is added).
fn aml_device(name: [u8; 4], hid: u32, resources: &[u8]) -> Vec<u8> {
    let mut crs = resources.to_vec();
    crs.extend_from_slice(&[0x79, 0x00]); // End tag (checksum 0: ignored)
    // Buffer (WordConst size) { bytes }
    let mut buffer = vec![0x0b];
    buffer.extend_from_slice(&(crs.len() as u16).to_le_bytes());
    buffer.extend_from_slice(&crs);
    let mut buf_op = vec![0x11];
    push_pkglen(&mut buf_op, buffer.len());
    buf_op.extend_from_slice(&buffer);
    let mut body = name.to_vec();
    body.extend_from_slice(&[0x08, b'_', b'H', b'I', b'D', 0x0c]);
    body.extend_from_slice(&hid.to_le_bytes());
    body.extend_from_slice(&[0x08, b'_', b'U', b'I', b'D', 0x00]);
    body.extend_from_slice(&[0x08, b'_', b'C', b'R', b'S']);
    body.extend_from_slice(&buf_op);
    // Device: ExtOpPrefix DeviceOp PkgLength NameString body
    let mut dev = vec![0x5b, 0x82];
    push_pkglen(&mut dev, body.len());
    dev.extend_from_slice(&body);
    dev
}

/// A PCI root bridge (`PNP0A03`, EisaId 0x030AD041): conventional
/// configuration space through ports 0xCF8/0xCFC, which thinhv presents,
/// decoding bus 0 (`WordBusNumber`) and the given memory ranges
/// (`QWordMemory` each) (ACPI 6.5 §6.4.3.5.1, §6.4.3.5.3).
fn pci_root_bridge(windows: &[(u64, u64)]) -> Vec<u8> {
    let mut crs = Vec::new();
    // WordBusNumber: producer, MinFixed | MaxFixed, range 0..=0, length 1.
    crs.extend_from_slice(&[0x88, 13, 0, 2, 0x0c, 0]);
    for v in [0u16, 0, 0, 0, 1] {
        crs.extend_from_slice(&v.to_le_bytes());
    }
    for &(base, size) in windows {
        // QWordMemory: producer, MinFixed | MaxFixed, read-write,
        // non-cacheable.
        crs.extend_from_slice(&[0x8a, 43, 0, 0, 0x0c, 0x01]);
        for v in [0u64, base, base + size - 1, 0, size] {
            crs.extend_from_slice(&v.to_le_bytes());
        }
    }
    aml_device(*b"PCI0", 0x030a_d041, &crs)
}

/// AML PkgLength (ACPI 6.5 §20.2.4) for `body` bytes after it.
fn push_pkglen(out: &mut Vec<u8>, body: usize) {
    // The length counts its own bytes.
    if body + 1 < 0x40 {
        out.push((body + 1) as u8);
    } else {
        let total = body + 2;
        assert!(total < 0x1000, "AML package too long");
        out.push(0x40 | (total & 0xf) as u8);
        out.push((total >> 4) as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bzImage: the header fields of Debian's 6.1 kernel.
    fn bzimage(pm_len: usize) -> Vec<u8> {
        let mut k = vec![0u8; 40 * 512 + pm_len];
        k[0x1f1] = 39;
        k[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        k[0x201] = 106;
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        k[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        k[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
        k[0x234] = 1;
        k[0x236..0x238].copy_from_slice(&0x7fu16.to_le_bytes());
        k[0x238..0x23c].copy_from_slice(&0x7ffu32.to_le_bytes());
        k[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        k[0x260..0x264].copy_from_slice(&0x3f9_8000u32.to_le_bytes());
        k[40 * 512] = 0xe9;
        k
    }

    #[test]
    fn lays_out_kernel_initrd_and_zero_page() {
        let k = bzimage(0x10000);
        let initrd = vec![7u8; 0x12345];
        let img = build(&Spec {
            kernel: &k,
            initrd: Some(&initrd),
            cmdline: "console=ttyS0",
            ram: 256 << 20,
            apic_ids: &[2, 3],
            console_port: CONSOLE_PORT,
            pci_windows: &[],
        })
        .unwrap();
        assert_eq!(img.kernel_at, 0x100_0000);
        assert_eq!(img.entry.rip, 0x100_0200);
        assert_eq!(img.initrd_at, ((256 << 20) - 0x13000, 0x12345));
        let zp = &img.pieces.iter().find(|p| p.0 == BOOT_PARAMS).unwrap().1;
        assert_eq!(&zp[0x202..0x206], b"HdrS");
        assert_eq!(zp[0x210], 0xff);
        assert_eq!(u32_at(zp, 0x218), (256 << 20) - 0x13000);
        assert_eq!(u32_at(zp, 0x21c), 0x12345);
        assert_eq!(u64_at(zp, 0x70), RSDP);
        assert_eq!(zp[0x1e8], 3);
        // The last e820 entry ends at the appliance's RAM end.
        let o = 0x2d0 + 40;
        assert_eq!(u64_at(zp, o) + u64_at(zp, o + 8), 256 << 20);
        // Pieces never overlap.
        let mut spans: Vec<(u64, u64)> = img
            .pieces
            .iter()
            .map(|(a, b)| (*a, *a + b.len() as u64))
            .collect();
        spans.sort_unstable();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:x?}");
    }

    #[test]
    fn a_large_appliance_has_ram_from_4_gib_and_keeps_its_bars_in_the_hole() {
        let k = bzimage(0x10000);
        let initrd = vec![7u8; 0x12345];
        let spec = |pci_windows| Spec {
            kernel: &k,
            initrd: Some(&initrd),
            cmdline: "",
            ram: 6 << 30,
            apic_ids: &[1],
            console_port: CONSOLE_PORT,
            pci_windows,
        };
        let bar = [(0xfeb0_0000, 0x2_0000)];
        let img = build(&spec(&bar)).unwrap();
        // The initrd at the top of its RAM below the hole, not at 6 GiB.
        assert_eq!(img.initrd_at, ((2 << 30) - 0x13000, 0x12345));
        assert_eq!(
            e820(6 << 30),
            [
                (0, RESERVED_START, E820_RAM),
                (RESERVED_START, HIGH_RAM - RESERVED_START, E820_RESERVED),
                (HIGH_RAM, (2 << 30) - HIGH_RAM, E820_RAM),
                (1 << 32, 4 << 30, E820_RAM),
            ]
        );
        let zp = &img.pieces.iter().find(|p| p.0 == BOOT_PARAMS).unwrap().1;
        assert_eq!(zp[0x1e8], 4);
        // Every piece lies in its RAM below the hole.
        assert!(img.pieces.iter().all(|(at, b)| {
            thinhv_abi::handoff::appliance_ram_offset(6 << 30, *at, b.len() as u64).is_some()
        }));
        // A 64-bit BAR where its high RAM is, or one below 2 GiB: refused.
        static BAD: [[(u64, u64); 1]; 2] = [[(0x1_8000_0000, 0x4000)], [(0x7000_0000, 0x1000)]];
        for bad in &BAD {
            let e = build(&spec(bad)).unwrap_err();
            assert!(e.contains("falls on its RAM"), "{e}");
        }
        // Up to 2 GiB the map is as before: one range.
        assert_eq!(e820(256 << 20).len(), 3);
    }

    #[test]
    fn refuses_what_does_not_fit_or_is_not_a_kernel() {
        let k = bzimage(0x10000);
        let spec = |ram, initrd: Option<&'static [u8]>| Spec {
            kernel: &k,
            initrd,
            cmdline: "",
            ram,
            apic_ids: &[1],
            console_port: CONSOLE_PORT,
            pci_windows: &[],
        };
        let e = build(&spec(64 << 20, None)).unwrap_err();
        assert!(e.contains("needs"), "{e}");
        static BIG: [u8; 200 << 20] = [0; 200 << 20];
        let e = build(&spec(256 << 20, Some(&BIG))).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        let mut bad = bzimage(0x100);
        bad[0x236] = 0;
        assert!(setup_header(&bad).unwrap_err().contains("64-bit"));
        assert!(setup_header(&[0u8; 8192]).unwrap_err().contains("bzImage"));
        let long = "x".repeat(3000);
        let e = build(&Spec {
            kernel: &k,
            initrd: None,
            cmdline: &long,
            ram: 256 << 20,
            apic_ids: &[1],
            console_port: CONSOLE_PORT,
            pci_windows: &[],
        })
        .unwrap_err();
        assert!(e.contains("command line"), "{e}");
    }

    #[test]
    fn acpi_tables_checksum_and_name_only_the_appliance_cpus() {
        let t = acpi_tables(&[2, 3, 300], CONSOLE_PORT, &[]);
        for (_, b) in &t[1..] {
            assert_eq!(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            assert_eq!(u32_at(b, 4) as usize, b.len());
        }
        let rsdp = &t[0].1;
        assert_eq!(rsdp[..20].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        assert_eq!(rsdp.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let madt = &t[3].1;
        let ids = thinhv_passthrough::madt::processor_ids(madt).unwrap();
        assert_eq!(ids, [2, 3, 300]);
        // The FADT says hardware-reduced and points at the DSDT.
        let fadt = &t[2].1;
        assert_ne!(u32_at(fadt, 112) & 1 << 20, 0);
        assert_eq!(u64_at(fadt, 140), DSDT);
        // Physical destination mode forced.
        assert_ne!(u32_at(fadt, 112) & 1 << 19, 0);
        // The DSDT's AML: one scope, its package length right.
        let d = &t[4].1[36..];
        assert_eq!(d[0], 0x10);
        assert_eq!(usize::from(d[1]), d.len() - 1);
        assert!(!d.windows(4).any(|w| w == b"PCI0"));
    }

    #[test]
    fn a_pci_root_bridge_decodes_the_given_windows() {
        let w = [(0xc000_0000, 0x2_0000), (0x8_0000_0000, 0x4000)];
        let t = acpi_tables(&[1], 0x2f8, &w);
        let dsdt = &t[4].1;
        assert_eq!(dsdt.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let d = &dsdt[36..];
        // Scope's two-byte package length covers the whole body.
        assert_eq!(d[0], 0x10);
        let len = usize::from(d[1] & 0xf) | usize::from(d[2]) << 4;
        assert_eq!(len, d.len() - 1);
        // The console given to it (COM2) is the UART described.
        assert!(
            d.windows(6)
                .any(|x| x == [0x47, 0x01, 0xf8, 0x02, 0xf8, 0x02])
        );
        let at = d.windows(4).position(|x| x == b"PCI0").unwrap();
        let dev = &d[at..];
        assert_eq!(&dev[5..10], b"_HID\x0c".as_slice());
        assert_eq!(u32_at(dev, 10), 0x030a_d041);
        // The _CRS buffer: bus 0..=0, then each window as a QWordMemory.
        let crs = dev.windows(2).position(|x| x == [0x88, 13]).unwrap();
        let q = &dev[crs + 16..];
        assert_eq!(q[0], 0x8a);
        assert_eq!(u64_at(q, 14), 0xc000_0000);
        assert_eq!(u64_at(q, 22), 0xc001_ffff);
        assert_eq!(u64_at(q, 38), 0x2_0000);
        let q = &q[46..];
        assert_eq!(u64_at(q, 14), 0x8_0000_0000);
        assert_eq!(&q[46..48], &[0x79, 0x00]);
    }

    #[test]
    fn the_bios_area_holds_smbios_with_a_date_and_the_reset_stub() {
        let a = bios_area();
        assert_eq!(a.len(), 0x1_0000);
        assert_eq!(&a[..5], b"_SM3_");
        assert_eq!(a[..24].iter().fold(0u8, |s, x| s.wrapping_add(*x)), 0);
        assert_eq!(u64_at(&a, 16), SMBIOS_TABLE);
        let t = &a[0x100..0x100 + u32_at(&a, 12) as usize];
        // BIOS information, then system information, then the end.
        assert_eq!((t[0], t[1]), (0, 0x18));
        let text = String::from_utf8_lossy(t);
        assert!(text.contains(BIOS_DATE), "{text}");
        assert!(text.contains("appliance partition"), "{text}");
        assert_eq!(&t[t.len() - 6..], &[127, 4, 2, 0, 0, 0]);
        assert_eq!(&a[0xfff0..0xfff0 + RESET_STUB.len()], &RESET_STUB);
    }
}
