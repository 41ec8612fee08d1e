//! The agent's own log, on stderr: every line goes through `tracing`, as text
//! for people or as one JSON object per line for log collectors
//! (`--log-format`). Colour only when stderr is a terminal (and `NO_COLOR` is
//! unset). `RUST_LOG` picks the levels (default: info). Flow records and the
//! output of `status`, `check` and `flows` are data, not log lines: they are
//! printed as they are.

use std::io::IsTerminal as _;

use tracing_subscriber::{fmt::MakeWriter, EnvFilter};

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `TIME LEVEL target: message`, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `message`, `target`
    /// and the event's fields.
    Json,
}

/// The subscriber for `format`, writing to `writer`.
fn subscriber<W>(
    format: LogFormat,
    ansi: bool,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .finish(),
        ),
    }
}

/// Sets the process's log up, once, before anything is logged. A second call
/// changes nothing.
pub fn init(format: LogFormat) {
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ =
        tracing::subscriber::set_global_default(subscriber(format, ansi, filter, std::io::stderr));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat, ansi: bool) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = subscriber(format, ansi, EnvFilter::new("info"), move || out.clone());
        tracing::subscriber::with_default(sub, || {
            tracing::info!("ready: redirecting in 2 network namespace(s)");
            tracing::warn!(dropped = 3, "a message\nover two lines with \"quotes\"");
            tracing::debug!("not at info");
        });
        let bytes = buf.0.lock().expect("lock").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn json_is_one_object_per_line() {
        let text = logged(LogFormat::Json, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
        assert_eq!(first["level"], "INFO");
        assert_eq!(
            first["message"],
            "ready: redirecting in 2 network namespace(s)"
        );
        assert!(first["timestamp"].is_string(), "{first}");
        let second: serde_json::Value = serde_json::from_str(lines[1]).expect("JSON");
        assert_eq!(second["level"], "WARN");
        assert_eq!(second["dropped"], 3);
        assert_eq!(
            second["message"],
            "a message\nover two lines with \"quotes\""
        );
    }

    #[test]
    fn text_has_no_colour_unless_asked() {
        let plain = logged(LogFormat::Text, false);
        assert!(!plain.contains('\u{1b}'), "{plain:?}");
        assert!(
            plain.contains("INFO") && plain.contains("ready: redirecting"),
            "{plain}"
        );
        let coloured = logged(LogFormat::Text, true);
        assert!(coloured.contains('\u{1b}'), "{coloured:?}");
    }
}
