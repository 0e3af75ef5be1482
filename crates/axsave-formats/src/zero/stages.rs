//! Building the catalog from the parsed rank files: the stage and world size, the buffers, the
//! frozen parameters and the trainable ones, as zero_to_fp32 lays them out for stages 1/2 and 3.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::catalog::{
    Catalog, Checksum, Format, Piece, RecordCheck, Region, SourceFile, TensorEntry,
};
use crate::dtype::DType;
use crate::error::{FormatError, Result};

use super::files::{
    Archive, FlatSrc, MODEL_SUFFIX, OPTIM_SUFFIX, ckpt_files, output_dtype, rank_in_name,
};
use super::states::{
    ModelStates, OptimStates, int_of, load_groups, model_states, numel_of, optim_states,
};

/// Everything read from the rank files, and what the catalog is being built into.
pub(super) struct Build {
    /// The tag directory.
    pub(super) tdir: PathBuf,
    /// The tag directory relative to the catalog root.
    pub(super) rel: PathBuf,
    pub(super) partial: bool,
    pub(super) files: Vec<SourceFile>,
    pub(super) tensors: Vec<TensorEntry>,
    pub(super) notes: Vec<String>,
}

impl Build {
    pub(super) fn open(&mut self, name: &str) -> Result<Archive> {
        let path = self.tdir.join(name);
        let a = Archive::open(path, name.to_string(), self.files.len())?;
        self.files.push(SourceFile {
            path: self.rel.join(name),
            size: a.map.len() as u64,
        });
        Ok(a)
    }

    pub(super) fn bad(&self, msg: impl Into<String>) -> FormatError {
        FormatError::invalid(&self.tdir, msg)
    }

    /// Adds a tensor. Shapes come from the files (`param_shapes`, tensors' sizes) and only
    /// their element count is checked on reading: one whose bytes in the output dtype (fp32
    /// for stored bf16) overflow u64 is refused here, as every later `nbytes()` would overflow
    /// (found by fuzzing: a partial read, which checks no element counts, let one through).
    pub(super) fn push(
        &mut self,
        name: &str,
        dtype: DType,
        shape: Vec<u64>,
        pieces: Vec<Piece>,
    ) -> Result<()> {
        if numel_of(&shape)
            .and_then(|n| n.checked_mul(dtype.size() as u64))
            .is_none()
        {
            return Err(self.bad(format!(
                "tensor {name}: shape {shape:?} of {dtype} overflows 64 bits"
            )));
        }
        self.tensors.push(TensorEntry {
            name: name.to_string(),
            path: vec![name.to_string()],
            dtype,
            shape,
            pieces,
        });
        Ok(())
    }
}

/// Reads the rank files in `tdir`, giving file paths relative to `root`.
pub(super) fn read_in(root: &Path, tdir: &Path, partial: bool) -> Result<Catalog> {
    let rel = tdir
        .strip_prefix(root)
        .unwrap_or(Path::new(""))
        .to_path_buf();
    let mut b = Build {
        tdir: tdir.to_path_buf(),
        rel,
        partial,
        files: Vec::new(),
        tensors: Vec::new(),
        notes: Vec::new(),
    };
    let (models, mut optims) = open_rank_files(&mut b)?;
    let (stage, world) = stage_and_world(&b, &optims, &models)?;
    let key = if stage <= 2 {
        "single_partition_of_fp32_groups"
    } else {
        "fp32_flat_groups"
    };
    for o in &mut optims {
        load_groups(o, key)?;
    }
    let ranks = rank_order(&b, &optims, world)?;
    let m0 = model_for_metadata(&b, &models, stage)?;

    buffers(&mut b, m0)?;
    if stage <= 2 {
        frozen_stage2(&mut b, m0)?;
        trainable_stage12(&mut b, m0, &optims, &ranks, world)?;
        left_out_stage12(&mut b, m0, stage);
    } else {
        frozen_stage3(&mut b, m0, &models, world)?;
        trainable_stage3(&mut b, m0, &optims, &ranks, world)?;
    }
    drop_aliases(&mut b, m0);
    if !partial {
        for t in &b.tensors {
            t.check_coverage()
                .map_err(|msg| b.bad(format!("tensor {}: {msg}", t.name)))?;
        }
    }
    // The flat partitions are read in slices by many pieces: each whole record is checked.
    let mut records = Vec::new();
    for f in optims.iter().flat_map(|o| o.groups.iter()) {
        let r = RecordCheck {
            file: f.file,
            checksum: Checksum {
                offset: f.record.data_offset,
                len: f.record.size,
                crc32: f.record.crc32,
            },
        };
        if f.record.size > 0 && !records.contains(&r) {
            records.push(r);
        }
    }
    Ok(Catalog {
        format: Format::DeepSpeed { stage },
        root: root.to_path_buf(),
        files: b.files,
        tensors: b.tensors,
        writer_ranks: usize::try_from(world).ok(),
        skipped: Vec::new(),
        notes: b.notes,
        records,
    })
}

