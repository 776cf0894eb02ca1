//! Human tables or JSON, chosen once by `--json`.

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

/// Where a command's result goes.
pub(crate) struct Output {
    json: bool,
}

/// The human form being written.
pub(crate) struct Human;

impl Output {
    pub(crate) fn new(json: bool) -> Self {
        Self { json }
    }

    /// Whether `--json` was given.
    pub(crate) fn json(&self) -> bool {
        self.json
    }

    /// Prints a serializable result: JSON with `--json`, else `human`.
    pub(crate) fn show<T: serde::Serialize>(
        &self,
        value: &T,
        human: impl FnOnce(&mut Human),
    ) -> anyhow::Result<()> {
        let json = serde_json::to_value(value)?;
        self.print(&json, human);
        Ok(())
    }

    /// Prints `value` as JSON with `--json`, else calls `human`.
    pub(crate) fn print(&self, value: &serde_json::Value, human: impl FnOnce(&mut Human)) {
        if self.json() {
            #[allow(clippy::print_stdout)]
            {
                println!(
                    "{}",
                    serde_json::to_string_pretty(value).unwrap_or_default()
                );
            }
        } else {
            human(&mut Human);
        }
    }
}

impl Human {
    #[allow(clippy::print_stdout)]
    pub(crate) fn line(&mut self, text: impl AsRef<str>) {
        println!("{}", text.as_ref());
    }

    #[allow(clippy::print_stdout)]
    pub(crate) fn table(&mut self, header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) {
        let mut table = Table::new();
        table
            .load_style(UTF8_FULL_CONDENSED)
            .set_header(header.to_vec());
        for row in rows {
            table.add_row(row);
        }
        println!("{table}");
    }
}

/// A time for people: RFC 3339 to the second, in the offset it carries (UTC from
/// the database: `2026-12-07T12:08:36Z`).
pub(crate) fn time(t: time::OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{} (unix seconds)", t.unix_timestamp()))
}

/// Prints the error a command failed with: the whole chain (each message once) on
/// stderr and, with `--json`, the same as a JSON object on stdout, with the
/// server's words as fields when PostgreSQL refused a statement.
pub(crate) fn print_error(e: &anyhow::Error, json: bool) {
    let message = format!("{e:#}");
    eprintln!("sanare: {message}");
    if json {
        let core = e
            .chain()
            .find_map(|c| c.downcast_ref::<sanare::core::Error>());
        let value = serde_json::json!({
            "error": {
                "kind": core.map_or("other", sanare::core::Error::kind_name),
                "message": message,
                "retryable": core.is_some_and(sanare::core::Error::is_retryable),
                "server": core.and_then(sanare::core::Error::server),
            }
        });
        #[allow(clippy::print_stdout)]
        {
            println!("{value}");
        }
    }
}

/// Runs long work with a progress bar on a terminal (none with `--json` or when
/// stderr is not a terminal); Ctrl-C cancels the work cleanly.
pub(crate) async fn with_progress<T, F, Fut>(out: &Output, label: &str, work: F) -> T
where
    F: FnOnce(sanare::Control) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    use std::io::IsTerminal;
    let (control, handle) = sanare::Control::new();
    let cancel = control.cancel_token().clone();
    let ctrl_c = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("sanare: cancelling (the work stops at its next safe point)");
            cancel.cancel();
        }
    });
    let bar = (!out.json() && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {prefix} {msg} [{elapsed_precise}] {wide_bar} {pos}/{len}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_prefix(label.to_owned());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    });
    let updater = bar.clone().map(|bar| {
        let mut rx = handle.into_receiver();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let p = rx.borrow_and_update().clone();
                bar.set_message(format!("{} ({})", p.phase, p.unit));
                if let Some(total) = p.total {
                    bar.set_length(total);
                }
                bar.set_position(p.done);
            }
        })
    });
    let result = work(control).await;
    ctrl_c.abort();
    if let Some(updater) = updater {
        updater.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_print_in_rfc3339_to_the_second_with_their_offset() {
        let utc = time::macros::datetime!(2026-12-07 12:08:36.787818 UTC);
        assert_eq!(super::time(utc), "2026-12-07T12:08:36Z");
        let cet = time::macros::datetime!(2026-12-07 13:08:36.5 +01:00);
        assert_eq!(super::time(cet), "2026-12-07T13:08:36+01:00");
    }
}
