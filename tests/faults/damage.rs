//! 2. Damaged or hostile input: exit 1, the file named, nothing written.

use super::*;

/// How one damaged-input case runs: arguments, working directory, the output directory, and
/// what must still be in it afterwards (name → bytes).
struct Prepared {
    args: Vec<String>,
    cwd: Option<PathBuf>,
    out: PathBuf,
    keep: Vec<(String, Vec<u8>)>,
}

/// A damaged-input case: name, how to make it in a fresh temp dir, message fragments.
struct Damage {
    name: &'static str,
    make: fn(&Path) -> Prepared,
    want: &'static [&'static str],
}

fn plain(src: &Path, t: &Path) -> Prepared {
    Prepared {
        args: vec![
            "--source".into(),
            s(src).into(),
            "--output".into(),
            s(&t.join("out")).into(),
            "-q".into(),
        ],
        cwd: None,
        out: t.join("out"),
        keep: Vec::new(),
    }
}

/// A writable copy of a fixture checkpoint in `t/ckpt`.
pub(super) fn ckpt_copy(fx: Fx, t: &Path) -> PathBuf {
    let dst = t.join("ckpt");
    copy_dir(&fx.checkpoint(), &dst);
    dst
}

pub(super) fn edit(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut d = std::fs::read(path).unwrap();
    f(&mut d);
    std::fs::write(path, d).unwrap();
}

/// Replaces the only occurrence of `from` (asserting there is one) by `to` (same length).
pub(super) fn replace_once(d: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let hits: Vec<usize> = (0..=d.len() - from.len())
        .filter(|&i| &d[i..i + from.len()] == from)
        .collect();
    assert_eq!(hits.len(), 1, "{:?}", String::from_utf8_lossy(from));
    d[hits[0]..hits[0] + to.len()].copy_from_slice(to);
}

fn find(d: &[u8], pat: &[u8]) -> usize {
    (0..=d.len() - pat.len())
        .find(|&i| &d[i..i + pat.len()] == pat)
        .unwrap_or_else(|| panic!("{:?} not found", String::from_utf8_lossy(pat)))
}

/// Spoils every occurrence of a zip signature (`PK\x01\x02`: central directory records).
fn spoil_signature(d: &mut [u8], sig: &[u8; 4]) {
    let mut n = 0;
    for i in 0..d.len() - 4 {
        if &d[i..i + 4] == sig {
            d[i + 3] = 0x09;
            n += 1;
        }
    }
    assert!(n > 0);
}

fn write_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.resize(b.len() + data_len, 0);
    std::fs::write(path, b).unwrap();
}

fn safetensors_case(t: &Path, header: &str, data_len: usize) -> Prepared {
    let f = t.join("model.safetensors");
    write_safetensors(&f, header, data_len);
    plain(&f, t)
}

pub(super) const OPTIM1: &str = "global_step2/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt";
const OPTIM0: &str = "global_step2/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt";

