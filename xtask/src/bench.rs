use anyhow::Result;
pub fn run(_name: Option<&str>) -> Result<()> {
    anyhow::bail!("bench: not yet")
}
