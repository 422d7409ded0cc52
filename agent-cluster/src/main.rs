//! `cattle-cluster-agent`: see the library docs.

use std::process::ExitCode;

use agent_cluster::{Args, ClusterConfig};
use agent_core::env::{Layered, ProcessEnv};
use clap::Parser;

fn main() -> ExitCode {
    let args = Args::parse();
    let strings = Layered(args.to_strings(), ProcessEnv);
    let config = match ClusterConfig::from_strings(&strings) {
        Ok(c) => c,
        Err(errs) => {
            eprintln!("cattle-cluster-agent: {errs}");
            return ExitCode::FAILURE;
        }
    };
    agent_core::init_logging(config.common.log_level);
    agent_core::run_to_exit("cattle-cluster-agent", agent_cluster::run(config))
}
