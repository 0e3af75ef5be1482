//! The Python wheel's sources agree with the binary: one version everywhere (Cargo.toml, which
//! maturin puts in the wheel; `axsave --version`; the package's fallback constant), and
//! `python -m axsave` runs the binary with the same arguments and exit code. The built wheel
//! itself is tested by scripts/test-wheel.sh.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The lines of one `[section]` of a TOML file, comments and blank lines left out.
fn toml_section<'a>(text: &'a str, section: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| l.trim() != format!("[{section}]"))
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[test]
fn one_version_in_cargo_toml_the_binary_and_the_python_package() {
    // The binary's package takes the workspace's version (so CARGO_PKG_VERSION is it).
    let cargo = repo_file("Cargo.toml");
    assert!(
        toml_section(&cargo, "workspace.package")
            .contains(&format!("version = \"{VERSION}\"").as_str()),
        "Cargo.toml's [workspace.package] version is not {VERSION}"
    );
    assert!(
        toml_section(&cargo, "package").contains(&"version.workspace = true"),
        "the axsave package must take the workspace version"
    );

    let o = axsave(&["--version"]);
    assert_ok(&o);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("axsave {VERSION}\n")
    );

    // maturin reads the version from Cargo.toml only when pyproject.toml declares none.
    let pyproject = repo_file("pyproject.toml");
    let project = toml_section(&pyproject, "project");
    assert!(
        project.contains(&r#"dynamic = ["version"]"#),
        "pyproject.toml: [project] must say dynamic = [\"version\"]"
    );
    assert!(
        !project.iter().any(|l| l.starts_with("version")),
        "pyproject.toml: [project] must not set a version (Cargo.toml's is the wheel's)"
    );
    let maturin = toml_section(&pyproject, "tool.maturin");
    assert!(maturin.contains(&r#"bindings = "bin""#), "{maturin:?}");
    assert!(
        maturin.contains(&r#"python-source = "python""#),
        "{maturin:?}"
    );
    assert!(
        !maturin.iter().any(|l| l.contains("mpi")),
        "the wheel links no MPI: {maturin:?}"
    );

    // The version a source tree reports when the package is not installed.
    let init = repo_file("python/axsave/_version.py");
    assert!(
        init.lines()
            .any(|l| l.trim() == format!("_SOURCE_VERSION = \"{VERSION}\"")),
        "python/axsave/_version.py: _SOURCE_VERSION is not \"{VERSION}\""
    );
}

/// `python3` with the source tree's package on its path and `AXSAVE_BIN` set to the built
/// binary, or None (with the reason printed) where there is no python3.
fn python_m_axsave(args: &[&str]) -> Option<std::process::Output> {
    python_m_axsave_with(&bin(), args)
}

/// `python3 -m axsave ARGS` with `AXSAVE_BIN=axsave_bin`, or None where there is no python3.
fn python_m_axsave_with(axsave_bin: &Path, args: &[&str]) -> Option<std::process::Output> {
    let mut c = Command::new("python3");
    c.args(["-m", "axsave"]).args(args);
    c.env(
        "PYTHONPATH",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("python"),
    );
    c.env("AXSAVE_BIN", axsave_bin);
    clean_env(&mut c);
    match c.output() {
        Ok(o) => Some(o),
        Err(e) => {
            eprintln!("skipping python -m axsave: cannot run python3 ({e})");
            None
        }
    }
}

#[test]
fn python_m_axsave_runs_the_binary_with_its_arguments_and_exit_code() {
    let Some(o) = python_m_axsave(&["--version"]) else {
        return;
    };
    assert_ok(&o);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("axsave {VERSION}\n")
    );

    let o = python_m_axsave(&["--no-such-option"]).unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--no-such-option"), "{}", stderr(&o));

    // Bad input: exit 1, nothing written.
    let tmp = tempfile::tempdir().unwrap();
    let never = tmp.path().join("never");
    let o = python_m_axsave(&[
        "--source",
        s(&tmp.path().join("missing")),
        "--output",
        s(&never),
    ])
    .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_no_output(&never);

    let out = tmp.path().join("final");
    let ckpt = fixture("dcp/fsdp_w2/checkpoint");
    let o = python_m_axsave(&["--source", s(&ckpt), "--output", s(&out), "--quiet"]).unwrap();
    assert_ok(&o);
    assert_eq!(listing(&out), ["model.safetensors"]);
    assert!(
        std::fs::read(out.join("model.safetensors")).unwrap()
            == std::fs::read(fixture("dcp/fsdp_w2/reference.safetensors")).unwrap(),
        "python -m axsave: output differs from the reference"
    );
}

#[test]
fn python_m_axsave_says_which_binary_is_missing() {
    let Some(o) = python_m_axsave_with(Path::new("/nonexistent/axsave"), &["--version"]) else {
        return;
    };
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("AXSAVE_BIN='/nonexistent/axsave' is not an executable file"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}
