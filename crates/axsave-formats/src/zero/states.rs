//! Typed reading of the pickles: what a model-states file and an optimizer-states file hold
//! (shapes, groups, partition counts), each error naming the file.

use std::collections::{HashMap, HashSet};

use crate::error::Result;
use crate::pickle::{Pickle, Value};
use crate::torchsave::size_of;

use super::files::{Archive, FlatSrc};

/// An int, or an int enum pickled as REDUCE(EnumClass, (int,)) (`ZeroStageEnum.gradients`).
pub(super) fn int_of(p: &Pickle, v: &Value) -> Option<i64> {
    p.as_int(v).or_else(|| {
        p.call_args(v)
            .and_then(|a| a.first())
            .and_then(|x| p.as_int(x))
    })
}

/// Elements of a shape, failing on overflow.
pub(super) fn numel_of(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |a, &n| a.checked_mul(n))
}

/// An ordered `name → shape` dict.
pub(super) fn shape_dict(a: &Archive, v: &Value, what: &str) -> Result<Vec<(String, Vec<u64>)>> {
    let p = a.p();
    let items = p
        .as_dict(v)
        .ok_or_else(|| a.bad(format!("{what} is {}, not a dict", p.describe(v))))?;
    items
        .iter()
        .map(|(k, s)| {
            let name = p
                .as_str(k)
                .ok_or_else(|| a.bad(format!("a key of {what} is {}", p.describe(k))))?;
            let shape = size_of(p, s).ok_or_else(|| {
                a.bad(format!(
                    "{what}[{name:?}] is {}, not a shape",
                    p.describe(s)
                ))
            })?;
            if numel_of(&shape).is_none() {
                return Err(a.bad(format!("{what}[{name:?}]: shape {shape:?} overflows")));
            }
            Ok((name.to_string(), shape))
        })
        .collect()
}

/// An ordered `name → value` dict (`module`, `frozen_param_fragments`).
pub(super) fn value_dict(a: &Archive, v: &Value, what: &str) -> Result<Vec<(String, Value)>> {
    let p = a.p();
    let items = p
        .as_dict(v)
        .ok_or_else(|| a.bad(format!("{what} is {}, not a dict", p.describe(v))))?;
    items
        .iter()
        .map(|(k, x)| match p.as_str(k) {
            Some(name) => Ok((name.to_string(), x.clone())),
            None => Err(a.bad(format!("a key of {what} is {}", p.describe(k)))),
        })
        .collect()
}

/// What zero_to_fp32 takes from one `*_model_states.pt`.
pub(super) struct ModelStates {
    pub(super) arch: Archive,
    pub(super) buffer_names: HashSet<String>,
    pub(super) module: Vec<(String, Value)>,
    pub(super) param_shapes: Vec<Vec<(String, Vec<u64>)>>,
    pub(super) frozen_shapes: Vec<(String, Vec<u64>)>,
    pub(super) frozen_fragments: HashMap<String, Value>,
    /// alias → source.
    pub(super) shared: Vec<(String, String)>,
}

