//! `thinhv.toml`: the configuration file beside `thinhv.efi` on the ESP.
//!
//! The same parser runs in the loader (UEFI, `no_std` + `alloc`) and in the
//! host tool (`thinhv check`), so what an admin checks is what boots.
//!
//! Every key is documented in `docs/configuration.md`. Unknown keys, wrong
//! types and bad values are errors that name the line. A file that cannot be
//! parsed at all is still searched, line by line, for the three keys the
//! boot depends on ([`salvage`]): `[hypervisor] required`, `[boot] next` and
//! `[boot] options`, so a typo elsewhere never loses the admin's choice of OS
//! or the demand that the hypervisor be present.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod appliance;
pub mod profile;
mod salvage;
mod value;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::fmt::Write;
use serde::Deserialize;

pub use appliance::{ApicMode, Appliance, Console, Control, CpuSpec, OnCrash};
pub use salvage::{Salvaged, salvage};
pub use value::{InitSipi, IommuInterrupts, IommuMode, IommuOs, LogLevel, OnFatal, Serial};

/// File name the loader looks for beside its own image.
pub const FILE_NAME: &str = "thinhv.toml";

/// Longest accepted `boot.options`, in characters.
pub const MAX_OPTIONS_LEN: usize = 4096;

/// The whole configuration, with defaults for anything absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[hypervisor]`.
    pub hypervisor: Hypervisor,
    /// `[boot]`.
    pub boot: Boot,
    /// `[cpu]`.
    pub cpu: Cpu,
    /// `[iommu]`.
    pub iommu: Iommu,
    /// `[[device]]`: PCI ownership rules, in file order.
    pub device: Vec<DeviceRule>,
    /// `[[sriov]]`: VF budgets.
    pub sriov: Vec<SriovRule>,
    /// `[[appliance]]`: appliance partitions, in file order.
    pub appliance: Vec<Appliance>,
    /// `[debug]` (for tests; not for production).
    pub debug: Debug,
}

/// `[hypervisor]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hypervisor {
    /// Start the hypervisor at all. `false` turns thinhv into a plain
    /// chain-loader (a way back that needs no change of boot entries).
    pub enabled: bool,
    /// Stop the boot rather than start the OS without thinhv.
    pub required: bool,
    /// Log verbosity of loader and core.
    pub log_level: LogLevel,
    /// Serial port for the log.
    pub serial: Serial,
    /// What a fatal error in the core does.
    pub on_fatal: OnFatal,
}

impl Default for Hypervisor {
    fn default() -> Self {
        Self {
            enabled: true,
            required: false,
            log_level: LogLevel::Info,
            serial: Serial::Port(0x3f8),
            on_fatal: OnFatal::Halt,
        }
    }
}

/// `[boot]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Boot {
    /// ESP path of the image to start next, e.g. `\EFI\Linux\vmlinuz.efi`.
    /// Absent: the next `Boot####` in `BootOrder` after thinhv's own.
    pub next: Option<String>,
    /// Load options passed to `next` (e.g. a kernel command line).
    pub options: Option<String>,
}

/// `[cpu]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cpu {
    /// Do not announce the hypervisor through CPUID.
    pub hide_hypervisor: bool,
    /// How application processors are started (INIT/SIPI) on Intel VT-x.
    pub init_sipi: InitSipi,
    /// Processor compatibility profile: `host` or a name in
    /// [`profile::PROFILES`].
    pub profile: String,
    /// Features to hide on top of the profile (Linux's names).
    pub hide: Vec<String>,
    /// Explicit per-leaf AND-masks, `[[cpu.mask]]`.
    pub mask: Vec<CpuidMaskEntry>,
}

impl Default for Cpu {
    fn default() -> Self {
        Self {
            hide_hypervisor: false,
            init_sipi: InitSipi::default(),
            profile: profile::HOST.to_string(),
            hide: Vec::new(),
            mask: Vec::new(),
        }
    }
}

/// One `[[cpu.mask]]`: bits of each register the guest may see (absent
/// registers are not masked).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidMaskEntry {
    /// Leaf (EAX on input).
    pub leaf: u32,
    /// Sub-leaf (ECX on input); absent: any.
    pub subleaf: Option<u32>,
    /// Mask for EAX.
    pub eax: Option<u32>,
    /// Mask for EBX.
    pub ebx: Option<u32>,
    /// Mask for ECX.
    pub ecx: Option<u32>,
    /// Mask for EDX.
    pub edx: Option<u32>,
}

