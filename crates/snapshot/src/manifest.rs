//! The manifest (`manifests/<snapshot id>`): what a snapshot is, written last,
//! and signed with the repository key (see `docs/formats.md`).

use std::collections::BTreeMap;

use sanare_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::format::{BlockId, ChunkParams, Codec, open_versions, seal_version};

/// Magic of a manifest object.
pub const MANIFEST_MAGIC: [u8; 4] = *b"SNMF";
/// The version of the manifest format written by this crate: version 1 plus the
/// repository, the database and the DDL block, and an authentication trailer
/// (see [`Manifest::encode`]).
pub const MANIFEST_VERSION: u16 = 2;
/// Length of a version 2 manifest's authentication trailer: key id, keyed hash.
const AUTH_LEN: usize = 8 + 32;

/// The journal cut, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCut {
    /// The position.
    pub position: u64,
    /// `pg_current_snapshot()` text.
    pub db_snapshot: Option<String>,
}

/// The manifest object of a snapshot (`manifests/<id>`), written last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The snapshot id (UUID bytes).
    pub id: [u8; 16],
    /// When its consistent view was taken, Unix microseconds.
    pub created_at_us: i64,
    /// The label.
    pub label: Option<String>,
    /// The snapshot it was deduplicated against (its base), if any.
    pub base: Option<[u8; 16]>,
    /// The journal cut.
    pub journal_cut: Option<StoredCut>,
    /// Chunking parameters.
    pub chunking: ChunkParams,
    /// Codec asked for (a block may fall back to none).
    pub codec: Codec,
    /// Per table: schema, name, rows.
    pub tables: Vec<(String, String, u64)>,
    /// Uncompressed bytes.
    pub size_bytes: u64,
    /// Compressed bytes of all referenced blocks.
    pub compressed_bytes: u64,
    /// Bytes newly written for this snapshot.
    pub stored_bytes: u64,
    /// Blocks referenced.
    pub block_count: u64,
    /// blake3 of the index object.
    pub index_hash: [u8; 32],
    /// Host metadata.
    pub metadata: BTreeMap<String, String>,
    /// The repository it was written to (UUID bytes; `None` in version 1).
    pub repository: Option<[u8; 16]>,
    /// The database it was captured from: the id kept in that database's snapshot
    /// catalog (UUID bytes; `None` in version 1).
    pub database: Option<[u8; 16]>,
    /// The block holding the DDL that recreates its tables (`None` in version 1).
    pub ddl: Option<BlockId>,
}

/// The body of a version 1 manifest.
#[derive(Serialize, Deserialize)]
struct ManifestV1 {
    id: [u8; 16],
    created_at_us: i64,
    label: Option<String>,
    base: Option<[u8; 16]>,
    journal_cut: Option<StoredCut>,
    chunking: ChunkParams,
    codec: Codec,
    tables: Vec<(String, String, u64)>,
    size_bytes: u64,
    compressed_bytes: u64,
    stored_bytes: u64,
    block_count: u64,
    index_hash: [u8; 32],
    metadata: BTreeMap<String, String>,
}

/// What a manifest's authentication trailer says under a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManifestAuth {
    /// Signed with this key, and the keyed hash matches: authentic.
    Valid,
    /// Signed with another key (this id): another database's, or a key that was
    /// replaced.
    OtherKey([u8; 8]),
    /// Not signed (version 1, or written without a key).
    Unsigned,
    /// Claims this key, but the keyed hash does not match: forged or damaged.
    Invalid,
}

impl Manifest {
    /// Encodes the manifest in the current version ([`MANIFEST_VERSION`]): the
    /// envelope, then the authentication trailer: the key's id (8 bytes) and the
    /// keyed blake3 hash of every byte before it, or 40 zero bytes without a key.
    pub fn encode(&self, key: Option<&crate::RepositoryKey>) -> Result<Vec<u8>> {
        let mut out = seal_version(MANIFEST_MAGIC, MANIFEST_VERSION, self)?;
        match key {
            Some(key) => {
                out.extend_from_slice(&key.id());
                let mac = key.mac(&out);
                out.extend_from_slice(&mac);
            }
            None => out.extend_from_slice(&[0; AUTH_LEN]),
        }
        Ok(out)
    }

