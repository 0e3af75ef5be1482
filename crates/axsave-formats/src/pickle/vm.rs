//! The pickle machine: reads opcodes and builds a [`Pickle`], never executing anything.

use std::collections::HashMap;
use std::rc::Rc;

use super::error::{Limits, PickleError, PickleErrorKind};
use super::value::{Node, Object, Pickle, Value};

/// Reads a pickle with the default [`Limits`].
pub fn parse(data: &[u8]) -> Result<Pickle, PickleError> {
    parse_with_limits(data, Limits::default())
}

/// Reads a pickle. Data after `STOP` is ignored, as `pickle.load` does.
pub fn parse_with_limits(data: &[u8], limits: Limits) -> Result<Pickle, PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        op_pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Memo::default(),
        nodes: Vec::new(),
        depth: Vec::new(),
        memoized: Vec::new(),
        pushes: 0,
        last_memo_push: None,
        limits,
    };
    m.run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    op_pos: usize,
    stack: Vec<Value>,
    /// Stack heights at each `MARK`.
    marks: Vec<usize>,
    memo: Memo,
    nodes: Vec<Node>,
    /// Nesting depth of each node (1 for a container of scalars; at most `max_depth`).
    depth: Vec<u32>,
    /// Whether each node has been memoized.
    memoized: Vec<bool>,
    /// Values pushed so far, and that count at the last memo store.
    pushes: u64,
    last_memo_push: Option<u64>,
    limits: Limits,
}

type R<T> = Result<T, PickleError>;

/// The memo: picklers number entries 0, 1, 2, ... (MEMOIZE takes the next number), so entries
/// live in a vector; an index past its end (a hand-made pickle) goes to a map.
#[derive(Default)]
struct Memo {
    dense: Vec<Option<Value>>,
    sparse: HashMap<u64, Value>,
    len: usize,
}

impl Memo {
    /// Number of distinct indices stored (what `MEMOIZE` numbers the next entry).
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, idx: u64) -> Option<&Value> {
        match usize::try_from(idx).ok().and_then(|i| self.dense.get(i)) {
            Some(v) => v.as_ref(),
            None => self.sparse.get(&idx),
        }
    }

    fn put(&mut self, idx: u64, v: Value) {
        let i = usize::try_from(idx).unwrap_or(usize::MAX);
        let new = self.get(idx).is_none();
        if i < self.dense.len() {
            self.dense[i] = Some(v);
        } else if i == self.dense.len() && !self.sparse.contains_key(&idx) {
            self.dense.push(Some(v));
        } else {
            self.sparse.insert(idx, v);
        }
        if new {
            self.len += 1;
        }
    }
}