impl Cpu {
    fn explicit_masks(&self) -> Vec<profile::ExplicitMask> {
        self.mask
            .iter()
            .map(|m| profile::ExplicitMask {
                leaf: m.leaf,
                subleaf: m.subleaf.unwrap_or(thinhv_abi::handoff::ANY_SUBLEAF),
                regs: [
                    m.eax.unwrap_or(u32::MAX),
                    m.ebx.unwrap_or(u32::MAX),
                    m.ecx.unwrap_or(u32::MAX),
                    m.edx.unwrap_or(u32::MAX),
                ],
            })
            .collect()
    }

    /// The masks the core applies (`Config::parse` has checked they
    /// resolve).
    pub fn cpuid_profile(&self) -> Result<thinhv_abi::handoff::CpuidProfile, String> {
        profile::resolve(&self.profile, &self.hide, &self.explicit_masks())
    }
}

/// `[iommu]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Iommu {
    /// Who owns the IOMMU.
    pub mode: IommuMode,
    /// Whether thinhv remaps interrupt messages through the IOMMU it owns
    /// (with appliances, on AMD-Vi: `docs/appliances.md`, "Interrupt
    /// isolation").
    pub interrupts: IommuInterrupts,
    /// Whether the OS gets an emulated IOMMU of its own where thinhv owns
    /// the platform's (`docs/os-iommu.md`).
    pub os: IommuOs,
}

/// One `[[device]]` table. `match` and `owner` are checked against the
/// machine at boot (`thinhv_passthrough::policy`): a rule that cannot be
/// applied is reported and left out, it never stops the boot.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRule {
    /// `"0000:02:00.0"`, `"8086:10d3"` or `"class:nic"`.
    #[serde(rename = "match")]
    pub matcher: String,
    /// `"os"` (the default) or `"hidden"`.
    #[serde(default = "default_owner")]
    pub owner: String,
    /// Line of the `[[device]]` header (filled in by [`Config::parse`]).
    #[serde(skip)]
    pub line: Option<usize>,
}

fn default_owner() -> String {
    "os".to_string()
}

/// One `[[sriov]]` table: the OS may create at most `os_vfs` VFs of the
/// PFs `device` matches.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SriovRule {
    /// Which PF(s), as `[[device]] match`.
    pub device: String,
    /// VFs the OS may create.
    pub os_vfs: u32,
    /// Line of the `[[sriov]]` header (filled in by [`Config::parse`]).
    #[serde(skip)]
    pub line: Option<usize>,
}

/// 1-based line of the `n`-th (0-based) `[[name]]` header in `text`.
pub fn table_line(text: &str, name: &str, n: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let l = l.split('#').next().unwrap_or("").trim();
            l.strip_prefix("[[")
                .and_then(|r| r.strip_suffix("]]"))
                .is_some_and(|x| x.trim() == name)
        })
        .nth(n)
        .map(|(i, _)| i + 1)
}

/// `[debug]`: switches for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Debug {
    /// Make the core refuse to virtualize the CPU with this index, to test
    /// that a partial installation is rolled back.
    pub fail_cpu: Option<u32>,
    /// Raise an exception inside the hypervisor (host mode) once all CPUs
    /// are virtualized, to test that it is reported and handled per
    /// `on_fatal`.
    pub host_fault: bool,
}

/// A configuration error, with its position in the file when known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line.
    pub line: Option<usize>,
    /// 1-based column.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{FILE_NAME}:{l}:{c}: {}", self.message),
            (Some(l), None) => write!(f, "{FILE_NAME}:{l}: {}", self.message),
            _ => write!(f, "{FILE_NAME}: {}", self.message),
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.split(|&b| b == b'\n').count();
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}

/// Line (1-based) of the first line `key = ...` inside `[section]`.
fn key_line(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if let Some(rest) = l.strip_prefix('[') {
            current = rest
                .trim_start_matches('[')
                .trim_end_matches(']')
                .trim()
                .to_string();
            continue;
        }
        if current == section
            && let Some((k, _)) = l.split_once('=')
            && k.trim() == key
        {
            return Some(i + 1);
        }
    }
    None
}

