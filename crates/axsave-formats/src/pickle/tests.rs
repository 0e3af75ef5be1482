//! Tests on pickles written by CPython's own `pickle` (tests/fixtures/pickle, made by
//! scripts/make_fixtures.py; tests/fixtures/pickle/obj.json describes the object).

use super::*;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../tests/fixtures/pickle/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn key<'a>(p: &'a Pickle, root: &Value, k: &str) -> &'a Value {
    p.dict_get(root, k)
        .unwrap_or_else(|| panic!("no key {k} in {}", p.describe(root)))
}

/// Little-endian two's complement of a Python int, as pickle's LONG1 stores it.
fn le_bytes_of(v: &Value) -> Vec<u8> {
    match v {
        Value::BigInt(b) => b.to_vec(),
        other => panic!("expected a big int, found {other:?}"),
    }
}

fn check_object(proto: u8) {
    let data = fixture(&format!("proto{proto}.pkl"));
    let p = parse(&data).unwrap_or_else(|e| panic!("proto{proto}: {e}"));
    let root = p.root();
    let keys: Vec<&str> = p
        .as_dict(root)
        .unwrap()
        .iter()
        .map(|(k, _)| p.as_str(k).unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "none",
            "true",
            "false",
            "ints",
            "floats",
            "str",
            "bytes",
            "bytearray",
            "tuples",
            "list",
            "nested",
            "set",
            "frozenset",
            "shared",
            "self_ref",
            "point",
            "reduced",
            "ordered",
            "by_index"
        ],
        "proto{proto}"
    );
    assert_eq!(key(&p, root, "none"), &Value::None);
    // Protocol 0 writes True as `I01`, which is a bool too.
    assert_eq!(p.as_int(key(&p, root, "true")), Some(1));
    assert_eq!(p.as_int(key(&p, root, "false")), Some(0));

    let ints = p.as_list(key(&p, root, "ints")).unwrap();
    let small: Vec<i64> = ints[..9].iter().map(|v| p.as_int(v).unwrap()).collect();
    assert_eq!(
        small,
        [0, 1, 255, 256, 65535, 65536, -1, 1 << 31, i64::MIN],
        "proto{proto}"
    );
    // 2**64 and -(2**100) need more than 64 bits.
    let mut two64 = vec![0u8; 8];
    two64.push(1);
    assert_eq!(trim_sign(&le_bytes_of(&ints[9])), two64, "proto{proto}");
    let mut neg = vec![0u8; 12];
    neg.push(0xf0);
    assert_eq!(trim_sign(&le_bytes_of(&ints[10])), neg, "proto{proto}");

    let floats = p.as_list(key(&p, root, "floats")).unwrap();
    assert_eq!(floats[0], Value::Float(1.5));
    assert!(matches!(floats[1], Value::Float(f) if f == 0.0 && f.is_sign_negative()));
    assert_eq!(floats[2], Value::Float(f64::INFINITY));

    assert_eq!(
        p.as_str(key(&p, root, "str")),
        Some("h\u{e9}llo w\u{f6}rld \u{2713} \u{1f980}")
    );
    let bytes = key(&p, root, "bytes");
    if proto >= 3 {
        assert_eq!(
            bytes,
            &Value::Bytes(vec![0u8, 1, 0xff, b'a', b'b', b'c'].into())
        );
    } else {
        // Python 2 had no bytes type: older protocols go through _codecs.encode.
        assert_eq!(p.class_of(bytes), Some(("_codecs", "encode")));
    }
    if proto >= 5 {
        assert_eq!(
            key(&p, root, "bytearray"),
            &Value::Bytes(b"xyz".to_vec().into())
        );
    }

    let tuples = p.as_list(key(&p, root, "tuples")).unwrap();
    let lens: Vec<usize> = tuples
        .iter()
        .map(|t| p.as_tuple(t).unwrap().len())
        .collect();
    assert_eq!(lens, [0, 1, 2, 3, 5]);
    let five: Vec<i64> = p
        .as_tuple(&tuples[4])
        .unwrap()
        .iter()
        .map(|v| p.as_int(v).unwrap())
        .collect();
    assert_eq!(five, [1, 2, 3, 4, 5]);

    let list = p.as_list(key(&p, root, "list")).unwrap();
    assert_eq!(list[0], Value::Int(1));
    assert_eq!(p.as_str(&list[1]), Some("two"));
    assert_eq!(list[2], Value::Float(3.0));
    assert_eq!(list[3], Value::None);

    // Keys of any kind, in order.
    let nested = p.as_dict(key(&p, root, "nested")).unwrap();
    assert_eq!(p.as_str(&nested[0].0), Some("a"));
    let c = p
        .dict_get(p.dict_get(&nested[0].1, "b").unwrap(), "c")
        .unwrap();
    assert_eq!(p.as_list(c).unwrap(), &[Value::Int(1), Value::Int(2)]);
    assert_eq!(nested[1].0, Value::Int(7));
    assert_eq!(p.as_str(&nested[1].1), Some("int key"));
    let tk = p.as_tuple(&nested[2].0).unwrap();
    assert_eq!(tk[0], Value::Int(1));
    assert_eq!(p.as_str(&tk[1]), Some("x"));

    if proto >= 4 {
        match p.node(key(&p, root, "set")) {
            Some(Node::Set(items)) => {
                let mut v: Vec<i64> = items.iter().map(|x| p.as_int(x).unwrap()).collect();
                v.sort();
                assert_eq!(v, [1, 2, 3]);
            }
            other => panic!("set is {other:?}"),
        }
        match p.node(key(&p, root, "frozenset")) {
            Some(Node::Set(items)) => {
                let mut v: Vec<&str> = items.iter().map(|x| p.as_str(x).unwrap()).collect();
                v.sort();
                assert_eq!(v, ["a", "b"]);
            }
            other => panic!("frozenset is {other:?}"),
        }
    } else {
        assert_eq!(
            p.class_of(key(&p, root, "set")).map(|(_, n)| n),
            Some("set")
        );
    }

    // One list object referenced twice: the memo shares it.
    let shared = p.as_list(key(&p, root, "shared")).unwrap();
    assert!(matches!(shared[0], Value::Ref(_)));
    assert_eq!(shared[0], shared[1]);
    let inner: Vec<i64> = p
        .as_list(&shared[0])
        .unwrap()
        .iter()
        .map(|v| p.as_int(v).unwrap())
        .collect();
    assert_eq!(inner, [1, 2, 3]);

    // A list that contains itself.
    let self_ref = key(&p, root, "self_ref");
    let items = p.as_list(self_ref).unwrap();
    assert_eq!(items[0], Value::Int(1));
    assert_eq!(&items[1], self_ref);

    // An instance: class recorded, state applied by BUILD.
    let point = key(&p, root, "point");
    let state = p.as_object(point).unwrap().state.as_ref().unwrap();
    assert_eq!(p.dict_get(state, "x"), Some(&Value::Int(1)));
    assert_eq!(p.dict_get(state, "y"), Some(&Value::Float(2.5)));
    assert_eq!(p.as_str(p.dict_get(state, "label").unwrap()), Some("p"));

    // A REDUCE is recorded, never called.
    let reduced = key(&p, root, "reduced");
    assert_eq!(
        p.class_of(reduced),
        Some(("fixtures.pickles", "rebuild_pair"))
    );
    let args = p.call_args(reduced).unwrap();
    assert_eq!(args[0], Value::Int(3));
    assert_eq!(p.as_str(&args[1]), Some("four"));

    if proto >= 2 {
        let ordered = p.as_dict(key(&p, root, "ordered")).unwrap();
        assert_eq!(p.as_str(&ordered[0].0), Some("z"));
        assert_eq!(ordered[0].1, Value::Int(1));
        assert_eq!(p.as_str(&ordered[1].0), Some("a"));
    }

    // A dict keyed by objects, like DCP's MetadataIndex.
    let by_index = p.as_dict(key(&p, root, "by_index")).unwrap();
    assert_eq!(by_index.len(), 2);
    let k1 = p.as_object(&by_index[1].0).unwrap().state.as_ref().unwrap();
    assert_eq!(p.as_str(p.dict_get(k1, "fqn").unwrap()), Some("model.w"));
    let off = p.as_tuple(p.dict_get(k1, "offset").unwrap()).unwrap();
    assert_eq!(off, &[Value::Int(4), Value::Int(0)]);
    assert_eq!(p.as_str(&by_index[1].1), Some("chunk1"));
}

