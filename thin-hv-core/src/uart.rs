//! The 16550 an appliance's kernel writes its console to when its
//! `console = "log"`: enough of the UART for Linux's 8250 driver to find
//! it and write through it (registers hold what is written, the
//! transmitter is always empty and says so in IIR when its interrupt is
//! enabled, no interrupt line is ever raised, loopback reflects the modem
//! controls), and the text it sends, cut into lines for
//! thinhv's log (PC16550D data sheet, register summary).

/// Longest line kept before it is cut.
pub const LINE: usize = 160;

/// The registers and the line being sent.
#[derive(Debug)]
pub struct Uart {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    fcr: u8,
    dll: u8,
    dlm: u8,
    line: [u8; LINE],
    len: usize,
}

impl Default for Uart {
    fn default() -> Self {
        Self {
            ier: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            fcr: 0,
            dll: 1,
            dlm: 0,
            line: [0; LINE],
            len: 0,
        }
    }
}

const DLAB: u8 = 0x80;

impl Uart {
    /// A read of register `off` (0–7).
    pub fn read(&mut self, off: u16) -> u8 {
        let dlab = self.lcr & DLAB != 0;
        match off {
            0 if dlab => self.dll,
            0 => 0,
            1 if dlab => self.dlm,
            1 => self.ier,
            // IIR: the transmitter-empty interrupt is pending whenever it
            // is enabled (the transmitter is always empty), which is what
            // Linux's 8250 driver polls for when the port has no IRQ;
            // nothing else ever is. FIFOs on when enabled.
            2 => {
                let fifo = if self.fcr & 1 != 0 { 0xc0 } else { 0 };
                if self.ier & 0x02 != 0 {
                    0x02 | fifo
                } else {
                    0x01 | fifo
                }
            }
            3 => self.lcr,
            4 => self.mcr,
            // LSR: transmitter holding register and transmitter empty.
            5 => 0x60,
            6 => {
                if self.mcr & 0x10 != 0 {
                    // Loopback: DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
                    let m = self.mcr;
                    (m & 1) << 5 | (m & 2) << 3 | (m & 4) << 4 | (m & 8) << 4
                } else {
                    0xb0
                }
            }
            _ => self.scr,
        }
    }

    /// A write of `v` to register `off`; returns a completed line of
    /// output, if this write ended one.
    pub fn write(&mut self, off: u16, v: u8) -> Option<&[u8]> {
        let dlab = self.lcr & DLAB != 0;
        match off {
            0 if dlab => self.dll = v,
            0 => return self.put(v),
            1 if dlab => self.dlm = v,
            1 => self.ier = v & 0x0f,
            2 => self.fcr = v,
            3 => self.lcr = v,
            4 => self.mcr = v & 0x1f,
            7 => self.scr = v,
            _ => {}
        }
        None
    }

    fn put(&mut self, c: u8) -> Option<&[u8]> {
        match c {
            b'\r' => None,
            b'\n' => {
                let n = core::mem::take(&mut self.len);
                Some(&self.line[..n])
            }
            _ => {
                self.line[self.len] = if c.is_ascii_graphic() || c == b' ' || c == b'\t' {
                    c
                } else {
                    b'?'
                };
                self.len += 1;
                if self.len == LINE {
                    self.len = 0;
                    return Some(&self.line[..LINE]);
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_out_whole_and_registers_read_back() {
        let mut u = Uart::default();
        let mut out = Vec::new();
        for c in b"hello\r\nworld\n" {
            if let Some(l) = u.write(0, *c) {
                out.push(String::from_utf8(l.to_vec()).unwrap());
            }
        }
        assert_eq!(out, ["hello", "world"]);
        u.write(7, 0x5a);
        assert_eq!(u.read(7), 0x5a);
        u.write(3, 0x83);
        u.write(0, 0x01);
        u.write(1, 0x00);
        assert_eq!((u.read(0), u.read(1)), (1, 0), "divisor latch");
        u.write(3, 0x03);
        assert_eq!(u.read(5) & 0x60, 0x60, "always ready to send");
        assert_eq!(u.read(2) & 1, 1, "no interrupt pending");
        u.write(1, 0x02);
        assert_eq!(u.read(2) & 0x0f, 0x02, "THRE pending once enabled");
        u.write(1, 0x00);
        u.write(2, 0x07);
        assert_eq!(u.read(2) & 0xc0, 0xc0, "FIFOs reported once enabled");
        // Loopback as the 8250 driver tests it: MCR = loopback | OUT2 | RTS.
        u.write(4, 0x1a);
        assert_eq!(u.read(6) & 0xf0, 0x90);
        u.write(4, 0x1f);
        assert_eq!(u.read(6) & 0xf0, 0xf0);
    }

    #[test]
    fn a_long_line_is_cut_and_control_bytes_masked() {
        let mut u = Uart::default();
        let mut n = 0;
        for _ in 0..LINE {
            if u.write(0, 0x07).is_some() {
                n += 1;
            }
        }
        assert_eq!(n, 1);
        assert_eq!(u.write(0, b'\n').unwrap(), b"");
        for c in [0x1b, b'x'] {
            u.write(0, c);
        }
        assert_eq!(u.write(0, b'\n').unwrap(), b"?x");
    }
}
