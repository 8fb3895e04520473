//! terse: an inference server for small reasoning language models.
//!
//! The modules follow the data's trip: `model` turns weights and tokens into
//! logits, `tokenize` turns text into tokens and back, `engine` schedules many
//! sequences over one model, `server` speaks OpenAI's HTTP API; `config`
//! gathers the command line's settings from flags, environment and a file.

pub mod config;
pub mod engine;
pub mod eval;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod probe;
pub mod reasoning;
pub mod server;
pub mod tokenize;
