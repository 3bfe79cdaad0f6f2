//! One module per subcommand.

pub mod bench;
pub mod chat;
pub mod demo;
pub mod inspect;
pub mod logits;
pub mod mem;
pub mod model_args;
pub mod report;
pub mod run;
pub mod synth;
