//! Which tensors `--dtype` leaves alone although they are floating: the scales of quantized
//! (float8 / packed fp4) weights.
//!
//! An fp8 or fp4 weight is only meaningful with its scales (DeepSeek's blockwise
//! `weight_scale_inv`, compressed-tensors' and ModelOpt's `weight_scale`, NVFP4's
//! `weight_scale_2`, static activation `input_scale`), and those are usually F32: rounding them
//! to bf16 would change every dequantized value. The weights themselves are never converted
//! (see [`axsave_formats::DType::is_convertible_float`]).

use axsave_formats::DType;

/// Last name segments of scale tensors.
pub const SCALE_SUFFIXES: [&str; 4] = [
    "weight_scale_inv",
    "weight_scale",
    "weight_scale_2",
    "input_scale",
];

/// Whether a dtype is quantized storage: float8 of any kind, or packed fp4.
pub fn is_quantized(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F8E4M3
            | DType::F8E5M2
            | DType::F8E8M0
            | DType::F8E4M3Fnuz
            | DType::F8E5M2Fnuz
            | DType::F4x2
    )
}

/// Whether the tensor `name` is the scale of a quantized weight, and so keeps its dtype under
/// `--dtype`: its last dotted segment is one of [`SCALE_SUFFIXES`] and its module's weight
/// (the same name with that segment replaced by `weight`) exists with a float8 or packed fp4
/// dtype. `dtype_of` gives the dtype of another tensor by (output) name. A scale next to a
/// bf16 or f32 weight is an ordinary tensor and is converted like the others.
pub fn is_quantization_scale(name: &str, dtype_of: impl Fn(&str) -> Option<DType>) -> bool {
    let (module, leaf) = match name.rsplit_once('.') {
        Some((m, l)) => (Some(m), l),
        None => (None, name),
    };
    if !SCALE_SUFFIXES.contains(&leaf) {
        return false;
    }
    let weight = match module {
        Some(m) => format!("{m}.weight"),
        None => "weight".to_string(),
    };
    dtype_of(&weight).is_some_and(is_quantized)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn scales_of_fp8_and_fp4_weights_only() {
        let dtypes: HashMap<&str, DType> = [
            ("l.0.mlp.down_proj.weight", DType::F8E4M3),
            ("l.0.mlp.down_proj.weight_scale_inv", DType::F32),
            ("l.0.mlp.up_proj.weight", DType::F4x2),
            ("l.0.mlp.up_proj.weight_scale", DType::F32),
            ("l.0.mlp.up_proj.weight_scale_2", DType::F32),
            ("l.0.mlp.up_proj.input_scale", DType::F32),
            ("l.0.mlp.gate_proj.weight", DType::BF16),
            ("l.0.mlp.gate_proj.weight_scale", DType::F32),
            ("l.0.orphan.weight_scale_inv", DType::F32),
            ("weight", DType::F8E5M2),
            ("weight_scale", DType::F32),
        ]
        .into_iter()
        .collect();
        let keep = |n: &str| is_quantization_scale(n, |w| dtypes.get(w).copied());
        assert!(keep("l.0.mlp.down_proj.weight_scale_inv"));
        assert!(keep("l.0.mlp.up_proj.weight_scale"));
        assert!(keep("l.0.mlp.up_proj.weight_scale_2"));
        assert!(keep("l.0.mlp.up_proj.input_scale"));
        assert!(keep("weight_scale"));
        // Next to a bf16 weight, or with no weight at all: an ordinary tensor.
        assert!(!keep("l.0.mlp.gate_proj.weight_scale"));
        assert!(!keep("l.0.orphan.weight_scale_inv"));
        // Not a scale name: the weights themselves, lookalikes.
        assert!(!keep("l.0.mlp.down_proj.weight"));
        assert!(!keep("l.0.mlp.down_proj.my_weight_scale_inv"));
        assert!(!keep("l.0.mlp.down_proj.weight_scale_inv.x"));
    }
}