/// Opens and parses every rank file of the tag directory: the model states first, then the
/// optimizer states, as zero_to_fp32 does.
pub(super) fn open_rank_files(b: &mut Build) -> Result<(Vec<ModelStates>, Vec<OptimStates>)> {
    let tdir = b.tdir.clone();
    let model_names = ckpt_files(&tdir, MODEL_SUFFIX)?;
    let optim_names = ckpt_files(&tdir, OPTIM_SUFFIX)?;
    let none_seen = model_names.is_empty() && optim_names.is_empty();
    if none_seen || (!b.partial && (model_names.is_empty() || optim_names.is_empty())) {
        return Err(FormatError::NotACheckpoint {
            path: tdir,
            why: format!(
                "a ZeRO checkpoint needs *{MODEL_SUFFIX} and *{OPTIM_SUFFIX} files; {}found {} and {}",
                if b.partial { "this process " } else { "" },
                model_names.len(),
                optim_names.len()
            ),
        });
    }
    // Mixture-of-experts saves add `[layer_L_]expert_E_mp_rank_XX_model_states.pt`, which the
    // same glob matches; zero_to_fp32 then fails on them (they hold no buffer_names).
    if let Some(moe) = model_names.iter().find(|n| n.contains("expert_")) {
        return Err(FormatError::unsupported(
            tdir.join(moe),
            "a mixture-of-experts ZeRO checkpoint (zero_to_fp32 does not read it either)",
        ));
    }
    let models = model_names
        .iter()
        .map(|n| model_states(b.open(n)?))
        .collect::<Result<Vec<_>>>()?;
    let optims = optim_names
        .iter()
        .map(|n| optim_states(b.open(n)?))
        .collect::<Result<Vec<_>>>()?;
    Ok((models, optims))
}

