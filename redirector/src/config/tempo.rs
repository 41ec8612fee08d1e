//! Tempo's own config file: read for the two ports redirector needs
//! (`server.grpc_listen_port`, `live_store.ring.instance_port`), everything
//! else ignored.

use std::path::Path;

use redirector_common::DEFAULT_LISTEN_PORT;
use serde::Deserialize;

use super::{port::opt_port, read, yaml_error, Error, Result};
use crate::bpf::{Redirect, SamePort};

/// The two ports redirector needs from a live-store's Tempo config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TempoPorts {
    /// `server.grpc_listen_port`: where the live-store's gRPC socket listens.
    pub listen_port: u16,
    /// `live_store.ring.instance_port`: what the ring tells queriers to dial.
    pub advertise_port: u16,
}

/// Reads the two ports out of Tempo's config file at `path`.
pub fn tempo_ports(path: &Path) -> Result<TempoPorts> {
    parse_tempo(&read(path)?, path)
}

/// [`tempo_ports`] on text already read; `origin` names it in errors.
pub fn parse_tempo(text: &str, origin: &Path) -> Result<TempoPorts> {
    // No deny_unknown_fields anywhere here: Tempo's file has hundreds of keys that
    // are none of our business, and new Tempo releases add more.
    #[derive(Deserialize)]
    struct Root {
        server: Option<Server>,
        live_store: Option<LiveStore>,
    }
    #[derive(Deserialize)]
    struct Server {
        #[serde(default, deserialize_with = "opt_port")]
        grpc_listen_port: Option<u16>,
    }
    #[derive(Deserialize)]
    struct LiveStore {
        ring: Option<Ring>,
    }
    #[derive(Deserialize)]
    struct Ring {
        #[serde(default, deserialize_with = "opt_port")]
        instance_port: Option<u16>,
    }

    let root: Option<Root> = yaml_serde::from_str(text).map_err(|e| yaml_error(origin, &e))?;
    let listen_port = root
        .as_ref()
        .and_then(|r| r.server.as_ref())
        .and_then(|s| s.grpc_listen_port)
        .unwrap_or(DEFAULT_LISTEN_PORT);
    let advertise_port = root
        .as_ref()
        .and_then(|r| r.live_store.as_ref())
        .and_then(|l| l.ring.as_ref())
        .and_then(|r| r.instance_port)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: live_store.ring.instance_port is not set: set it to the port queriers should dial \
                 (e.g. 12345), different from server.grpc_listen_port ({listen_port})",
                origin.display()
            ))
        })?;
    let pair = Redirect::new(advertise_port, listen_port).map_err(|SamePort(port)| {
        Error::Invalid(format!(
            "{}: live_store.ring.instance_port and server.grpc_listen_port are both {port}: \
             there is nothing to redirect; advertise a different port in live_store.ring.instance_port",
            origin.display()
        ))
    })?;
    Ok(TempoPorts {
        listen_port: pair.listen_port,
        advertise_port: pair.advertise_port,
    })
}
