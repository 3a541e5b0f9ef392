//! The `jobcachefs` binary: the operator CLI, the plain-VM volume commands and the
//! local-path-provisioner hook, on top of the library's engine. The command line lives in
//! [`cli`]; this file only wires it to the process: parse, log, run, exit code.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(&args);
    match cli::run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
