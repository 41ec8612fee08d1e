//! The rule for each kind of value a setting takes, written once and used by
//! both of its sources: the flag's parser (`&str`) and the redirector.yaml
//! key's deserializer (which raises its error on the value, so yaml_serde
//! reports the key, line and column).

use std::{fmt, marker::PhantomData, str::FromStr};

use serde::{de, Deserialize, Deserializer};

/// Seconds of an interval: at least 1. The flag and the redirector.yaml key
/// both check with this.
pub fn check_interval(secs: u64) -> Result<u64, String> {
    if secs == 0 {
        Err("0 is not an interval: at least 1 second".to_owned())
    } else {
        Ok(secs)
    }
}

pub fn parse_interval(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) => check_interval(n),
        Err(_) => Err(format!("`{s}` is not a whole number of seconds")),
    }
}

/// The flow ring's size: a power of two of at least 4096 bytes. The flag and
/// the redirector.yaml key both check with this.
pub fn check_ring_bytes(n: u64) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(n) if n >= 4096 && n.is_power_of_two() => Ok(n),
        _ => Err(format!(
            "`{n}` is not a valid ring size: a power of two of at least 4096 bytes"
        )),
    }
}

pub fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u64>() {
        Ok(n) => check_ring_bytes(n),
        Err(_) => Err(format!(
            "`{s}` is not a valid ring size: a power of two of at least 4096 bytes"
        )),
    }
}

pub(crate) fn opt_pattern<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    match s {
        // An empty substring matches every cgroup, which is never what a pattern is for.
        Some(s) if s.trim().is_empty() => Err(de::Error::custom(
            "cgroup_pattern is empty: give a substring or a glob with * and ?, or remove the key",
        )),
        s => Ok(s),
    }
}

/// A text value from redirector.yaml, turned into a setting by `parse`. The
/// error is raised while the deserializer is on the value, so it carries the
/// key and the value's line and column.
struct Text<T, F> {
    parse: F,
    _out: PhantomData<T>,
}

impl<'de, T, F> de::Visitor<'de> for Text<T, F>
where
    F: FnOnce(&str) -> Result<T, String>,
{
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        (self.parse)(v).map(Some).map_err(E::custom)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

fn text<'de, D, T>(
    d: D,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
{
    d.deserialize_option(Text {
        parse,
        _out: PhantomData,
    })
}

/// A redirector.yaml value for a setting whose flag takes a fixed set of
/// words (a clap `ValueEnum`): the file takes exactly the flag's words.
pub fn opt_value_enum<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: clap::ValueEnum,
{
    text(d, |word| {
        T::from_str(word, false).map_err(|_| {
            let names: Vec<String> = T::value_variants()
                .iter()
                .filter_map(|v| v.to_possible_value())
                .map(|p| format!("`{}`", p.get_name()))
                .collect();
            format!(
                "unknown variant `{word}`, expected one of {}",
                names.join(", ")
            )
        })
    })
}

/// A redirector.yaml value parsed from its text by the flag's own parser
/// (`FromStr`), e.g. the ring URL.
pub fn opt_from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    text(d, |s| s.parse().map_err(|e: T::Err| e.to_string()))
}

/// A whole number from redirector.yaml, checked by the function the flag's
/// parser uses too, so the flag and the key accept the same values.
struct Checked<T, F> {
    check: F,
    _out: PhantomData<T>,
}

impl<'de, T, F> de::Visitor<'de> for Checked<T, F>
where
    F: Fn(u64) -> Result<T, String>,
{
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a whole number")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        (self.check)(v).map(Some).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!("{v} is negative"))),
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

fn checked<'de, D, T>(d: D, check: impl Fn(u64) -> Result<T, String>) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
{
    d.deserialize_option(Checked {
        check,
        _out: PhantomData,
    })
}

/// Seconds of an interval: at least 1.
pub fn opt_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    checked(d, check_interval)
}

/// Seconds, 0 included.
pub fn opt_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    checked(d, Ok)
}

/// The flow ring's size (see `--flow-ring-bytes`).
pub fn opt_ring_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    checked(d, check_ring_bytes)
}
