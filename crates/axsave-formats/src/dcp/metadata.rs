//! Typed reading of the metadata pickle: what a `.metadata` (or `__{rank}.metadata`) file says
//! about each tensor, its chunks and where each chunk was stored, and the consistency checks on it.

use std::collections::HashMap;
use std::path::Path;

use crate::dtype::DType;
use crate::error::{FormatError, Result};
use crate::pickle::{self, Pickle, Value};
use crate::torchsave::size_of;

/// One tensor's description in `.metadata`.
#[derive(Debug, Clone)]
pub(super) struct TensorMeta {
    pub(super) dtype: DType,
    pub(super) size: Vec<u64>,
    pub(super) chunks: Vec<(Vec<u64>, Vec<u64>)>,
}

/// Where one chunk was stored.
#[derive(Debug, Clone)]
pub(super) struct StorageInfo {
    pub(super) relative_path: String,
    pub(super) offset: u64,
    pub(super) length: u64,
    pub(super) transforms: Vec<String>,
}

/// What one metadata file holds.
#[derive(Default)]
pub(super) struct Metadata {
    /// Flat names in save order, with `None` for non-tensor items.
    pub(super) entries: Vec<(String, Option<TensorMeta>)>,
    pub(super) storage: HashMap<(String, Vec<u64>), StorageInfo>,
    pub(super) planner: HashMap<String, Vec<String>>,
    /// Whether `planner_data` was a dict (DefaultSavePlanner's name → path map).
    pub(super) has_planner: bool,
}

/// Parses a metadata pickle, building at most `max_objects` objects.
pub(super) fn parse_metadata_pickle(
    path: &Path,
    bytes: &[u8],
    max_objects: usize,
) -> Result<Pickle> {
    let limits = pickle::Limits {
        max_nodes: max_objects,
        ..pickle::Limits::default()
    };
    pickle::parse_with_limits(bytes, limits).map_err(|source| {
        if matches!(source.kind, pickle::PickleErrorKind::Limit(_)) {
            FormatError::invalid(
                path,
                format!(
                    "{source}: more than a DCP checkpoint of some 400,000 chunks needs; refused"
                ),
            )
        } else {
            FormatError::Pickle {
                path: path.to_path_buf(),
                base: 0,
                source,
            }
        }
    })
}

pub(super) fn parse_metadata(p: &Pickle, path: &Path) -> Result<Metadata> {
    let bad = |msg: String| FormatError::invalid(path, msg);
    let root = p.root();
    match p.class_of(root) {
        Some((_, "Metadata")) => {}
        _ => {
            return Err(bad(format!(
                "expected a torch.distributed.checkpoint Metadata object, found {}",
                p.describe(root)
            )));
        }
    }
    let state = state_of(p, root).ok_or_else(|| bad("Metadata has no state".into()))?;
    let sdm = p
        .dict_get(state, "state_dict_metadata")
        .and_then(|v| p.as_dict(v))
        .ok_or_else(|| bad("Metadata.state_dict_metadata is missing".into()))?;
    let mut out = Metadata::default();
    let mut names = std::collections::HashSet::with_capacity(sdm.len());
    for (k, v) in sdm {
        let name = p
            .as_str(k)
            .ok_or_else(|| bad(format!("a state_dict_metadata key is {}", p.describe(k))))?
            .to_string();
        if !names.insert(name.clone()) {
            return Err(bad(format!("state_dict_metadata names {name:?} twice")));
        }
        match p.class_of(v) {
            Some((_, "TensorStorageMetadata")) => {
                let t = tensor_meta(p, v).map_err(|m| bad(format!("tensor {name}: {m}")))?;
                out.entries.push((name, Some(t)));
            }
            Some((_, "BytesStorageMetadata")) => out.entries.push((name, None)),
            _ => {
                return Err(bad(format!(
                    "entry {name}: unknown storage metadata {}",
                    p.describe(v)
                )));
            }
        }
    }
    if let Some(sd) = p.dict_get(state, "storage_data").and_then(|v| p.as_dict(v)) {
        for (k, v) in sd {
            let (fqn, offset) = metadata_index(p, k).map_err(bad)?;
            let info = storage_info(p, v).map_err(|m| bad(format!("storage of {fqn}: {m}")))?;
            let key = (fqn, offset);
            if out.storage.contains_key(&key) {
                return Err(bad(format!(
                    "storage_data holds the chunk of {} at {:?} twice",
                    key.0, key.1
                )));
            }
            out.storage.insert(key, info);
        }
    } else {
        return Err(bad("Metadata.storage_data is missing".into()));
    }
    // DefaultSavePlanner records `{flat name: object path}` here; a custom planner may record
    // anything (or None), which is then not used.
    if let Some(pd) = p.dict_get(state, "planner_data").and_then(|v| p.as_dict(v)) {
        for (k, v) in pd {
            let fqn = p
                .as_str(k)
                .ok_or_else(|| bad(format!("a planner_data key is {}", p.describe(k))))?;
            let path: Option<Vec<String>> = p.as_sequence(v).and_then(|items| {
                items
                    .iter()
                    .map(|x| match x {
                        Value::Str(s) => Some(s.to_string()),
                        Value::Int(i) => Some(i.to_string()),
                        _ => None,
                    })
                    .collect()
            });
            let path = path.ok_or_else(|| {
                bad(format!(
                    "planner_data entry {fqn:?} is {}, not an object path",
                    p.describe(v)
                ))
            })?;
            if out.planner.insert(fqn.to_string(), path).is_some() {
                return Err(bad(format!("planner_data names {fqn:?} twice")));
            }
        }
        out.has_planner = true;
    }
    Ok(out)
}

