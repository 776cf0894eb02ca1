//! `cargo xtask rooms`: no source file over [`MAX_FILE_LINES`] lines and no
//! function over [`MAX_FN_LINES`] lines in the workspace (the project's "rooms of a
//! livable size"). Functions are found by parsing each file with `syn` (so braces
//! in strings and comments do not count), methods and trait defaults included;
//! a function's length is the lines from its signature to its closing brace.

use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// The longest a source file may be.
pub(crate) const MAX_FILE_LINES: usize = 1_200;
/// The longest a function may be.
pub(crate) const MAX_FN_LINES: usize = 150;

/// Folders of the workspace holding Rust sources (`target` and hidden folders are
/// skipped wherever they are).
const SOURCE_ROOTS: &[&str] = &["crates", "tests", "examples", "benches", "xtask"];

/// One thing too big.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Offender {
    /// The file, relative to the workspace root.
    pub(crate) file: PathBuf,
    /// The function's name, `None` for the file itself.
    pub(crate) function: Option<String>,
    /// Its first line (1-based).
    pub(crate) line: usize,
    /// Its length in lines.
    pub(crate) lines: usize,
}

impl std::fmt::Display for Offender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.function {
            None => write!(
                f,
                "{}: {} lines (at most {MAX_FILE_LINES})",
                self.file.display(),
                self.lines
            ),
            Some(name) => write!(
                f,
                "{}:{}: fn {name} is {} lines (at most {MAX_FN_LINES})",
                self.file.display(),
                self.line,
                self.lines
            ),
        }
    }
}

/// Every offender of the workspace at `root`, in path order.
pub(crate) fn check(root: &Path) -> Result<Vec<Offender>, String> {
    let mut files = Vec::new();
    for dir in SOURCE_ROOTS {
        collect(&root.join(dir), &mut files)?;
    }
    files.sort();
    let mut offenders = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("reading {}: {e}", file.display()))?;
        let relative = file.strip_prefix(root).unwrap_or(&file).to_path_buf();
        offenders.extend(check_source(&relative, &text)?);
    }
    Ok(offenders)
}

/// The offenders of one file's source text.
pub(crate) fn check_source(file: &Path, text: &str) -> Result<Vec<Offender>, String> {
    let mut offenders = Vec::new();
    let lines = text.lines().count();
    if lines > MAX_FILE_LINES {
        offenders.push(Offender {
            file: file.to_path_buf(),
            function: None,
            line: 1,
            lines,
        });
    }
    let parsed = syn::parse_file(text).map_err(|e| format!("parsing {}: {e}", file.display()))?;
    let mut functions = Functions::default();
    functions.visit_file(&parsed);
    offenders.extend(
        functions
            .found
            .into_iter()
            .filter(|(_, _, len)| *len > MAX_FN_LINES)
            .map(|(function, line, lines)| Offender {
                file: file.to_path_buf(),
                function: Some(function),
                line,
                lines,
            }),
    );
    Ok(offenders)
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.map_err(|e| format!("listing {}: {e}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            collect(&path, files)?;
        } else if name.ends_with(".rs") {
            files.push(path);
        }
    }
    Ok(())
}

/// Every function with a body: (name, first line, lines).
#[derive(Default)]
struct Functions {
    found: Vec<(String, usize, usize)>,
}

impl Functions {
    fn note(&mut self, sig: &syn::Signature, body: &syn::Block) {
        let start = sig.fn_token.span.start().line;
        let end = body.brace_token.span.close().end().line;
        self.found
            .push((sig.ident.to_string(), start, end + 1 - start));
    }
}

impl<'ast> Visit<'ast> for Functions {
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.note(&f.sig, &f.block);
        syn::visit::visit_item_fn(self, f);
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        self.note(&f.sig, &f.block);
        syn::visit::visit_impl_item_fn(self, f);
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(body) = &f.default {
            self.note(&f.sig, body);
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(name: &str, body_lines: usize) -> String {
        let body: String = (0..body_lines)
            .map(|i| format!("    let _x{i} = \"}}{{\"; // {{\n"))
            .collect();
        format!("fn {name}() {{\n{body}}}\n")
    }

    #[test]
    fn a_long_function_is_named_with_its_line_and_length() {
        // 148 body lines + signature + closing brace = 150: allowed.
        let fine = function("fine", MAX_FN_LINES - 2);
        let long = function("long", MAX_FN_LINES - 1);
        let method = format!(
            "struct S;\nimpl S {{\n{}}}\ntrait T {{\n{}}}\n",
            function("method", MAX_FN_LINES),
            function("provided", MAX_FN_LINES)
        );
        let text = format!("{fine}{long}{method}");
        let found = check_source(Path::new("x.rs"), &text).unwrap();
        let names: Vec<_> = found
            .iter()
            .map(|o| (o.function.clone().unwrap(), o.lines))
            .collect();
        assert_eq!(
            names,
            vec![
                ("long".to_owned(), MAX_FN_LINES + 1),
                ("method".to_owned(), MAX_FN_LINES + 2),
                ("provided".to_owned(), MAX_FN_LINES + 2),
            ]
        );
        assert_eq!(found[0].line, MAX_FN_LINES + 1);
    }

    #[test]
    fn a_long_file_is_named() {
        let text = "// line\n".repeat(MAX_FILE_LINES + 1);
        let found = check_source(Path::new("big.rs"), &text).unwrap();
        assert_eq!(
            found,
            vec![Offender {
                file: PathBuf::from("big.rs"),
                function: None,
                line: 1,
                lines: MAX_FILE_LINES + 1,
            }]
        );
        let text = "// line\n".repeat(MAX_FILE_LINES);
        assert!(check_source(Path::new("ok.rs"), &text).unwrap().is_empty());
    }
}