fn damage_cases() -> Vec<Damage> {
    vec![
        Damage {
            name: "truncated .distcp (cut in half)",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                let f = c.join("__0_0.distcp");
                cut_in_half(&f);
                plain(&c, t)
            },
            want: &["__0_0.distcp", "past the end of the file"],
        },
        Damage {
            name: "truncated torch.save zip (ZeRO optim file cut)",
            make: |t| {
                let c = ckpt_copy(ZERO2_W2, t);
                edit(&c.join(OPTIM1), |d| d.truncate(d.len() * 2 / 3));
                plain(&c, t)
            },
            want: &[
                "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "damaged zip archive",
            ],
        },
        Damage {
            name: "damaged central directory (.distcp)",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                edit(&c.join("__0_0.distcp"), |d| {
                    spoil_signature(d, b"PK\x01\x02")
                });
                plain(&c, t)
            },
            want: &["__0_0.distcp", "damaged zip archive at byte"],
        },
        Damage {
            name: "damaged central directory (ZeRO optim file)",
            make: |t| {
                let c = ckpt_copy(ZERO2_W2, t);
                edit(&c.join(OPTIM1), |d| spoil_signature(d, b"PK\x01\x02"));
                plain(&c, t)
            },
            want: &[
                "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "damaged zip archive at byte",
            ],
        },
        Damage {
            name: "DCP metadata naming a missing .distcp",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                std::fs::remove_file(c.join("__1_0.distcp")).unwrap();
                plain(&c, t)
            },
            want: &["__1_0.distcp"],
        },
        Damage {
            name: "safetensors index naming a missing shard",
            make: |t| {
                let c = t.join("model");
                copy_dir(&fixture("safetensors/sharded"), &c);
                std::fs::remove_file(c.join("model-00002-of-00002.safetensors")).unwrap();
                plain(&c, t)
            },
            want: &["model-00002-of-00002.safetensors", "No such file"],
        },
        Damage {
            name: "DCP item length past the end of its .distcp",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                // The first item's `length` (BININT2) becomes 65535.
                edit(&c.join(".metadata"), |d| {
                    let i = find(d, b"\x8c\x06length\x94M") + 10;
                    d[i] = 0xff;
                    d[i + 1] = 0xff;
                });
                plain(&c, t)
            },
            want: &["__0_0.distcp", "lies past the end of the file"],
        },
        Damage {
            name: "safetensors data_offsets past the end",
            make: |t| {
                safetensors_case(
                    t,
                    r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                    8,
                )
            },
            want: &["model.safetensors", "do not match the file's length"],
        },
        Damage {
            name: "unknown dtype in DCP metadata (torch.bits1x8)",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                edit(&c.join(".metadata"), |d| {
                    replace_once(d, b"\x8c\x07float32", b"\x8c\x07bits1x8")
                });
                plain(&c, t)
            },
            want: &[".metadata", "unsupported dtype torch.bits1x8"],
        },
        Damage {
            name: "unknown dtype in torch.save (QInt8Storage, ZeRO optim)",
            make: |t| {
                let c = ckpt_copy(ZERO2_W2, t);
                edit(&c.join(OPTIM0), |d| {
                    replace_once(d, b"FloatStorage", b"QInt8Storage");
                    resign_zip_record(d, "data.pkl");
                });
                plain(&c, t)
            },
            want: &[
                "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "QInt8Storage is not supported",
            ],
        },
        Damage {
            name: "unknown dtype in a safetensors header (Q9)",
            make: |t| {
                safetensors_case(
                    t,
                    r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#,
                    8,
                )
            },
            want: &["model.safetensors", "Q9"],
        },
        Damage {
            name: "shape whose byte size overflows (DCP metadata)",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                edit(&c.join(".metadata"), |d| {
                    // torch.Size((13, 8)) of the first tensor becomes (2**62, 8): the BININT1 13
                    // becomes a LONG1, and the frame that holds it grows to match.
                    let at = find(d, b"\x8c\x04Size\x94\x93\x94K\x0dK\x08") + 9;
                    let mut long = vec![0x8a, 8];
                    long.extend_from_slice(&(1u64 << 62).to_le_bytes());
                    d.splice(at..at + 2, long.iter().copied());
                    assert_eq!(d[2], 0x95, "FRAME");
                    let frame = u64::from_le_bytes(d[3..11].try_into().unwrap());
                    let grown = frame + long.len() as u64 - 2;
                    d[3..11].copy_from_slice(&grown.to_le_bytes());
                });
                plain(&c, t)
            },
            want: &[".metadata", "overflows"],
        },
        Damage {
            name: "shape whose byte size overflows (safetensors)",
            make: |t| {
                safetensors_case(
                    t,
                    r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#,
                    8,
                )
            },
            want: &["model.safetensors", "overflow"],
        },
        Damage {
            name: "safetensors header length > 100 MB",
            make: |t| {
                let f = t.join("model.safetensors");
                let mut b = 200_000_000u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{\"a\":{}}       ");
                std::fs::write(&f, b).unwrap();
                plain(&f, t)
            },
            want: &["model.safetensors", "larger than 100 MB"],
        },
        Damage {
            name: "safetensors overlapping offsets",
            make: |t| {
                safetensors_case(
                    t,
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                    12,
                )
            },
            want: &["model.safetensors", "invalid offset"],
        },
        Damage {
            name: "pickle with a bad opcode (DCP .metadata)",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                edit(&c.join(".metadata"), |d| d[11] = 0xff);
                plain(&c, t)
            },
            want: &[".metadata", "unknown opcode 0xff"],
        },
        Damage {
            name: "pickle nested 10,000 deep (DCP .metadata)",
            make: |t| {
                let c = ckpt_copy(FSDP_W2, t);
                std::fs::copy(fixture("pickle/deep.pkl"), c.join(".metadata")).unwrap();
                plain(&c, t)
            },
            want: &[".metadata", "nesting deeper than"],
        },
        Damage {
            name: "ZeRO partition count vs files (a rank's optim file missing)",
            make: |t| {
                let c = ckpt_copy(ZERO3_W2, t);
                std::fs::remove_file(c.join(OPTIM1)).unwrap();
                plain(&c, t)
            },
            want: &["global_step2", "expected 2 *_optim_states.pt files"],
        },
        Damage {
            name: "ZeRO partition_count edited (2 -> 3)",
            make: |t| {
                let c = ckpt_copy(ZERO3_W2, t);
                edit(&c.join(OPTIM0), |d| {
                    replace_once(
                        d,
                        b"partition_countq\x0fK\x02",
                        b"partition_countq\x0fK\x03",
                    );
                    resign_zip_record(d, "data.pkl");
                });
                plain(&c, t)
            },
            want: &[
                "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "expected 3",
            ],
        },
        Damage {
            name: "YAML with a wrong type (--config, lora_r: eight)",
            make: |t| {
                std::fs::write(
                    t.join("bad.yml"),
                    "base_model: ./base\noutput_dir: ./run\nadapter: lora\nlora_r: eight\n",
                )
                .unwrap();
                Prepared {
                    args: vec!["--config".into(), "bad.yml".into()],
                    cwd: Some(t.to_path_buf()),
                    out: t.join("run"),
                    keep: Vec::new(),
                }
            },
            want: &["bad.yml", "lora_r", "line 4"],
        },
        Damage {
            name: "existing model without --force (refused, untouched)",
            make: |t| {
                let mut p = plain(&FSDP_W2.checkpoint(), t);
                std::fs::create_dir_all(&p.out).unwrap();
                std::fs::write(p.out.join("model.safetensors"), b"old").unwrap();
                p.keep = vec![("model.safetensors".into(), b"old".to_vec())];
                p
            },
            want: &["model.safetensors", "--force"],
        },
    ]
}

