//! The idempotency keys the WAL remembers: the most recent ones, bounded.
//!
//! Each key is held as the first 16 bytes of its blake3 hash (a collision among a
//! million keys has a chance near 2⁻⁸⁸), so memory is about 60 bytes a key
//! whatever the keys' length. Beyond `capacity` keys the oldest is forgotten: a
//! key is recognised as a duplicate when it was recorded within the last
//! `capacity` keyed entries ([`JournalBuilder::idempotency_window`]).
//!
//! [`JournalBuilder::idempotency_window`]: crate::JournalBuilder::idempotency_window

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};

use uuid::Uuid;

/// The first 16 bytes of a key's blake3 hash.
pub(crate) type KeyHash = [u8; 16];

/// The hash a key is remembered by.
pub(crate) fn hash(key: &str) -> KeyHash {
    let h = blake3::hash(key.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.as_bytes()[..16]);
    out
}

/// Hashes a [`KeyHash`] for the window's map. The key hash is already uniform
/// (blake3 output), so mixing its words with a per-process random seed is enough
/// and far cheaper than SipHash when a million keys are loaded at open; the seed
/// keeps someone who picks keys from picking the map's buckets.
#[derive(Clone, Debug)]
struct Seeded(u64);

impl Seeded {
    fn new() -> Self {
        Self(std::collections::hash_map::RandomState::new().hash_one(0u8))
    }
}

impl BuildHasher for Seeded {
    type Hasher = Mix;

    fn build_hasher(&self) -> Mix {
        Mix(self.0)
    }
}

/// The hasher of [`Seeded`].
struct Mix(u64);

impl Hasher for Mix {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0 ^ u64::from_le_bytes(word))
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(29);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The last `capacity` idempotency keys with their entries' positions and ids.
#[derive(Debug)]
pub(crate) struct KeyWindow {
    map: HashMap<KeyHash, (u64, Uuid), Seeded>,
    order: VecDeque<KeyHash>,
    capacity: usize,
}

impl KeyWindow {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::with_hasher(Seeded::new()),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// An empty window with room for `expected` keys.
    pub(crate) fn with_capacity(capacity: usize, expected: usize) -> Self {
        Self {
            map: HashMap::with_capacity_and_hasher(expected, Seeded::new()),
            order: VecDeque::with_capacity(expected),
            capacity: capacity.max(1),
        }
    }

    /// Puts the keys of `newer` (recorded after every key here) after these,
    /// oldest first, forgetting the oldest beyond the capacity.
    pub(crate) fn extend(&mut self, newer: KeyWindow) {
        let KeyWindow { mut map, order, .. } = newer;
        for h in order {
            if let Some(at) = map.remove(&h) {
                self.insert_hash(h, at);
            }
        }
    }

    /// The entry first recorded with `key`, if it is in the window.
    pub(crate) fn get(&self, key: &str) -> Option<(u64, Uuid)> {
        self.map.get(&hash(key)).copied()
    }

    /// Remembers `key` (the first entry of a key wins), forgetting the oldest key
    /// beyond the capacity.
    pub(crate) fn insert(&mut self, key: &str, at: (u64, Uuid)) {
        self.insert_hash(hash(key), at);
    }

    /// Remembers a key by its hash (see [`insert`](Self::insert)).
    pub(crate) fn insert_hash(&mut self, h: KeyHash, at: (u64, Uuid)) {
        if self.map.contains_key(&h) {
            return;
        }
        self.map.insert(h, at);
        self.order.push_back(h);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_keeps_the_newest_keys_and_the_first_entry_of_each() {
        let mut w = KeyWindow::new(3);
        for (i, k) in ["a", "b", "a", "c", "d"].iter().enumerate() {
            w.insert(k, (i as u64, Uuid::nil()));
        }
        assert_eq!(w.len(), 3);
        assert_eq!(w.get("a"), None, "the oldest key is forgotten");
        assert_eq!(w.get("b").map(|x| x.0), Some(1));
        assert_eq!(w.get("d").map(|x| x.0), Some(4));
    }

    #[test]
    fn keys_recorded_since_open_go_after_the_loaded_ones() {
        let mut older = KeyWindow::with_capacity(3, 2);
        older.insert("a", (1, Uuid::nil()));
        older.insert("b", (2, Uuid::nil()));
        let mut newer = KeyWindow::new(3);
        newer.insert("c", (3, Uuid::nil()));
        newer.insert("d", (4, Uuid::nil()));
        older.extend(newer);
        assert_eq!(older.len(), 3);
        assert_eq!(older.get("a"), None, "the oldest key is forgotten");
        assert_eq!(older.get("b").map(|x| x.0), Some(2));
        assert_eq!(older.get("d").map(|x| x.0), Some(4));
    }
}
