//! 5. A shard rewritten while a rank is stalled at `copying`.

use super::damage::OPTIM1;
use super::kill::all_exited;
use super::*;

/// Rank `stall` stops at `copying`; the test rewrites `rewrite` (same bytes, a new mtime),
/// releases it, and every rank must fail with the identity check's message.
fn rewritten_run(
    n: usize,
    mode: &str,
    source: &str,
    rewrite: &[PathBuf],
    stall: usize,
) -> Result<(), String> {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let reached = t.path().join("reached");
    let release = t.path().join("release");
    let (r_s, rel_s) = (s(&reached).to_string(), s(&release).to_string());
    let env = move |r: usize| {
        if r == stall {
            vec![
                ("AXSAVE_FAULT".to_string(), format!("copying@{stall}")),
                ("AXSAVE_FAULT_FILE".to_string(), r_s.clone()),
                ("AXSAVE_FAULT_RELEASE".to_string(), rel_s.clone()),
            ]
        } else {
            Vec::new()
        }
    };
    let mut kids = spawn_ranks(
        n,
        &[
            "--source",
            source,
            "--output",
            s(&out),
            "-q",
            "--mode",
            mode,
            "--workers",
            "1",
            "--timeout",
            "30",
        ],
        &env,
    );
    let start = Instant::now();
    while !reached.exists() {
        if start.elapsed() > Duration::from_secs(120) || all_exited(&mut kids) {
            let res = wait_ranks(kids, Duration::ZERO);
            return Err(format!("rank {stall} never reached copying: {res:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for f in rewrite {
        let bytes = std::fs::read(f).unwrap();
        std::fs::write(f, &bytes).unwrap();
        let later = std::time::SystemTime::now() + Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(f)
            .and_then(|h| h.set_modified(later))
            .unwrap();
    }
    std::fs::write(&release, b"go").unwrap();
    let res = wait_ranks(kids, Duration::from_secs(120));
    for (r, (code, text, _)) in res.iter().enumerate() {
        if !matches!(code, Some(c) if *c != 0 && *c != -999) || text.contains("panicked") {
            return Err(format!("rank {r} exited {code:?}: {text}"));
        }
    }
    let all: String = res.iter().map(|(_, t, _)| t.as_str()).collect();
    let named = rewrite
        .iter()
        .any(|f| all.contains(&*f.file_name().unwrap().to_string_lossy()));
    if !(named && all.contains("changed while it was being read")) {
        return Err(format!(
            "no identity error naming the rewritten file: {all}"
        ));
    }
    if !listing(&out).is_empty() {
        return Err(format!("left {:?}", listing(&out)));
    }
    Ok(())
}

#[test]
fn source_rewritten_during_a_multirank_save() {
    let mut tally = Tally::default();
    // Node-local gather: rank 1 alone reads its shard, and sends it to rank 0.
    let (dir, template) = node_local(FSDP_W2, 2);
    let shard = dir.path().join("rank1/__1_0.distcp");
    tally.add(
        "node-local gather, rank 1's shard rewritten while it copies",
        rewritten_run(2, "gather", &template, &[shard], 1),
    );
    // Shared source, sharded: every data file rewritten while rank 1 is stalled.
    let t = tempfile::tempdir().unwrap();
    let ckpt = t.path().join("ckpt");
    copy_dir(&FSDP_W4.checkpoint(), &ckpt);
    let shards: Vec<PathBuf> = listing(&ckpt)
        .into_iter()
        .filter(|n| n.ends_with(".distcp"))
        .map(|n| ckpt.join(n))
        .collect();
    tally.add(
        "shared source, 3 ranks sharded, the shards rewritten while rank 1 copies",
        rewritten_run(3, "sharded", s(&ckpt), &shards, 1),
    );
    // DeepSpeed, node-local: rank 1's optimizer partition rewritten.
    let (dir, template) = node_local(ZERO3_W2, 2);
    let optim = dir.path().join("rank1").join(OPTIM1);
    tally.add(
        "DeepSpeed node-local gather, rank 1's optim file rewritten",
        rewritten_run(2, "gather", &template, &[optim], 1),
    );
    tally.finish("5. source rewritten during a save", true);
}
