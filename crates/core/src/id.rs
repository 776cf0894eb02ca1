//! Identifier newtypes over UUID.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        ///
        /// A newtype over a UUID v7 (time-ordered), so ids sort by creation time and
        /// index well in PostgreSQL. Displayed and parsed as the plain hyphenated UUID.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new, unique id ordered after every id made before it in this process.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Wraps an existing UUID (for example one read back from the database).
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The underlying UUID.
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// The kind of id, as used in messages (for example `"snapshot"`).
            pub const KIND: &'static str = $prefix;
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = crate::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s.trim()).map(Self).map_err(|e| {
                    crate::Error::invalid_input(format!(
                        "`{s}` is not a valid {} id (expected a UUID): {e}",
                        $prefix
                    ))
                })
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }
    };
}

id_type!(
    /// Identifies one snapshot in a snapshot repository.
    SnapshotId,
    "snapshot"
);
id_type!(
    /// Identifies one snapshot repository: the store a snapshot's blocks, index and
    /// manifest live in (written in the store when the repository is created).
    RepositoryId,
    "repository"
);
id_type!(
    /// Identifies one integrity violation.
    ViolationId,
    "violation"
);
id_type!(
    /// Identifies one integrity check run (a report).
    CheckId,
    "check"
);
id_type!(
    /// Identifies one repair operation.
    RepairId,
    "repair"
);
id_type!(
    /// Identifies one recorded crash.
    CrashId,
    "crash"
);
id_type!(
    /// Identifies one recovery run.
    RecoveryId,
    "recovery"
);
id_type!(
    /// Identifies one corruption issue.
    IssueId,
    "issue"
);
id_type!(
    /// Identifies one corruption scan.
    ScanId,
    "scan"
);
id_type!(
    /// Identifies one journal entry (the entry's transaction id).
    JournalEntryId,
    "entry"
);
id_type!(
    /// Identifies one alert.
    AlertId,
    "alert"
);
id_type!(
    /// Identifies one published event.
    EventId,
    "event"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_ordered_and_round_trip() {
        let a = SnapshotId::new();
        let b = SnapshotId::new();
        assert_ne!(a, b);
        assert!(a < b, "v7 ids sort by creation");
        let parsed: SnapshotId = a.to_string().parse().unwrap();
        assert_eq!(parsed, a);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, format!("\"{a}\""));
        assert_eq!(serde_json::from_str::<SnapshotId>(&json).unwrap(), a);
    }

    #[test]
    fn a_bad_id_names_its_kind() {
        let err = "nope".parse::<RepairId>().unwrap_err();
        assert!(err.to_string().contains("repair id"), "{err}");
    }
}
