//! Ports and redirects as the command line and redirector.yaml write them:
//! the one port parser (1-65535, quoting what the file says), for flags and
//! keys, and the `redirects` list (into [`Redirect`], whose constructor
//! enforces that the two ports differ).

use std::{collections::HashSet, fmt};

use serde::{de, Deserialize, Deserializer};

use crate::bpf::{Redirect, SamePort};

/// A TCP port a client can connect to: 1-65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range: a TCP port is 1-65535")),
        Err(_) => Err(format!("`{s}` is not a port number: a TCP port is 1-65535")),
    }
}

/// Reads a TCP port (1-65535) from whatever scalar YAML gives, so the error can
/// quote what the file says. Errors are raised while yaml_serde is still on the
/// value, which makes it prefix the full key path and point at the value.
struct PortVisitor {
    /// `key:` with nothing after it (YAML null) means "not set" where allowed.
    allow_null: bool,
}

impl PortVisitor {
    fn check<E: de::Error>(n: i128) -> Result<Option<u16>, E> {
        match n {
            1..=65535 => Ok(Some(n as u16)),
            _ => Err(E::custom(format!(
                "port {n} is out of range: a TCP port is 1-65535"
            ))),
        }
    }

    fn not_a_port<E: de::Error>(shown: &str) -> E {
        let hint = if shown.contains("${") {
            " (environment placeholders are not expanded here: write the number)"
        } else {
            ""
        };
        E::custom(format!(
            "`{shown}` is not a port number{hint}: a TCP port is 1-65535"
        ))
    }
}

impl<'de> de::Visitor<'de> for PortVisitor {
    type Value = Option<u16>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TCP port number (1-65535)")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Self::check(i128::from(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Self::check(i128::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Err(Self::not_a_port(&v.to_string()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        // Quoted digits are still a port.
        match v.trim().parse::<i128>() {
            Ok(n) => Self::check(n),
            Err(_) => Err(Self::not_a_port(v)),
        }
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Err(Self::not_a_port(&v.to_string()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        if self.allow_null {
            Ok(None)
        } else {
            Err(E::custom("no value: a TCP port is 1-65535"))
        }
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_unit()
    }
}

/// A port that must be there.
struct Port(u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(PortVisitor { allow_null: false })? {
            Some(p) => Ok(Port(p)),
            None => Err(de::Error::custom("no value: a TCP port is 1-65535")),
        }
    }
}

pub fn opt_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    d.deserialize_any(PortVisitor { allow_null: true })
}

/// Reads one `{advertise_port, listen_port}` mapping. The pair checks (equal
/// ports, an advertise port already used by an earlier entry) run inside the
/// mapping so yaml_serde reports them at that entry, not at the list.
struct RedirectVisitor<'a> {
    seen: &'a mut HashSet<u16>,
}

impl<'de> de::Visitor<'de> for RedirectVisitor<'_> {
    type Value = Redirect;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping with advertise_port and listen_port")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Redirect, A::Error> {
        // A derived identifier rejects unknown keys while yaml_serde is on the
        // key, so the error points at it rather than at the mapping.
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "snake_case")]
        enum Field {
            AdvertisePort,
            ListenPort,
        }
        let (mut advertise, mut listen) = (None, None);
        while let Some(key) = map.next_key::<Field>()? {
            let (slot, name) = match key {
                Field::AdvertisePort => (&mut advertise, "advertise_port"),
                Field::ListenPort => (&mut listen, "listen_port"),
            };
            if slot.is_some() {
                return Err(de::Error::duplicate_field(name));
            }
            *slot = Some(map.next_value::<Port>()?.0);
        }
        let advertise_port = advertise.ok_or_else(|| de::Error::missing_field("advertise_port"))?;
        let listen_port = listen.ok_or_else(|| de::Error::missing_field("listen_port"))?;
        let redirect = Redirect::new(advertise_port, listen_port).map_err(|SamePort(port)| {
            de::Error::custom(format!(
                "advertise_port and listen_port are both {port}: a redirect needs two different ports"
            ))
        })?;
        if !self.seen.insert(advertise_port) {
            return Err(de::Error::custom(format!(
                "advertise_port {advertise_port} appears more than once in redirects: \
                 one advertise port can only go to one listener"
            )));
        }
        Ok(redirect)
    }
}

impl<'de> de::DeserializeSeed<'de> for RedirectVisitor<'_> {
    type Value = Redirect;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Redirect, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Deserialize<'de> for Redirect {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RedirectVisitor {
            seen: &mut HashSet::new(),
        })
    }
}

struct RedirectListVisitor;

impl<'de> de::Visitor<'de> for RedirectListVisitor {
    type Value = Vec<Redirect>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of {advertise_port, listen_port} mappings")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        while let Some(spec) = seq.next_element_seed(RedirectVisitor { seen: &mut seen })? {
            out.push(spec);
        }
        Ok(out)
    }
}

pub fn redirect_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Redirect>, D::Error> {
    d.deserialize_option(RedirectListVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_must_be_connectable() {
        assert_eq!(parse_port("9095"), Ok(9095));
        assert_eq!(parse_port("65535"), Ok(65535));
        assert!(parse_port("0").unwrap_err().contains("out of range"));
        assert!(parse_port("65536").unwrap_err().contains("out of range"));
        assert!(parse_port("-1").unwrap_err().contains("not a port number"));
        assert!(parse_port("grpc")
            .unwrap_err()
            .contains("not a port number"));
    }
}
