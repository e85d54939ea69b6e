//! Core masks in SPDK's notations: `0x3`, `3`, `[0,1]`, `[0,2-3]`, and `0-1`.

use std::fmt;

/// Error parsing a core mask.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid core mask '{input}': {reason}")]
pub struct MaskError {
    /// The text that was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// An ordered set of CPU (logical core) ids.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct CoreMask {
    cores: Vec<u32>,
}

/// Highest core id accepted, as SPDK's default `RTE_MAX_LCORE` range.
pub const MAX_CORE_ID: u32 = 1023;

impl CoreMask {
    /// A mask holding exactly `cores` (sorted, deduplicated).
    pub fn from_cores(cores: impl IntoIterator<Item = u32>) -> Self {
        let mut cores: Vec<u32> = cores.into_iter().collect();
        cores.sort_unstable();
        cores.dedup();
        CoreMask { cores }
    }

    /// Parses `0x3`, `3` (hex, as SPDK), `[0,1]`, `[0, 2-3]` or `0-1`.
    pub fn parse(text: &str) -> Result<Self, MaskError> {
        let err = |reason: &str| MaskError {
            input: text.to_string(),
            reason: reason.to_string(),
        };
        let t = text.trim();
        if t.is_empty() {
            return Err(err("empty"));
        }
        let list = if let Some(inner) = t.strip_prefix('[') {
            Some(inner.strip_suffix(']').ok_or_else(|| err("missing ']'"))?)
        } else if t.contains('-') || t.contains(',') {
            Some(t)
        } else {
            None
        };
        let mut cores = Vec::new();
        match list {
            Some(list) => {
                for part in list.split(',') {
                    let part = part.trim();
                    if part.is_empty() {
                        return Err(err("empty list element"));
                    }
                    let (lo, hi) = match part.split_once('-') {
                        Some((a, b)) => (parse_id(a.trim(), text)?, parse_id(b.trim(), text)?),
                        None => {
                            let v = parse_id(part, text)?;
                            (v, v)
                        }
                    };
                    if lo > hi {
                        return Err(err("range start is above its end"));
                    }
                    cores.extend(lo..=hi);
                }
            }
            None => {
                let hex = t
                    .strip_prefix("0x")
                    .or_else(|| t.strip_prefix("0X"))
                    .unwrap_or(t);
                if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(err("not a hex mask"));
                }
                // Walk nibbles from the least significant end so masks wider
                // than 128 bits still parse.
                for (nibble_idx, c) in hex.chars().rev().enumerate() {
                    let v = c.to_digit(16).unwrap_or(0);
                    for bit in 0..4 {
                        if v & (1 << bit) != 0 {
                            let id = nibble_idx as u64 * 4 + bit;
                            if id > MAX_CORE_ID as u64 {
                                return Err(err("core id above 1023"));
                            }
                            cores.push(id as u32);
                        }
                    }
                }
            }
        }
        let mask = CoreMask::from_cores(cores);
        if mask.cores.is_empty() {
            return Err(err("selects no core"));
        }
        Ok(mask)
    }

    /// The cores, ascending.
    pub fn cores(&self) -> &[u32] {
        &self.cores
    }

    /// Number of cores.
    pub fn len(&self) -> usize {
        self.cores.len()
    }

    /// True when no core is selected.
    pub fn is_empty(&self) -> bool {
        self.cores.is_empty()
    }

    /// True when `core` is in the mask.
    pub fn contains(&self, core: u32) -> bool {
        self.cores.binary_search(&core).is_ok()
    }

    /// Hex digits without `0x`, as SPDK prints cpumasks in RPC replies.
    pub fn to_hex(&self) -> String {
        let top = self.cores.last().copied().unwrap_or(0) as usize;
        let mut nibbles = vec![0u8; top / 4 + 1];
        for &c in &self.cores {
            nibbles[c as usize / 4] |= 1 << (c % 4);
        }
        let s: String = nibbles
            .iter()
            .rev()
            .map(|n| char::from_digit(*n as u32, 16).unwrap_or('0'))
            .collect();
        let trimmed = s.trim_start_matches('0');
        if trimmed.is_empty() {
            "0".into()
        } else {
            trimmed.into()
        }
    }
}

fn parse_id(s: &str, input: &str) -> Result<u32, MaskError> {
    let v: u32 = s.parse().map_err(|_| MaskError {
        input: input.to_string(),
        reason: format!("'{s}' is not a core number"),
    })?;
    if v > MAX_CORE_ID {
        return Err(MaskError {
            input: input.to_string(),
            reason: format!("core {v} is above {MAX_CORE_ID}"),
        });
    }
    Ok(v)
}

impl fmt::Debug for CoreMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", self.to_hex())
    }
}

impl fmt::Display for CoreMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spdk_forms() {
        assert_eq!(CoreMask::parse("0x3").unwrap().cores(), &[0, 1]);
        assert_eq!(CoreMask::parse("3").unwrap().cores(), &[0, 1]);
        assert_eq!(
            CoreMask::parse("1F07").unwrap().cores(),
            &[0, 1, 2, 8, 9, 10, 11, 12]
        );
        assert_eq!(CoreMask::parse("[0,1]").unwrap().cores(), &[0, 1]);
        assert_eq!(CoreMask::parse("[0, 2-3]").unwrap().cores(), &[0, 2, 3]);
        assert_eq!(CoreMask::parse("0-1").unwrap().cores(), &[0, 1]);
        assert_eq!(CoreMask::parse("[5]").unwrap().cores(), &[5]);
    }

    #[test]
    fn rejects_bad_masks() {
        for bad in [
            "", "0x", "0x0", "zz", "[0,1", "[3-1]", "[a]", "[0,,1]", "[2000]",
        ] {
            assert!(CoreMask::parse(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn hex_round_trip() {
        for m in ["0x1", "0x3", "0x1f07", "0x100"] {
            let mask = CoreMask::parse(m).unwrap();
            assert_eq!(format!("0x{}", mask.to_hex()), m);
        }
    }
}
