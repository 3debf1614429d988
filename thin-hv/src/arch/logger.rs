//! The `log` backend: a 16550 serial port (polled, bounded waits) and the
//! log ring in the status page.
use super::status_page::StatusPage;
use core::fmt::Write;
use spin::Mutex;
use uart_16550::Uart16550;
use uart_16550::backend::PioBackend;

struct Sink {
    serial: Option<Uart16550<PioBackend>>,
    ring: Option<StatusPage>,
}

/// The logger.
pub struct CoreLogger {
    sink: Mutex<Sink>,
}

/// The one logger.
pub static LOGGER: CoreLogger = CoreLogger {
    sink: Mutex::new(Sink {
        serial: None,
        ring: None,
    }),
};

/// Sends bytes, giving up on a port that never drains (no hang).
fn send(uart: &mut Uart16550<PioBackend>, mut bytes: &[u8]) {
    let mut idle = 0u32;
    while !bytes.is_empty() && idle < 100_000 {
        let n = uart.send_bytes(bytes);
        if n == 0 {
            idle += 1;
            core::hint::spin_loop();
        } else {
            idle = 0;
            bytes = &bytes[n..];
        }
    }
}

/// A line buffer that truncates instead of failing.
struct Line {
    buf: [u8; 320],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl CoreLogger {
    /// Starts logging to `serial_port` (0: none) at `level` (0 off..5 trace).
    pub fn init(&'static self, serial_port: u16, level: u8) {
        let serial = if serial_port == 0 {
            None
        } else {
            // SAFETY: the port comes from the validated configuration and
            // names a 16550; the firmware has already initialized it, so
            // the core only writes bytes and never reprograms it.
            unsafe { Uart16550::new_port(serial_port).ok() }
        };
        self.sink.lock().serial = serial;
        let _ = log::set_logger(self);
        log::set_max_level(match level {
            0 => log::LevelFilter::Off,
            1 => log::LevelFilter::Error,
            2 => log::LevelFilter::Warn,
            3 => log::LevelFilter::Info,
            4 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        });
    }

    /// Adds the status page's ring as a sink.
    pub fn attach_ring(&self, ring: StatusPage) {
        self.sink.lock().ring = Some(ring);
    }

    /// Writes raw text even if another CPU holds the lock (for fatal paths).
    pub fn emergency(&self, text: &str) {
        let mut guard = if let Some(g) = self.sink.try_lock() {
            g
        } else {
            // SAFETY: only used on the way to stopping this CPU; a torn
            // line on the serial port is better than a silent hang.
            unsafe { self.sink.force_unlock() };
            self.sink.lock()
        };
        if let Some(u) = guard.serial.as_mut() {
            send(u, text.as_bytes());
        }
        if let Some(r) = guard.ring.as_ref() {
            r.log_append(text.as_bytes());
        }
    }
}

impl log::Log for CoreLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = Line {
            buf: [0; 320],
            len: 0,
        };
        let cpu = super::core_state::current_cpu();
        let _ = match cpu {
            Some(c) => write!(
                line,
                "thinhv[cpu{c}] {:<5} {}",
                record.level(),
                record.args()
            ),
            None => write!(line, "thinhv {:<5} {}", record.level(), record.args()),
        };
        let text = &line.buf[..line.len];
        // Once the OS runs, the serial port is its console: only errors go
        // there (a half line of ours inside the OS's output is the price),
        // unless the admin asked for debug output; everything stays in the
        // ring, readable with `thinhv log`.
        let to_serial = record.level() <= log::Level::Error
            || log::max_level() >= log::LevelFilter::Debug
            || !super::core_state::get().is_some_and(|c| c.hv.is_sealed());
        let mut s = self.sink.lock();
        if let Some(u) = s.serial.as_mut().filter(|_| to_serial) {
            send(u, text);
            send(u, b"\r\n");
        }
        if let Some(r) = s.ring.as_ref() {
            r.log_append(text);
            r.log_append(b"\n");
        }
    }

    fn flush(&self) {}
}
