//! Arbitrary bytes from the flow ring: decoded, turned into a record and
//! written in every format, as the agent's reader does, without a panic.
#![no_main]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use libfuzzer_sys::fuzz_target;
use redirector::flows::{
    log::{write_line, FlowFormat, Recorder},
    reader::decode,
};

fuzz_target!(|bytes: &[u8]| {
    let Some(event) = decode(bytes) else {
        return;
    };
    // The clock offset comes from the fuzzer too: any value the two clocks
    // could give.
    let offset = bytes
        .get(redirector_common_size()..)
        .and_then(|rest| rest.get(..16))
        .map(|b| i128::from_le_bytes(b.try_into().unwrap_or([0; 16])))
        .unwrap_or(0);
    let recorder = Recorder {
        namespaces: Arc::new(Mutex::new(HashMap::new())),
        clock_offset_ns: offset,
    };
    if let Some(record) = recorder.record(&event) {
        for format in [FlowFormat::Text, FlowFormat::Json, FlowFormat::Logfmt] {
            let mut out = Vec::new();
            let _ = write_line(&mut out, format, &record);
        }
    }
});

fn redirector_common_size() -> usize {
    std::mem::size_of::<redirector_common::FlowEvent>()
}