/// The ZeRO stage and the data-parallel world size, from the first optimizer file (as
/// zero_to_fp32 does), checked against the number of optimizer files.
pub(super) fn stage_and_world(
    b: &Build,
    optims: &[OptimStates],
    models: &[ModelStates],
) -> Result<(u8, u64)> {
    let Some(o0) = optims.first() else {
        return stage_from_model_states(b, models);
    };
    let Some(stage) = o0.stage else {
        let p = o0.arch.p();
        let bf16_optimizer = p
            .dict_get(p.root(), "optimizer_state_dict")
            .and_then(|osd| p.dict_get(osd, "single_partition_of_fp32_groups"))
            .is_some();
        let hint = if bf16_optimizer {
            " (a BF16_Optimizer checkpoint: bf16 with ZeRO-1 and fp32 gradient accumulation, or pipeline parallelism; zero_to_fp32 cannot read it either)"
        } else {
            ""
        };
        return Err(o0
            .arch
            .bad(format!("is not a ZeRO checkpoint: no zero_stage{hint}")));
    };
    let stage = u8::try_from(stage)
        .ok()
        .filter(|s| *s <= 3)
        .ok_or_else(|| o0.arch.bad(format!("unknown zero stage {stage}")))?;
    let world = o0
        .world
        .filter(|w| *w > 0)
        .ok_or_else(|| o0.arch.bad("no usable partition_count"))?;
    if !b.partial && world != optims.len() as u64 {
        return Err(b.bad(format!(
            "expected {world} *{OPTIM_SUFFIX} files (partition_count in {}) but found {}: a rank did not save its file, or an older checkpoint was partly overwritten",
            o0.arch.name,
            optims.len()
        )));
    }
    for o in &optims[1..] {
        if o.stage.is_some_and(|s| s != i64::from(stage)) || o.world.is_some_and(|w| w != world) {
            return Err(o.arch.bad(format!(
                "records ZeRO stage {:?} and partition_count {:?}, but {} says stage {stage} over {world} ranks",
                o.stage, o.world, o0.arch.name
            )));
        }
    }
    Ok((stage, world))
}

/// A partial view with model states but no optimizer file: the stage from the saved config
/// (`ds_config.zero_optimization.stage`) and the world from `dp_world_size`.
pub(super) fn stage_from_model_states(b: &Build, models: &[ModelStates]) -> Result<(u8, u64)> {
    let Some(m) = models.first() else {
        return Err(b.bad(format!("no *{OPTIM_SUFFIX} file")));
    };
    let p = m.arch.p();
    let root = p.root();
    let stage = p
        .dict_get(root, "ds_config")
        .and_then(|c| p.dict_get(c, "zero_optimization"))
        .and_then(|z| p.dict_get(z, "stage"))
        .and_then(|s| int_of(p, s))
        .and_then(|s| u8::try_from(s).ok())
        .filter(|s| (1..=3).contains(s));
    let world = p
        .dict_get(root, "dp_world_size")
        .and_then(|w| p.as_int(w))
        .and_then(|w| u64::try_from(w).ok())
        .filter(|w| *w > 0);
    match (stage, world) {
        (Some(s), Some(w)) => Ok((s, w)),
        _ => Err(m.arch.bad(format!(
            "no *{OPTIM_SUFFIX} file is visible, and the model states do not record the ZeRO stage (ds_config) and dp_world_size"
        ))),
    }
}

/// The rank of each optimizer file: its position in natural order (zero_to_fp32), or, for a
/// partial view, the rank in its name.
pub(super) fn rank_order(b: &Build, optims: &[OptimStates], world: u64) -> Result<Vec<usize>> {
    if !b.partial {
        return Ok((0..optims.len()).collect());
    }
    optims
        .iter()
        .map(|o| {
            rank_in_name(&o.arch.name)
                .filter(|&r| (r as u64) < world)
                .ok_or_else(|| {
                    o.arch.bad(format!(
                        "no data-parallel rank below {world} in the name (zero_pp_rank_N)"
                    ))
                })
        })
        .collect()
}

/// The model-state file whose metadata is used: the first in natural order (rank 0's). A
/// partial view uses rank 0's for stage 1/2 (the only one) and any rank's for stage 3, whose
/// files all record the same shapes.
pub(super) fn model_for_metadata<'a>(
    b: &Build,
    models: &'a [ModelStates],
    stage: u8,
) -> Result<&'a ModelStates> {
    models.first().ok_or_else(|| {
        if stage <= 2 {
            b.bad(format!(
                "sees optimizer files but not mp_rank_00{MODEL_SUFFIX}, whose param_shapes say where each parameter lies in the partitions; make that file visible to this process"
            ))
        } else {
            b.bad(format!(
                "sees optimizer files but no *{MODEL_SUFFIX} file (each rank's records the parameter shapes)"
            ))
        }
    })
}

