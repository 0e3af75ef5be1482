//! What happens to each base tensor: copied, replaced by the adapter's copy, or merged with a
//! LoRA delta. Everything is checked here, before any output file exists.

use std::collections::{BTreeMap, HashMap};

use axsave_formats::{Catalog, DType};

use super::config::AdapterConfig;
use super::math::{Combine, mergeable};
use crate::error::{CoreError, Result};

/// The prefix PEFT's saved adapter names carry (`PeftModel.base_model.model`).
pub const PEFT_PREFIX: &str = "base_model.model.";

/// A LoRA merge into one weight.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraOp {
    /// The adapter tensor `lora_A` / `lora_embedding_A`.
    pub a: usize,
    /// The adapter tensor `lora_B` / `lora_embedding_B`.
    pub b: usize,
    /// The rank.
    pub rank: usize,
    /// PEFT's scaling (`alpha / r` or `alpha / sqrt(r)`).
    pub scale: f64,
    /// The stored weight is `(B @ A)^T` (embeddings, `fan_in_fan_out`).
    pub transposed: bool,
    /// How the delta meets the weight.
    pub combine: Combine,
    /// DoRA's magnitude vector (an adapter tensor).
    pub magnitude: Option<usize>,
    /// The weight comes from the adapter (`<module>.base_layer.weight`, saved for embedding
    /// targets), not from the base.
    pub weight_from_adapter: Option<usize>,
}

/// What becomes of one base tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Written as the base has it.
    Copy,
    /// Replaced by an adapter tensor (`modules_to_save`), converted to the base's dtype.
    Replace(usize),
    /// Merged with a LoRA delta.
    Lora(LoraOp),
    /// `lora_bias`: `bias + lora_B.bias * scaling` (the adapter tensor and the scaling).
    Bias(usize, f64),
}

/// The op for every base tensor, by catalog index.
#[derive(Clone, Debug)]
pub struct MergePlan {
    /// One op per base catalog tensor.
    pub ops: Vec<Op>,
}

impl MergePlan {
    /// How many base tensors are merged, replaced and left as they are.
    pub fn counts(&self) -> (usize, usize, usize) {
        let merged = self
            .ops
            .iter()
            .filter(|o| matches!(o, Op::Lora(_) | Op::Bias(..)))
            .count();
        let replaced = self
            .ops
            .iter()
            .filter(|o| matches!(o, Op::Replace(_)))
            .count();
        (merged, replaced, self.ops.len() - merged - replaced)
    }
}

/// The parts an adapter holds for one module.
#[derive(Default)]
struct Parts {
    a: Option<usize>,
    b: Option<usize>,
    bias: Option<usize>,
    embedding: bool,
    magnitude: Option<usize>,
    base_layer: Option<usize>,
}

/// Records an adapter tensor as one part of its module.
type SetPart = fn(&mut Parts, usize);

fn err(msg: String) -> CoreError {
    CoreError::Merge(msg)
}

