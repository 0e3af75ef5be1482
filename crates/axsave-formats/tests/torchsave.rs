//! The `torch.save` reader on archives written by torch itself (tests/fixtures/torchsave, made by
//! scripts/make_fixtures.py): every dtype, views with storage offsets and strides, parameters,
//! nested containers. Expected values are what torch reported for each tensor.

use axsave_formats::DType;
use axsave_formats::pickle::Value;
use axsave_formats::torchsave::{TensorError, TensorRef, TorchSave};

fn fixture(name: &str) -> Vec<u8> {
    let p = format!(
        "{}/../../tests/fixtures/torchsave/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Follows `a/b/0/c` through dicts (string keys) and lists/tuples (indices).
fn walk<'a>(save: &'a TorchSave, path: &str) -> &'a Value {
    let p = &save.pickle;
    let mut v = p.root();
    for part in path.split('/') {
        v = match part.parse::<usize>() {
            Ok(i) if p.as_sequence(v).is_some() => &p.as_sequence(v).unwrap()[i],
            _ => p
                .dict_get(v, part)
                .unwrap_or_else(|| panic!("no {part} in {path}")),
        };
    }
    v
}

/// The tensor's logical elements, row-major, read through its strides from the archive.
fn logical_bytes(data: &[u8], save: &TorchSave, t: &TensorRef) -> Vec<u8> {
    let rec = save.storage(&t.storage_key).unwrap();
    let storage = save.zip.bytes(data, rec).unwrap();
    let es = t.dtype.size();
    let numel = t.numel() as usize;
    let mut out = Vec::with_capacity(numel * es);
    let mut idx = vec![0u64; t.shape.len()];
    for _ in 0..numel {
        let e: u64 = t.storage_offset
            + idx
                .iter()
                .zip(&t.strides)
                .map(|(i, s)| i * *s as u64)
                .sum::<u64>();
        let at = e as usize * es;
        out.extend_from_slice(&storage[at..at + es]);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

fn check(archive: &str, expected: &str) {
    let data = fixture(archive);
    let save = TorchSave::parse(&data[..]).unwrap_or_else(|e| panic!("{archive}: {e}"));
    let exp: serde_json::Value = serde_json::from_slice(&fixture(expected)).unwrap();
    let mut checked = 0;
    for (name, e) in exp["tensors"].as_object().unwrap() {
        let v = walk(&save, name);
        let torch_dtype = e["dtype"].as_str().unwrap();
        let got = save
            .tensor(v)
            .unwrap_or_else(|| panic!("{name} is not a tensor"));
        let Some(dtype) = DType::from_torch_name(torch_dtype) else {
            // complex128 has no safetensors dtype: it must be refused by name, not misread.
            assert!(
                matches!(got, Err(TensorError::Unsupported(_))),
                "{name}: {got:?}"
            );
            continue;
        };
        let t = got.unwrap_or_else(|err| panic!("{archive} {name}: {err}"));
        assert_eq!(t.dtype, dtype, "{name}");
        let shape: Vec<u64> = serde_json::from_value(e["shape"].clone()).unwrap();
        let stride: Vec<i64> = serde_json::from_value(e["stride"].clone()).unwrap();
        assert_eq!(t.shape, shape, "{name} shape");
        assert_eq!(t.strides, stride, "{name} strides");
        assert_eq!(
            t.storage_offset,
            e["storage_offset"].as_u64().unwrap(),
            "{name} offset"
        );
        assert_eq!(
            logical_bytes(&data, &save, &t),
            unhex(e["hex"].as_str().unwrap()),
            "{archive}: bytes of {name}"
        );
        checked += 1;
    }
    assert!(checked >= 10, "{archive}: only {checked} tensors checked");
}

#[test]
fn every_dtype() {
    check("dtypes.pt", "dtypes.bin.json");
}

#[test]
fn views_offsets_strides_parameters_nesting() {
    check("views.pt", "views.json");
}

#[test]
fn pickle_protocol_4_data_pkl() {
    check("legacy_proto.pt", "legacy_proto.json");
}

#[test]
fn truncated_archives_fail_cleanly() {
    let data = fixture("views.pt");
    for cut in [0, 10, 100, data.len() / 2, data.len() - 30, data.len() - 1] {
        assert!(
            TorchSave::parse(&data[..cut]).is_err(),
            "cut at {cut} parsed"
        );
    }
    // Damage inside the central directory.
    let mut bad = data.clone();
    let cd = bad
        .windows(4)
        .rposition(|w| w == [0x50, 0x4b, 0x01, 0x02])
        .unwrap();
    bad[cd + 1] ^= 0xff;
    assert!(TorchSave::parse(&bad[..]).is_err());
}

#[test]
fn legacy_tar_format_is_refused() {
    // torch.save(_use_new_zipfile_serialization=False) is not a zip.
    assert!(TorchSave::parse(&fixture("legacy_tar.pt")[..]).is_err());
}
