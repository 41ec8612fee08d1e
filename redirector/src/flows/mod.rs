//! Flow records: read from the kernel's ring (`reader`), written as text,
//! JSON or logfmt lines (`log`), and published to `redirector flows`
//! subscribers (`sub`).

pub mod log;
pub mod reader;
pub mod sub;