/// Decides the op of every base tensor from the adapter's tensors and config, checking names,
/// shapes and dtypes.
pub fn plan(base: &Catalog, adapter: &Catalog, cfg: &AdapterConfig) -> Result<MergePlan> {
    let by_name: HashMap<&str, usize> = base
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut ops = vec![Op::Copy; base.tensors.len()];
    let mut modules: BTreeMap<String, Parts> = BTreeMap::new();
    for (ai, t) in adapter.tensors.iter().enumerate() {
        let name = &t.name;
        let Some(rest) = name.strip_prefix(PEFT_PREFIX) else {
            return Err(err(format!(
                "adapter tensor {name} does not start with {PEFT_PREFIX}: not a PEFT adapter saved by save_pretrained"
            )));
        };
        if !matches!(t.dtype, DType::BF16 | DType::F16 | DType::F32) {
            return Err(err(format!(
                "adapter tensor {name} is {}: only bf16, fp16 and fp32 adapters are merged",
                t.dtype
            )));
        }
        let suffixes: [(&str, SetPart); 8] = [
            (".lora_A.weight", |p, i| p.a = Some(i)),
            (".lora_B.weight", |p, i| p.b = Some(i)),
            (".lora_B.bias", |p, i| p.bias = Some(i)),
            (".lora_embedding_A", |p, i| {
                p.a = Some(i);
                p.embedding = true
            }),
            (".lora_embedding_B", |p, i| {
                p.b = Some(i);
                p.embedding = true
            }),
            (".lora_magnitude_vector", |p, i| p.magnitude = Some(i)),
            (".lora_magnitude_vector.weight", |p, i| {
                p.magnitude = Some(i)
            }),
            (".base_layer.weight", |p, i| p.base_layer = Some(i)),
        ];
        if let Some((module, set)) = suffixes
            .iter()
            .find_map(|(s, set)| rest.strip_suffix(s).map(|m| (m, set)))
        {
            set(modules.entry(module.to_string()).or_default(), ai);
            continue;
        }
        if rest.contains("lora_") {
            return Err(err(format!(
                "adapter tensor {name}: a LoRA tensor of a kind axsave does not merge"
            )));
        }
        // A `modules_to_save` copy: it replaces the base tensor of the same name.
        let module = rest.rsplit_once('.').map_or("", |(m, _)| m);
        let listed = cfg.modules_to_save.iter().any(|m| {
            module == m
                || module.ends_with(&format!(".{m}"))
                || module.starts_with(&format!("{m}."))
        });
        if !listed {
            return Err(err(format!(
                "adapter tensor {name} is neither a LoRA tensor nor part of a module in modules_to_save {:?}",
                cfg.modules_to_save
            )));
        }
        let bi = base_tensor(&by_name, rest, name)?;
        check_replacement(base, adapter, bi, ai)?;
        ops[bi] = Op::Replace(ai);
    }

    for (module, p) in &modules {
        let weight = format!("{module}.weight");
        let any = p.a.or(p.b).or(p.bias).or(p.magnitude).or(p.base_layer);
        let Some(any) = any else { continue };
        let adapter_name = &adapter.tensors[any].name;
        let bi = base_tensor(&by_name, &weight, adapter_name)?;
        let (a, b) = match (p.a, p.b) {
            (Some(a), Some(b)) => (a, b),
            (None, None) if p.base_layer.is_some() => {
                check_replacement(base, adapter, bi, p.base_layer.unwrap_or(any))?;
                ops[bi] = Op::Replace(p.base_layer.unwrap_or(any));
                continue;
            }
            _ => {
                return Err(err(format!(
                    "adapter module {module} has lora_A or lora_B but not both (e.g. {adapter_name})"
                )));
            }
        };
        let wt = &base.tensors[bi];
        let (an, bn) = (&adapter.tensors[a], &adapter.tensors[b]);
        if !mergeable(wt.dtype) {
            return Err(err(format!(
                "{weight} is {}: only bf16, fp16 and fp32 weights are merged",
                wt.dtype
            )));
        }
        if wt.shape.len() != 2 || an.shape.len() != 2 || bn.shape.len() != 2 {
            return Err(err(format!(
                "{weight} {:?} with {} {:?} and {} {:?}: LoRA merges 2-D weights only",
                wt.shape, an.name, an.shape, bn.name, bn.shape
            )));
        }
        let rank = an.shape[0];
        let transposed = p.embedding || cfg.fan_in_fan_out;
        // W is (out, in) with A (r, in) and B (out, r); transposed W is (in, out).
        let (out_f, in_f) = if transposed {
            (wt.shape[1], wt.shape[0])
        } else {
            (wt.shape[0], wt.shape[1])
        };
        if an.shape != [rank, in_f] || bn.shape != [out_f, rank] {
            return Err(err(format!(
                "{} {:?} and {} {:?} do not fit {weight} {:?}{}",
                an.name,
                an.shape,
                bn.name,
                bn.shape,
                wt.shape,
                if transposed {
                    " (stored transposed)"
                } else {
                    ""
                }
            )));
        }
        let want = cfg.rank_of(module);
        if want != rank {
            return Err(err(format!(
                "{} has rank {rank} but adapter_config.json gives {module} rank {want}",
                an.name
            )));
        }
        if let Some(m) = p.magnitude {
            if adapter.tensors[m].shape != [out_f] {
                return Err(err(format!(
                    "{} {:?} does not fit {weight} {:?}",
                    adapter.tensors[m].name, adapter.tensors[m].shape, wt.shape
                )));
            }
        } else if cfg.use_dora {
            return Err(err(format!(
                "use_dora is set but the adapter has no lora_magnitude_vector for {module}"
            )));
        }
        if let Some(bl) = p.base_layer {
            check_replacement(base, adapter, bi, bl)?;
        }
        let scale = cfg.scaling_of(module);
        ops[bi] = Op::Lora(LoraOp {
            a,
            b,
            rank: rank as usize,
            scale,
            transposed,
            combine: if p.embedding {
                Combine::AddRounded
            } else {
                Combine::Add
            },
            magnitude: p.magnitude,
            weight_from_adapter: p.base_layer,
        });
        if let Some(bias) = p.bias {
            let bias_name = format!("{module}.bias");
            let bb = base_tensor(&by_name, &bias_name, &adapter.tensors[bias].name)?;
            let bt = &base.tensors[bb];
            if bt.shape != adapter.tensors[bias].shape || bt.shape != [out_f] {
                return Err(err(format!(
                    "{} {:?} does not fit {bias_name} {:?}",
                    adapter.tensors[bias].name, adapter.tensors[bias].shape, bt.shape
                )));
            }
            if !mergeable(bt.dtype) {
                return Err(err(format!("{bias_name} is {}: not merged", bt.dtype)));
            }
            ops[bb] = Op::Bias(bias, scale);
        }
    }
    Ok(MergePlan { ops })
}

/// The base tensor `name`, or an error naming the adapter tensor that wants it.
fn base_tensor(by_name: &HashMap<&str, usize>, name: &str, wanted_by: &str) -> Result<usize> {
    by_name.get(name).copied().ok_or_else(|| {
        err(format!(
            "adapter tensor {wanted_by} needs {name}, which the base model does not have"
        ))
    })
}

/// An adapter tensor may replace a base tensor of the same shape, in a dtype that converts.
fn check_replacement(base: &Catalog, adapter: &Catalog, bi: usize, ai: usize) -> Result<()> {
    let (bt, at) = (&base.tensors[bi], &adapter.tensors[ai]);
    if bt.shape != at.shape {
        return Err(err(format!(
            "adapter tensor {} {:?} does not fit {} {:?}",
            at.name, at.shape, bt.name, bt.shape
        )));
    }
    if bt.dtype != at.dtype && !mergeable(bt.dtype) {
        return Err(err(format!(
            "adapter tensor {} is {} but {} is {}: not converted",
            at.name, at.dtype, bt.name, bt.dtype
        )));
    }
    Ok(())
}
