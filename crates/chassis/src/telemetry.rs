//! Logs through `tracing`: pretty on a terminal, JSON in production
//! (`BAZAAR_LOG_FORMAT=json`). Filter with `RUST_LOG` (default `info`).

use std::io::{IsTerminal, Write as _};

use tracing_subscriber::EnvFilter;

/// Installs the process's log subscriber once; later calls do nothing.
pub fn init(format: Option<&str>) {
    // lapin warns with the whole message on each unroutable command; the
    // bus already reports those (`BusError::Unroutable`).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,sqlx=warn,lapin=warn,lapin::returned_messages=error,amq_protocol=warn")
    });
    let json = match format {
        Some(f) => f.eq_ignore_ascii_case("json"),
        None => !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(|| Forgiving(std::io::stdout()))
        .with_env_filter(filter)
        .with_target(false);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.compact().try_init()
    };
}

/// Prints a line for the operator on stdout. A closed stdout (the reader
/// of a pipe gone, as after `| head -1`) is ignored: `println!` would
/// panic, and a server must go on serving and still stop on SIGTERM.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// A log writer that never fails: a line that cannot be written (a
/// broken pipe) is dropped, not buffered again behind the next one.
struct Forgiving(std::io::Stdout);

impl std::io::Write for Forgiving {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = self.0.lock();
        // Written whole or not at all; either way the line is done with.
        let _ = out.write_all(buf).and_then(|()| out.flush());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
