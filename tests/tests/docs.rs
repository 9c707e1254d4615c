//! The command-line reference in docs/cli.md is what the CLI definition renders: an option
//! added, renamed or re-described without regenerating it fails here.

use anyhow::{Result, ensure};

#[test]
fn cli_reference_matches_the_cli() -> Result<()> {
    let rendered = xtask::output(std::process::Command::new(xtask::inject_binary()?).arg("cli-docs"))?;
    let path = xtask::workspace_root().join("docs/cli.md");
    let file = std::fs::read_to_string(&path)?;
    ensure!(rendered.contains("| `--pid PID` |") && rendered.contains("## `inject detach`"), "rendering lost options");
    if file != rendered {
        let line = file.lines().zip(rendered.lines()).position(|(a, b)| a != b).map_or(0, |i| i + 1);
        anyhow::bail!("{} differs from the CLI from line {line}: run `cargo xtask docs`", path.display());
    }
    Ok(())
}
