//! The `redirector` binary: everything lives in the library (src/lib.rs).

fn main() -> std::process::ExitCode {
    redirector::cli::main()
}
