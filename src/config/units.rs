//! Value types of the config: byte quantities (`0`, `1048576`, `"64MiB"`, `"100MB"`, `"1.5G"`),
//! shares of a budget (a quantity or `"50%"`), durations (`"30s"`, `"1h 30m"`) and bounded whole
//! numbers. Their parse errors say what form was expected; ranges that depend on the key are
//! checked by `Config::validate`, which names the key.

use std::fmt;
use std::time::Duration;

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
    let bad = || format!("{s:?} is not a byte quantity such as \"64MiB\" or \"100MB\"");
    if unit.trim() == "%" {
        return Err(format!(
            "{s:?}: a percentage is accepted only by schedule.prewarm_bandwidth; \
             expected a byte quantity such as \"64MiB\" or \"100MB\""
        ));
    }
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
    let too_large = || {
        format!(
            "{s:?} is too large: byte quantities go up to {} (16EiB)",
            u64::MAX
        )
    };
    match scaled(num, mult) {
        Scaled::Bytes(b) => Ok(b),
        Scaled::NotANumber => Err(bad()),
        Scaled::TooLarge => Err(too_large()),
    }
}

enum Scaled {
    Bytes(u64),
    NotANumber,
    /// Past `u64::MAX`.
    TooLarge,
}

/// `num` (decimal digits with at most one point) times `mult`, rounded half up, in exact integer
/// arithmetic (through `f64`, quantities past 2^53 bytes lost their last digits). Fraction digits past the 24th are dropped: with units
/// up to 2^40 they are worth less than a millionth of a byte.
fn scaled(num: &str, mult: u64) -> Scaled {
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) {
        return Scaled::NotANumber;
    }
    let frac = &frac[..frac.len().min(24)];
    let Ok(whole) = (if whole.is_empty() {
        Ok(0)
    } else {
        whole.parse::<u128>()
    }) else {
        return Scaled::TooLarge; // more digits than u128 holds
    };
    let mult = u128::from(mult);
    let scale = 10u128.pow(frac.len() as u32);
    let Ok(part) = (if frac.is_empty() {
        Ok(0)
    } else {
        frac.parse::<u128>()
    }) else {
        return Scaled::NotANumber;
    };
    let bytes = whole
        .checked_mul(mult)
        .and_then(|b| b.checked_add((part * mult + scale / 2) / scale));
    match bytes.and_then(|b| u64::try_from(b).ok()) {
        Some(b) => Scaled::Bytes(b),
        None => Scaled::TooLarge,
    }
}

fn too_large_bytes(v: impl fmt::Display) -> String {
    format!(
        "{v} is too large: byte quantities go up to {} (16EiB)",
        u64::MAX
    )
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

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<u64, E> {
        match u64::try_from(v) {
            Ok(v) => Ok(v),
            Err(_) if v < 0 => Err(E::custom("must not be negative")),
            Err(_) => Err(E::custom(too_large_bytes(v))),
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(too_large_bytes(v)))
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
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Share, E> {
                BytesVisitor.visit_i128(v).map(Share::Bytes)
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Share, E> {
                BytesVisitor.visit_u128(v).map(Share::Bytes)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Share, E> {
                match v.trim().strip_suffix('%') {
                    // 0% is refused: it would read as "nothing" but 0 means "all of the budget".
                    Some(p) => match p.trim().parse::<u8>() {
                        Ok(p) if (1..=100).contains(&p) => Ok(Share::Percent(p)),
                        _ => Err(E::custom(format!(
                            "{v:?}: a percentage must be a whole number from 1% to 100%"
                        ))),
                    },
                    None => parse_bytes(v).map(Share::Bytes).map_err(E::custom),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `#[serde(with = "units::duration")]`: a duration written like `"30s"`, `"5m"`, `"1h 30m"`.
/// Unlike `humantime_serde`, every wrong form gets a message that shows the right one.
pub mod duration {
    use super::*;

    const LIKE: &str = "a duration like \"30s\", \"5m\" or \"1h 30m\"";

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl<'de> Visitor<'de> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(LIKE)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            humantime::parse_duration(v.trim())
                .map_err(|e| E::custom(format!("{v:?} is not a duration ({e}): expected {LIKE}")))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "{v} has no unit: expected {LIKE} (a quoted string, e.g. \"{v}s\")"
            )))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            self.visit_i128(i128::from(v))
        }

        fn visit_i128<E: de::Error>(self, v: i128) -> Result<Duration, E> {
            Err(E::custom(format!("{v} has no unit: expected {LIKE}")))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Err(E::custom(format!("{v} has no unit: expected {LIKE}")))
        }

        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Duration, E> {
            Err(E::custom(format!("{v} is not a duration: expected {LIKE}")))
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Duration, A::Error> {
            Err(de::Error::custom(format!(
                "an array is not a duration: expected {LIKE}"
            )))
        }

        // toml hands a date-time to serde as a one-entry map with a private key.
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Duration, A::Error> {
            let what = match map.next_key::<String>() {
                Ok(Some(k)) if k.contains("datetime") => "a date or time",
                _ => "a table",
            };
            Err(de::Error::custom(format!(
                "{what} is not a duration: expected {LIKE}"
            )))
        }
    }
}

/// `#[serde(deserialize_with = "units::whole::<_, _, MIN, MAX>")]`: a whole number from MIN to
/// MAX. The range is checked here because a value too large for the field's type never reaches
/// `Config::validate`, and serde's own message for it ("integer `…` as i128, expected usize")
/// neither names the limit nor is meant for an administrator.
pub fn whole<'de, D, T, const MIN: i64, const MAX: i64>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64>,
{
    struct V<const MIN: i64, const MAX: i64>;

    impl<const MIN: i64, const MAX: i64> V<MIN, MAX> {
        fn out_of_range<E: de::Error>(v: impl fmt::Display) -> E {
            E::custom(format!(
                "{v} is out of range: expected a whole number from {MIN} to {MAX}"
            ))
        }
    }

    impl<const MIN: i64, const MAX: i64> Visitor<'_> for V<MIN, MAX> {
        type Value = i64;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a whole number from {MIN} to {MAX}")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            if (MIN..=MAX).contains(&v) {
                Ok(v)
            } else {
                Err(Self::out_of_range(v))
            }
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            match i64::try_from(v) {
                Ok(v) => self.visit_i64(v),
                Err(_) => Err(Self::out_of_range(v)),
            }
        }

        fn visit_i128<E: de::Error>(self, v: i128) -> Result<i64, E> {
            Err(Self::out_of_range(v))
        }

        fn visit_u128<E: de::Error>(self, v: u128) -> Result<i64, E> {
            Err(Self::out_of_range(v))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
            Err(E::custom(format!(
                "{v} is not a whole number: expected one from {MIN} to {MAX}"
            )))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<i64, E> {
            Err(E::custom(format!(
                "{v:?} is a string: expected a whole number from {MIN} to {MAX}, without quotes"
            )))
        }
    }

    let v = d.deserialize_any(V::<MIN, MAX>)?;
    T::try_from(v).map_err(|_| de::Error::custom(format!("{v} does not fit")))
}

