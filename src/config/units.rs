//! Byte quantities in the config: `0`, `1048576`, `"64MiB"`, `"100MB"`, `"1.5G"`; and shares of a
//! budget: a quantity or `"50%"`.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A number of bytes (per second where the key says so).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

/// Part of a budget: absolute, or a percentage of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    Bytes(u64),
    Percent(u8),
}

impl Default for Share {
    fn default() -> Self {
        Share::Bytes(0)
    }
}

impl Share {
    /// Bytes per second out of `budget` (0 = unlimited: a percentage of no budget is unlimited).
    pub fn of(&self, budget: u64) -> u64 {
        match *self {
            Share::Bytes(b) => b,
            // In u128: `budget * p` overflows u64 for budgets above u64::MAX / 100.
            Share::Percent(p) => (u128::from(budget) * u128::from(p.min(100)) / 100) as u64,
        }
    }
}

/// Parses `"64MiB"`, `"100 MB/s"`, `"1.5G"`, `"1024"`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a byte quantity such as \"64MiB\" or \"100MB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "k" | "kB" => 1_000,
        "Ki" | "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "Mi" | "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "Gi" | "GiB" => 1 << 30,
        "T" | "TB" => 1_000_000_000_000,
        "Ti" | "TiB" => 1 << 40,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (use B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((n * mult as f64).round() as u64)
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BytesVisitor).map(Bytes)
    }
}

struct BytesVisitor;

impl Visitor<'_> for BytesVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a byte quantity: an integer or a string such as \"64MiB\"")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom("must not be negative"))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        parse_bytes(v).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Share;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a byte rate such as \"20MB\" or a percentage such as \"30%\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Share, E> {
                BytesVisitor.visit_i64(v).map(Share::Bytes)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Share, E> {
                Ok(Share::Bytes(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Share, E> {
                match v.trim().strip_suffix('%') {
                    Some(p) => match p.trim().parse::<u8>() {
                        Ok(p) if p <= 100 => Ok(Share::Percent(p)),
                        _ => Err(E::custom(format!("{v:?}: a percentage from 0% to 100%"))),
                    },
                    None => parse_bytes(v).map(Share::Bytes).map_err(E::custom),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_bytes("0").unwrap(), 0);
        assert_eq!(parse_bytes("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("100 MB/s").unwrap(), 100_000_000);
        assert_eq!(parse_bytes("1.5G").unwrap(), 1_500_000_000);
        assert!(parse_bytes("fast").is_err());
        assert!(parse_bytes("10 parsecs").is_err());
        assert_eq!(Share::Percent(30).of(1000), 300);
        assert_eq!(Share::Percent(30).of(0), 0);
        assert_eq!(Share::Percent(50).of(u64::MAX), u64::MAX / 2);
        assert_eq!(Share::Percent(100).of(u64::MAX), u64::MAX);
    }
}
