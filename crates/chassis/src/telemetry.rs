//! Logs through `tracing`: pretty on a terminal, JSON in production
//! (`BAZAAR_LOG_FORMAT=json`). Filter with `RUST_LOG`, else the
//! configuration's `log_level` (live: [`set_level`]).

use std::io::{IsTerminal, Write as _};
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

/// Replaces the installed filter.
type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The installed filter, to change the level while running (`None`
/// when `RUST_LOG` decides, or another subscriber was installed first).
static FILTER: OnceLock<Reload> = OnceLock::new();

/// lapin warns with the whole message on each unroutable command; the
/// bus already reports those (`BusError::Unroutable`).
const QUIET: &str = "sqlx=warn,lapin=warn,lapin::returned_messages=error,amq_protocol=warn";

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a `log_level`: a level, or comma-separated `target=level`
/// directives with at most one bare level. (`tracing` takes a bare word
/// as a target to log at every level, so `verbose` would silence
/// everything else: refused.)
pub fn check_level(level: &str) -> Result<(), String> {
    let level = level.trim();
    if level.is_empty() {
        return Err("the log level is empty".into());
    }
    for directive in level.split(',').map(str::trim) {
        let lvl = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.contains(&lvl.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "log level {directive:?}: expected one of {} (or target=level)",
                LEVELS.join(", ")
            ));
        }
    }
    Ok(())
}

fn filter_for(level: &str) -> Result<EnvFilter, String> {
    check_level(level)?;
    let level = level.trim();
    EnvFilter::try_new(format!("{level},{QUIET}")).map_err(|e| format!("log level {level:?}: {e}"))
}

/// Changes the log filter to `level` (a level or `tracing` directives).
/// Without effect when `RUST_LOG` is set: the operator's word wins.
pub fn set_level(level: &str) -> Result<(), String> {
    let filter = filter_for(level)?;
    if let Some(reload) = FILTER.get() {
        reload(filter)?;
        tracing::info!(level, "log level changed");
    }
    Ok(())
}

/// Installs the process's log subscriber once; later calls do nothing.
pub fn init(format: Option<&str>, level: &str) {
    let from_env = EnvFilter::try_from_default_env().ok();
    let reloadable = from_env.is_none();
    let filter = from_env
        .or_else(|| filter_for(level).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("info,{QUIET}")));
    let json = match format {
        Some(f) => f.eq_ignore_ascii_case("json"),
        None => LOG_FILE.get().is_some() || !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(|| Forgiving(std::io::stdout()))
        .with_env_filter(filter)
        .with_target(false);
    // The handle's type depends on the format: each branch keeps its own.
    let reload: Option<Reload> = if json {
        let b = builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter_reloading();
        let h = b.reload_handle();
        b.try_init()
            .ok()
            .map(|()| Box::new(move |f| h.reload(f).map_err(|e| e.to_string())) as Reload)
    } else {
        let b = builder.compact().with_filter_reloading();
        let h = b.reload_handle();
        b.try_init()
            .ok()
            .map(|()| Box::new(move |f| h.reload(f).map_err(|e| e.to_string())) as Reload)
    };
    if let Some(r) = reload.filter(|_| reloadable) {
        let _ = FILTER.set(r);
    }
}

/// Prints a line for the operator on stdout. A closed stdout (the reader
/// of a pipe gone, as after `| head -1`) is ignored: `println!` would
/// panic, and a server must go on serving and still stop on SIGTERM.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Where log lines go instead of stdout, when set before [`init`].
static LOG_FILE: OnceLock<std::sync::Mutex<std::fs::File>> = OnceLock::new();

/// Sends this process's log lines to `file` (appended) instead of stdout:
/// a terminal that shows something else, as `bazaar up --distributed`'s
/// live table. Call before [`init`].
pub fn log_to_file(file: &std::path::Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?;
    let _ = LOG_FILE.set(std::sync::Mutex::new(f));
    Ok(())
}

/// A log writer that never fails: a line that cannot be written (a
/// broken pipe) is dropped, not buffered again behind the next one.
struct Forgiving(std::io::Stdout);

impl std::io::Write for Forgiving {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(file) = LOG_FILE.get() {
            let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
            let _ = f.write_all(buf);
            return Ok(buf.len());
        }
        let mut out = self.0.lock();
        // Written whole or not at all; either way the line is done with.
        let _ = out.write_all(buf).and_then(|()| out.flush());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_checked() {
        for ok in [
            "info",
            "DEBUG",
            "warn,bazaar_gateway=debug",
            "off",
            "hyper=trace",
        ] {
            assert!(check_level(ok).is_ok(), "{ok}");
        }
        for bad in ["", "verbose", "info,loud", "hyper=lots"] {
            assert!(check_level(bad).is_err(), "{bad}");
        }
    }
}
