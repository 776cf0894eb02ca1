//! The getting-started guide and the host crate built from it
//! (`examples/host-axum`) say the same thing:
//!
//! - the host's `src/main.rs` is, verbatim, a Rust block of the guide (the block is
//!   compiled as a doctest of `sanare-examples`, the crate as a crate of its own);
//! - every dependency of the host's `Cargo.toml` is one the guide lists;
//! - every dependency the guide lists that sanare depends on too is asked for in a
//!   version compatible with sanare's (`deadpool-postgres` 0.14 for `.pool()`: a
//!   0.13 pool is another type).

/// The fenced code blocks of `markdown`: (info string, body).
fn code_blocks(markdown: &str) -> Vec<(&str, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(&str, String)> = None;
    for line in markdown.lines() {
        match (&mut open, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) => open = Some((info.trim(), String::new())),
            (Some(_), Some("")) => blocks.extend(open.take()),
            (Some((_, body)), _) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    blocks
}

/// Checks that `program` is one of the guide's Rust blocks.
pub(crate) fn check_program(guide: &str, program: &str) -> Result<(), String> {
    let found = code_blocks(guide)
        .iter()
        .any(|(info, body)| info.starts_with("rust") && body.trim_end() == program.trim_end());
    if found {
        Ok(())
    } else {
        Err(
            "the host's src/main.rs is not a Rust block of docs/getting-started.md: \
             change both together (the guide shows the program whole)"
                .into(),
        )
    }
}

/// The `[dependencies]` (or `[workspace.dependencies]`) of a manifest: name and
/// version requirement (`None` for a path-only dependency).
fn dependencies<'t>(manifest: &'t str, section: &str) -> Vec<(&'t str, Option<&'t str>)> {
    let mut current = "";
    let mut deps = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            current = line;
            continue;
        }
        if current != section || line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, spec)) = line.split_once('=') else {
            continue;
        };
        let name = name.trim().split('.').next().unwrap_or_default();
        let spec = spec.trim();
        let version = if spec.starts_with('"') {
            Some(spec)
        } else {
            spec.split_once("version")
                .and_then(|(_, rest)| rest.trim_start().strip_prefix('='))
                .map(str::trim_start)
        };
        let version = version.and_then(|v| v.strip_prefix('"')?.split('"').next());
        deps.push((name, version));
    }
    deps
}

/// What must match for two requirements to pick one crate: the major version, or
/// the minor for `0.x`.
fn compatibility(requirement: &str) -> Option<(u64, u64)> {
    let version = requirement.trim_start_matches(['^', '=', '~', ' ']);
    let mut parts = version.split('.').map(|p| p.parse::<u64>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    Some(if major == 0 { (0, minor) } else { (major, 0) })
}

/// Checks the host's dependencies against the guide's list, and the guide's list
/// against the workspace's versions.
pub(crate) fn check_dependencies(
    guide: &str,
    host_manifest: &str,
    workspace_manifest: &str,
) -> Result<(), String> {
    let listed: Vec<_> = code_blocks(guide)
        .into_iter()
        .filter(|(info, body)| *info == "toml" && body.contains("[dependencies]"))
        .flat_map(|(_, body)| {
            dependencies(&body, "[dependencies]")
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.map(str::to_owned)))
                .collect::<Vec<_>>()
        })
        .collect();
    if listed.is_empty() {
        return Err(
            "docs/getting-started.md lists no dependencies (a ```toml block with [dependencies])"
                .into(),
        );
    }
    let mut problems = Vec::new();
    for (name, _) in dependencies(host_manifest, "[dependencies]") {
        if !listed.iter().any(|(n, _)| n == name) {
            problems.push(format!(
                "the host depends on `{name}`, which docs/getting-started.md does not list"
            ));
        }
    }
    let ours = dependencies(workspace_manifest, "[workspace.dependencies]");
    for (name, requirement) in &listed {
        let Some((_, Some(theirs))) = ours.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let Some(requirement) = requirement else {
            problems.push(format!(
                "docs/getting-started.md lists `{name}` without a version"
            ));
            continue;
        };
        if compatibility(requirement) != compatibility(theirs) {
            problems.push(format!(
                "docs/getting-started.md asks for {name} \"{requirement}\", which cannot be \
                 the {name} \"{theirs}\" sanare uses"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUIDE: &str = "# Guide\n\n```toml\n[dependencies]\nsanare = \"0.1\"\n\
        deadpool-postgres = \"0.14\"  # the pool `.pool()` takes\n\
        tokio = { version = \"1\", features = [\"macros\"] }\n```\n\n\
        Some text.\n\n```rust,no_run\nfn main() {\n    println!(\"hi\");\n}\n```\n";

    const WORKSPACE: &str = "[workspace]\nmembers = []\n\n[workspace.dependencies]\n\
        sanare = { path = \"crates/sanare\", version = \"0.1.0\" }\n\
        deadpool-postgres = \"0.14.1\"\ntokio = { version = \"1.48\", default-features = false }\n";

    #[test]
    fn the_program_must_be_a_block_of_the_guide() {
        check_program(GUIDE, "fn main() {\n    println!(\"hi\");\n}\n").unwrap();
        let err = check_program(GUIDE, "fn main() {\n    println!(\"bye\");\n}\n").unwrap_err();
        assert!(err.contains("not a Rust block"), "{err}");
    }

    #[test]
    fn listed_dependencies_pass() {
        let host = "[package]\nname = \"h\"\n\n[dependencies]\n# comment\n\
            sanare = { path = \"../sanare\" }\ntokio = { version = \"1.40\", features = [\"net\"] }\n\n\
            [profile.dev.package.\"*\"]\nopt-level = 1\n";
        check_dependencies(GUIDE, host, WORKSPACE).unwrap();
    }

    #[test]
    fn an_unlisted_dependency_of_the_host_fails() {
        let host = "[dependencies]\nsanare = { path = \"../sanare\" }\nfutures = \"0.3\"\n";
        let err = check_dependencies(GUIDE, host, WORKSPACE).unwrap_err();
        assert_eq!(
            err,
            "the host depends on `futures`, which docs/getting-started.md does not list"
        );
    }

    #[test]
    fn a_guide_version_sanare_cannot_share_fails() {
        let guide = GUIDE.replace(
            "deadpool-postgres = \"0.14\"",
            "deadpool-postgres = \"0.13\"",
        );
        let err = check_dependencies(&guide, "[dependencies]\n", WORKSPACE).unwrap_err();
        assert!(err.contains("deadpool-postgres \"0.13\""), "{err}");
        let guide = GUIDE.replace("version = \"1\"", "version = \"2\"");
        assert!(check_dependencies(&guide, "[dependencies]\n", WORKSPACE).is_err());
    }

    #[test]
    fn requirements_compare_by_semver_compatibility() {
        assert_eq!(compatibility("0.14"), compatibility("0.14.1"));
        assert_ne!(compatibility("0.14"), compatibility("0.13.2"));
        assert_eq!(compatibility("^1.48"), compatibility("1"));
        assert_ne!(compatibility("1"), compatibility("2.0"));
        assert_eq!(compatibility("x"), None);
    }
}