impl Config {
    /// Parses and validates `text`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut cfg: Self = toml::from_str(text).map_err(|e| {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(text, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            ConfigError {
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })?;
        cfg.validate(text)?;
        for (i, r) in cfg.device.iter_mut().enumerate() {
            r.line = table_line(text, "device", i);
        }
        for (i, r) in cfg.sriov.iter_mut().enumerate() {
            r.line = table_line(text, "sriov", i);
        }
        for (i, a) in cfg.appliance.iter_mut().enumerate() {
            a.line = table_line(text, "appliance", i);
        }
        appliance::validate(&cfg).map_err(|(i, message)| ConfigError {
            line: table_line(text, "appliance", i),
            column: None,
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self, text: &str) -> Result<(), ConfigError> {
        let err = |section: &str, key: &str, message: String| ConfigError {
            line: key_line(text, section, key),
            column: None,
            message,
        };
        if let Err(m) = self.cpu.cpuid_profile() {
            let key = if m.starts_with("cpu.hide") {
                ("cpu", "hide")
            } else if m.starts_with("cpu.mask") || m.contains("masked CPUID leaves") {
                ("cpu.mask", "leaf")
            } else {
                ("cpu", "profile")
            };
            return Err(err(key.0, key.1, m));
        }
        if self.hypervisor.required && !self.hypervisor.enabled {
            return Err(err(
                "hypervisor",
                "enabled",
                "enabled = false contradicts required = true".to_string(),
            ));
        }
        if let Some(next) = &self.boot.next {
            check_esp_path(next).map_err(|m| err("boot", "next", m))?;
        }
        if let Some(opts) = &self.boot.options {
            if opts.chars().count() > MAX_OPTIONS_LEN {
                return Err(err(
                    "boot",
                    "options",
                    format!("boot.options is longer than {MAX_OPTIONS_LEN} characters"),
                ));
            }
            if opts.contains('\0') {
                return Err(err(
                    "boot",
                    "options",
                    "boot.options contains a NUL".to_string(),
                ));
            }
            if self.boot.next.is_none() {
                return Err(err(
                    "boot",
                    "options",
                    "boot.options is set but boot.next is not: options are only passed to an \
                     image named in boot.next"
                        .to_string(),
                ));
            }
        }
        Ok(())
    }

    /// The path in `boot.next` in UEFI form (backslashes).
    pub fn next_path(&self) -> Option<String> {
        self.boot.next.as_deref().map(normalize_esp_path)
    }

    /// The effective settings, as TOML with every key spelled out.
    pub fn effective(&self) -> String {
        let h = &self.hypervisor;
        let mut s = String::new();
        let _ = writeln!(s, "[hypervisor]");
        let _ = writeln!(s, "enabled = {}", h.enabled);
        let _ = writeln!(s, "required = {}", h.required);
        let _ = writeln!(s, "log_level = \"{}\"", h.log_level.name());
        let _ = writeln!(s, "serial = {}", h.serial);
        let _ = writeln!(s, "on_fatal = \"{}\"", h.on_fatal.name());
        let _ = writeln!(s, "\n[boot]");
        match &self.boot.next {
            Some(n) => {
                let _ = writeln!(s, "next = {}", toml_string(&normalize_esp_path(n)));
            }
            None => s.push_str("# next: unset (next Boot#### in BootOrder)\n"),
        }
        match &self.boot.options {
            Some(o) => {
                let _ = writeln!(s, "options = {}", toml_string(o));
            }
            None => s.push_str("# options: unset\n"),
        }
        let _ = writeln!(s, "\n[cpu]\nhide_hypervisor = {}", self.cpu.hide_hypervisor);
        let _ = writeln!(s, "init_sipi = \"{}\"", self.cpu.init_sipi.name());
        let _ = writeln!(s, "profile = {}", toml_string(&self.cpu.profile));
        let _ = write!(s, "hide = [");
        for (i, h) in self.cpu.hide.iter().enumerate() {
            let _ = write!(s, "{}{}", if i == 0 { "" } else { ", " }, toml_string(h));
        }
        let _ = writeln!(s, "]");
        for m in &self.cpu.mask {
            let _ = writeln!(s, "\n[[cpu.mask]]\nleaf = {:#x}", m.leaf);
            if let Some(sl) = m.subleaf {
                let _ = writeln!(s, "subleaf = {sl:#x}");
            }
            for (name, v) in [
                ("eax", m.eax),
                ("ebx", m.ebx),
                ("ecx", m.ecx),
                ("edx", m.edx),
            ] {
                if let Some(v) = v {
                    let _ = writeln!(s, "{name} = {v:#010x}");
                }
            }
        }
        if let Ok(p) = self.cpu.cpuid_profile()
            && p.active != 0
        {
            let _ = writeln!(s, "# resulting CPUID masks (bits the guest may see):");
            for m in p.masks() {
                let sub = if m.subleaf == thinhv_abi::handoff::ANY_SUBLEAF {
                    "*".to_string()
                } else {
                    format!("{:#x}", m.subleaf)
                };
                let _ = writeln!(
                    s,
                    "#   leaf {:#x}.{sub}: eax {:#010x} ebx {:#010x} ecx {:#010x} edx {:#010x}",
                    m.leaf, m.regs[0], m.regs[1], m.regs[2], m.regs[3]
                );
            }
            let _ = writeln!(s, "#   XCR0 allowed: {:#x}", p.xcr0_allowed);
        }
        let _ = writeln!(
            s,
            "\n[iommu]\nmode = \"{}\"\ninterrupts = \"{}\"\nos = \"{}\"",
            self.iommu.mode.name(),
            self.iommu.interrupts.name(),
            self.iommu.os.name()
        );
        for r in &self.device {
            let _ = writeln!(
                s,
                "\n[[device]]\nmatch = {}\nowner = {}",
                toml_string(&r.matcher),
                toml_string(&r.owner)
            );
        }
        for r in &self.sriov {
            let _ = writeln!(
                s,
                "\n[[sriov]]\ndevice = {}\nos_vfs = {}",
                toml_string(&r.device),
                r.os_vfs
            );
        }
        for a in &self.appliance {
            let _ = writeln!(
                s,
                "\n[[appliance]]\nname = {}\ncpus = {}\nmemory = {}\nkernel = {}",
                toml_string(&a.name),
                a.cpus,
                a.memory,
                toml_string(&normalize_esp_path(&a.kernel))
            );
            if let Some(i) = &a.initrd {
                let _ = writeln!(s, "initrd = {}", toml_string(&normalize_esp_path(i)));
            }
            let _ = writeln!(s, "cmdline = {}", toml_string(&a.cmdline));
            let _ = write!(s, "devices = [");
            for (i, d) in a.devices.iter().enumerate() {
                let _ = write!(s, "{}{}", if i == 0 { "" } else { ", " }, toml_string(d));
            }
            let _ = writeln!(s, "]");
            let _ = writeln!(
                s,
                "console = {}\non_crash = \"{}\"\ncontrol = \"{}\"\napic = \"{}\"",
                a.console,
                a.on_crash.name(),
                a.control.name(),
                a.apic.name()
            );
        }
        if self.debug != Debug::default() {
            let _ = writeln!(s, "\n[debug]");
            if let Some(c) = self.debug.fail_cpu {
                let _ = writeln!(s, "fail_cpu = {c}");
            }
            if self.debug.host_fault {
                let _ = writeln!(s, "host_fault = true");
            }
        }
        s
    }
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Accepts `\EFI\x\y.efi` or `/EFI/x/y.efi`.
fn check_esp_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("boot.next is empty".to_string());
    }
    if !(p.starts_with('\\') || p.starts_with('/')) {
        return Err(format!(
            "boot.next = {p:?} must be an absolute path on the ESP, like \\EFI\\Linux\\vmlinuz.efi"
        ));
    }
    if p.len() > 512 {
        return Err("boot.next is longer than 512 characters".to_string());
    }
    if p.chars().any(|c| c == '\0' || c.is_control()) {
        return Err("boot.next contains control characters".to_string());
    }
    if p.split(['\\', '/']).any(|c| c == "..") {
        return Err("boot.next must not contain '..'".to_string());
    }
    Ok(())
}

/// `/EFI/x` → `\EFI\x`.
pub fn normalize_esp_path(p: &str) -> String {
    p.replace('/', "\\")
}

#[cfg(test)]
mod tests;
