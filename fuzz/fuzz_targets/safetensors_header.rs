//! `st_header::read_header` on arbitrary bytes (a whole safetensors file), then what the
//! safetensors reader does with the result.
#![no_main]

use std::path::Path;

use axsave_formats::st_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    match st_header::read_header(path, data) {
        Ok(h) => {
            let _ = h.user_metadata();
            match h.tensors(path) {
                Ok(ts) => {
                    for (_, dtype, shape, offset) in ts {
                        assert!(offset <= data.len() as u64, "offset {offset} past the end");
                        let _ = shape.iter().product::<u64>() * dtype.size() as u64;
                    }
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
