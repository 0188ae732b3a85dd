//! `host compose …`: the CI side, over `cairn_builder`.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum ComposeCommand {}

pub fn run(cmd: ComposeCommand) -> Result<ExitCode> {
    match cmd {}
}
