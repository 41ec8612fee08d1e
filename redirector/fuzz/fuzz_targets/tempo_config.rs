//! Tempo's config file (--tempo-config): any text gets the two ports or a
//! one-line error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = redirector::config::parse_tempo(text, std::path::Path::new("tempo.yaml"));
});
