//! SVG output, laid out by `layout-rs` (a layered, Graphviz-style layout in pure Rust), so
//! drawing needs no external program.

use layout::backends::svg::SVGWriter;
use layout::core::base::Orientation;
use layout::core::color::Color;
use layout::core::style::{LineStyleKind, StyleAttr};
use layout::std_shapes::render::get_shape_size;
use layout::std_shapes::shapes::{Arrow, Element, LineEndKind, ShapeKind};
use layout::topo::layout::VisualGraph;

use super::{badge, fill, INITIAL_COLOR, NEXT_PAGE};
use crate::machine::Machine;

const FONT_SIZE: usize = 14;
const EDGE_FONT_SIZE: usize = 12;

/// The machine as a standalone SVG document.
pub fn to_svg(machine: &Machine) -> String {
    to_svg_highlighting(machine, &[])
}

/// The machine as SVG, with the named states drawn in the highlight colour (where an
/// instance's branches are now).
pub fn to_svg_highlighting(machine: &Machine, highlight: &[&str]) -> String {
    to_svg_annotated(machine, highlight, &[])
}

/// The machine as SVG, with the named states highlighted and a last line added to the
/// label of each state in `notes` (the console's machine page: how many branches are there).
pub fn to_svg_annotated(machine: &Machine, highlight: &[&str], notes: &[(&str, String)]) -> String {
    let dir = Orientation::TopToBottom;
    let mut graph = VisualGraph::new(dir);

    let start_look = StyleAttr::new(Color::fast("black"), 1, Some(Color::fast("black")), 0, 4);
    let start_shape = ShapeKind::new_circle("");
    let start = graph.add_node(Element::create(
        start_shape.clone(),
        start_look.clone(),
        dir,
        get_shape_size(dir, &start_shape, 4, true),
    ));

    let handles: Vec<_> = machine
        .states
        .iter()
        .map(|state| {
            let mut label = state.name.clone();
            if let Some(b) = badge(state) {
                label.push('\n');
                label.push_str(&b);
            }
            // A loop's label would sit on the loop (the layout draws it over its own curve):
            // the state names its loops instead, and the loop is drawn bare.
            if state.continuation {
                label.push_str(&format!("\n↻ {NEXT_PAGE}"));
            }
            for t in state.transitions.iter().filter(|t| t.to == state.name) {
                label.push_str(&format!("\n↻ {}", t.event));
            }
            for (_, note) in notes.iter().filter(|(s, _)| *s == state.name) {
                label.push('\n');
                label.push_str(note);
            }
            let (border, width) = if state.initial {
                (INITIAL_COLOR, 3)
            } else {
                ("#333333", 1)
            };
            let fill = if highlight.contains(&state.name.as_str()) {
                super::HIGHLIGHT_FILL
            } else {
                fill(state)
            };
            let look = StyleAttr::new(
                Color::fast(border),
                width,
                Some(Color::fast(fill)),
                10,
                FONT_SIZE,
            );
            let shape = ShapeKind::new_box(&label);
            let size = get_shape_size(dir, &shape, FONT_SIZE, false);
            graph.add_node(Element::create(shape, look, dir, size))
        })
        .collect();

    let edge_look = StyleAttr::new(Color::fast("#333333"), 1, None, 0, EDGE_FONT_SIZE);
    let arrow = |text: &str, style: LineStyleKind| {
        Arrow::new(
            LineEndKind::None,
            LineEndKind::Arrow,
            style,
            text,
            &edge_look,
            &None,
            &None,
        )
    };
    if let Some(i) = machine.states.iter().position(|s| s.initial) {
        graph.add_edge(arrow("", LineStyleKind::Normal), start, handles[i]);
    }
    // UML's end marker, one per final state: a final state may still have transitions
    // (Fantasm's "optionally final"), and the marker shows that an instance may end there.
    for (i, state) in machine.states.iter().enumerate() {
        if state.is_final {
            let end_shape = ShapeKind::new_double_circle("");
            let end = graph.add_node(Element::create(
                end_shape.clone(),
                start_look.clone(),
                dir,
                get_shape_size(dir, &end_shape, 4, true),
            ));
            graph.add_edge(arrow("", LineStyleKind::Normal), handles[i], end);
        }
    }
    for (i, state) in machine.states.iter().enumerate() {
        if state.continuation {
            graph.add_edge(arrow("", LineStyleKind::Dashed), handles[i], handles[i]);
        }
        for t in &state.transitions {
            if let Some(j) = machine.states.iter().position(|s| s.name == t.to) {
                let text = if i == j { "" } else { t.event.as_str() };
                graph.add_edge(arrow(text, LineStyleKind::Normal), handles[i], handles[j]);
            }
        }
    }
    let mut writer = SVGWriter::new();
    graph.do_it(false, false, false, &mut writer);
    titled(widened(writer.finalize()), &machine.name)
}

/// Room on the left for loops: the layout draws a state's loop left of its box, past the
/// drawing's edge when that state is the leftmost.
const LOOP_ROOM: f64 = 40.0;

/// The drawing with [`LOOP_ROOM`] more on its left (its `width` and `viewBox` moved), on a
/// white ground of its own so that its dark lines read on a dark page or viewer too; as it
/// was when the size is not where the layout writes it.
fn widened(svg: String) -> String {
    let header = |svg: &str| -> Option<(f64, f64, std::ops::Range<usize>)> {
        let start = svg.find("<svg width=\"")?;
        let end = start + svg[start..].find('>')?;
        let tag = &svg[start..end];
        let number = |after: &str| -> Option<f64> {
            let i = tag.find(after)? + after.len();
            tag[i..].split(['"', ' ']).next()?.parse().ok()
        };
        Some((number("width=\"")?, number("height=\"")?, start..end))
    };
    let Some((width, height, range)) = header(&svg) else {
        return svg;
    };
    let wide = width + LOOP_ROOM;
    format!(
        "{}<svg width=\"{wide}\" height=\"{height}\" viewBox=\"{x} 0 {wide} {height}\" xmlns=\"http://www.w3.org/2000/svg\">\
         <rect x=\"{x}\" width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>{}",
        &svg[..range.start],
        &svg[range.end + 1..],
        x = -LOOP_ROOM,
    )
}

/// The drawing with the machine's name as its title (what viewers and screen readers show).
fn titled(svg: String, name: &str) -> String {
    let Some(open) = svg
        .find("<svg")
        .and_then(|i| svg[i..].find('>').map(|j| i + j + 1))
    else {
        return svg;
    };
    let name: String = name
        .chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            c => c.to_string(),
        })
        .collect();
    format!("{}<title>{name}</title>{}", &svg[..open], &svg[open..])
}
