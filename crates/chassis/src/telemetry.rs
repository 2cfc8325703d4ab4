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
const QUIET: &str =
    "sqlx=warn,lapin=warn,lapin::returned_messages=error,amq_protocol=warn,audit=info";

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
/// With `traces`, spans are recorded too ([`crate::traces`]), whatever
/// the log level.
pub fn init(format: Option<&str>, level: &str, traces: Option<&crate::traces::Settings>) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let from_env = EnvFilter::try_from_default_env().ok();
    let reloadable = from_env.is_none();
    let filter = from_env
        .or_else(|| filter_for(level).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("info,{QUIET}")));
    let json = match format {
        Some(f) => f.eq_ignore_ascii_case("json"),
        None => LOG_FILE.get().is_some() || !std::io::stdout().is_terminal(),
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let logs = if json {
        json_logs(|| Forgiving(std::io::stdout())).boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(|| Forgiving(std::io::stdout()))
            .with_target(false)
            .compact()
            .boxed()
    };
    let spans = traces.and_then(crate::traces::layer);
    // One global filter: the log level's, and Bazaar's own spans at any
    // level when traces are recorded.
    let installed = tracing_subscriber::registry()
        .with(Admit {
            levels: filter,
            spans: spans.is_some(),
        })
        .with(logs)
        .with(spans)
        .try_init()
        .is_ok();
    if installed && reloadable {
        let _ = FILTER.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
    }
}

/// JSON log lines, one per event, with the span it is in (see
/// [`SpanFields`]) and its trace's ids.
fn json_logs<S, W>(writer: W) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false)
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .fmt_fields(SpanFields)
        .map_event_format(WithTraceIds)
}

/// The process's filter: what the log level lets through, and, when
/// `spans`, every Bazaar span (see [`crate::traces::ours`]).
struct Admit<L> {
    levels: L,
    spans: bool,
}

impl<S, L> tracing_subscriber::Layer<S> for Admit<L>
where
    S: tracing::Subscriber,
    L: tracing_subscriber::Layer<S>,
{
    fn register_callsite(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if self.spans && crate::traces::ours(meta) {
            tracing::subscriber::Interest::always()
        } else {
            self.levels.register_callsite(meta)
        }
    }

    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        (self.spans && crate::traces::ours(meta)) || self.levels.enabled(meta, ctx)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        let hint = self.levels.max_level_hint()?;
        // Bazaar's spans are at INFO.
        Some(if self.spans {
            hint.max(tracing::level_filters::LevelFilter::INFO)
        } else {
            hint
        })
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.levels.on_new_span(attrs, id, ctx);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.levels.on_record(id, values, ctx);
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.levels.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.levels.on_exit(id, ctx);
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.levels.on_close(id, ctx);
    }
}

/// What a JSON log line shows of the span it is in (`"span"`): its name,
/// service and request id. The span's other fields are its trace's.
/// The formatter keeps these for every span when it starts, logged in or
/// not: all of a span's fields as JSON cost a tenth of a traced
/// checkout's CPU, and more again for each field recorded later.
struct SpanFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for SpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut pick = Pick {
            out: Vec::with_capacity(64),
        };
        pick.out.push(b'{');
        fields.record(&mut pick);
        pick.out.push(b'}');
        writer.write_str(std::str::from_utf8(&pick.out).map_err(|_| std::fmt::Error)?)
    }

    fn add_fields(
        &self,
        _current: &'w mut tracing_subscriber::fmt::FormattedFields<Self>,
        _fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        // Service and request id are given when a span starts.
        Ok(())
    }
}

/// The fields [`SpanFields`] keeps, as JSON members.
struct Pick {
    out: Vec<u8>,
}

impl tracing::field::Visit for Pick {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if matches!(field.name(), "service" | "request_id") {
            if self.out.len() > 1 {
                self.out.push(b',');
            }
            json_string(&mut self.out, field.name());
            self.out.push(b':');
            json_string(&mut self.out, value);
        }
    }

    fn record_debug(&mut self, _field: &tracing::field::Field, _value: &dyn std::fmt::Debug) {}
}

/// `s` as a JSON string (a request id is the client's: anything).
fn json_string(out: &mut Vec<u8>, s: &str) {
    // Writing a string to a Vec cannot fail.
    let _ = serde_json::to_writer(out, s);
}

/// JSON log lines inside a recorded span get its `trace_id` and `span_id`.
struct WithTraceIds<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithTraceIds<F>
where
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        let ids = ctx.event_scope().and_then(|scope| {
            scope
                .into_iter()
                .find_map(|span| crate::traces::ids_of(&span))
        });
        match (ids, line.strip_suffix("}\n")) {
            (Some((trace_id, span_id)), Some(open)) => writeln!(
                writer,
                "{open},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
            ),
            _ => writer.write_str(&line),
        }
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
    fn a_log_line_shows_its_span() {
        use tracing_subscriber::layer::SubscriberExt as _;
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let out = lines.clone();
        let subscriber = tracing_subscriber::registry().with(json_logs(move || out.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "http",
                service = "orders",
                path = "/orders",
                status = tracing::field::Empty,
                request_id = "r\"1",
            );
            span.record("status", 201);
            let _in = span.enter();
            tracing::warn!(order = 7, "slow");
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["message"], "slow", "{line}");
        assert_eq!(line["order"], 7, "{line}");
        assert_eq!(
            line["span"],
            serde_json::json!({"name": "http", "service": "orders", "request_id": "r\"1"}),
            "{line}"
        );
    }

    #[test]
    fn span_fields_are_json() {
        let mut out = Vec::new();
        json_string(&mut out, "a\"b\\c\n\u{7f}é");
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, "a\"b\\c\n\u{7f}é");
    }

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
