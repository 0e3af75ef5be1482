//! torch's answers for every float conversion, as `scripts/fixtures/convert.py` stored them under
//! `tests/fixtures/convert`: the one place the tests of [`convert`](crate::convert) and of
//! axsave-core's GPU kernels (and their CPU twins) read them from.
//!
//! Compiled for this crate's tests and, in other crates, only with the `torch-fixtures` feature
//! (axsave-core's dev-dependency turns it on). Every function panics with the path and the way
//! to regenerate when a fixture is missing: these are test helpers, not a reader of user input.
//!
//! Two kinds of fixture: **explicit** pairs (torch's output for a stored input, compared element by
//! element) and **sweeps** (millions of inputs that both sides generate from the same formulas;
//! the manifest holds the CRC-32 of the input, which proves the generators agree, and of torch's
//! output block by block).

use std::path::PathBuf;

use serde_json::Value;

use crate::dtype::DType;

/// `tests/fixtures/convert`, or `$AXSAVE_FIXTURES/convert` for prebuilt test binaries run on
/// another machine (`scripts/gpu-check.sh`).
pub fn dir() -> PathBuf {
    std::env::var_os("AXSAVE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
        .join("convert")
}

/// The fixtures' `manifest.json`.
pub fn manifest() -> Value {
    let path = dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run scripts/fixtures/convert.py tests/fixtures)",
            path.display()
        )
    });
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not valid JSON: {e}", path.display()))
}

fn dtype(v: &Value) -> DType {
    let name = v.as_str().expect("a dtype name in manifest.json");
    DType::from_safetensors_name(name).unwrap_or_else(|| panic!("unknown dtype {name:?}"))
}

