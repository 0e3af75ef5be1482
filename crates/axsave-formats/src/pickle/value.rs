//! The value tree a pickle builds, and read-only accessors for the extractors.

use std::rc::Rc;

/// A value on the pickle stack or in a container.
///
/// Scalars are inline; every container or object lives in the [`Pickle`] arena and is referred
/// to by index, so that memo entries are shared (a list memoized before it is filled shows its
/// later items, as in Python).
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Value {
    /// `None`.
    #[default]
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A larger integer, as little-endian two's complement bytes.
    BigInt(Rc<[u8]>),
    /// A float.
    Float(f64),
    /// A `str`.
    Str(Rc<str>),
    /// A `bytes` or `bytearray`.
    Bytes(Rc<[u8]>),
    /// A container or object in the arena.
    Ref(usize),
}

/// A container or object built by the pickle.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// A `list`.
    List(Vec<Value>),
    /// A `tuple`.
    Tuple(Vec<Value>),
    /// A `dict`, as ordered pairs (keys may be any value, objects included).
    Dict(Vec<(Value, Value)>),
    /// A `set` or `frozenset`.
    Set(Vec<Value>),
    /// A global name (`GLOBAL` / `STACK_GLOBAL`); never resolved, never called.
    Global {
        /// The module, e.g. `torch._utils`.
        module: Rc<str>,
        /// The qualified name, e.g. `_rebuild_tensor_v2`.
        name: Rc<str>,
    },
    /// The result of a call the pickle asked for (`REDUCE`, `NEWOBJ`, `NEWOBJ_EX`, `INST`,
    /// `OBJ`). Nothing is called: the callable, its arguments and whatever the pickle did to the
    /// result afterwards (`BUILD`, `SETITEMS`, `APPENDS`) are recorded. Boxed: objects are a
    /// minority of nodes and four times the size of the others.
    Object(Box<Object>),
    /// A persistent id (`BINPERSID` / `PERSID`): how `torch.save` refers to storages.
    PersId(Value),
}

/// A recorded call: see [`Node::Object`].
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Object {
    /// What was called: usually a [`Node::Global`].
    pub callable: Value,
    /// The positional arguments (a tuple).
    pub args: Value,
    /// Keyword arguments (`NEWOBJ_EX` only).
    pub kwargs: Option<Value>,
    /// The state given by `BUILD`, if any.
    pub state: Option<Value>,
    /// Items set on the object by `SETITEM(S)` (e.g. an `OrderedDict`).
    pub dict_items: Vec<(Value, Value)>,
    /// Items appended by `APPEND(S)` (a list subclass).
    pub list_items: Vec<Value>,
    /// True for `NEWOBJ` (`cls.__new__(cls, *args)`), false for `REDUCE`.
    pub newobj: bool,
}

/// A parsed pickle: the arena of nodes and the top-level value.
#[derive(Clone, Debug, Default)]
pub struct Pickle {
    pub(crate) nodes: Vec<Node>,
    pub(crate) root: Value,
}

impl Pickle {
    /// The top-level value (what `pickle.load` would return).
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// The node a value refers to, if it is a reference.
    pub fn node(&self, v: &Value) -> Option<&Node> {
        match v {
            Value::Ref(i) => self.nodes.get(*i),
            _ => None,
        }
    }

    /// Number of nodes in the arena.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The string, if the value is a `str`.
    pub fn as_str<'a>(&self, v: &'a Value) -> Option<&'a str> {
        match v {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if the value is an int (or bool) that fits in an `i64`.
    pub fn as_int(&self, v: &Value) -> Option<i64> {
        match v {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The items, if the value is a tuple.
    pub fn as_tuple(&self, v: &Value) -> Option<&[Value]> {
        match self.node(v)? {
            Node::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// The items, if the value is a list, or a list subclass filled by `APPENDS`.
    pub fn as_list(&self, v: &Value) -> Option<&[Value]> {
        match self.node(v)? {
            Node::List(items) => Some(items),
            Node::Object(o) if !o.list_items.is_empty() => Some(&o.list_items),
            _ => None,
        }
    }

    /// The items of a tuple or a list.
    pub fn as_sequence(&self, v: &Value) -> Option<&[Value]> {
        self.as_tuple(v).or_else(|| self.as_list(v))
    }

    /// The pairs, if the value is a dict or a dict-like object filled by `SETITEMS` (such as
    /// `collections.OrderedDict()`).
    pub fn as_dict(&self, v: &Value) -> Option<&[(Value, Value)]> {
        match self.node(v)? {
            Node::Dict(items) => Some(items),
            Node::Object(o) => {
                let (module, name) = self.global(&o.callable)?;
                let dict_like = matches!(
                    (module, name),
                    ("collections", "OrderedDict") | ("builtins", "dict")
                ) || !o.dict_items.is_empty();
                dict_like.then_some(&o.dict_items[..])
            }
            _ => None,
        }
    }

    /// The value under a string key of a dict.
    pub fn dict_get<'a>(&'a self, v: &Value, key: &str) -> Option<&'a Value> {
        self.as_dict(v)?
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))
            .map(|(_, v)| v)
    }

    /// `(module, name)` if the value is a global.
    pub fn global<'a>(&'a self, v: &Value) -> Option<(&'a str, &'a str)> {
        match self.node(v)? {
            Node::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// The recorded call, if the value is one.
    pub fn as_object<'a>(&'a self, v: &Value) -> Option<&'a Object> {
        match self.node(v)? {
            Node::Object(o) => Some(&**o),
            _ => None,
        }
    }

    /// `(module, name)` of the class or function that made an object.
    pub fn class_of<'a>(&'a self, v: &Value) -> Option<(&'a str, &'a str)> {
        self.global(&self.as_object(v)?.callable)
    }

    /// The positional arguments of a recorded call.
    pub fn call_args<'a>(&'a self, v: &Value) -> Option<&'a [Value]> {
        self.as_tuple(&self.as_object(v)?.args)
    }

    /// The pid, if the value is a persistent id.
    pub fn as_persid<'a>(&'a self, v: &Value) -> Option<&'a Value> {
        match self.node(v)? {
            Node::PersId(p) => Some(p),
            _ => None,
        }
    }

    /// A short human description of a value for error messages (`"str"`, `"dict"`,
    /// `"torch.Size(...)"`).
    pub fn describe(&self, v: &Value) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::BigInt(_) => "big int".into(),
            Value::Float(f) => format!("float {f}"),
            Value::Str(s) => format!("str {s:?}"),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Ref(_) => match self.node(v) {
                Some(Node::List(l)) => format!("list of {}", l.len()),
                Some(Node::Tuple(t)) => format!("tuple of {}", t.len()),
                Some(Node::Dict(d)) => format!("dict of {}", d.len()),
                Some(Node::Set(s)) => format!("set of {}", s.len()),
                Some(Node::Global { module, name }) => format!("global {module}.{name}"),
                Some(Node::Object(o)) => match self.global(&o.callable) {
                    Some((m, n)) => format!("{m}.{n}(...)"),
                    None => "object".into(),
                },
                Some(Node::PersId(_)) => "persistent id".into(),
                None => "dangling reference".into(),
            },
        }
    }
}
