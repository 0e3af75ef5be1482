//! Element types, as torch names them on disk and as safetensors names them in headers.

use std::fmt;

/// The element type of a tensor.
///
/// Covers every dtype that `torch.save`, DCP and safetensors can carry for model weights. Names
/// follow safetensors (`F32`, `BF16`, ...); [`DType::from_torch_name`] maps torch's own names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// `torch.bool`, one byte per element (0 or 1).
    Bool,
    /// `torch.uint8`.
    U8,
    /// `torch.int8`.
    I8,
    /// `torch.int16`.
    I16,
    /// `torch.uint16`.
    U16,
    /// `torch.int32`.
    I32,
    /// `torch.uint32`.
    U32,
    /// `torch.int64`.
    I64,
    /// `torch.uint64`.
    U64,
    /// `torch.float16` (IEEE half).
    F16,
    /// `torch.bfloat16`.
    BF16,
    /// `torch.float32`.
    F32,
    /// `torch.float64`.
    F64,
    /// `torch.complex64` (two f32).
    C64,
    /// `torch.float8_e4m3fn`.
    F8E4M3,
    /// `torch.float8_e5m2`.
    F8E5M2,
    /// `torch.float8_e8m0fnu`.
    F8E8M0,
    /// `torch.float8_e4m3fnuz`.
    F8E4M3Fnuz,
    /// `torch.float8_e5m2fnuz`.
    F8E5M2Fnuz,
    /// `torch.float4_e2m1fn_x2`: two packed fp4 (e2m1) values per byte, as MXFP4 / NVFP4
    /// weights are held. torch counts elements in bytes (pairs); safetensors writes it as `F4`
    /// with the last dimension in single fp4 values, twice torch's (see
    /// [`DType::header_shape`]).
    F4x2,
}

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 20] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::I16,
        DType::U16,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::C64,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::F8E8M0,
        DType::F8E4M3Fnuz,
        DType::F8E5M2Fnuz,
        DType::F4x2,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool
            | DType::U8
            | DType::I8
            | DType::F8E4M3
            | DType::F8E5M2
            | DType::F8E8M0
            | DType::F8E4M3Fnuz
            | DType::F8E5M2Fnuz
            | DType::F4x2 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 | DType::C64 => 8,
        }
    }

    /// True for the floating types that `--dtype` converts (f16, bf16, f32, f64).
    ///
    /// float8 kinds are floating too, but they are quantized storage whose meaning depends on
    /// scales kept elsewhere, so they are never converted; complex numbers are left alone too.
    pub fn is_convertible_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// The safetensors header name (`"F32"`, `"BF16"`, `"F8_E4M3"`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::C64 => "C64",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E8M0 => "F8_E8M0",
            DType::F8E4M3Fnuz => "F8_E4M3FNUZ",
            DType::F8E5M2Fnuz => "F8_E5M2FNUZ",
            DType::F4x2 => "F4",
        }
    }

    /// Parses a safetensors header name.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.safetensors_name() == name)
    }

    /// The safetensors crate's dtype.
    pub fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::Bool => S::BOOL,
            DType::U8 => S::U8,
            DType::I8 => S::I8,
            DType::I16 => S::I16,
            DType::U16 => S::U16,
            DType::I32 => S::I32,
            DType::U32 => S::U32,
            DType::I64 => S::I64,
            DType::U64 => S::U64,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::F32 => S::F32,
            DType::F64 => S::F64,
            DType::C64 => S::C64,
            DType::F8E4M3 => S::F8_E4M3,
            DType::F8E5M2 => S::F8_E5M2,
            DType::F8E8M0 => S::F8_E8M0,
            DType::F8E4M3Fnuz => S::F8_E4M3FNUZ,
            DType::F8E5M2Fnuz => S::F8_E5M2FNUZ,
            DType::F4x2 => S::F4,
        }
    }

    /// The dtype for a safetensors crate dtype (`F4` is held as torch's packed
    /// [`DType::F4x2`]), or `None` for the kinds torch cannot hold (F6).
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        DType::from_safetensors_name(&format!("{d:?}"))
    }

    /// torch's attribute name for the dtype (`torch.<name>`), as pickled by DCP metadata.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::I64 => "int64",
            DType::U64 => "uint64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::C64 => "complex64",
            DType::F8E4M3 => "float8_e4m3fn",
            DType::F8E5M2 => "float8_e5m2",
            DType::F8E8M0 => "float8_e8m0fnu",
            DType::F8E4M3Fnuz => "float8_e4m3fnuz",
            DType::F8E5M2Fnuz => "float8_e5m2fnuz",
            DType::F4x2 => "float4_e2m1fn_x2",
        }
    }

    /// The shape a safetensors header gives a tensor of this dtype and of torch `shape`: the
    /// same, except for packed fp4, whose last dimension counts single fp4 values (twice
    /// torch's), as `safetensors.torch.save_file` writes it. `None` for a 0-d packed fp4 tensor,
    /// which safetensors cannot describe (half a byte).
    pub fn header_shape(self, shape: &[u64]) -> Option<Vec<u64>> {
        let mut out = shape.to_vec();
        if self == DType::F4x2 {
            let last = out.last_mut()?;
            *last = last.checked_mul(2)?;
        }
        Some(out)
    }

    /// The torch shape of a tensor a safetensors header gives this dtype and `shape`: the
    /// inverse of [`DType::header_shape`]. `None` for a packed fp4 tensor whose last dimension
    /// is odd or that has none (torch's `float4_e2m1fn_x2` cannot hold it).
    pub fn torch_shape(self, shape: &[u64]) -> Option<Vec<u64>> {
        let mut out = shape.to_vec();
        if self == DType::F4x2 {
            let last = out.last_mut()?;
            if *last % 2 != 0 {
                return None;
            }
            *last /= 2;
        }
        Some(out)
    }

    /// Parses torch's dtype attribute name, aliases included (`float`, `half`, `long`, ...).
    pub fn from_torch_name(name: &str) -> Option<DType> {
        let alias = match name {
            "float" => Some(DType::F32),
            "double" => Some(DType::F64),
            "half" => Some(DType::F16),
            "long" => Some(DType::I64),
            "int" => Some(DType::I32),
            "short" => Some(DType::I16),
            "cfloat" => Some(DType::C64),
            _ => None,
        };
        alias.or_else(|| DType::ALL.into_iter().find(|d| d.torch_name() == name))
    }

    /// The dtype of a typed storage class (`FloatStorage`, `BFloat16Storage`, ...), as
    /// `torch.save` names it in a persistent id. `UntypedStorage` has no dtype of its own.
    pub fn from_storage_class(name: &str) -> Option<DType> {
        Some(match name {
            "BoolStorage" => DType::Bool,
            "ByteStorage" => DType::U8,
            "CharStorage" => DType::I8,
            "ShortStorage" => DType::I16,
            "IntStorage" => DType::I32,
            "LongStorage" => DType::I64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "ComplexFloatStorage" => DType::C64,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

impl serde::Serialize for DType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.safetensors_name())
    }
}