pub(super) fn model_states(arch: Archive) -> Result<ModelStates> {
    let p = arch.p();
    let root = p.root().clone();
    if p.as_dict(&root).is_none() {
        return Err(arch.bad(format!(
            "holds {}, not a model state dict",
            p.describe(&root)
        )));
    }
    let Some(bn) = p.dict_get(&root, "buffer_names") else {
        return Err(arch.bad(format!(
            "is not a model state checkpoint (no buffer_names; {})",
            arch.describe_keys(&root)
        )));
    };
    let buffer_names = p
        .as_sequence(bn)
        .and_then(|items| {
            items
                .iter()
                .map(|x| p.as_str(x).map(str::to_string))
                .collect()
        })
        .ok_or_else(|| arch.bad(format!("buffer_names is {}", p.describe(bn))))?;
    let module = value_dict(
        &arch,
        arch.key(&root, "module", "the model states")?,
        "module",
    )?;
    let ps = arch.key(&root, "param_shapes", "the model states")?;
    let groups = p.as_sequence(ps).ok_or_else(|| {
        arch.bad(format!(
            "param_shapes is {}: not saved with a ZeRO optimizer",
            p.describe(ps)
        ))
    })?;
    let param_shapes = groups
        .iter()
        .enumerate()
        .map(|(i, g)| shape_dict(&arch, g, &format!("param_shapes[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    let frozen_shapes = match p.dict_get(&root, "frozen_param_shapes") {
        None | Some(Value::None) => Vec::new(),
        Some(v) => shape_dict(&arch, v, "frozen_param_shapes")?,
    };
    let frozen_fragments = match p.dict_get(&root, "frozen_param_fragments") {
        None | Some(Value::None) => HashMap::new(),
        Some(v) => value_dict(&arch, v, "frozen_param_fragments")?
            .into_iter()
            .collect(),
    };
    let shared = match p.dict_get(&root, "shared_params") {
        None | Some(Value::None) => Vec::new(),
        Some(v) => value_dict(&arch, v, "shared_params")?
            .into_iter()
            .map(|(alias, src)| match p.as_str(&src) {
                Some(s) => Ok((alias, s.to_string())),
                None => Err(arch.bad(format!("shared_params[{alias:?}] is {}", p.describe(&src)))),
            })
            .collect::<Result<_>>()?,
    };
    Ok(ModelStates {
        arch,
        buffer_names,
        module,
        param_shapes,
        frozen_shapes,
        frozen_fragments,
        shared,
    })
}

/// What zero_to_fp32 takes from one `*_optim_states.pt`.
pub(super) struct OptimStates {
    pub(super) arch: Archive,
    /// `zero_stage` (absent in a BF16_Optimizer file).
    pub(super) stage: Option<i64>,
    /// `partition_count`, or its largest entry when it is a list (one per param group).
    pub(super) world: Option<u64>,
    /// The fp32 flat partitions, one per param group (stage 1/2) or sub-group (stage 3).
    pub(super) groups: Vec<FlatSrc>,
    /// `group_paddings`: this rank's tail padding per group (stage 1/2).
    pub(super) group_paddings: Vec<u64>,
    /// `param_alignment_paddings` (0.19.7+): per group, the padding after each parameter.
    pub(super) alignment: Option<Vec<Vec<u64>>>,
}

pub(super) fn optim_states(arch: Archive) -> Result<OptimStates> {
    let p = arch.p();
    let root = p.root().clone();
    let osd = arch
        .key(&root, "optimizer_state_dict", "the optimizer states")?
        .clone();
    let stage = p.dict_get(&osd, "zero_stage").and_then(|v| int_of(p, v));
    let world = match p.dict_get(&osd, "partition_count") {
        None => None,
        Some(v) => Some(
            partition_count(p, v)
                .ok_or_else(|| arch.bad(format!("partition_count is {}", p.describe(v))))?,
        ),
    };
    let group_paddings = match p
        .dict_get(&osd, "group_paddings")
        .and_then(|v| p.as_sequence(v))
    {
        Some(items) => items
            .iter()
            .map(|x| p.as_int(x).and_then(|i| u64::try_from(i).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| arch.bad("group_paddings holds a non-integer"))?,
        None => Vec::new(),
    };
    let alignment = match p.dict_get(&osd, "param_alignment_paddings") {
        None | Some(Value::None) => None,
        Some(v) => Some(int_lists(p, v).ok_or_else(|| {
            arch.bad(format!(
                "param_alignment_paddings is {}, not a list of integer lists",
                p.describe(v)
            ))
        })?),
    };
    Ok(OptimStates {
        arch,
        stage,
        world,
        groups: Vec::new(),
        group_paddings,
        alignment,
    })
}

/// `partition_count`: an int (stage 3), or a list with one per param group (stage 1/2), of which
/// zero_to_fp32 takes the largest (expert groups may be smaller).
pub(super) fn partition_count(p: &Pickle, v: &Value) -> Option<u64> {
    match p.as_sequence(v) {
        Some(items) => items
            .iter()
            .map(|x| p.as_int(x).and_then(|i| u64::try_from(i).ok()))
            .collect::<Option<Vec<u64>>>()?
            .into_iter()
            .max(),
        None => p.as_int(v).and_then(|i| u64::try_from(i).ok()),
    }
}

pub(super) fn int_lists(p: &Pickle, v: &Value) -> Option<Vec<Vec<u64>>> {
    p.as_sequence(v)?
        .iter()
        .map(|g| {
            p.as_sequence(g)?
                .iter()
                .map(|x| p.as_int(x).and_then(|i| u64::try_from(i).ok()))
                .collect()
        })
        .collect()
}

/// Reads the flat fp32 groups stored under `key` in an optimizer file.
pub(super) fn load_groups(o: &mut OptimStates, key: &str) -> Result<()> {
    let a = &o.arch;
    let p = a.p();
    let osd = a.key(p.root(), "optimizer_state_dict", "the optimizer states")?;
    let v = a.key(osd, key, "optimizer_state_dict")?;
    let items = p
        .as_sequence(v)
        .ok_or_else(|| a.bad(format!("{key} is {}, not a list", p.describe(v))))?;
    let groups = items
        .iter()
        .enumerate()
        .map(|(i, t)| a.flat(t, &format!("{key}[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    o.groups = groups;
    Ok(())
}
