//! `terse eval`: token efficiency measured on math benchmarks.
//!
//! `data` loads a data set, `settings` parses the grid of reasoning controls,
//! `runner` sends every (problem, setting) pair to a running terse server and
//! `rows` appends one graded row per pair to a JSONL file, `report` summarises the
//! rows per setting, `plot` draws accuracy against tokens with the Pareto
//! front, and `cli` is the `terse eval` subcommand that ties them together.

pub mod cli;
pub mod data;
pub mod grade;
pub mod plot;
pub mod report;
pub mod rows;
pub mod runner;
pub mod settings;
