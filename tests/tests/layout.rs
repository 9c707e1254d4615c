//! `runtime.g` offsets: the version table (used for stripped binaries) agrees with the
//! binary's own DWARF for every supported Go, and `inject functions` shows parameters with
//! their registers when DWARF is there.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use go_abi::GoBinary;
use go_abi::binary::runtime_layout_from_dwarf;
use go_abi::runtime::LayoutSource;
use xtask::{Flavor, build_fixture, inject_binary, output, test_toolchains};

#[test]
fn goid_table_matches_dwarf() -> Result<()> {
    for tc in test_toolchains()? {
        for flavor in [Flavor::Default, Flavor::Pie, Flavor::Race] {
            let exe = build_fixture("httpserver", &tc, flavor)?;
            let data = std::fs::read(&exe)?;
            let bin = GoBinary::parse(&data)?;
            let dwarf = bin.dwarf()?.context("default builds have DWARF")?;
            let from_dwarf = runtime_layout_from_dwarf(&dwarf)?.context("runtime.g in DWARF")?;
            let table =
                bin.runtime_layout_from_table().with_context(|| format!("Go {} not in the table", tc.version))?;
            ensure!(from_dwarf.source == LayoutSource::Dwarf && table.source == LayoutSource::Table);
            ensure!(
                (from_dwarf.goid, from_dwarf.stack_lo, from_dwarf.stack_hi, from_dwarf.stackguard0, from_dwarf.m)
                    == (table.goid, table.stack_lo, table.stack_hi, table.stackguard0, table.m)
                    && (from_dwarf.m_p, from_dwarf.p_id) == (table.m_p, table.p_id),
                "Go {} {}: DWARF {from_dwarf:?} vs table {table:?}",
                tc.version,
                flavor.name()
            );
        }
        let stripped = std::fs::read(build_fixture("httpserver", &tc, Flavor::Stripped)?)?;
        let bin = GoBinary::parse(&stripped)?;
        ensure!(bin.dwarf()?.is_none(), "stripped build has no DWARF");
        ensure!(bin.runtime_layout(None).is_some_and(|l| l.source == LayoutSource::Table));
    }
    Ok(())
}

#[test]
fn functions_show_parameters_and_registers() -> Result<()> {
    for tc in test_toolchains()? {
        let exe = build_fixture("funcs", &tc, Flavor::Default)?;
        let out = output(
            Command::new(inject_binary()?).args(["functions", "--json", "--exe"]).arg(&exe).arg("main.priceOf"),
        )?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
        let p = &rows[0]["params"];
        let loc = |i: usize| p[i]["location"].as_str().unwrap_or_default().to_string();
        ensure!(p[0]["name"] == "sku" && p[0]["type"] == "string" && loc(0) == "RAX,RBX", "Go {}: {p}", tc.version);
        ensure!(p[1]["name"] == "qty" && loc(1) == "RCX" && p[2]["name"] == "discount" && loc(2) == "X0", "{p}");
        ensure!(rows[0]["results"][0]["location"] == "RAX", "{}", rows[0]["results"]);
        // Stripped: the same function, no signature.
        let exe = build_fixture("funcs", &tc, Flavor::Stripped)?;
        let out = output(
            Command::new(inject_binary()?).args(["functions", "--json", "--exe"]).arg(&exe).arg("main.priceOf"),
        )?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
        ensure!(rows.len() == 1 && rows[0].get("params").is_none());
    }
    Ok(())
}