fn read(name: &str) -> Vec<u8> {
    let path = dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One explicit fixture: torch's output `want` for `input` converted `from` → `to`.
pub struct Pair {
    /// The input's dtype.
    pub from: DType,
    /// The output's dtype.
    pub to: DType,
    /// The stored input, little-endian.
    pub input: Vec<u8>,
    /// torch's output for it.
    pub want: Vec<u8>,
}

/// The four floats every conversion is between.
pub const FLOATS: [DType; 4] = [DType::F16, DType::BF16, DType::F32, DType::F64];

/// Every explicit pair, checked to cover each ordered pair of distinct [`FLOATS`] once and each
/// input to have the length the manifest gives.
pub fn pairs() -> Vec<Pair> {
    let m = manifest();
    let pairs: Vec<Pair> = m["pairs"]
        .as_array()
        .expect("manifest.json: pairs")
        .iter()
        .map(|p| {
            let from = dtype(&p["from"]);
            let input_entry = &m["inputs"][from.safetensors_name()];
            let input = read(input_entry["file"].as_str().expect("input file"));
            let count = input_entry["count"].as_u64().expect("count") as usize;
            assert_eq!(input.len(), count * from.size(), "{from} input length");
            Pair {
                from,
                to: dtype(&p["to"]),
                input,
                want: read(p["file"].as_str().expect("output file")),
            }
        })
        .collect();
    let mut seen: Vec<(DType, DType)> = pairs.iter().map(|p| (p.from, p.to)).collect();
    seen.sort();
    let mut all: Vec<(DType, DType)> = FLOATS
        .iter()
        .flat_map(|&a| {
            FLOATS
                .iter()
                .filter(move |&&b| b != a)
                .map(move |&b| (a, b))
        })
        .collect();
    all.sort();
    assert_eq!(
        seen, all,
        "the fixtures cover every pair of distinct floats"
    );
    pairs
}

/// One sweep: a generated input and, per target dtype, the CRC-32s of torch's output in blocks of
/// [`Sweeps::block`] elements.
pub struct Sweep {
    /// The input's dtype.
    pub from: DType,
    /// The generated input (its CRC already checked against the manifest).
    pub input: Vec<u8>,
    /// `(to, block CRC-32s as 8 hex digits)` for each target dtype.
    pub outputs: Vec<(DType, Vec<String>)>,
}

impl Sweep {
    /// The number of input elements.
    pub fn count(&self) -> usize {
        self.input.len() / self.from.size()
    }
}

/// The sweeps of the manifest, inputs generated.
pub struct Sweeps {
    /// Elements per CRC block.
    pub block: usize,
    /// One per source dtype.
    pub sources: Vec<Sweep>,
}

impl Sweeps {
    /// The indices of the blocks of `out` (a conversion to `to`) whose CRC-32 differs from
    /// `crcs`; panics if the number of blocks differs.
    pub fn differing_blocks(&self, to: DType, out: &[u8], crcs: &[String]) -> Vec<usize> {
        let bytes = self.block * to.size();
        assert_eq!(crcs.len(), out.len().div_ceil(bytes), "{to}: block count");
        out.chunks(bytes)
            .zip(crcs)
            .enumerate()
            .filter(|(_, (chunk, crc))| format!("{:08x}", crc32fast::hash(chunk)) != **crc)
            .map(|(b, _)| b)
            .collect()
    }
}

/// The manifest's sweeps with their inputs generated and checked: a generator that drifted from
/// `scripts/fixtures/convert.py` panics here, naming the dtype, before any conversion is blamed.
pub fn sweeps() -> Sweeps {
    let m = manifest();
    let s = &m["sweeps"];
    let block = s["block"].as_u64().expect("sweeps.block") as usize;
    let half = s["half"].as_u64().expect("sweeps.half");
    let grid_lo: Vec<u64> = s["grid_lo"]
        .as_array()
        .expect("sweeps.grid_lo")
        .iter()
        .map(|v| v.as_u64().expect("grid_lo entry"))
        .collect();
    let sources: Vec<Sweep> = s["sources"]
        .as_object()
        .expect("sweeps.sources")
        .iter()
        .map(|(name, entry)| {
            let from = DType::from_safetensors_name(name).expect("sweep dtype");
            let input = sweep_input(from, half, &grid_lo);
            let count = entry["count"].as_u64().expect("count") as usize;
            assert_eq!(input.len(), count * from.size(), "{from} sweep length");
            assert_eq!(
                format!("{:08x}", crc32fast::hash(&input)),
                entry["input_crc32"].as_str().expect("input_crc32"),
                "the {from} sweep input differs from the generator's: fix sweep_input, not convert"
            );
            let outputs = entry["output_block_crc32"]
                .as_object()
                .expect("output_block_crc32")
                .iter()
                .map(|(to, crcs)| {
                    let crcs = crcs.as_array().expect("crc list").iter();
                    let crcs = crcs.map(|c| c.as_str().expect("crc").to_owned()).collect();
                    (DType::from_safetensors_name(to).expect("dtype"), crcs)
                })
                .collect();
            Sweep {
                from,
                input,
                outputs,
            }
        })
        .collect();
    assert_eq!(sources.len(), FLOATS.len(), "a sweep per float");
    Sweeps { block, sources }
}

/// SplitMix64, the sweeps' pseudo-random numbers (`splitmix64` in `scripts/fixtures/convert.py`).
pub fn splitmix64(i: u64) -> u64 {
    let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sweep input of `from`, exactly as `sweep_input` in `scripts/fixtures/convert.py` builds it:
/// every 16-bit pattern; for f32 a grid of exponents and low bits plus random words; for f64
/// random values near each rounding tie of every narrower float plus random words.
fn sweep_input(from: DType, half: u64, grid_lo: &[u64]) -> Vec<u8> {
    match from {
        DType::F16 | DType::BF16 => (0..=u16::MAX).flat_map(u16::to_le_bytes).collect(),
        DType::F32 => {
            let grid = (0..half).map(|i| (((i >> 4) << 16) | grid_lo[(i & 15) as usize]) as u32);
            let random = (0..half).map(|i| (splitmix64(i + half) >> 32) as u32);
            grid.chain(random).flat_map(u32::to_le_bytes).collect()
        }
        DType::F64 => {
            let low = |bits: u32| (1u64 << bits) - 1;
            let (f32_tie, bf16_tie, f16_tie) = (1u64 << 28, 1u64 << 44, 1u64 << 41);
            let structured = (0..half).map(|i| {
                let r = splitmix64(i);
                let sign = r >> 63;
                let exp = 1023 - 160 + ((r >> 40) & 0x1FF) % 300;
                let m = r & low(52);
                let m = match i & 7 {
                    1 => (m & !low(29)) | f32_tie,
                    2 => (m & !low(29)) | f32_tie | 1,
                    3 => (m & !low(29)) | (f32_tie - 1),
                    4 => (m & !low(45)) | bf16_tie | 1,
                    5 => (m & !low(45)) | (bf16_tie - 1),
                    6 => (m & !low(42)) | f16_tie | 1,
                    7 => (m & !low(42)) | (f16_tie - 1),
                    _ => m,
                };
                (sign << 63) | (exp << 52) | m
            });
            let random = (0..half).map(|i| splitmix64(i + half));
            structured
                .chain(random)
                .flat_map(u64::to_le_bytes)
                .collect()
        }
        other => panic!("the fixtures have no sweep for {other}"),
    }
}
