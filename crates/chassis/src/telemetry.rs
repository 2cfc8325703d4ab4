//! Logs through `tracing`: pretty on a terminal, JSON in production
//! (`BAZAAR_LOG_FORMAT=json`). Filter with `RUST_LOG` (default `info`).

use std::io::IsTerminal;

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