/// Whether a partial view holds rank 0's model-state file (the source of buffers and stage 2
/// frozen parameters); a full read always uses the first file.
pub(super) fn is_rank0_model(b: &Build, m: &ModelStates) -> bool {
    !b.partial || m.arch.name.starts_with("mp_rank_") || rank_in_name(&m.arch.name) == Some(0)
}

/// Persistent buffers, in `module` order, floating ones reported as fp32.
pub(super) fn buffers(b: &mut Build, m0: &ModelStates) -> Result<()> {
    let with_pieces = is_rank0_model(b, m0);
    for (name, v) in &m0.module {
        if !m0.buffer_names.contains(name) {
            continue;
        }
        let (t, piece) = m0.arch.whole(v, &format!("buffer {name}"))?;
        let pieces = if with_pieces {
            piece.into_iter().collect()
        } else {
            Vec::new()
        };
        b.push(name, output_dtype(t.dtype), t.shape, pieces)?;
    }
    Ok(())
}

/// Stage ≤ 2 frozen parameters: whole tensors from rank 0's `frozen_param_fragments`.
pub(super) fn frozen_stage2(b: &mut Build, m0: &ModelStates) -> Result<()> {
    let with_pieces = is_rank0_model(b, m0);
    for (name, _shape) in &m0.frozen_shapes {
        let v = m0.frozen_fragments.get(name).ok_or_else(|| {
            m0.arch.bad(format!(
                "frozen parameter {name} is in frozen_param_shapes but not in frozen_param_fragments"
            ))
        })?;
        // zero_to_fp32 outputs the fragment itself, so its shape is the one that counts.
        let (t, piece) = m0.arch.whole(v, &format!("frozen parameter {name}"))?;
        let pieces = if with_pieces {
            piece.into_iter().collect()
        } else {
            Vec::new()
        };
        b.push(name, output_dtype(t.dtype), t.shape, pieces)?;
    }
    Ok(())
}

/// Stage 3 frozen parameters: every rank's `frozen_param_fragments[name]` concatenated in rank
/// order, then cut to the parameter's size.
pub(super) fn frozen_stage3(
    b: &mut Build,
    m0: &ModelStates,
    models: &[ModelStates],
    world: u64,
) -> Result<()> {
    for (name, shape) in &m0.frozen_shapes {
        let numel = numel_of(shape).unwrap_or(0);
        let part = numel.div_ceil(world);
        let mut pieces = Vec::new();
        let mut dtype: Option<DType> = None;
        let mut start = 0u64;
        for m in models {
            let v = m.frozen_fragments.get(name).ok_or_else(|| {
                m.arch
                    .bad(format!("no frozen_param_fragments entry for {name}"))
            })?;
            let f = m.arch.flat(v, &format!("frozen fragment of {name}"))?;
            if dtype.is_some_and(|d| d != f.dtype) {
                return Err(m.arch.bad(format!(
                    "frozen fragment of {name} is {} but another rank's is {}",
                    f.dtype,
                    dtype.unwrap_or(f.dtype)
                )));
            }
            dtype = Some(f.dtype);
            // A full read follows the concatenation; a partial one places a fragment by its
            // rank, each rank holding `ceil(numel / world)` elements.
            let at = if b.partial {
                let r = rank_in_name(&m.arch.name).ok_or_else(|| {
                    m.arch
                        .bad("no data-parallel rank in the name (zero_pp_rank_N)")
                })? as u64;
                // The rank comes from a file name, not checked against the world size: a
                // position past u64 lies past the parameter (skipped below), as it should.
                r.saturating_mul(part)
            } else {
                let s = start;
                start += f.len;
                s
            };
            if at < numel && f.len > 0 {
                let len = f.len.min(numel - at);
                pieces.push(f.piece(0, at, len));
            }
        }
        if !b.partial && start < numel {
            return Err(b.bad(format!(
                "frozen parameter {name} has {numel} elements but the ranks' fragments hold only {start}"
            )));
        }
        let dtype = dtype.unwrap_or(DType::BF16);
        b.push(name, output_dtype(dtype), shape.clone(), pieces)?;
    }
    Ok(())
}