fn run_damage(d: &Damage) -> Result<(), String> {
    let t = tempfile::tempdir().unwrap();
    let p = (d.make)(t.path());
    let mut c = Command::new(bin());
    clean_env(&mut c);
    c.args(&p.args);
    if let Some(cwd) = &p.cwd {
        c.current_dir(cwd);
    }
    let o = c.output().map_err(|e| e.to_string())?;
    let err = stderr(&o);
    if o.status.code() != Some(1) {
        return Err(format!("exit {:?}, want 1: {err}", o.status.code()));
    }
    if err.contains("panicked") {
        return Err(format!("panic: {err}"));
    }
    for w in d.want {
        if !err.contains(w) {
            return Err(format!("the error lacks {w:?}: {err}"));
        }
    }
    let names = listing(&p.out);
    let want: Vec<String> = p.keep.iter().map(|(n, _)| n.clone()).collect();
    if names != want {
        return Err(format!(
            "the output directory holds {names:?}, want {want:?}"
        ));
    }
    for (n, bytes) in &p.keep {
        if std::fs::read(p.out.join(n)).ok().as_ref() != Some(bytes) {
            return Err(format!("{n} was changed"));
        }
    }
    Ok(())
}

#[test]
fn damaged_inputs() {
    let mut tally = Tally::default();
    for d in damage_cases() {
        tally.add(d.name, run_damage(&d));
    }
    tally.finish("2. damaged inputs", true);
}
