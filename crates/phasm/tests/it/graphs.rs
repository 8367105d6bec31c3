//! Snapshots of the DOT and Mermaid drawings of real Fantasm machines, and a check that the
//! SVG drawing marks every kind of state and labels every transition.

use std::path::Path;

use phasm::config::{load_file, LoadOptions};
use phasm::graph::{to_dot, to_mermaid, to_svg};
use phasm::machine::Machine;

fn machine(file: &str, name: &str) -> Machine {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fantasm-yaml")
        .join(file);
    let loaded = load_file(path, &LoadOptions::default()).expect("fixture loads");
    loaded.config.machine(name).expect("machine exists").clone()
}

fn complex() -> Machine {
    machine("test/fsm.yaml", "ComplexMachine")
}

fn diamond() -> Machine {
    machine(
        "test/fantasm_tests/yaml/test-DatastoreFSMContinuationFanInTests.yaml",
        "DatastoreFSMContinuationFanInDiamondTests",
    )
}

#[test]
fn dot_of_complex_machine() {
    insta::assert_snapshot!(to_dot(&complex()));
}

#[test]
fn mermaid_of_complex_machine() {
    insta::assert_snapshot!(to_mermaid(&complex()));
}

#[test]
fn dot_of_diamond_machine() {
    insta::assert_snapshot!(to_dot(&diamond()));
}

#[test]
fn mermaid_of_diamond_machine() {
    insta::assert_snapshot!(to_mermaid(&diamond()));
}

#[test]
fn svg_labels_every_transition_and_styles_each_kind_of_state() {
    let m = complex();
    let svg = to_svg(&m);
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{}",
        &svg[..80.min(svg.len())]
    );
    for state in &m.states {
        assert!(
            svg.contains(&format!(">{}<", state.name)) || svg.contains(&state.name),
            "{}",
            state.name
        );
        for t in &state.transitions {
            assert!(svg.contains(&t.event), "edge label {} missing", t.event);
        }
    }
    assert!(svg.contains("next page"), "continuation loop");
    assert!(svg.contains("fan-in 2s"), "fan-in badge");
    // The loop's label is in its state's box, not on the loop (where it overlapped the curve).
    assert!(
        svg.contains("↻ next page"),
        "the loop is named in the state"
    );
    assert!(!svg.contains(">next page</tspan>"), "no label on the loop");
    // Its own ground and title, and room on the left for loops.
    assert!(svg.contains("<title>ComplexMachine</title>"), "a title");
    assert!(svg.contains("fill=\"#ffffff\"/>"), "a white ground");
    assert!(svg.contains("viewBox=\"-40 0 "), "room for loops");
    // Fills distinguish continuation (blue) and fan-in (amber) states; the initial border is green.
    for colour in ["dbeafe", "fef3c7", "2e7d32"] {
        assert!(
            svg.to_lowercase().contains(colour),
            "colour {colour} missing"
        );
    }
}

#[test]
fn dot_output_parses_as_dot() {
    for m in [complex(), diamond()] {
        let dot = to_dot(&m);
        let mut parser = layout::gv::DotParser::new(&dot);
        assert!(parser.process().is_ok(), "invalid DOT:\n{dot}");
    }
}
