//! redirector.yaml as an operator (or a broken ConfigMap) may write it: any
//! text gets a configuration or a one-line error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let origin = std::path::Path::new("redirector.yaml");
    if let Ok(file) = redirector::config::parse(text, origin) {
        // What `run` does next with a parsed file; not when it names a Tempo
        // file, which would make the fuzzer open arbitrary paths (a FIFO
        // blocks).
        if file.tempo_config.is_none() {
            let _ = redirector::config::resolve_redirects(&file);
        }
    }
});