/// Checks that the three parts of (merged) metadata describe the same items: every name has
/// one entry; every `storage_data` key names an entry (and, for a tensor, one of its chunks);
/// every chunk and every bytes item has storage; and, where `planner_data` was recorded, it
/// maps exactly the entries' names, each to the object path whose dotted form is the name (as
/// torch's `flatten_state_dict` makes it). A damaged byte in any of them would otherwise drop
/// or misplace a tensor silently.
pub(super) fn check_consistency(m: &Metadata, path: &Path) -> Result<()> {
    let bad = |msg: String| Err(FormatError::invalid(path, msg));
    let mut entries: HashMap<&str, Option<&TensorMeta>> = HashMap::with_capacity(m.entries.len());
    for (name, t) in &m.entries {
        if entries.insert(name.as_str(), t.as_ref()).is_some() {
            return bad(format!("state_dict_metadata names {name:?} twice"));
        }
    }
    for (fqn, offset) in m.storage.keys() {
        match entries.get(fqn.as_str()) {
            None => {
                return bad(format!(
                    "storage_data names {fqn:?}, which state_dict_metadata does not hold: the metadata is damaged"
                ));
            }
            Some(Some(t)) => {
                if !t.chunks.iter().any(|(o, _)| o == offset) {
                    return bad(format!(
                        "storage_data of tensor {fqn}: no chunk at {offset:?} in state_dict_metadata: the metadata is damaged"
                    ));
                }
            }
            Some(None) => {
                if !offset.is_empty() {
                    return bad(format!(
                        "storage_data of item {fqn}: an offset {offset:?} for a non-tensor item: the metadata is damaged"
                    ));
                }
            }
        }
    }
    for (name, t) in &m.entries {
        let missing = match t {
            // Ranks holding an empty shard save nothing for it.
            Some(t) => t
                .chunks
                .iter()
                .find(|(o, s)| {
                    !s.contains(&0) && !m.storage.contains_key(&(name.clone(), o.clone()))
                })
                .map(|(o, _)| format!("tensor {name}: no storage entry for the chunk at {o:?}")),
            None => (!m.storage.contains_key(&(name.clone(), Vec::new())))
                .then(|| format!("item {name}: no storage entry")),
        };
        if let Some(msg) = missing {
            return bad(format!("{msg}: the metadata is damaged"));
        }
    }
    if m.has_planner {
        for (fqn, obj_path) in &m.planner {
            if !entries.contains_key(fqn.as_str()) {
                return bad(format!(
                    "planner_data names {fqn:?}, which state_dict_metadata does not hold: the metadata is damaged"
                ));
            }
            if obj_path.join(".") != *fqn {
                return bad(format!(
                    "planner_data maps {fqn:?} to the path {obj_path:?}, whose name differs: the metadata is damaged"
                ));
            }
        }
        if let Some((name, _)) = m.entries.iter().find(|(n, _)| !m.planner.contains_key(n)) {
            return bad(format!(
                "tensor or item {name:?} of state_dict_metadata has no planner_data entry: the metadata is damaged"
            ));
        }
    }
    Ok(())
}

