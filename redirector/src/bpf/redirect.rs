//! A redirect: the one type for it, from flags, redirector.yaml or Tempo's
//! config (which parse it) to the kernel maps (which hold it).

use serde::Serialize;

/// Connections to `advertise_port` go to the listener on `listen_port`: the
/// one type for a redirect, from flags, redirector.yaml or Tempo's config to
/// the kernel maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Redirect {
    pub advertise_port: u16,
    pub listen_port: u16,
}

/// Both ports of a redirect are this one: there would be nothing to redirect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamePort(pub u16);

impl Redirect {
    /// The one check every source of a redirect goes through (flags,
    /// redirector.yaml, Tempo's config); the caller says where the ports came
    /// from in its error.
    pub fn new(advertise_port: u16, listen_port: u16) -> Result<Self, SamePort> {
        if advertise_port == listen_port {
            return Err(SamePort(listen_port));
        }
        Ok(Self {
            advertise_port,
            listen_port,
        })
    }
}