impl<'de> serde::Deserialize<'de> for DType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        DType::from_safetensors_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown dtype {name:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
            assert_eq!(DType::from_torch_name(d.torch_name()), Some(d));
            assert_eq!(DType::from_safetensors(d.to_safetensors()), Some(d));
            // torch packs two fp4 values in one element; safetensors counts single values.
            let per_element = if d == DType::F4x2 { 2 } else { 1 };
            assert_eq!(
                d.to_safetensors().bitsize() * per_element,
                d.size() * 8,
                "size of {d} disagrees with the safetensors crate"
            );
        }
        assert_eq!(DType::from_torch_name("half"), Some(DType::F16));
        assert_eq!(DType::from_torch_name("quint8"), None);
        assert_eq!(
            DType::from_storage_class("BFloat16Storage"),
            Some(DType::BF16)
        );
        assert_eq!(DType::from_storage_class("UntypedStorage"), None);
    }

    /// What `safetensors.torch.save_file` 0.8 writes for `float4_e2m1fn_x2` tensors of torch
    /// shapes (3,), (0, 4) and (2, 3, 1): F4 of shapes [6], [0, 8], [2, 3, 2]; a 0-d one it
    /// refuses ("does not end up at a byte boundary").
    #[test]
    fn packed_fp4_shapes_follow_safetensors() {
        let f4 = DType::F4x2;
        assert_eq!(DType::from_torch_name("float4_e2m1fn_x2"), Some(f4));
        assert_eq!(f4.safetensors_name(), "F4");
        assert_eq!(f4.header_shape(&[3]), Some(vec![6]));
        assert_eq!(f4.header_shape(&[0, 4]), Some(vec![0, 8]));
        assert_eq!(f4.header_shape(&[2, 3, 1]), Some(vec![2, 3, 2]));
        assert_eq!(f4.header_shape(&[]), None);
        assert_eq!(f4.torch_shape(&[2, 3, 2]), Some(vec![2, 3, 1]));
        assert_eq!(f4.torch_shape(&[5]), None);
        assert_eq!(f4.torch_shape(&[]), None);
        assert_eq!(DType::F32.header_shape(&[]), Some(vec![]));
        assert_eq!(DType::BF16.torch_shape(&[5]), Some(vec![5]));
        assert!(!f4.is_convertible_float());
    }
}
