//! 4. A full disk: ENOSPC at preallocation and in the commit.

use super::*;

/// A filesystem mounted by the test, unmounted when dropped.
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    fn tmpfs(dir: &Path, bytes: u64) -> Result<Mounted, String> {
        std::fs::create_dir_all(dir).unwrap();
        run_tool(Command::new("mount").args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={bytes}"),
            "tmpfs",
            s(dir),
        ]))?;
        Ok(Mounted {
            dir: dir.to_path_buf(),
        })
    }

    /// An ext4 image of `bytes` made with mkfs.ext4 and loop-mounted.
    fn ext4(dir: &Path, image: &Path, bytes: u64) -> Result<Mounted, String> {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::File::create(image)
            .and_then(|f| f.set_len(bytes))
            .map_err(|e| e.to_string())?;
        run_tool(Command::new("mkfs.ext4").args(["-q", "-F", s(image)]))?;
        run_tool(Command::new("mount").args(["-o", "loop", s(image), s(dir)]))?;
        Ok(Mounted {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn run_tool(c: &mut Command) -> Result<(), String> {
    let o = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{c:?}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{c:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

fn free_bytes(dir: &Path) -> u64 {
    let o = Command::new("df")
        .args(["-B1", "--output=avail", s(dir)])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

fn page_size() -> u64 {
    Command::new("getconf")
        .arg("PAGESIZE")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(4096)
}

/// Checks a run that must fail with ENOSPC: every rank exit 1, the message, no panic, nothing
/// of the model left in `out`.
fn check_enospc(res: &[(Option<i32>, String)], out: &Path) -> Result<(), String> {
    for (r, (code, text)) in res.iter().enumerate() {
        if !matches!(code, Some(c) if *c != 0 && *c != -999) {
            return Err(format!("rank {r} exited {code:?}: {text}"));
        }
        if text.contains("panicked") {
            return Err(format!("rank {r} panicked: {text}"));
        }
    }
    let all: String = res.iter().map(|(_, t)| t.as_str()).collect();
    if !(all.contains("No space left on device") && all.contains(".safetensors")) {
        return Err(format!("no ENOSPC naming the file: {all}"));
    }
    let left: Vec<String> = listing(out)
        .into_iter()
        .filter(|n| n != "lost+found" && n != "filler")
        .collect();
    if !left.is_empty() {
        return Err(format!("left behind: {left:?}"));
    }
    Ok(())
}

fn one(args: &[&str]) -> Vec<(Option<i32>, String)> {
    let o = axsave(args);
    vec![(o.status.code(), stderr(&o))]
}

fn ranks(n: usize, args: &[&str]) -> Vec<(Option<i32>, String)> {
    let mut a: Vec<&str> = args.to_vec();
    a.extend(["--timeout", "10"]);
    wait_ranks(
        spawn_ranks(n, &a, &|_| Vec::new()),
        Duration::from_secs(120),
    )
    .into_iter()
    .map(|(c, t, _)| (c, t))
    .collect()
}

#[test]
fn disk_full() {
    let mut tally = Tally::default();
    let demo = fixture("dcp/demo_w4/checkpoint");
    let demo = s(&demo);
    let t = tempfile::tempdir().unwrap();
    let page = page_size();

    // tmpfs
    let probe = t.path().join("probe");
    match Mounted::tmpfs(&probe, 64 << 10) {
        Err(why) => tally.note(format!("tmpfs: skipped, cannot mount: {why}")),
        Ok(m) => {
            drop(m);
            tally.note("tmpfs: mounting works".into());
            let case = |name: &str| format!("tmpfs: {name}");
            // One process, output 266 KB, 64 KiB of room: fails at preallocation.
            let dir = t.path().join("t1");
            let r = Mounted::tmpfs(&dir, 64 << 10).and_then(|_m| {
                check_enospc(&one(&["--source", demo, "--output", s(&dir), "-q"]), &dir)
            });
            tally.add(&case("1 process, 64 KiB for 266 KB"), r);

            // The data files fit exactly; the index, written in the commit, does not.
            let reference = t.path().join("ref");
            assert_ok(&axsave(&[
                "--source",
                demo,
                "--output",
                s(&reference),
                "-q",
                "--max-shard-size",
                "100KB",
            ]));
            let pages: u64 = listing(&reference)
                .iter()
                .filter(|n| n.ends_with(".safetensors"))
                .map(|n| {
                    std::fs::metadata(reference.join(n))
                        .unwrap()
                        .len()
                        .div_ceil(page)
                })
                .sum();
            let dir = t.path().join("t2");
            // One page more for the output lock (`.axsave.lock`, which records its holder).
            let r = Mounted::tmpfs(&dir, (pages + 1) * page).and_then(|_m| {
                let res = one(&[
                    "--source",
                    demo,
                    "--output",
                    s(&dir),
                    "-q",
                    "--max-shard-size",
                    "100KB",
                ]);
                if !res[0].1.contains("index.json") {
                    return Err(format!("expected the index write to fail: {}", res[0].1));
                }
                check_enospc(&res, &dir)
            });
            tally.add(&case("3 shards fit, the index does not (commit)"), r);

            // Two sharded ranks, room for one's files.
            let dir = t.path().join("t3");
            let r = Mounted::tmpfs(&dir, 160 << 10).and_then(|_m| {
                check_enospc(
                    &ranks(
                        2,
                        &[
                            "--source",
                            demo,
                            "--output",
                            s(&dir),
                            "-q",
                            "--mode",
                            "sharded",
                        ],
                    ),
                    &dir,
                )
            });
            tally.add(&case("2 ranks sharded, room for one"), r);
        }
    }

    // ext4 on a loop device, filled up by another file first.
    let probe = t.path().join("probe4");
    match Mounted::ext4(&probe, &t.path().join("probe.img"), 2 << 20) {
        Err(why) => tally.note(format!("loop-mounted ext4: skipped: {why}")),
        Ok(m) => {
            drop(m);
            tally.note("loop-mounted ext4: mkfs.ext4 + mount -o loop work".into());
            for (name, n) in [("1 process", 1usize), ("2 ranks gather", 2)] {
                let dir = t.path().join(format!("e{n}"));
                let r = Mounted::ext4(&dir, &t.path().join(format!("e{n}.img")), 2 << 20).and_then(
                    |_m| {
                        let room = 100 << 10;
                        let fill = free_bytes(&dir).saturating_sub(room);
                        std::fs::File::create(dir.join("filler"))
                            .and_then(|f| {
                                f.set_len(0)?;
                                std::io::Write::write_all(
                                    &mut std::io::BufWriter::new(&f),
                                    &vec![1u8; fill as usize],
                                )?;
                                f.sync_all()
                            })
                            .map_err(|e| e.to_string())?;
                        let out = dir.join("out");
                        let args = ["--source", demo, "--output", s(&out), "-q"];
                        let res = if n == 1 { one(&args) } else { ranks(n, &args) };
                        check_enospc(&res, &out)
                    },
                );
                tally.add(&format!("ext4 (loop): {name}, 100 KiB left for 266 KB"), r);
            }
        }
    }
    tally.finish("4. disk full", true);
}
