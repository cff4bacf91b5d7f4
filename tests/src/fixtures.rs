//! Artefacts built on the fly for tests.
//!
//! # Theory of operation
//!
//! The verifier-rejection test needs an eBPF ELF object that loads (aya
//! finds the programs by symbol name in a `classifier` section) but that
//! the kernel verifier refuses. [`invalid_ebpf_object`] writes a few lines
//! of BPF assembly and assembles them with LLVM's `llvm-mc` (from
//! `$LLVM_MC`, `/usr/lib/llvm-22/bin/llvm-mc`, or `llvm-mc` on `PATH`):
//! both `tg_tap_ingress` and `tg_uplink_ingress` read through `r2`, a
//! register that is not initialised at program entry, which the verifier
//! reports as `R2 !read_ok`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::child::{check_output, run_with_timeout};

/// Assembly of the invalid object.
pub const INVALID_PROGRAM_ASM: &str = r#"
    .text
    .section classifier,"ax",@progbits
    .globl tg_tap_ingress
    .p2align 3
    .type tg_tap_ingress,@function
tg_tap_ingress:
    r0 = *(u64 *)(r2 + 0)
    exit
.Ltap_end:
    .size tg_tap_ingress, .Ltap_end-tg_tap_ingress

    .globl tg_uplink_ingress
    .p2align 3
    .type tg_uplink_ingress,@function
tg_uplink_ingress:
    r0 = *(u64 *)(r2 + 0)
    exit
.Luplink_end:
    .size tg_uplink_ingress, .Luplink_end-tg_uplink_ingress

    .section license,"aw",@progbits
    .globl _license
    .type _license,@object
_license:
    .asciz "GPL"
    .size _license, 4
"#;

/// Finds `llvm-mc`: `$LLVM_MC`, then `/usr/lib/llvm-22/bin/llvm-mc`, then
/// `llvm-mc` on `PATH`.
pub fn llvm_mc() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("LLVM_MC") {
        return Ok(PathBuf::from(path));
    }
    let fixed = Path::new("/usr/lib/llvm-22/bin/llvm-mc");
    if fixed.is_file() {
        return Ok(fixed.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("llvm-mc");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("llvm-mc not found (set LLVM_MC or install LLVM 22)")
}

/// Assembles the invalid eBPF object into `dir` and returns its path.
pub fn invalid_ebpf_object(dir: &Path) -> Result<PathBuf> {
    assemble(dir, "invalid", INVALID_PROGRAM_ASM)
}

/// Assembly of a one-program object whose classifier `NAME` lets every
/// frame continue (`r0 = -1`, i.e. `TC_ACT_UNSPEC`, then `exit`).
pub fn pass_program_asm(name: &str) -> String {
    format!(
        r#"
    .text
    .section classifier,"ax",@progbits
    .globl {name}
    .p2align 3
    .type {name},@function
{name}:
    r0 = -1
    exit
.Lend:
    .size {name}, .Lend-{name}

    .section license,"aw",@progbits
    .globl _license
    .type _license,@object
_license:
    .asciz "GPL"
    .size _license, 4
"#
    )
}

/// Assembles a pass-everything classifier called `name` (see
/// [`pass_program_asm`]) into `dir` and returns the object's path.
pub fn pass_ebpf_object(dir: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        bail!("{name:?} is not a valid program name");
    }
    assemble(dir, name, &pass_program_asm(name))
}

/// Assembles `asm` to `dir/<stem>.o` with llvm-mc.
fn assemble(dir: &Path, stem: &str, asm: &str) -> Result<PathBuf> {
    let source = dir.join(format!("{stem}.s"));
    let object = dir.join(format!("{stem}.o"));
    std::fs::write(&source, asm).with_context(|| format!("cannot write {}", source.display()))?;
    let mc = llvm_mc()?;
    let mut cmd = Command::new(&mc);
    cmd.args(["-triple", "bpfel", "-filetype=obj", "-o"])
        .arg(&object)
        .arg(&source);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30))?;
    check_output(
        &format!("{} (assembling {})", mc.display(), source.display()),
        out,
    )?;
    Ok(object)
}