    /// Encodes the manifest in version 1, as older versions of this crate wrote
    /// it (the fields added by version 2 are dropped).
    pub fn encode_v1(&self) -> Result<Vec<u8>> {
        let v1 = ManifestV1 {
            id: self.id,
            created_at_us: self.created_at_us,
            label: self.label.clone(),
            base: self.base,
            journal_cut: self.journal_cut.clone(),
            chunking: self.chunking,
            codec: self.codec,
            tables: self.tables.clone(),
            size_bytes: self.size_bytes,
            compressed_bytes: self.compressed_bytes,
            stored_bytes: self.stored_bytes,
            block_count: self.block_count,
            index_hash: self.index_hash,
            metadata: self.metadata.clone(),
        };
        seal_version(MANIFEST_MAGIC, 1, &v1)
    }

    /// Decodes a manifest object of version 1 or 2, checking its envelope (magic,
    /// version, length, blake3). This proves it intact, not authentic: see
    /// [`Manifest::authenticate`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        const WHAT: &str = "snapshot manifest";
        if bytes.len() >= 6 && bytes[..4] == MANIFEST_MAGIC && bytes[4..6] == [2, 0] {
            let Some(envelope) = bytes.len().checked_sub(AUTH_LEN) else {
                return Err(Error::corrupt(WHAT, "truncated"));
            };
            return open_versions(MANIFEST_MAGIC, WHAT, &bytes[..envelope], &[2]).map(|(_, m)| m);
        }
        let v1: ManifestV1 = open_versions(MANIFEST_MAGIC, WHAT, bytes, &[1])?.1;
        Ok(Self {
            id: v1.id,
            created_at_us: v1.created_at_us,
            label: v1.label,
            base: v1.base,
            journal_cut: v1.journal_cut,
            chunking: v1.chunking,
            codec: v1.codec,
            tables: v1.tables,
            size_bytes: v1.size_bytes,
            compressed_bytes: v1.compressed_bytes,
            stored_bytes: v1.stored_bytes,
            block_count: v1.block_count,
            index_hash: v1.index_hash,
            metadata: v1.metadata,
            repository: None,
            database: None,
            ddl: None,
        })
    }

    /// Checks the authentication trailer of the manifest object `bytes` under
    /// `key` (in constant time).
    pub fn authenticate(bytes: &[u8], key: &crate::RepositoryKey) -> ManifestAuth {
        if bytes.len() < 6 + AUTH_LEN || bytes[4..6] != [2, 0] {
            return ManifestAuth::Unsigned;
        }
        let (signed, mac) = bytes.split_at(bytes.len() - 32);
        let mut id = [0u8; 8];
        id.copy_from_slice(&signed[signed.len() - 8..]);
        if id == [0; 8] && mac == [0; 32] {
            return ManifestAuth::Unsigned;
        }
        if id != key.id() {
            return ManifestAuth::OtherKey(id);
        }
        let mut want = [0u8; 32];
        want.copy_from_slice(mac);
        if blake3::Hash::from_bytes(key.mac(signed)) == blake3::Hash::from_bytes(want) {
            ManifestAuth::Valid
        } else {
            ManifestAuth::Invalid
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn sample_manifest() -> Manifest {
        Manifest {
            id: [1; 16],
            created_at_us: 1_700_000_000_000_000,
            label: Some("nightly".into()),
            base: None,
            journal_cut: Some(StoredCut {
                position: 42,
                db_snapshot: Some("100:100:".into()),
            }),
            chunking: ChunkParams::default(),
            codec: Codec::Lz4,
            tables: vec![("public".into(), "t".into(), 3)],
            size_bytes: 300,
            compressed_bytes: 200,
            stored_bytes: 200,
            block_count: 1,
            index_hash: [2; 32],
            metadata: BTreeMap::from([("k".into(), "v".into())]),
            repository: Some([3; 16]),
            database: Some([4; 16]),
            ddl: Some(BlockId([5; 32])),
        }
    }

    const V1_BODY: &str = concat!(
        "010101010101010101010101010101018080f2818389850601076e696768746c7900012a0108",
        "3130303a3130303a80208080018080040101067075626c6963017403ac02c801c801010202",
        "02020202020202020202020202020202020202020202020202020202020201016b0176",
    );

    #[test]
    fn manifest_v1_golden_vector_still_decodes() {
        let bytes = sample_manifest().encode_v1().unwrap();
        assert_eq!(hex(&bytes[..4]), "534e4d46");
        assert_eq!(hex(&bytes[4..6]), "0100");
        assert_eq!(hex(&bytes[10..bytes.len() - 32]), V1_BODY);
        let v1 = Manifest {
            repository: None,
            database: None,
            ddl: None,
            ..sample_manifest()
        };
        assert_eq!(Manifest::decode(&bytes).unwrap(), v1);
        let key = crate::RepositoryKey::from_bytes([9; 32]);
        assert_eq!(Manifest::authenticate(&bytes, &key), ManifestAuth::Unsigned);
    }

    #[test]
    fn manifest_v2_golden_vector_and_authentication() {
        let key = crate::RepositoryKey::from_bytes([9; 32]);
        let bytes = sample_manifest().encode(Some(&key)).unwrap();
        assert_eq!(hex(&bytes[..6]), "534e4d460200", "magic SNMF, version 2");
        let body_end = bytes.len() - 32 - 40;
        assert_eq!(
            hex(&bytes[10..body_end]),
            format!(
                "{V1_BODY}{}{}{}",
                "0103030303030303030303030303030303", // repository
                "0104040404040404040404040404040404", // database
                "010505050505050505050505050505050505050505050505050505050505050505", // ddl
            )
        );
        assert_eq!(&bytes[body_end + 32..body_end + 40], &key.id());
        assert_eq!(Manifest::decode(&bytes).unwrap(), sample_manifest());
        assert_eq!(Manifest::authenticate(&bytes, &key), ManifestAuth::Valid);
        let other = crate::RepositoryKey::from_bytes([8; 32]);
        assert_eq!(
            Manifest::authenticate(&bytes, &other),
            ManifestAuth::OtherKey(key.id())
        );
        // Unsigned: the trailer is zero.
        let unsigned = sample_manifest().encode(None).unwrap();
        assert!(unsigned.ends_with(&[0; 40]));
        assert_eq!(Manifest::decode(&unsigned).unwrap(), sample_manifest());
        assert_eq!(
            Manifest::authenticate(&unsigned, &key),
            ManifestAuth::Unsigned
        );
        // A forger who rewrites the body and its blake3 but cannot key the hash.
        let mut forged = sample_manifest();
        forged.tables[0].0 = "x'; DROP TABLE t; --".into();
        let mut forged = forged.encode(None).unwrap();
        let n = forged.len();
        forged[n - 40..n - 32].copy_from_slice(&key.id());
        assert!(Manifest::decode(&forged).is_ok(), "intact as an envelope");
        assert_eq!(Manifest::authenticate(&forged, &key), ManifestAuth::Invalid);
    }

    #[test]
    fn damaged_envelopes_are_refused() {
        let key = crate::RepositoryKey::from_bytes([9; 32]);
        let bytes = sample_manifest().encode(Some(&key)).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(
                Manifest::decode(&bad).is_err()
                    || Manifest::authenticate(&bad, &key) != ManifestAuth::Valid,
                "flip at {i} not caught"
            );
        }
        assert!(Manifest::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Manifest::decode(&bytes[..10]).is_err());
        assert!(crate::format::Index::decode(&bytes).is_err(), "wrong magic");
        let v1 = sample_manifest().encode_v1().unwrap();
        for i in 0..v1.len() {
            let mut bad = v1.clone();
            bad[i] ^= 1;
            assert!(
                Manifest::decode(&bad).is_err(),
                "v1: flip at {i} not caught"
            );
        }
    }
}
