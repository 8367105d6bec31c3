//! The table of invalid machine files: each file in `tests/invalid/` starts with one
//! `# expect: [FILE:]LINE:COL: MESSAGE` comment per error it must produce, and must produce
//! exactly those errors (message text contained, position exact) and no others. `FILE` names
//! an imported file (relative to the case) when the error belongs there.

use std::path::{Path, PathBuf};

use phasm::config::{load_file, LoadOptions};

struct Expected {
    file: Option<String>,
    line: usize,
    column: usize,
    message: String,
}

fn expectations(path: &Path) -> Vec<Expected> {
    let text = std::fs::read_to_string(path).expect("case is readable");
    text.lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(|e| {
            let first = e.split(':').next().unwrap_or_default();
            let (file, rest) = if first.parse::<usize>().is_ok() {
                (None, e)
            } else {
                (Some(first.to_string()), &e[first.len() + 1..])
            };
            let mut parts = rest.splitn(3, ':');
            let line = parts.next().and_then(|p| p.trim().parse().ok());
            let column = parts.next().and_then(|p| p.trim().parse().ok());
            let message = parts.next().map(|m| m.trim().to_string());
            match (line, column, message) {
                (Some(line), Some(column), Some(message)) => Expected {
                    file,
                    line,
                    column,
                    message,
                },
                _ => panic!("{}: malformed expectation `{e}`", path.display()),
            }
        })
        .collect()
}

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/invalid exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_invalid_file_reports_exactly_its_expected_errors() {
    let files = cases();
    assert!(files.len() >= 40, "only {} cases", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let expected = expectations(file);
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            file.display()
        );
        let diags = match load_file(file, &LoadOptions::default()) {
            Ok(_) => {
                failures.push(format!("{}: loaded without errors", file.display()));
                continue;
            }
            Err(diags) => diags,
        };
        let errors: Vec<_> = diags.0.iter().filter(|d| d.is_error()).collect();
        let mut unmatched: Vec<_> = errors.clone();
        for e in &expected {
            let found = unmatched.iter().position(|d| {
                let expected_file = match &e.file {
                    Some(f) => Path::new(f).file_name().map(std::borrow::ToOwned::to_owned),
                    None => file.file_name().map(std::borrow::ToOwned::to_owned),
                };
                d.message.contains(&e.message)
                    && d.location.as_ref().is_some_and(|l| {
                        l.line == e.line
                            && l.column == e.column
                            && Path::new(&l.file)
                                .file_name()
                                .map(std::borrow::ToOwned::to_owned)
                                == expected_file
                    })
            });
            match found {
                Some(i) => {
                    unmatched.remove(i);
                }
                None => failures.push(format!(
                    "{}: expected `{}:{}: {}`, got:\n{diags}",
                    file.display(),
                    e.line,
                    e.column,
                    e.message
                )),
            }
        }
        if errors.len() != expected.len() {
            let extra: Vec<String> = unmatched
                .iter()
                .map(std::string::ToString::to_string)
                .collect();
            failures.push(format!(
                "{}: unexpected errors:\n{}",
                file.display(),
                extra.join("\n")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_error_has_a_location_and_a_source_line() {
    for file in cases() {
        if let Err(diags) = load_file(&file, &LoadOptions::default()) {
            for d in &diags.0 {
                let loc = d
                    .location
                    .as_ref()
                    .unwrap_or_else(|| panic!("{}: {d} has no location", file.display()));
                assert!(loc.line >= 1 && loc.column >= 1, "{d}");
                assert!(loc.file.ends_with(".yaml"), "{d}");
            }
        }
    }
}
