//! `cargo xtask msrv`: the declared `rust-version` is at least what every dependency
//! of a published crate declares.
//!
//! Only one toolchain can be assumed where the checks run (CI images and this
//! project's machines have the current stable and cannot fetch another), so the
//! minimum supported Rust is not checked by building with an old compiler. It is
//! checked by two things that need only the current one:
//!
//! - this step: the resolved graph of `cargo metadata --all-features` (every
//!   platform), walked from each published crate over its normal and build
//!   dependencies, its own dev-dependencies (its tests must build too) and their
//!   normal and build dependencies. Every package in it that declares a
//!   `rust-version` above the crate's is an error;
//! - clippy's `incompatible_msrv` lint (on by default, and `-D warnings` in
//!   `cargo xtask test`), which flags our own uses of standard-library items
//!   stabilized after the declared `rust-version`.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde_json::Value;

/// A Rust version, `1.92` or `1.92.0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RustVersion(u64, u64, u64);

impl RustVersion {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.trim().split('.').map(|p| {
            p.parse::<u64>()
                .map_err(|_| format!("`{text}` is not a Rust version (expected e.g. 1.92)"))
        });
        let major = parts.next().transpose()?.unwrap_or(0);
        let minor = parts.next().transpose()?.unwrap_or(0);
        let patch = parts.next().transpose()?.unwrap_or(0);
        if parts.next().is_some() {
            return Err(format!("`{text}` has more than three parts"));
        }
        Ok(Self(major, minor, patch))
    }
}

impl fmt::Display for RustVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.2 {
            0 => write!(f, "{}.{}", self.0, self.1),
            patch => write!(f, "{}.{}.{patch}", self.0, self.1),
        }
    }
}

/// A dependency that needs a newer Rust than the crate that pulls it in.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Violation {
    /// The published crate and the version it declares.
    pub(crate) krate: String,
    pub(crate) declared: RustVersion,
    /// The dependency (`name version`) and the version it declares.
    pub(crate) dependency: String,
    pub(crate) needs: RustVersion,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} declares rust-version {} but its dependency {} needs {}",
            self.krate, self.declared, self.dependency, self.needs
        )
    }
}

/// What the check found.
#[derive(Debug)]
pub(crate) struct Report {
    /// Published crates checked, with their declared version.
    pub(crate) checked: Vec<(String, RustVersion)>,
    /// The highest `rust-version` among their dependencies, and who declares it.
    pub(crate) highest: Option<(RustVersion, String)>,
    pub(crate) violations: Vec<Violation>,
}

/// A dependency edge: the dependency's id and its kinds (`None` for normal, `"dev"`,
/// `"build"`).
type Edge<'a> = (&'a str, Vec<Option<&'a str>>);

struct Graph<'a> {
    packages: HashMap<&'a str, &'a Value>,
    /// Package id → its dependencies.
    edges: HashMap<&'a str, Vec<Edge<'a>>>,
}

impl<'a> Graph<'a> {
    fn new(metadata: &'a Value) -> Result<Self, String> {
        let packages = metadata["packages"]
            .as_array()
            .ok_or("cargo metadata: no `packages`")?
            .iter()
            .filter_map(|p| Some((p["id"].as_str()?, p)))
            .collect();
        let nodes = metadata["resolve"]["nodes"]
            .as_array()
            .ok_or("cargo metadata: no `resolve.nodes` (was it run with --no-deps?)")?;
        let mut edges = HashMap::new();
        for node in nodes {
            let Some(id) = node["id"].as_str() else {
                continue;
            };
            let deps = node["deps"]
                .as_array()
                .map(|deps| {
                    deps.iter()
                        .filter_map(|d| {
                            let kinds = d["dep_kinds"]
                                .as_array()?
                                .iter()
                                .map(|k| k["kind"].as_str())
                                .collect();
                            Some((d["pkg"].as_str()?, kinds))
                        })
                        .collect()
                })
                .unwrap_or_default();
            edges.insert(id, deps);
        }
        Ok(Self { packages, edges })
    }

    fn deps_of<'s>(&'s self, id: &str, with_dev: bool) -> impl Iterator<Item = &'a str> + 's {
        self.edges
            .get(id)
            .into_iter()
            .flatten()
            .filter(move |(_, kinds)| kinds.iter().any(|k| with_dev || *k != Some("dev")))
            .map(|(dep, _)| *dep)
    }

    /// Everything compiled to build `root` and its tests.
    fn closure(&self, root: &'a str) -> BTreeSet<&'a str> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&str> = self.deps_of(root, true).collect();
        while let Some(id) = stack.pop() {
            if seen.insert(id) {
                stack.extend(self.deps_of(id, false));
            }
        }
        seen.remove(root);
        seen
    }

    fn rust_version(&self, id: &str) -> Result<Option<RustVersion>, String> {
        match self
            .packages
            .get(id)
            .and_then(|p| p["rust_version"].as_str())
        {
            Some(v) => RustVersion::parse(v)
                .map(Some)
                .map_err(|e| format!("{}: {e}", self.label(id))),
            None => Ok(None),
        }
    }

    fn label(&self, id: &str) -> String {
        match self.packages.get(id) {
            Some(p) => format!(
                "{} {}",
                p["name"].as_str().unwrap_or("?"),
                p["version"].as_str().unwrap_or("?")
            ),
            None => id.to_owned(),
        }
    }
}

