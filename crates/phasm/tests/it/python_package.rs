//! The Python package's own unit tests (`crates/phasm/python/tests`, standard library `unittest`), run
//! with the `python3` the action hosts use.

use std::process::Command;

#[test]
fn the_python_packages_own_tests_pass() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    let out = Command::new("python3")
        .args(["-m", "unittest", "discover", "-s", "tests", "-t", ".", "-v"])
        .current_dir(&root)
        .output()
        .expect("python3 runs");
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    // unittest ends with "OK" after "Ran N tests"; make sure some ran.
    assert!(
        report.contains("Ran ") && !report.contains("Ran 0 tests"),
        "{report}"
    );
}