/// Drops redundant sign-extension bytes so encodings of different lengths compare equal.
fn trim_sign(b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    while v.len() > 1 {
        let last = v[v.len() - 1];
        let prev = v[v.len() - 2];
        if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
            v.pop();
        } else {
            break;
        }
    }
    v
}

#[test]
fn protocol_0() {
    check_object(0);
}
#[test]
fn protocol_1() {
    check_object(1);
}
#[test]
fn protocol_2() {
    check_object(2);
}
#[test]
fn protocol_3() {
    check_object(3);
}
#[test]
fn protocol_4() {
    check_object(4);
}
#[test]
fn protocol_5() {
    check_object(5);
}

#[test]
fn deep_nesting_is_refused_not_a_crash() {
    let e = parse(&fixture("deep.pkl")).unwrap_err();
    assert!(
        matches!(e.kind, PickleErrorKind::Limit(_)),
        "expected a limit error, got {e}"
    );
    // With a higher limit it parses: the machine itself never recurses.
    let p = parse_with_limits(
        &fixture("deep.pkl"),
        Limits {
            max_depth: 20_000,
            ..Limits::default()
        },
    )
    .unwrap();
    assert!(p.node_count() >= 10_000);
}

#[test]
fn bad_opcode_names_its_offset() {
    let data = fixture("bad_opcode.pkl");
    let at = data.iter().position(|&b| b == 0xff).unwrap();
    let e = parse(&data).unwrap_err();
    assert_eq!(e.kind, PickleErrorKind::UnknownOpcode(0xff));
    assert_eq!(e.offset, at as u64);
}

