//! Last-resort reading of a file that does not parse.
//!
//! When `thinhv.toml` is broken, the loader boots without the hypervisor, but
//! it must still honour what the admin asked for where it can: which OS to
//! start (`[boot] next`, `options`) and whether the hypervisor is required.
//! This scanner reads plain `key = value` lines in the right section and
//! ignores everything else. It is deliberately simple: a value it cannot
//! read is treated as absent, except that any readable `required` other
//! than `false` counts as `true` (a broken file must not silently drop a
//! requirement).
use alloc::string::{String, ToString};

/// What could be recovered from a broken file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Salvaged {
    /// `[hypervisor] required` (true when present and not plainly `false`).
    pub required: bool,
    /// `[boot] next`.
    pub next: Option<String>,
    /// `[boot] options`.
    pub options: Option<String>,
}

/// Scans `text` for the keys the boot depends on.
pub fn salvage(text: &str) -> Salvaged {
    let mut out = Salvaged::default();
    let mut section = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            section = rest.split(']').next().unwrap_or("").trim().to_string();
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match (section.as_str(), k) {
            ("hypervisor", "required") => {
                let word = v.split('#').next().unwrap_or("").trim();
                out.required = word != "false";
            }
            ("boot", "next") => out.next = string_value(v),
            ("boot", "options") => out.options = string_value(v),
            _ => {}
        }
    }
    out
}

/// A TOML basic ("...") or literal ('...') string on one line.
fn string_value(v: &str) -> Option<String> {
    if let Some(rest) = v.strip_prefix('\'') {
        return rest.split_once('\'').map(|(s, _)| s.to_string());
    }
    let rest = v.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    None
}