/// Where one rank's flat partitions start in zero_to_fp32's concatenation, per group.
pub(super) fn stage12_starts(b: &Build, optims: &[OptimStates], ranks: &[usize]) -> Vec<Vec<u64>> {
    if !b.partial {
        // A full read concatenates what the ranks saved, in file order.
        let mut acc: Vec<u64> = vec![0; optims.first().map_or(0, |o| o.groups.len())];
        return optims
            .iter()
            .map(|o| {
                let starts = acc.clone();
                for (a, g) in acc.iter_mut().zip(&o.groups) {
                    *a += g.len;
                }
                starts
            })
            .collect();
    }
    // Partitions are equal-sized (P) before each rank drops the part of it that lies in the
    // group's tail padding (`group_paddings`: 0, some, or all of P), so saved + padding = P and
    // rank r's partition starts at r × P.
    optims
        .iter()
        .zip(ranks)
        .map(|(o, &r)| {
            o.groups
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    // `group_paddings` comes from the file: a start past u64 (a damaged padding)
                    // is taken as lying past every element, so that it yields no piece (`cut`)
                    // and the merged catalog reports the elements missing.
                    let pad = o.group_paddings.get(i).copied().unwrap_or(0);
                    g.len
                        .checked_add(pad)
                        .and_then(|p| p.checked_mul(r as u64))
                        .unwrap_or(u64::MAX)
                })
                .collect()
        })
        .collect()
}

/// Stage 1/2 trainable parameters: walk `param_shapes[i]` through the concatenation of every
/// rank's partition of group `i`; a parameter may straddle ranks.
pub(super) fn trainable_stage12(
    b: &mut Build,
    m0: &ModelStates,
    optims: &[OptimStates],
    ranks: &[usize],
    world: u64,
) -> Result<()> {
    let n_groups = optims
        .first()
        .map_or(m0.param_shapes.len(), |o| o.groups.len());
    for o in optims {
        if o.groups.len() != n_groups {
            return Err(o.arch.bad(format!(
                "holds {} fp32 partitions but {} holds {n_groups}",
                o.groups.len(),
                optims[0].arch.name
            )));
        }
    }
    if !optims.is_empty() && m0.param_shapes.len() != n_groups {
        return Err(m0.arch.bad(format!(
            "param_shapes lists {} parameter groups but the optimizer files hold {n_groups} fp32 partitions",
            m0.param_shapes.len()
        )));
    }
    let starts = stage12_starts(b, optims, ranks);
    // zero_to_fp32 reads param_alignment_paddings from the first file; every rank saves the
    // same lists.
    let alignment = optims.first().and_then(|o| o.alignment.as_ref());
    for (i, shapes) in m0.param_shapes.iter().enumerate() {
        let pads = match alignment {
            Some(a) => {
                let g = a.get(i).ok_or_else(|| {
                    optims[0]
                        .arch
                        .bad(format!("param_alignment_paddings has no group {i}"))
                })?;
                if g.len() != shapes.len() {
                    return Err(optims[0].arch.bad(format!(
                        "expected {} parameter alignment paddings for group {i}, but found {}",
                        shapes.len(),
                        g.len()
                    )));
                }
                Some(g)
            }
            None => None,
        };
        let spans: Vec<(u64, &FlatSrc)> = optims
            .iter()
            .enumerate()
            .map(|(k, o)| (starts[k][i], &o.groups[i]))
            .collect();
        let avail: u64 = spans.iter().map(|(_, f)| f.len).sum();
        let mut off = 0u64;
        for (j, (name, shape)) in shapes.iter().enumerate() {
            let numel = numel_of(shape).unwrap_or(0);
            // Sizes and paddings come from the files; offsets past u64 are damage (found by
            // fuzzing: huge param_alignment_paddings overflowed `off` in a partial read, which
            // checks no element counts).
            let overflow = |b: &Build| {
                b.bad(format!(
                    "parameter {name} (group {i}): element offsets overflow 64 bits (param_shapes or param_alignment_paddings are damaged)"
                ))
            };
            let Some(end) = off.checked_add(numel) else {
                return Err(overflow(b));
            };
            if !b.partial && end > avail {
                return Err(b.bad(format!(
                    "parameter {name} (group {i}) needs elements {off}..{end} but the ranks' partitions of that group hold {avail}"
                )));
            }
            let pieces = cut(&spans, off, numel);
            let dtype = spans.first().map_or(DType::F32, |(_, f)| f.dtype);
            b.push(name, output_dtype(dtype), shape.clone(), pieces)?;
            let Some(next) = end.checked_add(pads.map_or(0, |p| p[j])) else {
                return Err(overflow(b));
            };
            off = next;
        }
        // zero_to_fp32's sanity check: both ends agree once rounded up to 2 × world (the
        // nccl_start_alignment_factor of 2 times the data-parallel size). `None` when the
        // paddings pushed `off` so far that rounding it up overflows: no match either.
        let align = |x: u64| x.div_ceil(2 * world).checked_mul(2 * world);
        if !b.partial && align(off) != align(avail) {
            return Err(b.bad(format!(
                "consumed {} numels out of {} in parameter group {i} - something is wrong (param_shapes do not match the fp32 partitions)",
                align(off).unwrap_or(off),
                align(avail).unwrap_or(avail)
            )));
        }
    }
    Ok(())
}