#[test]
fn truncated_is_an_error() {
    let e = parse(&fixture("truncated.pkl")).unwrap_err();
    assert!(
        matches!(
            e.kind,
            PickleErrorKind::Truncated | PickleErrorKind::BadStop(_)
        ),
        "{e}"
    );
}

#[test]
fn every_prefix_fails_cleanly() {
    // No panic on any truncation of any protocol's pickle.
    for proto in 0..=5 {
        let data = fixture(&format!("proto{proto}.pkl"));
        for n in 0..data.len() {
            assert!(parse(&data[..n]).is_err(), "proto{proto} prefix {n} parsed");
        }
    }
}

#[test]
fn lying_lengths_do_not_allocate() {
    // BINUNICODE claiming 4 GiB, BINBYTES8 claiming 2^63: truncation errors, no allocation.
    let e = parse(&[0x80, 4, b'X', 0xff, 0xff, 0xff, 0xff, b'a']).unwrap_err();
    assert_eq!(e.kind, PickleErrorKind::Truncated);
    let mut d = vec![0x80, 4, 0x8e];
    d.extend_from_slice(&(1u64 << 63).to_le_bytes());
    assert_eq!(parse(&d).unwrap_err().kind, PickleErrorKind::Truncated);
    // A memo index never stored.
    assert_eq!(
        parse(&[0x80, 2, b'h', 9, b'.']).unwrap_err().kind,
        PickleErrorKind::MissingMemo(9)
    );
}

/// 3·10^7 MEMOIZE ops (3.2 GB of memo before) are refused at the second one; memoizing one
/// container twice too. Values memoized once each, as picklers write them, still parse.
#[test]
fn memoizing_one_value_again_is_refused() {
    let mut flood = b"\x80\x04N".to_vec();
    flood.resize(flood.len() + 30_000_000, 0x94);
    flood.push(b'.');
    let e = parse(&flood).unwrap_err();
    assert_eq!(e.offset, 4, "{e}");
    assert!(e.to_string().contains("memoized twice"), "{e}");
    // A list memoized, fetched back and memoized again.
    let e = parse(b"\x80\x04]\x94h\x00\x94.").unwrap_err();
    assert!(e.to_string().contains("memoized twice"), "{e}");
    // None then a list, each memoized once.
    let p = parse(b"\x80\x04N\x94]\x94\x86\x94.").unwrap();
    assert!(p.node_count() >= 2);
}

/// Memo indices out of order (a hand-made pickle): stored past the dense run, found again.
#[test]
fn memo_indices_out_of_order() {
    // 'a' BINPUT 5, 'b' BINPUT 0, 'c' BINPUT 1, then BINGET 5, 0, 1 into a tuple; MEMOIZE of a
    // fresh value takes index 3 (the memo's length).
    let p = parse(
        b"\x80\x04(\x8c\x01aq\x05\x8c\x01bq\x00\x8c\x01cq\x01\x8c\x01d\x94h\x05h\x00h\x01h\x03t.",
    )
    .unwrap();
    let items: Vec<&str> = p
        .as_sequence(p.root())
        .unwrap()
        .iter()
        .map(|v| p.as_str(v).unwrap())
        .collect();
    assert_eq!(items, ["a", "b", "c", "d", "a", "b", "c", "d"]);
}
