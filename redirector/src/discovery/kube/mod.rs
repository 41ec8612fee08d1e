//! The Kubernetes API as a source of discovery: which pods are bound to this
//! node (`watch`) and where their sandboxes are (`sandbox`).

pub mod sandbox;
pub mod watch;
