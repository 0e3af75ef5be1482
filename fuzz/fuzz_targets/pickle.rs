//! The pickle machine on arbitrary bytes: with the default limits, and with small limits that
//! every result must respect. Seeds: tests/fixtures/pickle/*.pkl and the `data.pkl` of every
//! torch.save fixture, the DCP `.metadata` files.
#![no_main]

use axsave_formats::pickle::{self, Limits};
use libfuzzer_sys::{fuzz_mutator, fuzz_target};

fuzz_target!(|data: &[u8]| {
    match pickle::parse(data) {
        Ok(p) => axsave_fuzz::use_pickle(&p),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let small = Limits {
        max_nodes: 64,
        max_depth: 8,
        max_stack: 64,
    };
    match pickle::parse_with_limits(data, small) {
        Ok(p) => {
            assert!(
                p.node_count() <= small.max_nodes,
                "{} nodes",
                p.node_count()
            );
            axsave_fuzz::use_pickle(&p);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    axsave_fuzz::mutate(data, size, max_size, seed, Some(0))
});
