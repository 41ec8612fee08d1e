//! The one layering rule of `run`'s settings: command line > environment >
//! redirector.yaml > default.
//!
//! Every setting is defined once, as a field of [`crate::cli::RunArgs`]: its
//! flag and environment variable (clap, which already puts a flag over its
//! environment variable) and its redirector.yaml key (serde, the same field)
//! come from that one definition. [`run_settings!`] writes the struct and the
//! key-by-key merge of two layers ([`Layer`]), so no setting has merge code of
//! its own; the defaults come last, in `settings::resolve`.

use std::{fmt, marker::PhantomData, str::FromStr};

use serde::{de, Deserializer};

/// A setting's value in one layer: set there, or left to the layer below.
pub trait Layer {
    /// `self` where it is set, else `under`.
    fn over(self, under: Self) -> Self;
}

/// `None` is "not set here".
impl<T> Layer for Option<T> {
    fn over(self, under: Self) -> Self {
        self.or(under)
    }
}

/// A list given in a layer replaces the one below (not appended to it): the
/// flag `--netns a` means "a", whatever redirector.yaml lists.
impl<T> Layer for Vec<T> {
    fn over(self, under: Self) -> Self {
        if self.is_empty() {
            under
        } else {
            self
        }
    }
}

/// Only for what is not a file key (`--dry-run`): set if any layer sets it.
impl Layer for bool {
    fn over(self, under: Self) -> Self {
        self || under
    }
}

/// Writes the settings struct as given (attributes and doc comments included)
/// and its `over`, which applies [`Layer::over`] to every field.
macro_rules! run_settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $name {
            /// Every setting of `self` where it is set, else of `under`: the
            /// command line and environment over redirector.yaml.
            pub fn over(self, under: Self) -> Self {
                Self {
                    $( $field: $crate::config::layers::Layer::over(self.$field, under.$field), )*
                }
            }
        }
    };
}
pub(crate) use run_settings;

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
    checked(d, crate::cli::check_interval)
}

/// Seconds, 0 included.
pub fn opt_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    checked(d, Ok)
}

/// The flow ring's size (see `--flow-ring-bytes`).
pub fn opt_ring_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    checked(d, crate::cli::check_ring_bytes)
}