impl<'a> Machine<'a> {
    fn err<T>(&self, kind: PickleErrorKind) -> R<T> {
        Err(PickleError {
            offset: self.op_pos as u64,
            kind,
        })
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.data.len() => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => self.err(PickleErrorKind::Truncated),
        }
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }

    /// A length that must fit in the remaining data (so a lying length fails as truncation,
    /// never as a huge allocation).
    fn len(&mut self, n: u64) -> R<usize> {
        let remaining = (self.data.len() - self.pos) as u64;
        if n > remaining {
            return self.err(PickleErrorKind::Truncated);
        }
        Ok(n as usize)
    }

    fn line(&mut self) -> R<&'a [u8]> {
        let rest = &self.data[self.pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.pos += i + 1;
                Ok(&rest[..i])
            }
            None => self.err(PickleErrorKind::Truncated),
        }
    }

    fn utf8(&self, b: &[u8]) -> R<Rc<str>> {
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Rc::from(s)),
            Err(e) => self.err(PickleErrorKind::Malformed(format!("invalid UTF-8: {e}"))),
        }
    }

    fn push(&mut self, v: Value) -> R<()> {
        if self.stack.len() >= self.limits.max_stack {
            return self.err(PickleErrorKind::Limit(format!(
                "stack deeper than {}",
                self.limits.max_stack
            )));
        }
        self.stack.push(v);
        self.pushes += 1;
        Ok(())
    }

    fn pop(&mut self) -> R<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err(PickleErrorKind::StackUnderflow);
        }
        Ok(self.stack.pop().unwrap_or_default())
    }

    fn top(&self) -> R<&Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err(PickleErrorKind::StackUnderflow);
        }
        Ok(&self.stack[self.stack.len() - 1])
    }

    fn pop_mark(&mut self) -> R<Vec<Value>> {
        match self.marks.pop() {
            Some(h) => Ok(self.stack.split_off(h)),
            None => self.err(PickleErrorKind::NoMark),
        }
    }

    fn value_depth(&self, v: &Value) -> usize {
        match v {
            Value::Ref(i) => self.depth.get(*i).map_or(0, |&d| d as usize),
            _ => 0,
        }
    }

    /// Adds a node to the arena, checking the node and depth limits.
    fn alloc(&mut self, node: Node) -> R<Value> {
        if self.nodes.len() >= self.limits.max_nodes {
            return self.err(PickleErrorKind::Limit(format!(
                "more than {} objects",
                self.limits.max_nodes
            )));
        }
        let children: &[Value] = match &node {
            Node::Tuple(items) => items,
            Node::PersId(pid) => std::slice::from_ref(pid),
            Node::Object(o) => std::slice::from_ref(&o.args),
            _ => &[],
        };
        let d = 1 + children
            .iter()
            .map(|c| self.value_depth(c))
            .max()
            .unwrap_or(0);
        self.check_depth(d)?;
        self.nodes.push(node);
        self.depth.push(u32::try_from(d).unwrap_or(u32::MAX));
        self.memoized.push(false);
        Ok(Value::Ref(self.nodes.len() - 1))
    }

    fn check_depth(&self, d: usize) -> R<()> {
        if d > self.limits.max_depth {
            return self.err(PickleErrorKind::Limit(format!(
                "nesting deeper than {}",
                self.limits.max_depth
            )));
        }
        Ok(())
    }

    /// Records that `target` now contains `children`, raising its depth if needed.
    fn grow_depth(&mut self, target: usize, children: &[Value]) -> R<()> {
        let d = 1 + children
            .iter()
            .map(|c| self.value_depth(c))
            .max()
            .unwrap_or(0);
        if d > self.depth[target] as usize {
            self.check_depth(d)?;
            self.depth[target] = u32::try_from(d).unwrap_or(u32::MAX);
        }
        Ok(())
    }

    fn target(&self, v: &Value) -> R<usize> {
        match v {
            Value::Ref(i) if *i < self.nodes.len() => Ok(*i),
            other => self.err(PickleErrorKind::BadOperand(format!(
                "expected a container, found {other:?}"
            ))),
        }
    }

    /// Stores the top of the stack in the memo. Python's pickler memoizes each object once,
    /// right after making it; storing one value again (a file of nothing but `MEMOIZE` grew the
    /// memo by a 24-byte entry per byte of input) is refused, and the memo never holds more
    /// entries than [`Limits::max_nodes`].
    fn memo_put(&mut self, idx: u64) -> R<()> {
        let v = self.top()?.clone();
        let again = match v {
            Value::Ref(i) => self.memoized.get(i).copied().unwrap_or(false),
            _ => self.last_memo_push == Some(self.pushes),
        };
        if again {
            return self.err(PickleErrorKind::BadOperand(
                "the same value is memoized twice (no pickler writes this)".into(),
            ));
        }
        if let Value::Ref(i) = v {
            if let Some(m) = self.memoized.get_mut(i) {
                *m = true;
            }
        }
        self.last_memo_push = Some(self.pushes);
        if self.memo.len() >= self.limits.max_nodes && self.memo.get(idx).is_none() {
            return self.err(PickleErrorKind::Limit(format!(
                "more than {} memo entries",
                self.limits.max_nodes
            )));
        }
        self.memo.put(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u64) -> R<()> {
        match self.memo.get(idx) {
            Some(v) => {
                let v = v.clone();
                self.push(v)
            }
            None => self.err(PickleErrorKind::MissingMemo(idx)),
        }
    }

    fn decimal(&self, b: &[u8]) -> R<i64> {
        let s = std::str::from_utf8(b)
            .ok()
            .map(|s| s.trim_end_matches('L'))
            .unwrap_or("");
        match s {
            "00" => Ok(0),
            "01" => Ok(1),
            _ => s
                .parse::<i64>()
                .or_else(|e| self.err(PickleErrorKind::Malformed(format!("integer {s:?}: {e}")))),
        }
    }

    /// A decimal integer of any size (protocol 0's `INT` / `LONG`).
    fn decimal_value(&self, b: &[u8]) -> R<Value> {
        let text = std::str::from_utf8(b).unwrap_or("").trim_end_matches('L');
        if let Ok(v) = text.parse::<i64>() {
            return Ok(Value::Int(v));
        }
        let (neg, digits) = match text.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, text.strip_prefix('+').unwrap_or(text)),
        };
        if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) || digits.len() > 10_000
        {
            return self.err(PickleErrorKind::Malformed(format!("integer {text:?}")));
        }
        // Magnitude as little-endian bytes: multiply by ten and add, digit by digit.
        let mut mag: Vec<u8> = vec![0];
        for d in digits.bytes() {
            let mut carry = (d - b'0') as u32;
            for byte in mag.iter_mut() {
                let v = *byte as u32 * 10 + carry;
                *byte = v as u8;
                carry = v >> 8;
            }
            if carry > 0 {
                mag.push(carry as u8);
            }
        }
        mag.push(0); // room for the sign bit
        if neg {
            // Two's complement: invert and add one.
            let mut carry = 1u16;
            for byte in mag.iter_mut() {
                let v = (!*byte) as u16 + carry;
                *byte = v as u8;
                carry = v >> 8;
            }
        }
        Ok(self.long_bytes(&mag))
    }

    fn long_bytes(&self, b: &[u8]) -> Value {
        if b.is_empty() {
            return Value::Int(0);
        }
        if b.len() <= 8 {
            let neg = b[b.len() - 1] & 0x80 != 0;
            let mut buf = if neg { [0xffu8; 8] } else { [0u8; 8] };
            buf[..b.len()].copy_from_slice(b);
            return Value::Int(i64::from_le_bytes(buf));
        }
        Value::BigInt(Rc::from(b))
    }

    fn append_items(&mut self, target: Value, items: Vec<Value>) -> R<()> {
        let t = self.target(&target)?;
        self.grow_depth(t, &items)?;
        match &mut self.nodes[t] {
            Node::List(l) => l.extend(items),
            Node::Object(o) => o.list_items.extend(items),
            Node::Set(s) => s.extend(items),
            other => {
                let what = format!("cannot append to {}", node_kind(other));
                return self.err(PickleErrorKind::BadOperand(what));
            }
        }
        Ok(())
    }

    fn set_items(&mut self, target: Value, flat: Vec<Value>) -> R<()> {
        if flat.len() % 2 != 0 {
            return self.err(PickleErrorKind::BadOperand(
                "odd number of values for SETITEMS".into(),
            ));
        }
        let t = self.target(&target)?;
        self.grow_depth(t, &flat)?;
        let mut it = flat.into_iter();
        let mut pairs = Vec::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        match &mut self.nodes[t] {
            Node::Dict(d) => d.extend(pairs),
            Node::Object(o) => o.dict_items.extend(pairs),
            other => {
                let what = format!("cannot set items on {}", node_kind(other));
                return self.err(PickleErrorKind::BadOperand(what));
            }
        }
        Ok(())
    }

    fn call(&mut self, callable: Value, args: Value, kwargs: Option<Value>, newobj: bool) -> R<()> {
        let v = self.alloc(Node::Object(Box::new(Object {
            callable,
            args,
            kwargs,
            newobj,
            ..Object::default()
        })))?;
        self.push(v)
    }

    fn global(&mut self, module: Rc<str>, name: Rc<str>) -> R<()> {
        let v = self.alloc(Node::Global { module, name })?;
        self.push(v)
    }

    fn run(&mut self) -> R<Pickle> {
        loop {
            self.op_pos = self.pos;
            let op = self.u8()?;
            match op {
                // Protocol and framing.
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return self.err(PickleErrorKind::Protocol(p));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only; the frame's opcodes follow inline.
                    self.u64()?;
                }
                b'.' => {
                    if self.marks.is_empty() && self.stack.len() == 1 {
                        let root = self.stack.pop().unwrap_or_default();
                        return Ok(Pickle {
                            nodes: std::mem::take(&mut self.nodes),
                            root,
                        });
                    }
                    return self.err(PickleErrorKind::BadStop(self.stack.len()));
                }

                // Stack manipulation.
                b'(' => {
                    if self.marks.len() >= self.limits.max_depth {
                        return self.err(PickleErrorKind::Limit(format!(
                            "more than {} nested MARKs",
                            self.limits.max_depth
                        )));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }

                // Constants and numbers.
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?
                }
                b'I' => {
                    let line = self.line()?;
                    let v = match line {
                        b"00" => Value::Bool(false),
                        b"01" => Value::Bool(true),
                        _ => self.decimal_value(line)?,
                    };
                    self.push(v)?
                }
                b'L' => {
                    let line = self.line()?;
                    let v = self.decimal_value(line)?;
                    self.push(v)?
                }
                0x8a => {
                    let n = self.u8()? as u64;
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    let v = self.long_bytes(b);
                    self.push(v)?
                }
                0x8b => {
                    let n = self.u32()? as u64;
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    let v = self.long_bytes(b);
                    self.push(v)?
                }
                b'G' => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes(b.try_into().unwrap_or_default());
                    self.push(Value::Float(v))?
                }
                b'F' => {
                    let line = self.line()?;
                    let s = String::from_utf8_lossy(line);
                    match s.trim().parse::<f64>() {
                        Ok(v) => self.push(Value::Float(v))?,
                        Err(e) => {
                            return self
                                .err(PickleErrorKind::Malformed(format!("float {s:?}: {e}")));
                        }
                    }
                }

                // Strings and bytes.
                b'X' => {
                    let n = self.u32()? as u64;
                    self.unicode(n)?
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    self.unicode(n)?
                }
                0x8d => {
                    let n = self.u64()?;
                    self.unicode(n)?
                }
                b'V' => {
                    let line = self.line()?;
                    let s = raw_unicode_escape(line).map_or_else(
                        || self.err(PickleErrorKind::Malformed("bad \\u escape".into())),
                        Ok,
                    )?;
                    self.push(Value::Str(Rc::from(s)))?
                }
                b'B' => {
                    let n = self.u32()? as u64;
                    self.bytes(n)?
                }
                b'C' => {
                    let n = self.u8()? as u64;
                    self.bytes(n)?
                }
                0x8e | 0x96 => {
                    let n = self.u64()?;
                    self.bytes(n)?
                }
                b'T' => {
                    let n = self.u32()? as u64;
                    self.py2_string(n)?
                }
                b'U' => {
                    let n = self.u8()? as u64;
                    self.py2_string(n)?
                }
                b'S' => {
                    let line = self.line()?;
                    let inner = line
                        .strip_prefix(b"'")
                        .and_then(|l| l.strip_suffix(b"'"))
                        .or_else(|| line.strip_prefix(b"\"").and_then(|l| l.strip_suffix(b"\"")))
                        .unwrap_or(line);
                    let v = match std::str::from_utf8(inner) {
                        Ok(s) => Value::Str(Rc::from(s)),
                        Err(_) => Value::Bytes(Rc::from(inner)),
                    };
                    self.push(v)?
                }
                0x97 => return self.err(PickleErrorKind::Unsupported("NEXT_BUFFER")),
                0x98 => return self.err(PickleErrorKind::Unsupported("READONLY_BUFFER")),

                // Containers.
                b']' => {
                    let v = self.alloc(Node::List(Vec::new()))?;
                    self.push(v)?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Node::List(Vec::new()))?;
                    self.append_items(v.clone(), items)?;
                    self.push(v)?
                }
                b'a' => {
                    let item = self.pop()?;
                    let target = self.top()?.clone();
                    self.append_items(target, vec![item])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append_items(target, items)?
                }
                b')' => self.tuple(Vec::new())?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.tuple(items)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.tuple(items)?
                }
                b'}' => {
                    let v = self.alloc(Node::Dict(Vec::new()))?;
                    self.push(v)?
                }
                b'd' => {
                    let flat = self.pop_mark()?;
                    let v = self.alloc(Node::Dict(Vec::new()))?;
                    self.set_items(v.clone(), flat)?;
                    self.push(v)?
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let target = self.top()?.clone();
                    self.set_items(target, vec![key, value])?
                }
                b'u' => {
                    let flat = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.set_items(target, flat)?
                }
                0x8f => {
                    let v = self.alloc(Node::Set(Vec::new()))?;
                    self.push(v)?
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append_items(target, items)?
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Node::Set(Vec::new()))?;
                    self.append_items(v.clone(), items)?;
                    self.push(v)?
                }

                // Globals and calls: recorded, never executed.
                b'c' => {
                    let module = self.line()?;
                    let module = self.utf8(module)?;
                    let name = self.line()?;
                    let name = self.utf8(name)?;
                    self.global(module, name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(m, n)?,
                        _ => {
                            return self.err(PickleErrorKind::BadOperand(
                                "STACK_GLOBAL needs two strings".into(),
                            ));
                        }
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.call(callable, args, None, false)?
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.call(cls, args, None, true)?
                }
                0x92 => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.call(cls, args, Some(kwargs), true)?
                }
                b'i' => {
                    let module = self.line()?;
                    let module = self.utf8(module)?;
                    let name = self.line()?;
                    let name = self.utf8(name)?;
                    let items = self.pop_mark()?;
                    self.global(module, name)?;
                    let cls = self.pop()?;
                    self.tuple(items)?;
                    let args = self.pop()?;
                    self.call(cls, args, None, false)?
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return self.err(PickleErrorKind::StackUnderflow);
                    }
                    let cls = items.remove(0);
                    self.tuple(items)?;
                    let args = self.pop()?;
                    self.call(cls, args, None, false)?
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?.clone();
                    let t = self.target(&target)?;
                    self.grow_depth(t, std::slice::from_ref(&state))?;
                    match &mut self.nodes[t] {
                        Node::Object(o) => o.state = Some(state),
                        other => {
                            let what = format!("BUILD on {}", node_kind(other));
                            return self.err(PickleErrorKind::BadOperand(what));
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.alloc(Node::PersId(pid))?;
                    self.push(v)?
                }
                b'P' => {
                    let line = self.line()?;
                    let pid = Value::Str(self.utf8(line)?);
                    let v = self.alloc(Node::PersId(pid))?;
                    self.push(v)?
                }
                0x82..=0x84 => {
                    return self.err(PickleErrorKind::Unsupported(
                        "EXT (copyreg extension registry)",
                    ));
                }

                // Memo.
                b'p' => {
                    let line = self.line()?;
                    let idx = self.decimal(line)?;
                    self.memo_put(idx as u64)?
                }
                b'q' => {
                    let idx = self.u8()? as u64;
                    self.memo_put(idx)?
                }
                b'r' => {
                    let idx = self.u32()? as u64;
                    self.memo_put(idx)?
                }
                0x94 => {
                    let idx = self.memo.len() as u64;
                    self.memo_put(idx)?
                }
                b'g' => {
                    let line = self.line()?;
                    let idx = self.decimal(line)?;
                    self.memo_get(idx as u64)?
                }
                b'h' => {
                    let idx = self.u8()? as u64;
                    self.memo_get(idx)?
                }
                b'j' => {
                    let idx = self.u32()? as u64;
                    self.memo_get(idx)?
                }

                other => return self.err(PickleErrorKind::UnknownOpcode(other)),
            }
        }
    }

    fn unicode(&mut self, n: u64) -> R<()> {
        let n = self.len(n)?;
        let b = self.take(n)?;
        let s = self.utf8(b)?;
        self.push(Value::Str(s))
    }

    fn bytes(&mut self, n: u64) -> R<()> {
        let n = self.len(n)?;
        let b = self.take(n)?;
        self.push(Value::Bytes(Rc::from(b)))
    }

    /// A Python 2 `str`: text when it is UTF-8 (what `encoding="utf-8"` would give), else bytes.
    fn py2_string(&mut self, n: u64) -> R<()> {
        let n = self.len(n)?;
        let b = self.take(n)?;
        let v = match std::str::from_utf8(b) {
            Ok(s) => Value::Str(Rc::from(s)),
            Err(_) => Value::Bytes(Rc::from(b)),
        };
        self.push(v)
    }

    fn tuple(&mut self, items: Vec<Value>) -> R<()> {
        let v = self.alloc(Node::Tuple(items))?;
        self.push(v)
    }
}

/// Decodes Python's `raw-unicode-escape` (protocol 0 strings): bytes are Latin-1 characters,
/// except `\uXXXX` and `\UXXXXXXXX`.
fn raw_unicode_escape(b: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let width = match (b[i], b.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            (c, _) => {
                out.push(c as char);
                i += 1;
                continue;
            }
        };
        let hex = std::str::from_utf8(b.get(i + 2..i + 2 + width)?).ok()?;
        out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
        i += 2 + width;
    }
    Some(out)
}

fn node_kind(n: &Node) -> &'static str {
    match n {
        Node::List(_) => "a list",
        Node::Tuple(_) => "a tuple",
        Node::Dict(_) => "a dict",
        Node::Set(_) => "a set",
        Node::Global { .. } => "a global",
        Node::Object(_) => "an object",
        Node::PersId(_) => "a persistent id",
    }
}