/// The pieces of elements `[off, off + numel)` of a concatenation of runs, each given with
/// its start in the concatenation. Runs not present (a partial view) simply yield nothing.
pub(super) fn cut(spans: &[(u64, &FlatSrc)], off: u64, numel: u64) -> Vec<Piece> {
    let end = off + numel;
    let mut pieces = Vec::new();
    for &(s, f) in spans {
        let lo = off.max(s);
        // A run's end past u64 is past `end` anyway (starts may be u64::MAX: stage12_starts).
        let hi = end.min(s.saturating_add(f.len));
        if lo < hi {
            pieces.push(f.piece(lo - s, lo - off, hi - lo));
        }
    }
    pieces
}

/// A rank's flat runs, each with its first element's position in the rank's flat space.
pub(super) type Runs<'a> = Vec<(u64, &'a FlatSrc)>;

/// `groups` end to end.
pub(super) fn runs(groups: &[FlatSrc]) -> Runs<'_> {
    let mut at = 0;
    groups
        .iter()
        .map(|g| {
            let start = at;
            at += g.len;
            (start, g)
        })
        .collect()
}

/// Elements in a rank's runs.
pub(super) fn run_total(runs: &[(u64, &FlatSrc)]) -> u64 {
    runs.iter().map(|(_, g)| g.len).sum()
}

/// Stage 3's `param_shapes` groups merged into one dict, as zero_to_fp32 does: a repeated name
/// keeps its first position and its last shape.
pub(super) fn merged_shapes(m0: &ModelStates) -> Vec<(String, Vec<u64>)> {
    let mut merged: Vec<(String, Vec<u64>)> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for (name, shape) in m0.param_shapes.iter().flatten() {
        match at.get(name.as_str()) {
            Some(&k) => merged[k].1 = shape.clone(),
            None => {
                at.insert(name, merged.len());
                merged.push((name.clone(), shape.clone()));
            }
        }
    }
    merged
}