/// A duration in the config's own notation: the largest unit that divides it, e.g. `7d`, `90s`,
/// `1500ms`, so that a range reads as written in the file.
pub fn show_duration(d: Duration) -> String {
    const UNITS: [(&str, u128); 5] = [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ];
    let ms = d.as_millis();
    if ms == 0 {
        return if d.is_zero() {
            "0s".into()
        } else {
            format!("{d:?}")
        };
    }
    let (unit, per) = UNITS
        .iter()
        .find(|(_, per)| ms % per == 0)
        .expect("ms divides every whole number of ms");
    format!("{}{unit}", ms / per)
}

/// A byte quantity in the config's notation: `1KB`, `1TB`, `64MiB`, else the plain number.
pub fn show_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 8] = [
        ("TiB", 1 << 40),
        ("TB", 1_000_000_000_000),
        ("GiB", 1 << 30),
        ("GB", 1_000_000_000),
        ("MiB", 1 << 20),
        ("MB", 1_000_000),
        ("KiB", 1 << 10),
        ("KB", 1_000),
    ];
    match UNITS.iter().find(|(_, per)| b > 0 && b % per == 0) {
        Some((unit, per)) => format!("{}{unit}", b / per),
        None => b.to_string(),
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
        for bad in ["", ".", "1.2.3", "MiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
        // Exact past 2^53, where f64 loses the last digits.
        assert_eq!(
            parse_bytes("9007199254740993").unwrap(),
            9_007_199_254_740_993
        );
        assert_eq!(parse_bytes(&u64::MAX.to_string()).unwrap(), u64::MAX);
        assert!(parse_bytes("18446744073709551616").is_err());
        assert!(parse_bytes("16EiB").is_err(), "no such unit");
        assert!(parse_bytes("19000000T").is_err());
        assert_eq!(
            parse_bytes("16777215.999999Ti").unwrap(),
            18_446_744_073_708_452_104
        );
        assert_eq!(parse_bytes("0.5").unwrap(), 1, "half up");
        assert_eq!(parse_bytes("0.4999").unwrap(), 0);
        assert_eq!(parse_bytes(".5KiB").unwrap(), 512);
        assert_eq!(parse_bytes("2.").unwrap(), 2);
        assert_eq!(parse_bytes("0.1MB").unwrap(), 100_000);
        assert_eq!(Share::Percent(30).of(1000), 300);
        assert_eq!(Share::Percent(30).of(0), 0);
        assert_eq!(Share::Percent(50).of(u64::MAX), u64::MAX / 2);
        assert_eq!(Share::Percent(100).of(u64::MAX), u64::MAX);
    }
}
