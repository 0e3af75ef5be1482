//! A pickle reader that builds values and never executes anything.
//!
//! Python's pickle is a small stack machine. This one runs every opcode of protocols 0 to 5
//! that plain data, PyTorch's DCP metadata, `torch.save`'s `data.pkl` and DeepSpeed's files
//! use, but where Python would import a global or call a function it only records what was
//! asked ([`Node::Global`], [`Node::Object`]). Typed extractors (the DCP metadata reader, the
//! `torch.save` tensor reader, the ZeRO reader) then read that tree.
//!
//! Containers live in an arena and are shared by reference, so memo entries behave as in
//! Python; dicts are ordered pairs, so keys may be objects (DCP's `MetadataIndex`). [`Limits`]
//! bound the nodes, the stack and the nesting depth; every error carries a byte offset.

mod error;
mod value;
mod vm;

pub use error::{Limits, PickleError, PickleErrorKind};
pub use value::{Node, Object, Pickle, Value};
pub use vm::{parse, parse_with_limits};

#[cfg(test)]
mod tests;