/// The `BUILD` state of an object (its `__dict__` or `__getstate__` result).
pub(super) fn state_of<'a>(p: &'a Pickle, v: &Value) -> Option<&'a Value> {
    p.as_object(v)?.state.as_ref()
}

/// A field of a dataclass pickled with a dict state.
pub(super) fn field<'a>(p: &'a Pickle, v: &Value, name: &str) -> Option<&'a Value> {
    p.dict_get(state_of(p, v)?, name)
}

pub(super) fn tensor_meta(p: &Pickle, v: &Value) -> std::result::Result<TensorMeta, String> {
    let props = field(p, v, "properties").ok_or("no properties")?;
    // TensorProperties pickles its state as a tuple (dtype, layout, requires_grad,
    // memory_format, pin_memory[, strides]) through __getstate__; older releases as a dict.
    let pstate = state_of(p, props).ok_or("properties without state")?;
    let dtype_v = match p.as_tuple(pstate) {
        Some(t) => t.first(),
        None => p.dict_get(pstate, "dtype"),
    }
    .ok_or("properties without dtype")?;
    let dtype = match p.global(dtype_v) {
        Some(("torch", n)) => {
            DType::from_torch_name(n).ok_or(format!("unsupported dtype torch.{n}"))?
        }
        _ => return Err(format!("dtype is {}", p.describe(dtype_v))),
    };
    let size = field(p, v, "size")
        .and_then(|s| size_of(p, s))
        .ok_or("size is not a torch.Size")?;
    // The size comes from the file. A tensor whose byte size does not fit in 64 bits is damage,
    // and would make every later numel()/nbytes() overflow: a partial read checks no coverage
    // that would catch it (found by fuzzing).
    if size
        .iter()
        .try_fold(dtype.size() as u64, |a, &n| a.checked_mul(n))
        .is_none()
    {
        return Err(format!("size {size:?} overflows 64 bits"));
    }
    let chunks_v = field(p, v, "chunks")
        .and_then(|c| p.as_sequence(c))
        .ok_or("chunks is not a list")?;
    let mut chunks = Vec::with_capacity(chunks_v.len());
    for c in chunks_v {
        let offsets = field(p, c, "offsets").and_then(|o| size_of(p, o));
        let sizes = field(p, c, "sizes").and_then(|o| size_of(p, o));
        match (offsets, sizes) {
            (Some(o), Some(s)) if o.len() == size.len() && s.len() == size.len() => {
                chunks.push((o, s))
            }
            _ => return Err("a chunk without offsets/sizes matching the tensor's rank".into()),
        }
    }
    Ok(TensorMeta {
        dtype,
        size,
        chunks,
    })
}

pub(super) fn metadata_index(
    p: &Pickle,
    v: &Value,
) -> std::result::Result<(String, Vec<u64>), String> {
    let fqn = field(p, v, "fqn")
        .and_then(|f| p.as_str(f))
        .ok_or_else(|| format!("a storage_data key is {}", p.describe(v)))?;
    // `offset` is absent (or None) for bytes items.
    let offset = match field(p, v, "offset") {
        None | Some(Value::None) => Vec::new(),
        Some(o) => size_of(p, o).ok_or_else(|| format!("storage_data key {fqn}: bad offset"))?,
    };
    Ok((fqn.to_string(), offset))
}

pub(super) fn storage_info(p: &Pickle, v: &Value) -> std::result::Result<StorageInfo, String> {
    let relative_path = field(p, v, "relative_path")
        .and_then(|f| p.as_str(f))
        .ok_or("no relative_path")?
        .to_string();
    let int = |n: &str| {
        field(p, v, n)
            .and_then(|x| p.as_int(x))
            .and_then(|i| u64::try_from(i).ok())
            .ok_or(format!("no {n}"))
    };
    let transforms = match field(p, v, "transform_descriptors") {
        None | Some(Value::None) => Vec::new(),
        Some(t) => p
            .as_sequence(t)
            .ok_or("transform_descriptors is not a list")?
            .iter()
            .map(|x| p.as_str(x).map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or("transform_descriptors holds a non-string")?,
    };
    Ok(StorageInfo {
        relative_path,
        offset: int("offset")?,
        length: int("length")?,
        transforms,
    })
}
