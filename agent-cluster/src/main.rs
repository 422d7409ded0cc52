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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cattle-cluster-agent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent_cluster::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("cattle-cluster-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
