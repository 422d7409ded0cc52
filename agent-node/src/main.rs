//! `cattle-node-agent`: see the library docs.

use std::process::ExitCode;

use agent_core::env::{Layered, ProcessEnv};
use agent_node::{Args, NodeConfig, RealHost};
use clap::Parser;

fn main() -> ExitCode {
    let args = Args::parse();
    let strings = Layered(args.to_strings(), ProcessEnv);
    let config = match NodeConfig::from_strings(&strings, &RealHost) {
        Ok(c) => c,
        Err(errs) => {
            eprintln!("cattle-node-agent: {errs}");
            return ExitCode::FAILURE;
        }
    };
    agent_core::init_logging(config.common.log_level);
    agent_core::run_to_exit("cattle-node-agent", agent_node::run(config))
}
