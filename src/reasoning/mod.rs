//! Controlling how long the model thinks: pure logic on logits and token ids,
//! with no HTTP and no model code, so it is tested on its own.

pub mod control;
pub mod modes;
pub mod phase;
pub mod probing;
pub mod profile;
pub mod stopping;