/// Stage 3 trainable parameters: in each rank's flat space (its `fp32_flat_groups` end to end)
/// every parameter takes `ceil(numel / world)` elements at the same running offset; rank r's
/// share is elements `[r × part, (r + 1) × part)` of the parameter, cut to its size.
pub(super) fn trainable_stage3(
    b: &mut Build,
    m0: &ModelStates,
    optims: &[OptimStates],
    ranks: &[usize],
    world: u64,
) -> Result<()> {
    // zero_to_fp32 takes the group boundaries from rank 0 and uses them on every rank.
    if let Some(o0) = optims.first().filter(|_| !b.partial) {
        let sizes = |o: &OptimStates| o.groups.iter().map(|g| g.len).collect::<Vec<u64>>();
        for o in &optims[1..] {
            if sizes(o) != sizes(o0) {
                return Err(o.arch.bad(format!(
                    "fp32_flat_groups sizes {:?} differ from {}'s {:?}",
                    sizes(o),
                    o0.arch.name,
                    sizes(o0)
                )));
            }
        }
    }
    let rank_runs: Vec<Runs> = optims.iter().map(|o| runs(&o.groups)).collect();
    let mut offset = 0u64;
    for (name, shape) in merged_shapes(m0) {
        let numel = numel_of(&shape).unwrap_or(0);
        let part = numel.div_ceil(world);
        let mut pieces = Vec::new();
        let mut dtype = DType::F32;
        for ((o, &r), spans) in optims.iter().zip(ranks).zip(&rank_runs) {
            let have = run_total(spans);
            // `part` comes from param_shapes: with one rank it is a whole parameter's element
            // count, which may be near u64::MAX in a damaged file.
            if offset.checked_add(part).is_none_or(|e| e > have) {
                return Err(o.arch.bad(format!(
                    "parameter {name} needs elements {offset}..{} of this rank's fp32_flat_groups, which hold {have}",
                    offset.saturating_add(part)
                )));
            }
            dtype = spans.first().map_or(dtype, |(_, g)| g.dtype);
            let Some(lo) = (r as u64).checked_mul(part).filter(|&lo| lo < numel) else {
                continue;
            };
            for mut p in cut(spans, offset, part.min(numel - lo)) {
                if let Region::Flat { start, .. } = &mut p.region {
                    *start += lo;
                }
                pieces.push(p);
            }
        }
        b.push(&name, output_dtype(dtype), shape, pieces)?;
        offset += part;
    }
    if let Some(spans) = rank_runs.first().filter(|_| !b.partial) {
        let avail = run_total(spans);
        if offset != avail {
            return Err(b.bad(format!(
                "consumed {} numels out of {} - something is wrong (param_shapes do not match fp32_flat_groups)",
                offset * world,
                avail * world
            )));
        }
    }
    Ok(())
}

/// Stage ≤ 2: names the model states hold in `module` that zero_to_fp32 leaves out (frozen
/// parameters under ZeRO-1, which records no `frozen_param_shapes`).
pub(super) fn left_out_stage12(b: &mut Build, m0: &ModelStates, stage: u8) {
    let out: HashSet<&str> = b.tensors.iter().map(|t| t.name.as_str()).collect();
    let aliases: HashSet<&str> = m0.shared.iter().map(|(a, _)| a.as_str()).collect();
    let missing: Vec<&str> = m0
        .module
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !out.contains(k) && !aliases.contains(k) && !m0.buffer_names.contains(*k))
        .collect();
    if !missing.is_empty() {
        b.notes.push(format!(
            "left out {}: the model states hold them (16-bit) but zero_to_fp32 does not output them (frozen parameters under ZeRO-{stage}, which saves no frozen_param_shapes)",
            missing.join(", ")
        ));
    }
}

/// Tied parameters: zero_to_fp32 appends each alias as the source tensor itself; the catalog
/// keeps the source once and says which alias it dropped.
pub(super) fn drop_aliases(b: &mut Build, m0: &ModelStates) {
    for (alias, source) in &m0.shared {
        if b.tensors.iter().any(|t| &t.name == source) {
            b.notes.push(format!(
                "dropped {alias}: it is tied to {source} (DeepSpeed shared_params); safetensors forbids aliases, and transformers re-ties it on load"
            ));
        }
    }
}
