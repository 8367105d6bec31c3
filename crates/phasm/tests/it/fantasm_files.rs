//! Fantasm's own machine files (a verbatim copy in `tests/fixtures/fantasm-yaml`) load as they
//! are, and load to the model Fantasm's semantics give them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use phasm::config::{load_file, LoadOptions};
use phasm::machine::{Countdown, FanIn, Logging, RetryPolicy};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fantasm-yaml")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("fixture folder is readable")
        .map(|e| e.expect("fixture entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

#[test]
fn every_fantasm_machine_file_loads_and_the_circular_one_is_rejected() {
    let mut files = Vec::new();
    yaml_files(&fixtures(), &mut files);
    assert!(
        files.len() >= 17,
        "expected the Fantasm corpus, found {files:?}"
    );
    let mut loaded = 0;
    for file in &files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let result = load_file(file, &LoadOptions::default());
        match name {
            // App Engine's queue configuration, not a machine file.
            "queue.yaml" => assert!(result.is_err()),
            "test-YamlImportCircular.yaml" => {
                let err = result.expect_err("a self-import must be rejected");
                assert_eq!(err.error_count(), 1, "{err}");
                let text = err.to_string();
                assert!(text.contains("circular import"), "{text}");
                assert!(text.contains("import chain:"), "{text}");
            }
            _ => {
                let ok = result.unwrap_or_else(|e| panic!("{} must load:\n{e}", file.display()));
                assert!(!ok.config.machines.is_empty(), "{}", file.display());
                let warnings: Vec<String> = ok.warnings.iter().map(ToString::to_string).collect();
                assert!(warnings.is_empty(), "{}: {warnings:?}", file.display());
                loaded += 1;
            }
        }
    }
    assert_eq!(loaded, files.len() - 2);
}

#[test]
fn test_fsm_yaml_imports_its_neighbours_in_place() {
    let loaded = load_file(fixtures().join("test/fsm.yaml"), &LoadOptions::default()).unwrap();
    let names: Vec<&str> = loaded
        .config
        .machines
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "Backup",
            "DeleteBackup",
            "CsvReport",
            "TestDynamicQueue",
            "SimpleMachine",
            "UrlFanoutExample",
            "EmailBatch",
            "ValidateEmailBatch",
            "ComplexMachine",
            "NDBComplexMachine",
            "RetryTest",
        ]
    );
    assert_eq!(loaded.config.root_url.as_deref(), Some("/fantasm/"));
}

#[test]
fn complex_machine_resolves_transition_settings_over_machine_settings() {
    let loaded = load_file(fixtures().join("test/fsm.yaml"), &LoadOptions::default()).unwrap();
    let m = loaded.config.machine("ComplexMachine").unwrap();
    assert_eq!(m.logging, Logging::Persistent);
    assert_eq!(m.namespace.as_deref(), Some("complex_machine"));
    assert_eq!(m.context_types["key"].0, "google.appengine.ext.db.Key");
    let state2 = m.state("state2").unwrap();
    assert!(state2.continuation && state2.is_final);
    let event2 = state2.transition("event2").unwrap();
    assert_eq!(event2.effective.queue, "fan-in");
    assert_eq!(event2.effective.retry.retry_limit, 10);
    assert_eq!(event2.effective.retry.min_backoff, Duration::from_secs(60));
    // Not set anywhere: phasm's default.
    assert_eq!(
        event2.effective.retry.max_doublings,
        RetryPolicy::DEFAULT.max_doublings
    );
    let event1 = m.state("state1").unwrap().transition("event1").unwrap();
    assert_eq!(event1.effective.queue, "default");
    assert_eq!(
        event1.effective.retry.retry_limit, 2,
        "inherited from the machine"
    );
    assert_eq!(
        m.state("state3").unwrap().fan_in,
        Some(FanIn::Window(Duration::from_secs(2)))
    );
    assert_eq!(m.start_policy.retry.retry_limit, 2);
}

#[test]
fn random_countdown_and_targets_are_kept() {
    let path =
        fixtures().join("test/fantasm_tests/yaml/test-TaskQueueFSMRandomCountdownTests.yaml");
    let loaded = load_file(path, &LoadOptions::default()).unwrap();
    let m = &loaded.config.machines[0];
    let t = m
        .state("state-normal")
        .unwrap()
        .transition("next-event")
        .unwrap();
    assert_eq!(
        t.effective.countdown,
        Countdown::Random {
            minimum: Duration::from_secs(30),
            maximum: Duration::from_secs(60)
        }
    );
    assert_eq!(
        t.effective.retry,
        RetryPolicy::DEFAULT,
        "nothing set: phasm's default"
    );

    let path = fixtures().join("test/fantasm_tests/yaml/test-TaskQueueFSMTests.yaml");
    let loaded = load_file(path, &LoadOptions::default()).unwrap();
    let m = loaded.config.machine("TaskQueueFSMTests").unwrap();
    let first = m
        .state("state-initial")
        .unwrap()
        .transition("next-event")
        .unwrap();
    assert_eq!(first.effective.retry.retry_limit, 99, "own setting");
    assert_eq!(
        first.effective.target.as_deref(),
        Some("backend1"),
        "machine's target"
    );
    let second = m
        .state("state-normal")
        .unwrap()
        .transition("next-event")
        .unwrap();
    assert_eq!(second.effective.retry.retry_limit, 10, "machine's setting");
    assert_eq!(
        second.effective.countdown,
        Countdown::Fixed(Duration::from_secs(20))
    );
}

#[test]
fn imports_resolve_from_ancestor_folders_and_diamonds_load_once() {
    // test-YamlImport.yaml names its imports from the application root, two folders up.
    let path = fixtures().join("test/fantasm_tests/yaml/test-YamlImport.yaml");
    let loaded = load_file(path, &LoadOptions::default()).unwrap();
    let names: Vec<&str> = loaded
        .config
        .machines
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(names, ["TypeCoercionTests", "MyMachine", "Foo"]);
    assert_eq!(loaded.config.enable_capabilities_check, Some(false));
    assert_eq!(loaded.config.root_url.as_deref(), Some("/another-root"));
}

#[test]
fn constant_style_events_are_kept_literally() {
    let loaded = load_file(
        fixtures().join("test/test_dynamic_queue.yaml"),
        &LoadOptions::default(),
    )
    .unwrap();
    let m = &loaded.config.machines[0];
    assert!(m
        .state("OnDefaultQueue")
        .unwrap()
        .transition("OK_EVENT")
        .is_some());
}
