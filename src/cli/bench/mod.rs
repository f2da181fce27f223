//! `hbone bench`: the benchmark suite (being built; see issue 3).

use clap::Args;

#[derive(Args)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("hbone bench is not built yet")
}
