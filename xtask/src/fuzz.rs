use anyhow::Result;
pub fn run(_seconds: u64) -> Result<()> {
    anyhow::bail!("fuzz: not yet")
}
