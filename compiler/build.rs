//! Lists the CPU names the LLVM being linked knows for x86-64 (`llc -mcpu=help`), so that
//! `--target-cpu` can refuse a name LLVM would ignore and then abort on ("64-bit code
//! requested on a subtarget that doesn't support it"). Without `llc` the list is empty and
//! names are not checked.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LLVM_SYS_221_PREFIX");
    let prefix = std::env::var("LLVM_SYS_221_PREFIX").unwrap_or_else(|_| "/usr/lib/llvm-22".into());
    let llc = PathBuf::from(prefix).join("bin/llc");
    let text = Command::new(&llc)
        .args(["-march=x86-64", "-mcpu=help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
        .unwrap_or_default();
    // "Available CPUs for this target:", then "  name - Select the name processor.", then
    // a blank line and the features.
    let cpus: Vec<&str> = text
        .split("Available CPUs for this target:")
        .nth(1)
        .and_then(|rest| rest.split("Available features").next())
        .map(|list| list.lines().filter_map(|l| l.split_whitespace().next()).filter(|w| *w != "-").collect())
        .unwrap_or_default();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("x86_cpus.rs");
    let body: String = cpus.iter().map(|c| format!("    {c:?},\n")).collect();
    std::fs::write(out, format!("/// x86-64 CPU names this LLVM knows (from `llc -mcpu=help`).\npub const X86_CPUS: &[&str] = &[\n{body}];\n"))
        .unwrap();
}
