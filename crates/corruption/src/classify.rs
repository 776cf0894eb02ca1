//! Pattern classification: what shape a damaged value has against its last known
//! good version.

use sanare_core::CorruptionKind;

/// Classifies `current` against `good`, its last known good version (both in text
/// form, `None` for `NULL`).
///
/// - exactly one bit differs (same length) → [`CorruptionKind::BitFlip`];
/// - `current` is a strict, non-empty-loss prefix of `good` (or the value became
///   `NULL`/empty) → [`CorruptionKind::Truncation`];
/// - anything else → [`CorruptionKind::Unknown`]. Equal values return `None`.
pub fn classify_value(good: Option<&str>, current: Option<&str>) -> Option<CorruptionKind> {
    match (good, current) {
        (Some(g), Some(c)) if g == c => None,
        (None, None) => None,
        (Some(g), Some(c)) => Some(classify_bytes(g.as_bytes(), c.as_bytes())),
        (Some(g), None) if !g.is_empty() => Some(CorruptionKind::Truncation),
        _ => Some(CorruptionKind::Unknown),
    }
}

/// Byte-level classification of two different values.
pub fn classify_bytes(good: &[u8], current: &[u8]) -> CorruptionKind {
    if good.len() == current.len() {
        let bits: u32 = good
            .iter()
            .zip(current)
            .map(|(a, b)| (a ^ b).count_ones())
            .sum();
        if bits == 1 {
            return CorruptionKind::BitFlip;
        }
        return CorruptionKind::Unknown;
    }
    if current.len() < good.len() && good.starts_with(current) {
        return CorruptionKind::Truncation;
    }
    CorruptionKind::Unknown
}

/// The number of differing bits between two equal-length values, `None` when the
/// lengths differ.
pub fn bit_distance(a: &[u8], b: &[u8]) -> Option<u32> {
    (a.len() == b.len()).then(|| a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_flipped_bit_is_a_bit_flip() {
        // 'a' = 0x61, 'c' = 0x63: one bit.
        assert_eq!(
            classify_value(Some("alice@example.com"), Some("clice@example.com")),
            Some(CorruptionKind::BitFlip)
        );
        assert_eq!(bit_distance(b"a", b"c"), Some(1));
    }

    #[test]
    fn two_flipped_bits_are_not_a_bit_flip() {
        // 'a' = 0x61, 'b' = 0x62: two bits.
        assert_eq!(
            classify_value(Some("a"), Some("b")),
            Some(CorruptionKind::Unknown)
        );
    }

    #[test]
    fn a_prefix_is_a_truncation() {
        assert_eq!(
            classify_value(Some("Customer 42"), Some("Custo")),
            Some(CorruptionKind::Truncation)
        );
        assert_eq!(
            classify_value(Some("Customer 42"), Some("")),
            Some(CorruptionKind::Truncation)
        );
        assert_eq!(
            classify_value(Some("x"), None),
            Some(CorruptionKind::Truncation)
        );
    }

    #[test]
    fn equal_values_are_not_damage_and_other_changes_are_unknown() {
        assert_eq!(classify_value(Some("x"), Some("x")), None);
        assert_eq!(classify_value(None, None), None);
        assert_eq!(
            classify_value(Some("abc"), Some("abcd")),
            Some(CorruptionKind::Unknown)
        );
        assert_eq!(
            classify_value(None, Some("a")),
            Some(CorruptionKind::Unknown)
        );
    }
}