/// Checks `cargo metadata --format-version 1` output.
pub(crate) fn check(metadata: &Value) -> Result<Report, String> {
    let graph = Graph::new(metadata)?;
    let members: BTreeSet<&str> = metadata["workspace_members"]
        .as_array()
        .ok_or("cargo metadata: no `workspace_members`")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut report = Report {
        checked: Vec::new(),
        highest: None,
        violations: Vec::new(),
    };
    for &id in &members {
        let package = graph
            .packages
            .get(id)
            .ok_or("cargo metadata: unknown member")?;
        // `publish = false` is `[]`; publishable is `null` or a list of registries.
        if package["publish"].as_array().is_some_and(Vec::is_empty) {
            continue;
        }
        let name = package["name"].as_str().unwrap_or("?").to_owned();
        let declared = graph.rust_version(id)?.ok_or_else(|| {
            format!("{name} is published but declares no rust-version (add `rust-version.workspace = true`)")
        })?;
        for dep in graph.closure(id) {
            // Workspace crates are checked as crates of their own (or are not
            // published and only reached as dev-dependencies).
            if members.contains(dep) {
                continue;
            }
            let Some(needs) = graph.rust_version(dep)? else {
                continue;
            };
            if report.highest.as_ref().is_none_or(|(v, _)| needs > *v) {
                report.highest = Some((needs, graph.label(dep)));
            }
            if needs > declared {
                report.violations.push(Violation {
                    krate: name.clone(),
                    declared,
                    dependency: graph.label(dep),
                    needs,
                });
            }
        }
        report.checked.push((name, declared));
    }
    if report.checked.is_empty() {
        return Err("no published crate in the workspace: nothing to check".into());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn package(name: &str, rust_version: Option<&str>, publish: Option<bool>) -> Value {
        json!({
            "id": name,
            "name": name,
            "version": "1.0.0",
            "rust_version": rust_version,
            "publish": match publish { Some(false) => json!([]), _ => Value::Null },
        })
    }

    fn dep(pkg: &str, kinds: &[Option<&str>]) -> Value {
        json!({
            "pkg": pkg,
            "dep_kinds": kinds.iter().map(|k| json!({ "kind": k, "target": null })).collect::<Vec<_>>(),
        })
    }

    /// `lib` (published, 1.80) → `a` (normal, 1.70) → `deep` (normal, `deep_version`);
    /// `lib` → `b` (dev, `dev_version`) → `b-dev` (dev of a dev: never built, 9.9);
    /// `tool` (not published, 1.80) → `tool-dep` (normal, 9.9).
    fn metadata(deep_version: &str, dev_version: &str) -> Value {
        json!({
            "workspace_members": ["lib", "tool"],
            "packages": [
                package("lib", Some("1.80"), None),
                package("tool", Some("1.80"), Some(false)),
                package("a", Some("1.70"), None),
                package("deep", Some(deep_version), None),
                package("b", Some(dev_version), None),
                package("b-dev", Some("9.9"), None),
                package("tool-dep", Some("9.9"), None),
            ],
            "resolve": { "nodes": [
                { "id": "lib", "deps": [dep("a", &[None]), dep("b", &[Some("dev")])] },
                { "id": "a", "deps": [dep("deep", &[Some("build")])] },
                { "id": "deep", "deps": [] },
                { "id": "b", "deps": [dep("b-dev", &[Some("dev")])] },
                { "id": "b-dev", "deps": [] },
                { "id": "tool", "deps": [dep("tool-dep", &[None])] },
                { "id": "tool-dep", "deps": [] },
            ]},
        })
    }

    #[test]
    fn versions_parse_and_order() {
        assert_eq!(RustVersion::parse("1.92").unwrap(), RustVersion(1, 92, 0));
        assert_eq!(RustVersion::parse("1.92.1").unwrap(), RustVersion(1, 92, 1));
        assert!(RustVersion::parse("1.92.0").unwrap() < RustVersion::parse("1.92.1").unwrap());
        assert!(RustVersion::parse("1.100").unwrap() > RustVersion::parse("1.92").unwrap());
        assert_eq!(RustVersion::parse("1.92.0").unwrap().to_string(), "1.92");
        assert!(RustVersion::parse("1.x").is_err());
        assert!(RustVersion::parse("1.2.3.4").is_err());
    }

    #[test]
    fn a_graph_within_the_declared_version_passes() {
        let report = check(&metadata("1.80", "1.79")).unwrap();
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!(report.checked, vec![("lib".into(), RustVersion(1, 80, 0))]);
        assert_eq!(
            report.highest,
            Some((RustVersion(1, 80, 0), "deep 1.0.0".into()))
        );
    }

    #[test]
    fn a_transitive_build_dependency_above_the_declared_version_fails() {
        let report = check(&metadata("1.92", "1.79")).unwrap();
        assert_eq!(
            report.violations,
            vec![Violation {
                krate: "lib".into(),
                declared: RustVersion(1, 80, 0),
                dependency: "deep 1.0.0".into(),
                needs: RustVersion(1, 92, 0),
            }]
        );
        assert_eq!(
            report.violations[0].to_string(),
            "lib declares rust-version 1.80 but its dependency deep 1.0.0 needs 1.92"
        );
    }

    #[test]
    fn a_dev_dependency_of_a_published_crate_counts() {
        let report = check(&metadata("1.80", "1.92")).unwrap();
        let names: Vec<_> = report
            .violations
            .iter()
            .map(|v| v.dependency.as_str())
            .collect();
        assert_eq!(names, ["b 1.0.0"]);
    }

    #[test]
    fn a_published_crate_without_a_rust_version_is_an_error() {
        let mut m = metadata("1.80", "1.79");
        m["packages"][0]["rust_version"] = Value::Null;
        let err = check(&m).unwrap_err();
        assert!(
            err.contains("lib is published but declares no rust-version"),
            "{err}"
        );
    }
}
