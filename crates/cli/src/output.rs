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

    /// Prints `value` as JSON with `--json`, else calls `human`.
    pub(crate) fn print(&self, value: &serde_json::Value, human: impl FnOnce(&mut Human)) {
        if self.json {
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
